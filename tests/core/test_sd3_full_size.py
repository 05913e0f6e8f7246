"""SD3 at its real sizes: a full-size SD3 medium transformer in Stability AI's single-file names (random weights,
fp16, no config inside, 4.1 GB) and its diffusers transformer/ folder twin (converted by diffusers' own
single-file converter) load through the path a user's files take, read alike, and agree with diffusers'
SD3Transformer2DModel; SD3.5 large and medium at their full widths (q/k norms, MMDiT-X) with three blocks; and
T5-XXL at its full width with two layers, as a t5xxl_fp16.safetensors, against transformers' T5EncoderModel.
The SD3 medium pair is built once and cached under .cache/. One network sits in memory at a time: ours is run
and freed before diffusers' (or transformers') is loaded, and the folder is compared with the file tensor by
tensor, straight from disk."""
import gc
import json
import os
from dataclasses import replace

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from bench.references import max_rel
from bench.util import (SD3_MEDIUM_DIFFUSERS, random_float16, random_mmdit_float16, save_sd3_transformer, sd3_medium_config,
                        sd3_medium_transformer)
from sdcore.formats.build import build
from sdcore.formats.checkpoints import MMDIT, read_t5, read_transformer
from sdcore.mmdit import MMDiT
from sdcore.t5 import T5Config, T5Encoder

pytestmark = pytest.mark.slow
SD3_MEDIUM_PARAMS = 2_028_328_000       # the "2B": diffusers' parameters, without the positions table (a buffer there)
SD3_MEDIUM_TENSORS = 2_084_951_104      # and with it: the numbers the file holds
# SD3.5's widths and positions tables with 3 blocks where they have 38 and 24 (the first two MMDiT-X blocks of
# medium's 13): (our configuration, diffusers' config.json)
SD35 = {
    "sd3.5-large": (replace(sd3_medium_config(), depth=3, width=2432, qk_norm=True),
                    dict(SD3_MEDIUM_DIFFUSERS, num_layers=3, num_attention_heads=38, caption_projection_dim=2432,
                         qk_norm="rms_norm")),
    "sd3.5-medium": (replace(sd3_medium_config(), depth=3, pos_embed_max_size=384, qk_norm=True, dual_attention_layers=(0, 1)),
                     dict(SD3_MEDIUM_DIFFUSERS, num_layers=3, pos_embed_max_size=384, qk_norm="rms_norm",
                          dual_attention_layers=(0, 1))),
}
# T5-XXL v1.1's encoder (google/t5-v1_1-xxl, SD3's text_encoders/t5xxl_fp16.safetensors) with 2 of its 24 layers
T5XXL = T5Config(vocab=32128, width=4096, d_kv=64, heads=64, d_ff=10240, layers=2)


def _inputs(seed=0):
    """A 256-pixel latent (16×16 patches, the centre of the positions table) shared by a guided pair: two
    timesteps, two 333-token contexts (77 CLIP + 256 T5 tokens, as the pipeline joins them), two pooled vectors."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 32, 32, generator=g), torch.tensor([999.0, 250.5]),
            torch.randn(2, 333, 4096, generator=g), torch.randn(2, 2048, generator=g))


def _ours(path, cfg, inputs) -> torch.Tensor:
    """Our MMDiT read from ``path`` (read_transformer, build in float32) on ``inputs``; freed before returning."""
    part = read_transformer(str(path), MMDIT)
    assert part.cfg == cfg, part.cfg
    model = build(MMDiT, part.cfg, part.tensors, "cpu", torch.float32, "MMDiT", part.source)
    del part
    with torch.no_grad():
        out = model(*inputs)
    del model
    gc.collect()
    return out


def _diffusers(folder, inputs) -> torch.Tensor:
    """diffusers' SD3Transformer2DModel loaded from its transformer/ folder in float32, on the repeated latent."""
    ref = SD3Transformer2DModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    x, t, ctx, y = inputs
    with torch.no_grad():
        out = ref(hidden_states=x.repeat(len(t), 1, 1, 1), encoder_hidden_states=ctx, pooled_projections=y,
                  timestep=t).sample
    del ref
    gc.collect()
    return out


def _equal_to_diffusers(path, folder, cfg):
    inputs = _inputs()
    got = _ours(path, cfg, inputs)
    want = _diffusers(folder, inputs)
    assert got.shape == want.shape == (2, 16, 32, 32)
    assert want.std() > 0.1 and max_rel(want[0], want[1]) > 0.1      # O(1), and the timestep and text tell
    err = max_rel(got, want)
    print(f"{os.path.basename(path)}: max relative error {err:.2e}")
    assert err <= 1e-4


@pytest.fixture(scope="module")
def sd3_medium():
    return sd3_medium_transformer()


