"""Write the shipped reference model as a diffusers FluxTransformer2DModel
(config.json + safetensors weights, save_pretrained), converted exactly from
reference/weights/shapes_dit.safetensors (reference/diffusers_model.py).

    python scripts/convert_reference_to_diffusers.py --out DIR
then FluxTransformer2DModel.from_pretrained(DIR); its inputs: reference/diffusers_model.py predict().
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from pack_loader import import_pack  # noqa: E402

import_pack(comfy=False)
from dit_token_cache.reference.diffusers_model import load_reference_transformer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    load_reference_transformer().save_pretrained(str(args.out), safe_serialization=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
