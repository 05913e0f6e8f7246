"""Adapters (sdcore.lora, sdcore.formats.lora) against diffusers and the formulas.

The files are random, written by bench.lora_files in the layouts trainers write: kohya/A1111 (LoRA and
LoCon over convolutions), diffusers/PEFT, older diffusers; LoHa and LoKr in LyCORIS' names. Reference:
diffusers' own loader (``load_lora_weights``, which converts kohya files itself, then ``fuse_lora``, and its
unfused run-time layers) on a diffusers UNet and transformers text encoders holding the same weights;
LoHa/LoKr: the weight change computed here from LyCORIS' definition.
"""
import copy
import hashlib
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

import sdcore
from bench import references as refs
from bench.lora_files import write_lora
from sdcore.formats import layouts
from sdcore.formats.write import random_init_, save_single_file
from sdcore.lora import LoraError, apply_loras, find_lora, remove_loras
from sdcore.model import StableDiffusion
from sdcore.unet import UNet, UNetConfig, timestep_embedding
from sdcore.vae import AutoencoderKL
from sdcore.clip import TextConfig, TextEncoder
from tests.tiny_models import SD2_TEXT, SD2_UNET, SD2_VAE, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE

TOL = 1e-4
MULTIPLIER = 0.7


@pytest.fixture(scope="module")
def sd1(default_model_path):
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2-lora") / "sd2-shaped.safetensors"
    save_single_file(path, random_init_(UNet(SD2_UNET), 1), random_init_(AutoencoderKL(SD2_VAE), 2, gain=0.5),
                     random_init_(TextEncoder(SD2_TEXT), 3), family="sd2", prediction="v", with_config=False)
    return sdcore.load_model(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-lora") / "sdxl-shaped.safetensors"
    save_single_file(path, random_init_(UNet(SDXL_UNET), 1), random_init_(AutoencoderKL(SDXL_VAE), 2, gain=0.5),
                     random_init_(TextEncoder(SDXL_TEXT), 3), family="sdxl",
                     text_2=random_init_(TextEncoder(SDXL_TEXT_2), 4), with_config=False)
    return sdcore.load_model(path, device="cpu", dtype=torch.float32)


class DiffusersLoras(StableDiffusionLoraLoaderMixin):
    """diffusers' LoRA loading and fusing, on its UNet and transformers' text encoder (nothing else of a pipeline)."""
    hf_device_map = None

    def __init__(self, model):
        self.unet = refs.diffusers_unet_from_ours(copy.deepcopy(model.unet))    # its own tensors
        self.text_encoder = refs.transformers_text_from_ours(model.text_encoder)

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


class DiffusersXLLoras(StableDiffusionXLLoraLoaderMixin):
    hf_device_map = None

    def __init__(self, model):
        self.unet = refs.diffusers_unet_from_ours(copy.deepcopy(model.unet))    # its own tensors
        self.text_encoder = refs.transformers_text_from_ours(model.text_encoder)
        self.text_encoder_2 = refs.transformers_text_from_ours(model.text_encoder_2)

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


def _inputs(model):
    """A noisy latent, two timesteps, a context, token ids; SDXL: pooled output and the six size numbers."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 400.0])
    ctx = torch.randn(2, 77, model.unet.cfg.context_dim, generator=g) * 0.5
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 20:] = 49406, 49407
    extra = None
    if model.unet.cfg.adm_in_channels:
        pooled = torch.randn(2, model.text_encoder_2.cfg.projection_dim, generator=g)
        extra = (pooled, torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2))
    return x, t, ctx, ids, extra


def _ours(model):
    x, t, ctx, ids, extra = _inputs(model)
    with torch.inference_mode():
        if extra is None:
            unet = model.unet(x, t, ctx)
        else:
            sizes = timestep_embedding(extra[1].flatten(), 256).reshape(2, -1)
            unet = model.unet(x, t, ctx, y=torch.cat([extra[0], sizes], dim=-1))
        out = {"unet": unet, "text": model.text_encoder(ids, output_layer=-1)}
        if model.text_encoder_2 is not None:
            out["text_2"] = model.text_encoder_2(ids, output_layer=-1)
    return out


def _theirs(model, ref):
    x, t, ctx, ids, extra = _inputs(model)
    with torch.inference_mode():
        kw = {} if extra is None else {"added_cond_kwargs": {"text_embeds": extra[0], "time_ids": extra[1]}}
        out = {"unet": ref.unet(x, t, ctx, **kw).sample}
        for name, ours in (("text", model.text_encoder), ("text_2", model.text_encoder_2)):
            if ours is not None:                # the last block's output, through the final norm where ours has it
                h = getattr(ref, name.replace("text", "text_encoder"))(ids, output_hidden_states=True)
                out[name] = h.last_hidden_state if ours.cfg.final_norm else h.hidden_states[-1]
    return out


def _close(ours, theirs, what):
    for k in theirs:
        err = refs.max_rel(ours[k], theirs[k])
        assert err < TOL, f"{what} {k}: {err}"


def _changed(before, after, what):
    for k in before:
        assert refs.max_rel(before[k], after[k]) > 1e-3, f"{what}: the adapter did not change {k}"


# (family, layout, LoCon): older diffusers files exist for SD1 only (diffusers reads no SDXL ones);
# "kohya-diffusers-names": an SDXL file whose lora_unet_ keys follow diffusers' paths, as LCM-LoRA SDXL's do
CASES = [(family, layout, conv) for family in ("sd1", "sdxl")
         for layout, conv in (("kohya", False), ("kohya", True), ("peft", False), ("diffusers_old", False))
         if not (family == "sdxl" and layout == "diffusers_old")] + [("sdxl", "kohya-diffusers-names", True)] + [
    ("sd2", "kohya", True), ("sd2", "peft", False)]


@pytest.mark.parametrize("family,layout,convolutions", CASES,
                         ids=[f"{f}-{lay}{'-locon' if c else ''}" for f, lay, c in CASES])
def test_merged_adapter_equals_diffusers_fused_and_run_time(family, layout, convolutions, sd1, sd2, sdxl, tmp_path):
    model = {"sd1": sd1, "sd2": sd2, "sdxl": sdxl}[family]
    path = tmp_path / "adapter.safetensors"
    ldm = False if layout == "kohya-diffusers-names" else None
    write_lora(path, model, layout=layout.split("-")[0], convolutions=convolutions, seed=11, sdxl_ldm_names=ldm)
    ref = (DiffusersXLLoras if family == "sdxl" else DiffusersLoras)(model)
    plain = _theirs(model, ref)
    _close(_ours(model), plain, "without adapters")
    ref.load_lora_weights(_as_peft(path) if layout == "diffusers_old" else str(path), adapter_name="a")
    run_time = _theirs(model, ref)                 # diffusers' unfused layers, multiplier 1
    ref.fuse_lora(components=list(ref.components), lora_scale=MULTIPLIER)
    ref.unload_lora_weights()                      # the fused weights stay, the run-time layers go
    fused = _theirs(model, ref)
    try:
        files = apply_loras(model, [(str(path), 1.0)])
        ours_1 = _ours(model)
        apply_loras(model, [(str(path), MULTIPLIER)])
        ours = _ours(model)
    finally:
        remove_loras(model)
    assert len(files[0].patches) > 0
    _changed(plain, fused, "diffusers")
    _close(ours, fused, "vs fused")
    _close(ours_1, run_time, "vs run time")
    _close(_ours(model), plain, "after removing")


def _as_peft(path) -> dict:
    """An older diffusers file's tensors under PEFT's names (diffusers reads those files no longer)."""
    renames = [(r"\.processor\.(to_[qkv])_lora\.", r".\1."), (r"\.processor\.to_out_lora\.", ".to_out.0."),
               (r"\.(lora|lora_linear_layer)\.up\.weight$", ".lora_B.weight"),
               (r"\.(lora|lora_linear_layer)\.down\.weight$", ".lora_A.weight")]
    out = {}
    for key, value in load_file(path).items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _reference_delta(factors: dict, kind: str, shape) -> torch.Tensor:
    """LyCORIS' definitions: LoHa (w1a w1b) ⊙ (w2a w2b) · alpha / rank; LoKr w1 ⊗ (w2a w2b) · alpha / rank."""
    if kind == "loha":
        w1 = factors["hada_w1_a"] @ factors["hada_w1_b"]
        w2 = factors["hada_w2_a"] @ factors["hada_w2_b"]
        return (w1 * w2 * (factors["alpha"] / factors["hada_w1_b"].shape[0])).reshape(shape)
    w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    a, b = factors["lokr_w1"].shape
    c, d = w2.shape
    kron = (factors["lokr_w1"][:, None, :, None] * w2[None, :, None, :]).reshape(a * c, b * d)
    return (kron * (factors["alpha"] / factors["lokr_w2_b"].shape[0])).reshape(shape)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loha_and_lokr_merge_by_their_formulas(family, kind, sd1, sdxl, tmp_path):
    model = sd1 if family == "sd1" else sdxl
    path = tmp_path / f"{kind}.safetensors"
    written = write_lora(path, model, kind=kind, seed=5)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    their_names = {v: k for k, v in layouts.unet_name_map(before.keys(), model.unet.cfg).items()}
    try:
        apply_loras(model, [(str(path), MULTIPLIER)])
        after, text_after = model.unet.state_dict(), model.text_encoder.state_dict()
        checked = 0
        for (network, module), factors in written.items():
            if network == "unet":
                ours = their_names[module + ".weight"]
                want = before[ours] + MULTIPLIER * _reference_delta(factors, kind, before[ours].shape)
                got = after[ours]
            elif network == "text" and module.endswith("mlp.fc1"):
                n = module.split(".")[3]
                key = f"transformer.resblocks.{n}.mlp.c_fc.weight"
                want = text_before[key] + MULTIPLIER * _reference_delta(factors, kind, text_before[key].shape)
                got = text_after[key]
            else:
                continue
            assert refs.max_abs(got, want) < 1e-5 * max(1.0, want.abs().max().item()), module
            checked += 1
        assert checked > 10
    finally:
        remove_loras(model)


def test_remove_restores_every_weight_bit_for_bit_after_30_rounds(sd1, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(a, sd1, convolutions=True, seed=1)
    write_lora(b, sd1, layout="peft", seed=2)
    original = ({k: v.clone() for k, v in sd1.unet.state_dict().items()}
                | {"te." + k: v.clone() for k, v in sd1.text_encoder.state_dict().items()})
    sets = [[(str(a), 1.0)], [(str(b), 0.5)], [(str(a), 0.3), (str(b), -1.0)]]
    for i in range(30):
        apply_loras(sd1, sets[i % 3])
    remove_loras(sd1)
    now = sd1.unet.state_dict() | {"te." + k: v for k, v in sd1.text_encoder.state_dict().items()}
    assert all(torch.equal(now[k], v) for k, v in original.items())


def test_the_same_set_is_not_applied_twice(sd1, tmp_path):
    a = tmp_path / "a.safetensors"
    write_lora(a, sd1, seed=1)
    try:
        apply_loras(sd1, [(str(a), 1.0)])
        once = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
        apply_loras(sd1, [(str(a), 1.0)])
        assert all(torch.equal(sd1.unet.state_dict()[k], v) for k, v in once.items())
        apply_loras(sd1, [(str(a), 0.5)])          # a new multiplier: from the originals, not on top
        half = sd1.unet.state_dict()["input_blocks.1.1.proj_in.weight"].clone()
        remove_loras(sd1)
        base = sd1.unet.state_dict()["input_blocks.1.1.proj_in.weight"]
        full = once["input_blocks.1.1.proj_in.weight"]
        assert refs.max_abs(half - base, (full - base) * 0.5) < 1e-6
    finally:
        remove_loras(sd1)


def test_a_lora_for_another_family_is_refused_and_nothing_changes(sd1, sdxl, tmp_path):
    xl = tmp_path / "xl.safetensors"
    write_lora(xl, sdxl, seed=3)
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    with pytest.raises(LoraError, match="another model family"):
        apply_loras(sd1, [(str(xl), 1.0)])
    assert all(torch.equal(sd1.unet.state_dict()[k], v) for k, v in before.items())
    one = tmp_path / "sd1.safetensors"
    write_lora(one, sd1, seed=3)
    with pytest.raises(LoraError, match="another model family"):
        apply_loras(sdxl, [(str(one), 1.0)])


def test_names_resolve_inside_the_directory_only(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (loras / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    assert find_lora(str(loras), "style") == str((loras / "style.safetensors").resolve())
    for name in ("../secret", str(tmp_path / "secret"), "link", "sub/../../secret", ""):
        with pytest.raises(LoraError):
            find_lora(str(loras), name)
    with pytest.raises(LoraError, match="available: style"):
        find_lora(str(loras), "nope")


def test_short_hash_is_a1111s(tmp_path):
    """A1111 (networks.NetworkOnDisk): the sshs_model_hash metadata when the trainer wrote one, else its addnet
    hash: sha256 of what follows a safetensors file's header."""
    from safetensors.torch import save_file
    from sdcore.formats.lora import short_hash
    t = {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"ss_note": "one"})
    save_file(t, str(tmp_path / "b.safetensors"), metadata={"ss_note": "another, longer note"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert short_hash(str(tmp_path / "a.safetensors")) == hashlib.sha256(data).hexdigest()[:12]
    assert short_hash(str(tmp_path / "b.safetensors")) == short_hash(str(tmp_path / "a.safetensors"))
    save_file(t, str(tmp_path / "c.safetensors"), metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert short_hash(str(tmp_path / "c.safetensors")) == "abcdef012345"


def test_half_precision_weights_from_the_cache_merge_restore_and_leave_the_cache_as_it_was(
        default_model_path, sd1, tmp_path):
    cache = tmp_path / "cache"
    half = sdcore.load_model(default_model_path, device="cpu", dtype=torch.bfloat16, cache_dir=str(cache))
    files = sorted(cache.glob("*.safetensors"))
    assert files                                               # the weights are mapped from the converted cache
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    loaded = {k: v.clone() for k, v in half.unet.state_dict().items()}
    path = tmp_path / "a.safetensors"
    write_lora(path, sd1, convolutions=True, seed=4)
    try:
        apply_loras(sd1, [(str(path), 1.0)])
        want = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    finally:
        remove_loras(sd1)
    apply_loras(half, [(str(path), 1.0)])
    got = half.unet.state_dict()
    changed = [k for k in got if not torch.equal(got[k], loaded[k])]
    assert len(changed) > 20
    for k in changed:           # bf16 weight + float32 change, rounded once: within a bf16 step of the fp32 merge
        assert refs.max_abs(got[k].float(), want[k]) <= 2 ** -7 * want[k].abs().max().item() + 1e-6, k
    remove_loras(half)
    assert all(torch.equal(half.unet.state_dict()[k], v) for k, v in loaded.items())
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == digests
    assert sorted(cache.glob("*.safetensors")) == files


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_compiled_unet_runs_with_the_adapter_after_a_change(tmp_path):
    """torch.compile freezes the weights into its code: a change of adapters compiles again (sdcore.lora). A
    one-level UNet keeps the two compilations short."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                     transformer_depth=(1,), transformer_depth_middle=1, num_heads=2, context_dim=32)
    text = random_init_(TextEncoder(TextConfig(width=32, layers=1, heads=1)), 2)

    def tiny():
        return StableDiffusion(family="sd1", prediction="eps", unet=random_init_(UNet(cfg), 1), vae=None,
                               text_encoder=text, name="tiny", native_size=64, device="cpu", dtype=torch.float32,
                               source="")
    compiled, eager = tiny().compile(), tiny()
    path = tmp_path / "a.safetensors"
    write_lora(path, eager, convolutions=True, seed=6)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 32, generator=g)
    with torch.inference_mode():
        plain = compiled.unet(x, t, ctx)                         # compiled with the loaded weights
        apply_loras(compiled, [(str(path), 1.0)])
        apply_loras(eager, [(str(path), 1.0)])
        assert refs.max_rel(compiled.unet(x, t, ctx), eager.unet(x, t, ctx)) < 1e-4
        assert refs.max_rel(plain, eager.unet(x, t, ctx)) > 1e-2
