"""README's "Reproducing an image": the recipe below, run as written on a PNG the server returned,
draws that image again pixel for pixel. It loads the model the plain way (``sdcore.load_model(path)``:
the server's own device and dtype choice) and replays the PNG's ``parameters`` chunk."""
import base64
import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sdcore
from sdcore import device
from weights import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The recipe as README.md gives it, run in a folder holding out.png and the repository's weights/.
RECIPE = re.search(r"## Reproducing an image\n.*?```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(),
                   re.S).group(1)
BF16_CPU = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("served", ["default", "tiny", "default-bf16"])
def test_readme_recipe_redraws_a_served_image_bit_for_bit(served, tmp_path, monkeypatch, default_model_path):
    from app import create_app
    # default: no model named, as a newcomer starts the server; tiny: the generated test model;
    # default-bf16: on a CPU that computes bf16 natively (its flags stand in), where server and recipe pick bf16
    if served.endswith("bf16"):
        (tmp_path / "cpuinfo").write_text(BF16_CPU)
        monkeypatch.setattr(device, "CPUINFO", str(tmp_path / "cpuinfo"))
    config = {"data_dir": str(tmp_path / "data"), "api_key": None, "weights_cache": str(tmp_path / "cache")}
    if served == "tiny":
        config["models"] = [default_model_path]
    client = create_app(config).test_client()
    r = client.post("/v1/images/generations", json={
        "prompt": shapes.caption("circle", "red", "blue", "in the centre"), "negative_prompt": "green",
        "n": 2, "size": "64x64", "steps": 6, "cfg_scale": 5.0, "sample_method": "euler_a", "seed": 1234,
        "response_format": "b64_json"})
    assert r.status_code == 200, r.get_data(as_text=True)
    served_png = base64.b64decode(r.get_json()["data"][1]["b64_json"])     # image 1: seed 1235, its own draws

    (tmp_path / "out.png").write_bytes(served_png)
    os.symlink(os.path.join(ROOT, "weights"), tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(RECIPE, scope)

    assert scope["info"]["seed"] == 1235
    if served.endswith("bf16"):
        assert scope["model"].dtype == torch.bfloat16
    redrawn, original = _pixels(scope["png"]), _pixels(served_png)
    assert original.std() > 5                                           # a picture, not a constant
    assert redrawn.shape == original.shape and np.array_equal(redrawn, original)


@pytest.mark.parametrize("flags, want", [("fpu avx2 avx512f", "float32"), ("fpu avx512f avx512_bf16", "bfloat16"),
                                         ("fpu amx_tile amx_bf16", "bfloat16")])
def test_the_plain_load_follows_the_servers_device_and_dtype_policy(flags, want, tmp_path, monkeypatch,
                                                                    default_model_path):
    """``load_model(path)`` picks device and dtype by sdcore.device's rule (the CPU's bf16 flags here);
    named and torch dtypes are kept."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(device, "CPUINFO", str(info))
    assert device.resolve_dtype("auto", "cpu") == getattr(torch, want)
    assert device.resolve_dtype("float16", "cpu") == device.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        device.resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        assert device.resolve_device("auto") == "cpu"
        assert sdcore.load_model(default_model_path).dtype == getattr(torch, want)
