"""Loading checkpoints as users download them: LDM single files (.safetensors / .ckpt) and diffusers folders.

Every network is built on the meta device and its parameters are assigned tensor by tensor straight
from the (memory-mapped) file, cast per tensor to the requested dtype, so no second full copy of the
weights exists at any time. Hyperparameters are read off key names and shapes (CHECKPOINTS.md §2);
a ``sdcore.config`` JSON in the safetensors ``__metadata__`` overrides what shapes cannot tell.
"""
import dataclasses
import json
import os
import re
import struct

import torch

from . import layouts, weights_cache
from .clip import TextConfig
from .tokenizer import EOS
from .unet import UNetConfig
from .vae import VAEConfig

IGNORED = re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|posterior_.*|log_one_minus_alphas_cumprod|model_ema\.(decay|num_updates))$")
METADATA_KEY = "sdcore.config"


class CheckpointError(Exception):
    """A one-line, user-facing reason why a checkpoint cannot be loaded (and what to do)."""


# ------------------------------------------------------------------------------------------------
# Reading tensors lazily
# ------------------------------------------------------------------------------------------------
class TensorFile:
    """Name -> tensor on demand, from one safetensors file or an already loaded dict."""

    def __init__(self, path: str):
        self.path, self.metadata = path, {}
        if path.endswith(".safetensors"):
            self._check_safetensors(path)
            from safetensors import safe_open
            self._file = safe_open(path, framework="pt")
            self.metadata = self._file.metadata() or {}
            self._keys = list(self._file.keys())
        else:
            self._dict = _load_pickle(path)
            self._keys = list(self._dict)

    # methods, not lambdas stored on self: a self-referencing attribute would keep the memory map
    # (and its resident pages) alive after loading until the garbage collector finds the cycle
    def get(self, key):
        return self._file.get_tensor(key) if hasattr(self, "_file") else self._dict[key]

    def shape(self, key):
        return tuple(self._file.get_slice(key).get_shape()) if hasattr(self, "_file") else tuple(self._dict[key].shape)

    def keys(self):
        return self._keys

    @staticmethod
    def _check_safetensors(path):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n <= 1 or n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path} is not a checkpoint: no valid safetensors header "
                                      f"(expected a .safetensors/.ckpt Stable Diffusion checkpoint)")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{path} is not a checkpoint: its safetensors header is not valid JSON") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{path} is truncated: the header promises {8 + n + end} bytes but the file has "
                                  f"{size}; download it again")


def _load_pickle(path):
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) pickles
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint torch can read safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}); convert it to .safetensors") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = {k: v for k, v in (sd.items() if isinstance(sd, dict) else []) if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path} is not a checkpoint: it holds no tensors")
    return sd


class Tensors:
    """A merged, renamed view: ``our_key -> thunk producing the tensor`` (nothing read until asked)."""

    def __init__(self, entries=None):
        self.entries: dict[str, tuple] = entries or {}     # key -> (thunk, shape)

    def add(self, key, thunk, shape):
        self.entries[key] = (thunk, tuple(shape))

    def get(self, key):
        return self.entries[key][0]()

    def shape(self, key):
        return self.entries[key][1]

    def sub(self, prefix):
        """The keys under ``prefix``, with it stripped."""
        return Tensors({k[len(prefix):]: v for k, v in self.entries.items() if k.startswith(prefix)})

    def keys(self):
        return self.entries.keys()

    def __contains__(self, key):
        return key in self.entries


def from_file(tf: TensorFile) -> Tensors:
    t = Tensors()
    for k in tf.keys():
        if not IGNORED.match(k):
            t.add(k, (lambda k=k: tf.get(k)), tf.shape(k))
    return t


CAST_CHUNK = 1 << 20          # values per step of the two-step cast: 4 MiB of fp32 scratch, cache-resident


