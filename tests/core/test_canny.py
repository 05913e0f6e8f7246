"""The torch Canny preprocessor: closed-form cases (where a step edge must and must not be found,
given the documented blur and thresholds) and agreement with OpenCV's Canny."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdcore.canny import HIGH, LOW, canny, hysteresis

# A vertical step of height h (0..255) after the 5×5 σ=1.4 blur: the Sobel response at the pixel
# next to it is 4·h·(g(0) + g(1)), g the normalised 1-D Gaussian. So a step is an edge on its own
# above HIGH / PEAK ≈ 92 and can continue one above LOW / PEAK ≈ 46.
_g = [math.exp(-r * r / (2 * 1.4 ** 2)) for r in range(-2, 3)]
PEAK = 4 * (_g[2] + _g[3]) / sum(_g)


def _gray(values: np.ndarray) -> torch.Tensor:
    """[H, W] in 0..255 -> the RGB [1, 3, H, W] in [0, 1] that canny takes."""
    return torch.from_numpy(values).float().div(255).expand(1, 3, *values.shape).clone()


def _dilate(mask):
    return F.max_pool2d(mask.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0


def test_filled_square_edges_lie_exactly_on_its_border():
    img = np.full((48, 56), 30.0)
    img[12:36, 10:44] = 230.0
    out = canny(_gray(img))
    assert out.shape == (1, 3, 48, 56) and set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 0], out[0, 2])
    edges = out[0, 0].bool()
    inside = torch.zeros(48, 56, dtype=torch.bool)
    inside[12:36, 10:44] = True
    border = (inside & ~(~_dilate(~inside))) | (_dilate(inside) & ~inside)    # the pixels either side of it
    assert not (edges & ~border).any()                                       # nothing inside, nothing outside
    # one pixel per side, not two: of the two equal pixels either side of a step the first (top /
    # left) one, as OpenCV's tie rule. (Checked 3+ pixels from the corners, where blur + Sobel reach.)
    for y in range(15, 33):
        assert edges[y].nonzero().flatten().tolist() == [9, 43]
    for x in range(13, 41):
        assert edges[:, x].nonzero().flatten().tolist() == [11, 35]


def test_thresholds_and_hysteresis_in_closed_form():
    def square(h, left=None):
        img = np.full((40, 48), 60.0)
        img[10:30, 8:40] = 60.0 + h
        if left is not None:                  # the left half of the square at another contrast
            img[10:30, 8:24] = 60.0 + left
        return canny(_gray(img))[0, 0].bool()
    assert LOW / PEAK < 50 and HIGH / PEAK > 88
    assert square(120).sum() == 2 * (20 + 32) - 4                     # > HIGH: the whole outline by itself
    assert not square(40).any()                                       # < LOW: never
    assert not square(75).any()                                       # between: only when connected ...
    mixed = square(75, left=120)                                      # ... as here, to the strong half
    assert mixed[10:30, 38:41].any(dim=1).all() and mixed[29:32, 26:38].any(dim=0).all()
    # hysteresis on its own: 8-connected growth through weak pixels, isolated weak runs dropped
    strong = torch.zeros(1, 1, 6, 9, dtype=torch.bool)
    weak = torch.zeros_like(strong)
    strong[0, 0, 1, 1] = True
    for y, x in [(1, 2), (2, 3), (3, 4), (3, 5), (5, 8), (5, 7)]:    # a diagonal chain, and a far-off pair
        weak[0, 0, y, x] = True
    kept = hysteresis(strong, weak)[0, 0]
    assert kept.nonzero().tolist() == [[1, 1], [1, 2], [2, 3], [3, 4], [3, 5]]


def _scene(w, h, seed):
    """Shapes of random colours on a background with a smooth ramp (no edges) and sensor noise."""
    from PIL import Image, ImageDraw
    g = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (40, 60, 90))
    d = ImageDraw.Draw(img)
    for i in range(14):
        x0, y0 = int(g.integers(0, w - 20)), int(g.integers(0, h - 20))
        x1, y1 = x0 + int(g.integers(10, 90)), y0 + int(g.integers(10, 70))
        fill = tuple(int(c) for c in g.integers(0, 256, 3))
        if i % 3 == 0:
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif i % 3 == 1:
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([(x0, y0), (x1, y0 + 5), (x0 + 15, y1)], fill=fill)
    d.line([(0, h - 1), (w - 1, 0)], fill=(250, 250, 250), width=3)
    arr = np.asarray(img).astype(np.float32) + np.linspace(0, 60, w, dtype=np.float32)[None, :, None]
    arr += g.normal(0, 4, arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("seed, size", [(0, (256, 192)), (1, (200, 200))])
def test_agrees_with_opencv_canny(seed, size):
    cv2 = pytest.importorskip("cv2")
    rgb = _scene(*size, seed)
    ours = canny(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0, 0].bool()
    blurred = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (5, 5), 1.4)
    ref = torch.from_numpy(cv2.Canny(blurred, LOW, HIGH, L2gradient=True) > 0)
    assert ref.sum() > 500                                            # the scene has plenty of edges
    ours_near_ref = (ours & _dilate(ref)).sum() / ours.sum()
    ref_near_ours = (ref & _dilate(ours)).sum() / ref.sum()
    assert ours_near_ref >= 0.95 and ref_near_ours >= 0.95, (ours_near_ref, ref_near_ours)
