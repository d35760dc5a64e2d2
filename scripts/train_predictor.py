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

    # LoRA refinement of the last 2 blocks for the shipped predictor (its weights and calibration kept)
    python scripts/train_predictor.py --from-predictor reference/weights/token_cache/shapes_reference_predictor.safetensors \
        --lora-rank 8 --batch 64 --out reference/weights/token_cache/shapes_reference_predictor_lora.safetensors

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
from dit_token_cache.accel_core.predictor_file import load_predictor, save_predictor  # noqa: E402
from dit_token_cache.nodes.families import adapter_for  # noqa: E402
from dit_token_cache.nodes.predictor_training import (ARCHITECTURES, OBJECTIVES, TrainingSettings,  # noqa: E402
                                                       predictor_expectations, refine, train_with_refinement)
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
    parser.add_argument("--from-predictor", type=Path,
                        help="keep this predictor file's predictor and calibration; train only the LoRA (--lora-rank)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA refinement of the protected last blocks (0: none)")
    parser.add_argument("--cache-ratio", type=float, default=0.9, help="TokenCache setting the LoRA is trained under")
    parser.add_argument("--i-steps", type=int, default=4, help="TokenCache setting the LoRA is trained under")
    parser.add_argument("--protected-last-blocks", type=int, default=2,
                        help="blocks that get the LoRA (the reference model's benchmarks protect 2 of 8)")
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
                                architecture=args.architecture, objective=args.objective, lora_rank=args.lora_rank,
                                cache_ratio=args.cache_ratio, i_steps=args.i_steps,
                                protected_last_blocks=args.protected_last_blocks)

    def progress(done, total, loss):
        if done == total or done % max(1, total // 20) == 0:
            print(f"iteration {done:5d}/{total}  loss {loss:.4f}", flush=True)

    if args.from_predictor:
        if not args.lora_rank:
            parser.error("--from-predictor trains the LoRA only: give --lora-rank")
        adapter = adapter_for(model)
        predictor, metadata = load_predictor(str(args.from_predictor), expect=predictor_expectations(adapter),
                                             first_block=adapter.predictor_parts)
        metadata = {key: value for key, value in metadata.items() if key not in ("format", "format_version", "predictor")}
        lora = refine(model, predictor, metadata, positive, negative, latent, settings, progress)
    else:
        predictor, metadata, lora = train_with_refinement(model, positive, negative, latent, settings, progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(str(args.out), predictor, metadata, lora)
    training = metadata["training"]
    print(f"wrote {args.out}: loss {training['first_loss']:.4f} -> {training['final_loss']:.4f} "
          f"over {training['trajectories']} trajectories")
    if lora is not None:
        print(f"LoRA rank {args.lora_rank} on blocks {list(lora.spec.blocks)}: loss {training['lora']['first_loss']:.4f} "
              f"-> {training['lora']['final_loss']:.4f} over {training['lora']['trajectories']} trajectories")


if __name__ == "__main__":
    main()
