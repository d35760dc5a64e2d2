"""Train a TokenCache predictor outside ComfyUI's server: the same training as
the TokenCacheTrainPredictor node (nodes/predictor_training.py), on ComfyUI's
real sampling path.

    # the predictor shipped for the reference model (a couple of minutes on 2 cores)
    python scripts/train_predictor.py
    # any Flux-family diffusion model file, with class-free random conditioning of its text width
    python scripts/train_predictor.py --model path/to/flux.safetensors --width 1024 --height 1024 --out my.safetensors

    # the other two predictors shipped for the reference model
    python scripts/train_predictor.py --architecture mlp_mixer --out reference/weights/token_cache/shapes_reference_mlp_mixer.safetensors
    python scripts/train_predictor.py --architecture mlp_mixer --objective first_order \
        --out reference/weights/token_cache/shapes_reference_mlp_mixer_first_order.safetensors

With --model, the conditioning is a fixed random text embedding (no text
encoder is loaded here); the node is the way to train on real prompts.
"""
import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "harness"))
import tiny_models  # noqa: E402

tiny_models.ensure_comfy()

import comfy.sd  # noqa: E402

from pack_loader import import_pack  # noqa: E402

pack = import_pack()
from dit_token_cache.accel_core.predictor_file import save_predictor  # noqa: E402
from dit_token_cache.nodes.predictor_training import (ARCHITECTURES, OBJECTIVES, TrainingSettings,  # noqa: E402
                                                       train_predictor)
from reference import codec, shapes  # noqa: E402
from reference.model import MODEL_FILE, PREDICTOR_FILE, conditioning  # noqa: E402


def reference_inputs(batch: int, seed: int):
    """Class conditioning for `batch` random classes and an empty latent."""
    labels = shapes.random_labels(batch, torch.Generator().manual_seed(seed))
    positive, negative = conditioning(labels)
    side = shapes.IMAGE_SIZE // codec.DOWNSCALE
    return positive, negative, {"samples": torch.zeros(batch, codec.LATENT_CHANNELS, side, side)}


def random_text_inputs(model, width: int, height: int, seed: int):
    context = model.model.model_config.unet_config.get("context_in_dim", 4096)
    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, context, generator=generator), {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]
    negative = [[torch.zeros(1, 77, context), {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]
    channels = model.model.latent_format.latent_channels
    return positive, negative, {"samples": torch.zeros(1, channels, height // 8, width // 8)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Flux-family diffusion model file (default: the reference model)")
    parser.add_argument("--out", type=Path, default=PREDICTOR_FILE)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--cost-weight", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=16, help="reference model: classes per trajectory")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="first_block")
    parser.add_argument("--objective", choices=OBJECTIVES, default="chained")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.model is None:
        model = comfy.sd.load_diffusion_model(str(MODEL_FILE))
        positive, negative, latent = reference_inputs(args.batch, args.seed)
    else:
        model = comfy.sd.load_diffusion_model(str(args.model))
        positive, negative, latent = random_text_inputs(model, args.width, args.height, args.seed)
    settings = TrainingSettings(seed=args.seed, steps=args.steps, cfg=args.cfg, iterations=args.iterations,
                                learning_rate=args.learning_rate, cost_weight=args.cost_weight,
                                architecture=args.architecture, objective=args.objective)

    def progress(done, total, loss):
        if done == total or done % max(1, total // 20) == 0:
            print(f"iteration {done:5d}/{total}  loss {loss:.4f}", flush=True)

    predictor, metadata = train_predictor(model, positive, negative, latent, settings, progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(str(args.out), predictor, metadata)
    training = metadata["training"]
    print(f"wrote {args.out}: loss {training['first_loss']:.4f} -> {training['final_loss']:.4f} "
          f"over {training['trajectories']} trajectories")


if __name__ == "__main__":
    main()