def test_sd3_medium_has_diffusers_parameter_count(sd3_medium):
    """Our MMDiT at SD3 medium's configuration, diffusers' at its config.json and the file all hold the same
    numbers: 2.03B parameters and the 192² × 1536 positions table (a parameter here, a saved buffer there)."""
    with torch.device("meta"):
        ours, theirs = MMDiT(sd3_medium_config()), SD3Transformer2DModel(**SD3_MEDIUM_DIFFUSERS)
    assert sum(p.numel() for p in theirs.parameters()) == SD3_MEDIUM_PARAMS
    assert sum(p.numel() for n, p in ours.named_parameters() if n != "pos_embed") == SD3_MEDIUM_PARAMS
    assert sum(p.numel() for p in ours.parameters()) == sum(v.numel() for v in theirs.state_dict().values()) \
        == SD3_MEDIUM_TENSORS
    part = read_transformer(str(sd3_medium[0]), MMDIT)
    assert sum(torch.Size(part.tensors.shape(k)).numel() for k in part.tensors.keys()) == SD3_MEDIUM_TENSORS
    assert part.tensors.shape("pos_embed") == (1, 192 * 192, 1536)
    assert part.tensors.get("joint_blocks.0.x_block.attn.qkv.weight").dtype == torch.float16
    config = json.loads((sd3_medium[1] / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert {k: config[k] for k in SD3_MEDIUM_DIFFUSERS} == SD3_MEDIUM_DIFFUSERS


def test_sd3_medium_file_and_folder_read_alike(sd3_medium):
    """The single file (configuration read off its shapes) and the diffusers folder (its config.json, its names
    converted by our loader: q, k, v fused, the last modulations' halves swapped) give the same configuration and,
    tensor by tensor, the same weights."""
    a, b = read_transformer(str(sd3_medium[0]), MMDIT), read_transformer(str(sd3_medium[1]), MMDIT)
    assert a.cfg == b.cfg == sd3_medium_config()
    assert (a.cfg.depth, a.cfg.width, a.cfg.heads, a.cfg.pos_embed_max_size) == (24, 1536, 24, 192)
    assert set(a.tensors.keys()) == set(b.tensors.keys())
    for key in a.tensors.keys():
        assert torch.equal(a.tensors.get(key), b.tensors.get(key)), key


def test_sd3_medium_equals_diffusers(sd3_medium):
    _equal_to_diffusers(*sd3_medium, sd3_medium_config())


@pytest.mark.parametrize("name", list(SD35))
def test_sd35_at_full_width_equals_diffusers(tmp_path, name):
    """SD3.5 large's 2432 width (38 heads) and medium's MMDiT-X blocks and 384² positions, each with q/k RMS norms,
    through both loaders: the folder's config.json gives the configuration the file's shapes give."""
    cfg, config = SD35[name]
    path, folder = tmp_path / f"{name}.safetensors", tmp_path / "transformer"
    save_sd3_transformer(random_mmdit_float16(cfg, 22), path, folder, **config)
    gc.collect()
    assert read_transformer(str(folder), MMDIT).cfg == cfg
    _equal_to_diffusers(path, folder, cfg)


def _random_t5_float16(cfg, seed) -> T5Encoder:
    """random_float16's weights, made to act as a trained T5's do: O(1) token vectors, q smaller by √d_kv (T5
    does not divide q·k by it, its q is initialised and trained that much smaller: else the attention is one-hot),
    a position bias of O(1) (else it would not show)."""
    model = random_float16(T5Encoder, cfg, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.shared.weight.mul_(cfg.width ** 0.5)
        for block in model.encoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(cfg.d_kv ** -0.5)
        bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        bias.copy_(torch.randn(bias.shape, generator=g))
    return model


def test_t5xxl_at_full_width_equals_transformers(tmp_path):
    """A t5xxl_fp16.safetensors (transformers' names, float16, the token table once as shared.weight) read by
    read_t5 and built in float32, against transformers' T5EncoderModel loading the same file, on 256 tokens."""
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in _random_t5_float16(T5XXL, 31).state_dict().items()}, str(path))
    gc.collect()
    ids = torch.randint(0, T5XXL.vocab, (1, 256), generator=torch.Generator().manual_seed(3))
    part = read_t5(str(path))
    assert part.cfg == T5XXL, part.cfg
    model = build(T5Encoder, part.cfg, part.tensors, "cpu", torch.float32, "T5", part.source)
    del part
    with torch.no_grad():
        got = model(ids)
    del model
    gc.collect()
    folder = tmp_path / "text_encoder_3"                # transformers' folder: its config.json beside the same file
    HFT5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, tie_word_embeddings=False).save_pretrained(folder)
    os.symlink(path, folder / "model.safetensors")
    ref, info = T5EncoderModel.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        want = ref.eval()(input_ids=ids).last_hidden_state
    assert got.shape == want.shape == (1, 256, 4096)
    assert want.std() > 0.1
    err = max_rel(got, want)
    print(f"t5xxl: max relative error {err:.2e}")
    assert err <= 1e-4
