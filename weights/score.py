"""Scores how well a model follows the shapes prompts: generates an image per prompt and reads the
background colour, the shape's colour, its position and its kind back from the pixels.

    python -m weights.score [--model weights/shapes-sd1.safetensors] [--stride 1] [--steps 20 --cfg 5]
    python -m weights.score --stride 0 --grid docs/default-model-grid.png      # only the README's picture

The classifier is plain geometry, checked first on the data set's own drawings (the "drawn" row).
"""
import argparse
import random
import time

import torch

from weights import shapes

PALETTE = torch.tensor(list(shapes.COLOURS.values()), dtype=torch.float32)
NAMES = list(shapes.COLOURS)


def nearest_colour(rgb: torch.Tensor) -> str:
    return NAMES[int(((PALETTE - rgb) ** 2).sum(1).argmin())]


def classify(img) -> dict:
    """RGB PIL image -> {"background", "colour", "position", "shape"} (None where nothing is found)."""
    x = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).float()
    h, w = x.shape[:2]
    border = torch.cat([x[:3].reshape(-1, 3), x[-3:].reshape(-1, 3), x[:, :3].reshape(-1, 3), x[:, -3:].reshape(-1, 3)])
    bg = border.median(0).values
    fg = ((x - bg) ** 2).sum(-1).sqrt() > 90                   # far from the background colour
    out = {"background": nearest_colour(bg), "colour": None, "position": None, "shape": None}
    if fg.sum() < 12:
        return out
    ys, xs = torch.nonzero(fg, as_tuple=True)
    out["colour"] = nearest_colour(x[fg].median(0).values)
    cx, cy = xs.float().mean() / w, ys.float().mean() / h
    out["position"] = "on the left" if cx < 0.375 else "on the right" if cx > 0.625 else "in the centre"
    # area over the squared 95th-percentile radius: drawn circles 3.25–3.41, squares 2.66–2.95, triangles 1.92–2.12
    r = ((xs.float() - cx * w) ** 2 + (ys.float() - cy * h) ** 2).sqrt().quantile(0.95)
    compact = fg.sum().item() / max(r.item() ** 2, 1e-6)
    out["shape"] = "circle" if compact > 3.1 else "square" if compact > 2.4 else "triangle"
    return out


def score(images_and_labels) -> dict:
    hits = {"colour + background": 0, "shape": 0, "position": 0, "all": 0}
    n = 0
    for img, (shape, colour, background, position) in images_and_labels:
        c = classify(img)
        ok_colour = c["colour"] == colour and c["background"] == background
        hits["colour + background"] += ok_colour
        hits["shape"] += c["shape"] == shape
        hits["position"] += c["position"] == position
        hits["all"] += ok_colour and c["shape"] == shape and c["position"] == position
        n += 1
    return {k: v / max(n, 1) for k, v in hits.items()} | {"n": n}


def generated(model_path, prompts, steps, cfg, seed, sampler="euler"):
    import sdcore
    from sdcore.pipeline import GenerationParams, generate
    model = sdcore.load_model(model_path, device="cpu", dtype=torch.float32)
    for i, labels in enumerate(prompts):
        p = GenerationParams(shapes.caption(*labels), width=64, height=64, steps=steps, cfg_scale=cfg,
                             seed=seed + i, sample_method=sampler)
        yield generate(model, p)[0].image, labels


GRID_PROMPTS = [("circle", "red", "blue", "in the centre"), ("square", "yellow", "black", "on the left"),
                ("triangle", "white", "green", "on the right"), ("circle", "blue", "yellow", "on the left"),
                ("square", "green", "white", "in the centre"), ("triangle", "black", "red", "in the centre"),
                ("circle", "white", "black", "on the right"), ("triangle", "yellow", "blue", "on the left")]


def grid(model_path, path, steps, cfg, seeds=(100, 101), scale=2):
    """The README's picture: GRID_PROMPTS across, one row per seed (the first cell is the README's
    curl request), each image enlarged ``scale``× without smoothing."""
    from PIL import Image
    import sdcore
    from sdcore.pipeline import GenerationParams, generate
    model = sdcore.load_model(model_path, device="cpu", dtype=torch.float32)
    size = 64 * scale
    out = Image.new("RGB", (size * len(GRID_PROMPTS), size * len(seeds)), "white")
    for row, seed in enumerate(seeds):
        for col, labels in enumerate(GRID_PROMPTS):
            p = GenerationParams(shapes.caption(*labels), width=64, height=64, steps=steps, cfg_scale=cfg,
                                 seed=seed, sample_method="euler")
            img = generate(model, p)[0].image.resize((size, size), Image.Resampling.NEAREST)
            out.paste(img, (col * size, row * size))
    out.save(path, optimize=True)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weights/shapes-sd1.safetensors")
    ap.add_argument("--stride", type=int, default=1, help="score every k-th of the 270 prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--grid", help="also write the README's grid PNG here")
    args = ap.parse_args(argv)
    if args.grid:
        grid(args.model, args.grid, args.steps, args.cfg)
    if args.stride == 0:
        return None
    prompts = shapes.all_prompts()[::args.stride]
    rng = random.Random(0)
    drawn = score((shapes.draw(*p, rng=rng), p) for p in prompts)
    t = time.time()
    gen = score(generated(args.model, prompts, args.steps, args.cfg, args.seed))
    print("| images | n | colour + background | shape | position | all |\n|---|---|---|---|---|---|")
    for name, s in (("drawn (classifier check)", drawn), (f"generated ({args.steps} euler steps, cfg {args.cfg})", gen)):
        print(f"| {name} | {s['n']} | {s['colour + background']:.0%} | {s['shape']:.0%} | {s['position']:.0%} | {s['all']:.0%} |")
    print(f"({time.time() - t:.0f} s)")
    return gen


if __name__ == "__main__":
    main()
