"""Write the tiny synthetic multiple-choice set: coloured shapes on plain backgrounds.

    python tests/data/mc_synthetic/make_synthetic.py      # rewrites images/*.png and data.jsonl here

Each item asks for the shape's colour or its kind, with lettered options; the images are
small PNGs of varied (odd) sizes so that any-resolution tiling sees several aspect ratios.
Deterministic: the same files come out on every run.
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = [(48, 40), (40, 56), (33, 33), (64, 30)]


def draw(shape: str, colour: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", size, tuple(rng.randrange(200, 256) for _ in range(3)))
    w, h = size
    s = min(w, h) * 3 // 5
    x0, y0 = rng.randrange(0, w - s + 1), rng.randrange(0, h - s + 1)
    box, fill = (x0, y0, x0 + s - 1, y0 + s - 1), COLOURS[colour]
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + s // 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    return img


def main(n: int = 8, seed: int = 0) -> None:
    here = Path(__file__).parent
    rng = random.Random(seed)
    (here / "images").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"images/{i:02d}.png"
        draw(shape, colour, SIZES[i % len(SIZES)], rng).save(here / name)
        if i % 2 == 0:
            question, options, right = "What colour is the shape?", rng.sample(list(COLOURS), 3), colour
            if right not in options:
                options[rng.randrange(3)] = right
        else:
            question, options, right = "Which shape is shown?", list(SHAPES), shape
            rng.shuffle(options)
        answer = "ABC"[options.index(right)]
        lines.append({"id": f"syn{i:02d}", "image": name, "question": question, "options": options, "answer": answer})
    (here / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