def cast(t: torch.Tensor, device, dtype, scratch: torch.Tensor) -> torch.Tensor:
    """``t.to(device, dtype)``; fp16 -> bf16 on the CPU through fp32, a chunk at a time (``scratch``).

    ATen's direct Half -> BFloat16 copy converts one value at a time (≈ 1 G values/s on 2 cores), its
    Half -> Float and Float -> BFloat16 copies are vectorised: the two steps run ≈ 3 × faster, and
    every checkpoint in fp16 (most downloads) loads into the CPU default bf16 this way. Bit-identical:
    fp16 -> fp32 is exact, and both ways round that fp32 value to the nearest bf16."""
    if not (t.dtype == torch.float16 and dtype == torch.bfloat16 and t.device.type == "cpu"
            and torch.device(device).type == "cpu" and t.numel() > scratch.numel() // 4):
        return t.to(device=device, dtype=dtype)
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), scratch.numel()):
        n = min(scratch.numel(), src.numel() - i)
        dst[i:i + n].copy_(scratch[:n].copy_(src[i:i + n]))
    return out


def build(module_cls, cfg, tensors: Tensors, device, dtype, what, path, cache_dir=None):
    """Build ``module_cls(cfg)`` on the meta device and assign every parameter from ``tensors``.
    ``cache_dir``: keep the converted weights there (``weights_cache``) when loading converts them."""
    with torch.device("meta"):
        module = module_cls(cfg)
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} {what} tensors, e.g. {', '.join(missing[:3])}: "
                              f"the file is incomplete or not a full Stable Diffusion checkpoint")
    scratch = torch.empty(CAST_CHUNK, dtype=torch.float32)

    def convert(k):
        t = tensors.get(k)
        return cast(t, device, dtype, scratch) if t.is_floating_point() else t.to(device)

    sd = None
    if cache_dir and torch.device(device).type == "cpu" and _converts(tensors, wanted, dtype):
        sd = weights_cache.load(cache_dir, path, what, cfg, dtype, wanted, convert)
    if sd is None:
        sd = {k: convert(k) for k in wanted}
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{path}: {what} tensor shapes do not fit the inferred architecture ({first[:200]})") from None
    return module.eval().requires_grad_(False)


def _converts(tensors: Tensors, wanted: dict, dtype) -> bool:
    """Loading casts some tensor (a same-dtype load maps the file as it is), and every shape fits
    (else the load fails with the shapes' error, and nothing is cached)."""
    if any(tuple(tensors.shape(k)) != tuple(m.shape) for k, m in wanted.items()):
        return False
    return any(t.is_floating_point() and t.dtype != dtype for t in map(tensors.get, wanted))


# ------------------------------------------------------------------------------------------------
# Reading hyperparameters off shapes
# ------------------------------------------------------------------------------------------------
def infer_unet_config(t: Tensors) -> UNetConfig:
    conv_in = t.shape("input_blocks.0.0.weight")
    mc = conv_in[0]
    res, down = {}, []
    n = 1
    while f"input_blocks.{n}.0.in_layers.2.weight" in t or f"input_blocks.{n}.0.op.weight" in t:
        if f"input_blocks.{n}.0.op.weight" in t:
            down.append(n)
        else:
            res[n] = t.shape(f"input_blocks.{n}.0.in_layers.2.weight")[0]
        n += 1
    nrb = (down[0] - 1) if down else len(res)
    n_levels = len(down) + 1
    mult, attn, depth = [], [], []
    for level in range(n_levels):
        first = level * (nrb + 1) + 1
        mult.append(res[first] // mc)
        blocks = {int(m.group(1)) for k in t.keys()
                  if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))}
        depth.append(len(blocks))
        if blocks:
            attn.append(level)
    mid_depth = len({k.split(".")[3] for k in t.keys() if k.startswith("middle_block.1.transformer_blocks.")})
    to_k = next(k for k in t.keys() if k.endswith("attn2.to_k.weight"))
    context_dim = t.shape(to_k)[1]
    proj = next(k for k in t.keys() if k.endswith("proj_in.weight"))
    return UNetConfig(in_channels=conv_in[1], out_channels=t.shape("out.2.weight")[0], model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=nrb, attention_levels=tuple(attn),
                      transformer_depth=tuple(depth), transformer_depth_middle=mid_depth,
                      num_heads=8 if context_dim == 768 else None, head_dim=None if context_dim == 768 else 64,
                      context_dim=context_dim, use_linear_proj=len(t.shape(proj)) == 2,
                      adm_in_channels=t.shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in t else None)


