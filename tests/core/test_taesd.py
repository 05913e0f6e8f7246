"""TAESD (sdcore.taesd) against diffusers' AutoencoderTiny on the same random weights, read from both the
released decoder file's layout and diffusers' (folder and file); 4 and 16 latent channels."""
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from bench.references import max_rel
from sdcore.formats.files import CheckpointError
from sdcore.formats.taesd import load_taesd
from sdcore.taesd import decode


def _reference(channels: int, seed: int) -> AutoencoderTiny:
    torch.manual_seed(seed)
    ref = AutoencoderTiny(latent_channels=channels).eval()
    with torch.no_grad():
        for p in ref.parameters():           # diffusers' init leaves images flat: give every layer a say
            p.copy_(torch.randn_like(p) * (1.5 / p[0].numel()) ** 0.5)
    return ref


@pytest.mark.parametrize("channels", [4, 16])
def test_decoder_equals_diffusers_autoencoder_tiny_in_both_layouts(channels, tmp_path):
    ref = _reference(channels, seed=channels)
    decoder_sd = {k: v for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    released = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in decoder_sd.items()}
    save_file(released, str(tmp_path / "taesd_decoder.safetensors"))
    ref.save_pretrained(tmp_path / "folder")
    save_file(decoder_sd, str(tmp_path / "diffusers-file.safetensors"))
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, channels, 16, 12, generator=g) * 2
    with torch.no_grad():
        want = ref.decode(latent).sample
    assert want.std() > 0.05
    for path in ("taesd_decoder.safetensors", "folder", "diffusers-file.safetensors"):
        ours = load_taesd(tmp_path / path, "cpu", torch.float32)
        with torch.no_grad():
            got = decode(ours, latent)
        assert got.shape == (2, 3, 128, 96)
        assert max_rel(got, want.clamp(-1, 1)) < 1e-5, path


def test_other_files_are_refused(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a TAESD decoder"):
        load_taesd(tmp_path / "x.safetensors", "cpu", torch.float32)
