"""Train the reference classifier (reference/classifier.py) from scratch.

Every step draws a fresh batch from reference.shapes, so the training set is
unbounded. The one augmentation is pixel noise of a random strength per image:
the classifier scores generated images, which are never as clean as renders,
and trained on clean renders alone it misreads colours at noise sigma 0.05.
Fixed seeds and a fixed number of steps: rerunning gives the same weights on
the same machine and thread count. Writes reference/weights/
classifier.safetensors and classifier.json with the accuracy on a held-out set
of fresh images from a seed training never uses, clean and with noise.

    python scripts/train_classifier.py                        # the shipped weights
    python scripts/train_classifier.py --steps 20 --out /tmp/clf   # a smoke run
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from reference import shapes  # noqa: E402
from reference.classifier import FEATURE_DIM, ShapeClassifier, accuracy  # noqa: E402

HELD_OUT_SEED = 1_000_003   # never the training seed: the held-out images are fresh
HELD_OUT_COUNT = 2048
HELD_OUT_NOISE = 0.05


def with_noise(images: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise, sigma uniform in [0, max_sigma] per image."""
    sigma = max_sigma * torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def learning_rate(step: int, steps: int, peak: float) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-noise", type=float, default=0.1, help="largest augmentation noise sigma")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "reference" / "weights")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    started, window = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        images, labels = shapes.batch(args.batch, generator)
        logits = model(with_noise(images, args.max_noise, generator))
        loss = sum(torch.nn.functional.cross_entropy(head_logits, labels[:, index])
                   for index, head_logits in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  loss {sum(window) / len(window):.4f}  {time.time() - started:.0f} s", flush=True)
            window = []
    training_seconds = time.time() - started

    model.eval()
    held_out_generator = torch.Generator().manual_seed(HELD_OUT_SEED)
    held_out_images, held_out_labels = shapes.batch(HELD_OUT_COUNT, held_out_generator)
    noisy_images = (held_out_images + HELD_OUT_NOISE * torch.randn(held_out_images.shape, generator=held_out_generator)
                    ).clamp(0, 1)
    held_out = accuracy(model.predict(held_out_images), held_out_labels)
    held_out_noisy = accuracy(model.predict(noisy_images), held_out_labels)
    for title, scores in (("held-out accuracy", held_out), (f"with noise sigma {HELD_OUT_NOISE}", held_out_noisy)):
        print(f"{title}: " + ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()},
              str(args.out / "classifier.safetensors"))
    report = {"held_out_accuracy": held_out, "held_out_accuracy_with_noise": held_out_noisy,
              "held_out_noise_sigma": HELD_OUT_NOISE, "held_out_seed": HELD_OUT_SEED, "held_out_count": HELD_OUT_COUNT,
              "feature_dim": FEATURE_DIM, "parameters": sum(p.numel() for p in model.parameters()),
              "training": {k: v for k, v in vars(args).items() if k != "out"},
              "training_seconds": round(training_seconds), "torch": torch.__version__}
    (args.out / "classifier.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
