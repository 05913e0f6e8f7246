"""The default model's training recipe and scorer (weights/train.py, weights/score.py)."""
import json
import random

import torch
from safetensors import safe_open

import sdcore
from weights import score, shapes, train


def test_dataset_is_deterministic_and_labelled():
    a, cap_a, lab_a = shapes.sample(3, 17)
    b, cap_b, lab_b = shapes.sample(3, 17)
    assert torch.equal(a, b) and cap_a == cap_b == shapes.caption(*lab_a)
    assert a.shape == (3, 64, 64) and -1 <= a.min() and a.max() <= 1
    assert len(shapes.all_prompts()) == 270 and len(set(shapes.all_prompts())) == 270


def test_classifier_reads_the_drawings_back():
    rng = random.Random(1)
    result = score.score((shapes.draw(*p, rng=rng), p) for p in shapes.all_prompts())
    assert result["n"] == 270 and result["all"] >= 0.97


def test_training_recipe_runs_and_its_loss_goes_down(tmp_path):
    out = tmp_path / "m.safetensors"
    train.main(["--vae-steps", "30", "--vae-batch", "8", "--unet-steps", "40", "--batch", "12", "--pool", "128",
                "--log-every", "1000", "--save-every", "1000", "--work", str(tmp_path / "work"), "--out", str(out)])
    log = torch.load(next((tmp_path / "work").glob("state-*.pt")), weights_only=False)["log"]
    vae = [e["loss"] for e in log if e["stage"] == "vae"]
    unet = [e["loss"] for e in log if e["stage"] == "unet"]
    assert sum(vae[-10:]) / 10 < 0.9 * sum(vae[:10]) / 10
    assert sum(unet[-10:]) / 10 < sum(unet[:10]) / 10
    # the result is an ordinary SD1 single file, loaded by the public loader with its own config
    m = sdcore.load_model(out, device="cpu", dtype=torch.float32)
    assert m.family == "sd1" and m.native_size == 64 and m.tokenizer.pad_id == 49407
    assert m.unet.cfg == train.UNET and m.text_encoder.cfg == train.TEXT
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sdcore.training"])["unet_steps"] == 40
    assert abs(m.vae.cfg.scale_factor - json.loads(meta["sdcore.config"])["vae"]["scale_factor"]) < 1e-6
