"""The shipped reference model's files, and turning class labels into the
conditioning ComfyUI's samplers take. Plain torch; loading the DiT itself
goes through ComfyUI (comfy.sd.load_diffusion_model) in the caller."""
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conditioning import LabelEncoder
from .shapes import ATTRIBUTES

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_FILE = WEIGHTS / "shapes_dit.safetensors"
LABELS_FILE = WEIGHTS / "labels.safetensors"
PREDICTOR_DIR = WEIGHTS / "token_cache"     # the TokenCache predictor trained for the reference model
PREDICTOR_FILE = PREDICTOR_DIR / "shapes_reference_predictor.safetensors"
ANY = "any"   # an attribute left unspecified


@lru_cache(maxsize=1)
def label_encoder() -> LabelEncoder:
    encoder = LabelEncoder()
    encoder.load_state_dict(load_file(str(LABELS_FILE)))
    return encoder.eval().requires_grad_(False)


def label_indices(shape: str, colour: str, position: str) -> torch.Tensor:
    """[1, 3] label indices; ANY maps to the 'unspecified' row of its table."""
    chosen = {"shape": shape, "colour": colour, "position": position}
    indices = []
    for name, values in ATTRIBUTES.items():
        value = chosen[name]
        if value != ANY and value not in values:
            raise ValueError(f"{name}={value!r}: accepted {', '.join(values)} or {ANY}")
        indices.append(len(values) if value == ANY else values.index(value))
    return torch.tensor([indices])


def conditioning(labels: torch.Tensor):
    """(positive, negative) ComfyUI conditioning for labels [N, 3]. Row i
    conditions image i of an N-image latent batch (ComfyUI keeps a cond batch
    that matches the latent batch); the negative is the unconditional prompt."""
    encoder = label_encoder()
    with torch.no_grad():
        positive = [[encoder(labels), {}]]
        negative = [[encoder(encoder.null_labels(labels.shape[0])), {}]]
    return positive, negative
