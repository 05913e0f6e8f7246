"""Building a network from a checkpoint's tensors without a second copy of its weights.

The network is made on the meta device (no memory), then each parameter is assigned straight from
the (memory-mapped) file, cast on its own to the load dtype. With a cache directory, a load that
casts keeps the converted tensors there for later loads to map (``sdcore.weights_cache``).
"""
import torch
from torch import nn

from .. import weights_cache
from ..quant import QuantLinear
from .files import CheckpointError, Tensors

CAST_CHUNK = 1 << 20          # values per step of the two-step cast: 4 MiB of fp32 scratch, cache-resident


def cast(t: torch.Tensor, device, dtype, scratch: torch.Tensor) -> torch.Tensor:
    """``t.to(device, dtype)``; fp16 -> bf16 on the CPU through fp32, a chunk at a time (``scratch``).

    ATen's direct Half -> BFloat16 copy converts one value at a time, its Half -> Float and
    Float -> BFloat16 copies are vectorised: the two steps run faster, and every checkpoint in fp16
    (most downloads) loads into the CPU's bf16 this way. Bit-identical: fp16 -> fp32 is exact, and
    both ways round that fp32 value to the nearest bf16."""
    if not (t.dtype == torch.float16 and dtype == torch.bfloat16 and t.device.type == "cpu"
            and torch.device(device).type == "cpu" and t.numel() > scratch.numel() // 4):
        return t.to(device=device, dtype=dtype)
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, src.numel(), scratch.numel()):
        n = min(scratch.numel(), src.numel() - i)
        dst[i:i + n].copy_(scratch[:n].copy_(src[i:i + n]))
    return out


def build(module_cls, cfg, tensors: Tensors, device, dtype, what, path, cache_dir=None, keep_quantized=False):
    """Build ``module_cls(cfg)`` on the meta device and assign every parameter from ``tensors``.
    ``what`` names the network in errors; ``path`` is its source (errors, and the cache's key).
    ``cache_dir``: keep the converted weights there (``weights_cache``) when loading converts them.
    ``keep_quantized``: linear layers whose weights the file stores quantized (GGUF blocks, float8) keep them so,
    expanded per call (sdcore.quant.QuantLinear); the others are cast as usual."""
    with torch.device("meta"):
        module = module_cls(cfg)
    kept = _kept_linears(module, tensors) if keep_quantized else {}
    wanted = {k: v for k, v in module.state_dict().items() if k not in {name + ".weight" for name in kept}}
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} {what} tensors, e.g. {', '.join(missing[:3])}: "
                              f"the file is incomplete or not a full Stable Diffusion checkpoint")
    scratch = torch.empty(CAST_CHUNK, dtype=torch.float32)

    def convert(k):
        t = tensors.get(k)
        return cast(t, device, dtype, scratch) if t.is_floating_point() else t.to(device)

    sd = None
    if cache_dir and not kept and torch.device(device).type == "cpu" and _converts(tensors, wanted, dtype):
        sd = weights_cache.load(cache_dir, path, what, cfg, dtype, wanted, convert)
    if sd is None:
        sd = {k: convert(k) for k in wanted}
    try:
        missing = module.load_state_dict(sd, strict=not kept, assign=True).missing_keys
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{path}: {what} tensor shapes do not fit the inferred architecture ({first[:200]})") from None
    assert set(missing) <= {name + ".weight" for name in kept}, missing
    for name, (kind, stored) in kept.items():
        parent, _, child = name.rpartition(".")
        linear = module.get_submodule(name)
        setattr(module.get_submodule(parent), child, QuantLinear(stored().to(device), kind, tuple(linear.weight.shape),
                                                                 None if linear.bias is None else linear.bias.data))
    return module.eval().requires_grad_(False)


def _kept_linears(module: nn.Module, tensors: Tensors) -> dict:
    """{linear layer's name: (kind, thunk)} for the linear layers whose weight ``tensors`` stores quantized."""
    return {name: tensors.stored[name + ".weight"] for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and name + ".weight" in tensors.stored
            and tuple(tensors.shape(name + ".weight")) == tuple(sub.weight.shape)}


def _converts(tensors: Tensors, wanted: dict, dtype) -> bool:
    """Loading casts some tensor (a same-dtype load maps the file as it is), and every shape fits
    (else the load fails with the shapes' error, and nothing is cached)."""
    if any(tuple(tensors.shape(k)) != tuple(m.shape) for k, m in wanted.items()):
        return False
    return any(t.is_floating_point() and t.dtype != dtype for t in map(tensors.get, wanted))


def meta_keys(module_cls, cfg) -> list[str]:
    """The parameter names ``module_cls(cfg)`` has, without allocating it."""
    with torch.device("meta"):
        return list(module_cls(cfg).state_dict().keys())
