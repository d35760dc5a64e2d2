"""Draw the pack's icon (docs/icon.png, the Comfy Registry's `Icon`).

A grid of tokens, most of them dim (reused from the cache) and a few bright
(recomputed this step), with speed streaks trailing off to the left. Drawn at
4x and scaled down, so edges are smooth; nothing random, so rerunning gives
the same picture.

    python scripts/make_icon.py                  # writes docs/icon.png
    python scripts/make_icon.py --out /tmp/icon.png --size 256
"""
import argparse
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "icon.png"

BACKGROUND = (20, 26, 46)
CACHED = (58, 84, 118)
COMPUTED = (255, 184, 48)
STREAK = (96, 186, 214)
GRID = 4
# (row, column) of the tokens a conservative step recomputes
COMPUTED_TOKENS = {(0, 2), (1, 0), (2, 3), (3, 1)}
SUPERSAMPLE = 4


def draw_icon(size=400):
    s = size * SUPERSAMPLE
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 6, fill=BACKGROUND)

    cell = s * 0.125
    gap = s * 0.03
    grid = GRID * cell + (GRID - 1) * gap
    left = s * 0.9 - grid
    top = (s - grid) / 2
    for row in range(GRID):
        y0 = top + row * (cell + gap)
        # speed streaks: three lines of falling length and brightness per row
        for k, (length, alpha) in enumerate(((0.19, 255), (0.13, 170), (0.08, 100))):
            thickness = cell * 0.12
            y = y0 + cell * (0.28 + 0.22 * k)
            x1 = left - gap * 1.2
            x0 = x1 - s * length * (1 - 0.25 * (row % 2))
            colour = STREAK + (alpha,)
            draw.rounded_rectangle((x0, y - thickness / 2, x1, y + thickness / 2), radius=thickness / 2, fill=colour)
        for column in range(GRID):
            x0 = left + column * (cell + gap)
            fill = COMPUTED if (row, column) in COMPUTED_TOKENS else CACHED
            draw.rounded_rectangle((x0, y0, x0 + cell, y0 + cell), radius=cell * 0.22, fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--size", type=int, default=400)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_icon(args.size).save(args.out, optimize=True)
    print(f"make_icon: {args.out} ({args.size}x{args.size})")


if __name__ == "__main__":
    main()
