"""The procedural captioned dataset the default model is trained on: one coloured shape on a plain
background, "a red circle on a blue background, on the left". Sample i is a pure function of
(seed, i), so the data set is infinite, needs no storage and is the same on every machine."""
import math
import random

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 215, 30),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"on the left": 0.25, "in the centre": 0.5, "on the right": 0.75}
SIZE, SUPERSAMPLE = 64, 4


def caption(shape, colour, background, position):
    return f"a {colour} {shape} on a {background} background, {position}"


def all_prompts():
    """Every (shape, colour, background, position) combination: 3 × 30 × 3 = 270."""
    return [(s, c, b, p) for s in SHAPES for c in COLOURS for b in COLOURS if b != c for p in POSITIONS]


def draw(shape, colour, background, position, rng: random.Random | None = None) -> Image.Image:
    """Drawn at 4× and downsampled, so edges are anti-aliased like a photo's."""
    rng = rng or random.Random(0)
    n = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (n, n), COLOURS[background])
    d = ImageDraw.Draw(img)
    r = n * rng.uniform(0.14, 0.2)
    cx = n * (POSITIONS[position] + rng.uniform(-0.04, 0.04))
    cy = n * (0.5 + rng.uniform(-0.06, 0.06))
    angle = rng.uniform(-0.3, 0.3)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    else:
        k = 4 if shape == "square" else 3
        rr = r * (1.2 if shape == "square" else 1.35)       # similar areas for all three shapes
        start = angle + (math.pi / 4 if shape == "square" else -math.pi / 2)
        angles = [start + 2 * math.pi * j / k for j in range(k)]
        pts = [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a in angles]
        d.polygon(pts, fill=COLOURS[colour])
    return img.resize((SIZE, SIZE), Image.Resampling.BOX)


def sample(seed: int, index: int):
    """-> (image [3, 64, 64] in [-1, 1], caption, labels)."""
    rng = random.Random(seed * 1_000_003 + index)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    position = rng.choice(list(POSITIONS))
    img = draw(shape, colour, background, position, rng)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3).permute(2, 0, 1).float() / 127.5 - 1
    return x, caption(shape, colour, background, position), (shape, colour, background, position)


def batch(seed: int, start: int, size: int):
    items = [sample(seed, i) for i in range(start, start + size)]
    return torch.stack([x for x, _, _ in items]), [c for _, c, _ in items]