def infer_vae_config(t: Tensors) -> VAEConfig:
    ch = t.shape("encoder.conv_in.weight")[0]
    levels = sorted({int(k.split(".")[2]) for k in t.keys() if k.startswith("encoder.down.")})
    mult = tuple(t.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    nrb = len({k.split(".")[4] for k in t.keys() if k.startswith("encoder.down.0.block.")})
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=t.shape("post_quant_conv.weight")[0],
                     in_channels=t.shape("encoder.conv_in.weight")[1])


def infer_text_config(t: Tensors, family: str) -> TextConfig:
    vocab, width = t.shape("token_embedding.weight")
    layers = len({k.split(".")[2] for k in t.keys() if k.startswith("transformer.resblocks.")})
    sd1 = family == "sd1"
    return TextConfig(vocab_size=vocab, context_length=t.shape("positional_embedding")[0], width=width,
                      layers=layers, heads=max(1, width // 64), act="quick_gelu" if sd1 else "gelu",
                      output_layer=-1 if sd1 else -2, pad_id=EOS if sd1 else 0)


def _apply_overrides(cfg, overrides: dict | None):
    if not overrides:
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in overrides.items() if k in fields})


def config_to_metadata(**parts) -> dict[str, str]:
    """The ``__metadata__`` entry that records a checkpoint's full configuration (used by our writers)."""
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}
    return {METADATA_KEY: json.dumps(out, sort_keys=True)}


def hf_text_to_ours(hf: Tensors) -> Tensors:
    """A Hugging Face CLIPTextModel state dict, seen under our (OpenCLIP) names; q/k/v fused lazily."""
    layers = sorted({int(k.split(".")[2]) for k in hf.keys() if k.startswith("encoder.layers.")})
    names = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"]
    names += ["text_projection"] if "text_projection.weight" in hf else []
    names += [f"transformer.resblocks.{n}.{p}" for n in layers for p in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
        "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    out = Tensors()
    for key in names:
        src = layouts.text_hf_sources(key)
        if not all(s in hf for s in src):
            continue                                   # build() reports what is missing
        shapes = [hf.shape(s) for s in src]
        if key == "text_projection":                   # HF: Linear weight [proj, width]; ours: [width, proj]
            out.add(key, lambda s=src[0]: hf.get(s).T, shapes[0][::-1])
        elif len(src) == 1:
            out.add(key, lambda s=src[0]: hf.get(s), shapes[0])
        else:
            out.add(key, lambda src=src: torch.cat([hf.get(s) for s in src]), (sum(s[0] for s in shapes), *shapes[0][1:]))
    return out


def renamed(theirs: Tensors, name_map: dict, reshape=None) -> Tensors:
    """``theirs`` seen under our names (``name_map``: ours -> theirs); keys they lack are left out."""
    out = Tensors()
    for ours, their_key in name_map.items():
        if their_key in theirs:
            shape = theirs.shape(their_key)
            if reshape and reshape(their_key) and len(shape) == 2:   # Linear [C, C] -> 1×1 conv [C, C, 1, 1]
                out.add(ours, lambda k=their_key: theirs.get(k)[:, :, None, None], (*shape, 1, 1))
            else:
                out.add(ours, lambda k=their_key: theirs.get(k), shape)
    return out


def meta_keys(module_cls, cfg):
    with torch.device("meta"):
        return list(module_cls(cfg).state_dict().keys())
