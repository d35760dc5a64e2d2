"""Train the project's reference model from scratch on this CPU.

A small Flux-architecture DiT (ComfyUI's own comfy.ldm.flux.model.Flux class,
no guidance embedding, so ComfyUI detects it as Flux schnell-style: flow
matching, shift 1.0) learns to draw the procedural shapes of
reference/shapes.py from a 3-token label conditioning, with the
rectified-flow objective that ComfyUI's sampling for that family assumes:
x_t = (1 - t) x_0 + t eps, the model predicts v = eps - x_0 at timestep t
(ComfyUI's ModelSamplingFlux passes sigma = t as the timestep, CONST
denoising takes x_t - t v).

Fixed seed, fixed number of steps: rerunning gives the same weights on the
same machine. Writes reference/weights/: the model (safetensors, fp16),
the label encoder, config.json and the training curve (CSV and PNG).

    python scripts/train_reference.py                 # the shipped model (55 min on 2 shared cores)
    python scripts/train_reference.py --steps 50 --out /tmp/ref   # a smoke run
"""
import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "harness"))
import tiny_models  # noqa: E402

tiny_models.ensure_comfy()
from comfy.cli_args import args as comfy_args  # noqa: E402

comfy_args.use_pytorch_cross_attention = True   # SDPA: the fastest attention with a backward on CPU

import comfy.model_management  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pack_loader import import_pack  # noqa: E402
from reference import codec, shapes  # noqa: E402
from reference.conditioning import CONTEXT_DIM, LabelEncoder  # noqa: E402

MODEL_CONFIG = dict(in_channels=codec.LATENT_CHANNELS, out_channels=codec.LATENT_CHANNELS, vec_in_dim=None,
                    context_in_dim=CONTEXT_DIM, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2,
                    depth_single_blocks=6, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                    guidance_embed=False, txt_ids_dims=[])
WEIGHTS = REPO / "reference" / "weights"


def out_of_place_blocks(model) -> dict:
    """ComfyUI's blocks add to their inputs in place, which autograd cannot
    differentiate; train through the pack's out-of-place versions of the same
    blocks (built from the same submodules, bit-identical forward)."""
    flux = import_pack().nodes.adapters.flux_blocks
    patches = {}
    for i, block in enumerate(model.double_blocks):
        def double(args, extra, block=block):
            img, txt, _ = flux.double_block_forward(block, args)
            return {"img": img, "txt": txt}
        patches[("double_block", i)] = double
    for i, block in enumerate(model.single_blocks):
        def single(args, extra, block=block):
            return {"img": flux.single_block_forward(block, args)[0]}
        patches[("single_block", i)] = single
    return {"patches_replace": {"dit": patches}}


def flow_matching_loss(model, encoder, images, labels, generator, drop_labels, options):
    x0 = codec.to_model_space(images)
    n = x0.shape[0]
    # logit-normal timesteps (more weight mid-trajectory), as rectified-flow DiTs are trained
    t = torch.sigmoid(torch.randn(n, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    xt = (1 - t.view(n, 1, 1, 1)) * x0 + t.view(n, 1, 1, 1) * noise
    dropped = torch.rand(n, generator=generator) < drop_labels
    labels = torch.where(dropped.view(n, 1), encoder.null_labels(n), labels)
    prediction = model(xt, t, encoder(labels), transformer_options=options)
    return torch.nn.functional.mse_loss(prediction, noise - x0)


def learning_rate(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def save(out: Path, model, encoder, config: dict):
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(out / "shapes_dit.safetensors"), metadata={"dit_token_cache_reference": json.dumps(config)})
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(out / "labels.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def plot_curve(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], label="loss (mean over log interval)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--drop-labels", type=float, default=0.1, help="share of samples trained unconditionally (for CFG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    comfy.model_management.in_training = True   # plain-torch RoPE, which has a backward
    generator = torch.Generator().manual_seed(args.seed)
    model = Flux(**MODEL_CONFIG, operations=torch.nn)
    encoder = LabelEncoder()
    ema_model, ema_encoder = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(encoder).requires_grad_(False)
    parameters = list(model.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    options = out_of_place_blocks(model)

    rows, window, started = [], [], time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        images, labels = shapes.batch(args.batch, generator)
        loss = flow_matching_loss(model, encoder, images, labels, generator, args.drop_labels, options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            for live, ema in ((model, ema_model), (encoder, ema_encoder)):
                for p, q in zip(live.parameters(), ema.parameters()):
                    q.lerp_(p, 1 - args.ema)
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rows.append({"step": step + 1, "loss": sum(window) / len(window), "seconds": round(time.time() - started, 1)})
            window = []
            print(f"step {rows[-1]['step']:6d}  loss {rows[-1]['loss']:.4f}  {rows[-1]['seconds']:.0f} s", flush=True)

    config = {"model": MODEL_CONFIG, "image_size": shapes.IMAGE_SIZE, "attributes": shapes.ATTRIBUTES,
              "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
              "seconds": round(time.time() - started), "torch": torch.__version__}
    save(args.out, ema_model, ema_encoder, config)
    with open(args.out / "training_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    plot_curve(rows, args.out / "training_curve.png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
