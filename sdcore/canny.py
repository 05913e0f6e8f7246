"""Canny edge detection in torch: turns a photo sent as ``control_image`` into the edge map that canny
ControlNets were trained on (``apply_canny_preprocessor``), on whatever device the model runs.

The steps and thresholds (the documented behaviour of ``apply_canny_preprocessor``):
  1. luma of the RGB image (ITU-R 601 weights, as OpenCV's RGB2GRAY), rounded to 8-bit levels 0..255;
  2. Gaussian blur, 5×5, σ = 1.4 (borders reflected), so noise and JPEG blocks do not make edges,
     rounded to 8-bit levels again: from here on everything is integer arithmetic (exact in float32),
     so the two equal gradients either side of a symmetric step compare equal, not by rounding noise;
  3. Sobel 3×3 gradients (borders replicated), magnitude sqrt(gx² + gy²) (compared squared);
  4. non-maximum suppression across the gradient direction, quantised to 0°/45°/90°/135°,
     ties broken as OpenCV does so a symmetric edge stays one pixel wide;
  5. hysteresis: pixels with magnitude > HIGH are edges, and so are pixels > LOW that are
     8-connected to an edge through other pixels > LOW.
LOW = 100 and HIGH = 200 are the defaults of the ControlNet authors' canny annotator
(``cv2.Canny(img, 100, 200)``); on the blurred image they keep edges of roughly ≥ 45/255 contrast
when connected to one of ≥ 90/255. Same result as ``cv2.Canny(GaussianBlur(gray, (5, 5), 1.4), 100,
200, L2gradient=True)`` up to rounding.
"""
import math

import torch
import torch.nn.functional as F

LOW, HIGH = 100.0, 200.0
BLUR_SIZE, BLUR_SIGMA = 5, 1.4
LUMA = (0.299, 0.587, 0.114)
TAN_22_5, TAN_67_5 = math.tan(math.pi / 8), math.tan(3 * math.pi / 8)


def canny(image: torch.Tensor, low: float = LOW, high: float = HIGH) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1] -> edge map [B, 3, H, W]: 1 on edges, 0 elsewhere (white on black)."""
    x = image.float()
    gray = ((x * torch.tensor(LUMA, device=x.device)[:, None, None]).sum(1, keepdim=True) * 255).round()
    blurred = _filter(gray, _gaussian(BLUR_SIZE, BLUR_SIGMA, x.device), "reflect").round()
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    gx, gy = _filter(blurred, sobel, "replicate"), _filter(blurred, sobel.T, "replicate")   # gy > 0: brighter below
    thin = non_max_suppression(gx * gx + gy * gy, gx, gy)        # squared magnitude: < 2^24, exact
    edges = hysteresis(thin > high ** 2, thin > low ** 2)
    return edges.to(image.dtype).expand(-1, 3, -1, -1)


def non_max_suppression(mag, gx, gy):
    """Keep a pixel only where it is a maximum along its gradient; others become 0."""
    padded = F.pad(mag, (1, 1, 1, 1))                        # beyond the border: no edge
    h, w = mag.shape[-2:]
    at = lambda dy, dx: padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    ax, ay = gx.abs(), gy.abs()
    # '>' on one side, '>=' on the other: of two equal neighbours across an edge exactly one survives.
    along_x = (mag > at(0, -1)) & (mag >= at(0, 1))
    along_y = (mag > at(-1, 0)) & (mag >= at(1, 0))
    down_right = (mag > at(-1, -1)) & (mag > at(1, 1))      # gx, gy of the same sign
    down_left = (mag > at(-1, 1)) & (mag > at(1, -1))
    diagonal = torch.where(gx * gy < 0, down_left, down_right)
    keep = torch.where(ay < ax * TAN_22_5, along_x, torch.where(ay > ax * TAN_67_5, along_y, diagonal))
    return mag * keep


def hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Grow ``strong`` (bool) into the 8-connected ``weak`` pixels it touches, until nothing changes."""
    weak = weak | strong
    edges = strong
    while True:
        grown = edges
        for _ in range(8):                                   # a few steps between (synchronising) checks
            grown = weak & (F.max_pool2d(grown.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _gaussian(size, sigma, device):
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _filter(x, kernel, border):
    k = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (k, k, k, k), mode=border), kernel[None, None])
