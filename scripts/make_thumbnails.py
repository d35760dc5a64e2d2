"""Draw the template-browser thumbnails of the shipped workflows: a
same-named .jpg beside each file in workflows/, which ComfyUI's template
browser shows for a custom node pack's example workflows.

The three reference-model workflows show what that model draws, cut from the
demo's picture (docs/demo_side_by_side.png: its DuCa row). The real-model
workflows cannot be run where this pack is built, so theirs is a title card
(model, method, the node chain), never a picture claimed to come from that
model.

    python scripts/make_thumbnails.py     # writes workflows/*.jpg
"""
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
DEMO = REPO / "docs" / "demo_side_by_side.png"
SIZE = 512
BACKGROUND = (20, 26, 46)
ACCENT = (255, 184, 48)
TEXT = (230, 236, 245)
DIM = (140, 160, 190)

TITLES = {   # workflow -> (model, what it shows)
    "shapes_reference_duca": ("Reference model", "DuCa Cache, no downloads"),
    "shapes_reference_tokencache": ("Reference model", "TokenCache, no downloads"),
    "shapes_reference_train_predictor": ("Reference model", "Train a predictor, no downloads"),
    "flux_dev_t2i_duca": ("Flux.1-dev", "text to image, DuCa"),
    "flux_dev_t2i_toca": ("Flux.1-dev", "text to image, ToCa mode"),
    "flux_schnell_t2i_duca": ("Flux.1-schnell", "text to image, DuCa"),
    "pixart_sigma_t2i_duca": ("PixArt-Sigma", "text to image, DuCa"),
    "qwen_image_t2i_duca": ("Qwen-Image", "text to image, DuCa"),
    "sd35_t2i_duca": ("SD3.5 Large", "text to image, DuCa"),
    "wan21_t2v_duca": ("Wan 2.1 14B", "text to video, DuCa, fp8 cache"),
    "wan21_i2v_duca": ("Wan 2.1 14B", "image to video, DuCa, fp8 cache"),
    "wan21_t2v_tokencache": ("Wan 2.1 14B", "text to video, TokenCache, fp8 cache"),
}


def _font(size):
    for name in ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _chain(workflow: dict) -> str:
    """The node chain from the model loader to the sampler, by node type."""
    order = ("UNETLoader", "TokenCacheShapesModel", "DuCaCache", "TokenCache", "TokenCacheTrainPredictor",
             "KSampler")
    present = {node["type"] for node in workflow["nodes"]}
    names = {"UNETLoader": "Load model", "TokenCacheShapesModel": "Reference model", "DuCaCache": "DuCa Cache",
             "TokenCache": "TokenCache", "TokenCacheTrainPredictor": "Train predictor", "KSampler": "KSampler"}
    return "  >  ".join(names[t] for t in order if t in present)


def _picture() -> Image.Image:
    """Twelve of the demo's DuCa images (its lower row of 128-pixel tiles), 4 x 3."""
    demo = Image.open(DEMO).convert("RGB")
    tile = 128
    row = demo.crop((0, demo.height - tile, demo.width, demo.height))
    grid = Image.new("RGB", (4 * tile, 3 * tile), BACKGROUND)
    for k in range(12):
        grid.paste(row.crop((k * tile, 0, (k + 1) * tile, tile)), ((k % 4) * tile, (k // 4) * tile))
    return grid


def draw(name: str, workflow: dict) -> Image.Image:
    model, what = TITLES[name]
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw_ = ImageDraw.Draw(image)
    top = 14
    if name.startswith("shapes_reference"):
        picture = _picture()
        image.paste(picture, (0, SIZE - picture.height))
    else:
        # a token grid, most cached (dim), a few recomputed (bright): the pack's icon motif
        for row in range(6):
            for col in range(6):
                colour = ACCENT if (row * 5 + col * 3) % 7 == 0 else (58, 84, 118)
                x, y = 96 + col * 56, 190 + row * 48
                draw_.rounded_rectangle((x, y, x + 44, y + 36), radius=6, fill=colour)
    draw_.text((24, top), model, font=_font(40), fill=TEXT)
    draw_.text((24, top + 52), what, font=_font(24), fill=ACCENT)
    draw_.text((24, top + 88), _chain(workflow), font=_font(17), fill=DIM)
    return image


def main():
    for path in sorted(WORKFLOWS.glob("*.json")):
        image = draw(path.stem, json.loads(path.read_text()))
        image.save(path.with_suffix(".jpg"), quality=88)
        print(f"wrote {path.with_suffix('.jpg').relative_to(REPO)}")


if __name__ == "__main__":
    main()
