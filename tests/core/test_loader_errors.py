"""Bad checkpoint files give one clear line each (CheckpointError), never a bare traceback."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdcore
from sdcore import CheckpointError


def _err(path, **kw):
    with pytest.raises(CheckpointError) as e:
        sdcore.load_model(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "no such file or folder" in _err(tmp_path / "nope.safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "a.safetensors").write_text("hello, I am a text file pretending")
    assert "is not a checkpoint" in _err(tmp_path / "a.safetensors")
    (tmp_path / "b.ckpt").write_bytes(os.urandom(4096))
    assert "is not a checkpoint" in _err(tmp_path / "b.ckpt")
    (tmp_path / "c.safetensors").write_bytes(b"")
    assert "is not a checkpoint" in _err(tmp_path / "c.safetensors")
    os.mkdir(tmp_path / "folder")
    assert "not a diffusers pipeline" in _err(tmp_path / "folder")


def test_truncated_file(tmp_path, default_model_path):
    data = open(default_model_path, "rb").read()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    msg = _err(tmp_path / "t.safetensors")
    assert "is truncated" in msg and "download it again" in msg


def test_missing_tensors_are_named(tmp_path, default_model_path):
    sd = load_file(default_model_path)
    gone = [k for k in sd if k.startswith("model.diffusion_model.output_blocks.11.")]
    save_file({k: v for k, v in sd.items() if k not in gone}, str(tmp_path / "m.safetensors"))
    msg = _err(tmp_path / "m.safetensors")
    assert f"lacks {len(gone)} UNet tensors" in msg and "output_blocks.11." in msg


@pytest.mark.parametrize("keys, words", [
    ({"conditioner.embedders.0.model.token_embedding.weight": [4, 4],            # a refiner, mostly missing
      "model.diffusion_model.input_blocks.0.0.weight": [4, 4]}, "do not make up a whole network"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": [4, 4]}, "do not make up a whole network"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [4, 4]}, "do not make up a whole network"),
    ({"control_model.input_hint_block.0.weight": [4, 4]}, "is a ControlNet"),
    ({"encoder.down.0.block.0.conv1.weight": [4, 4]}, "holds only a VAE"),
    ({"some.other.weight": [4, 4]}, "is not a Stable Diffusion checkpoint"),
])
def test_unsupported_families(tmp_path, keys, words):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(tmp_path / "x.safetensors"))
    assert words in _err(tmp_path / "x.safetensors")


def test_bad_options(default_model_path, tmp_path):
    assert "prediction must be" in _err(default_model_path, prediction="x0")
    assert "no such VAE file" in _err(default_model_path, vae=str(tmp_path / "missing-vae.safetensors"))
