"""The project's reference model: a small Flux-architecture DiT trained on procedurally drawn shapes, its data, latent codec, label conditioning and the classifier that scores it."""
