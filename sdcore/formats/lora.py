"""Adapter files (LoRA and LyCORIS): which of a model's parameters each of their modules changes, and by what.

An adapter stores, per module of the network it was trained on, a low-rank (or otherwise compact)
factorisation of a weight change. Its keys name the module in one of several layouts:

    kohya / A1111     lora_unet_<module path, dots as underscores>.<factor>    (UNet: diffusers' paths for
                      SD1/SD2, the LDM ones for SDXL; SD3 / FLUX: Stability's / Black Forest Labs' paths),
                      lora_te_ (SD1/SD2 text encoder, Hugging Face paths), lora_te1_ / lora_te2_ / lora_te3_
                      (CLIP ViT-L / OpenCLIP bigG / T5)
    diffusers / PEFT  unet.<module path>.<factor> (SD3 / FLUX: transformer.<diffusers path>), text_encoder.<path>,
                      text_encoder_2.<path>, text_encoder_3.<path>; the factor as lora_A/lora_B (PEFT), lora.down/
                      lora.up or lora_linear_layer.down/up (older diffusers, whose attention processors also write
                      ``attn1.processor.to_q_lora``)
    ComfyUI           diffusion_model.<Black Forest Labs' / Stability's path>.<factor>

and the factors are one of (W the module's weight, [out, in] or [out, in, kh, kw]; r the rank):

    LoRA / LoCon  up [out, r] @ down [r, in·kh·kw]  (optionally through a Tucker core ``lora_mid``)
    LoHa          (w1_a @ w1_b) ⊙ (w2_a @ w2_b)      (Hadamard product of two low-rank products)
    LoKr          w1 ⊗ w2                             (Kronecker product, either factor itself low-rank)
    full          diff                                (the change itself)

scaled by ``alpha / r`` when the file stores an alpha (LoKr: only when one factor is low-rank), and by the
multiplier the prompt asks for. Module paths are matched on our parameter names through the same layout
tables the checkpoints use (``layouts``), so any network the loader reads takes adapters in every layout,
and a module the file names that the model lacks, or whose shape differs, tells that the adapter was made
for another model. Where one of our weights is several of theirs stacked by rows (q, k and v in one
projection), a change to one of theirs lands in its rows; where ours holds two halves in the other order
(SD3's and FLUX's final modulation), the change's halves are exchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct

import torch

from . import layouts
from ..unet import UNetConfig
from .files import CheckpointError, TensorFile, from_file

log = logging.getLogger("sdcore.lora")

EXTENSIONS = (".safetensors", ".ckpt", ".pt")
# Which network a key prefix addresses: "unet" the denoiser (a UNet, or SD3's / FLUX's transformer), "text" the
# first text encoder (CLIP-L), "text_2" SDXL's and SD3's second (bigG), "text_3" SD3's and FLUX's T5
NETWORK_PREFIXES = [("lora_unet_", "unet"), ("lora_te1_", "text"), ("lora_te2_", "text_2"), ("lora_te3_", "text_3"),
                    ("lora_te_", "text"), ("unet.", "unet"), ("transformer.", "unet"), ("diffusion_model.", "unet"),
                    ("text_encoder_2.", "text_2"), ("text_encoder_3.", "text_3"), ("text_encoder.", "text"),
                    ("base_model.model.", "unet"), ("lora_unet.", "unet")]
# Key endings -> the factor they hold, in every layout's spelling
FACTORS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
           "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
           "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha",
           "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
           "hada_t1": "hada_t1", "hada_t2": "hada_t2", "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a",
           "lokr_w1_b": "lokr_w1_b", "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
           "lokr_t2": "lokr_t2", "diff": "diff", "diff_b": "diff_b", "dora_scale": "dora_scale",
           "scale": "ignored", "on_input": "ignored"}
_FACTOR_END = re.compile(r"\.(" + "|".join(re.escape(k) for k in sorted(FACTORS, key=len, reverse=True)) + r")$")


class LoraError(CheckpointError):
    """An adapter file that cannot be applied to this model; the message names the file."""


@dataclasses.dataclass
class Target:
    """The parameter a module's change lands in: network, our key, (a fused q/k/v) which rows of it, and whether
    its two halves are in the other order in ours."""
    network: str
    key: str
    rows: tuple[int, int] | None = None
    swapped: bool = False


@dataclasses.dataclass
class Patch:
    target: Target
    kind: str                         # "lora" | "loha" | "lokr" | "full"
    factors: dict                     # factor name -> tensor (as stored)
    alpha: float | None

    def delta(self, shape, multiplier: float = 1.0) -> torch.Tensor:
        """The weight change, float32, reshaped to the target's ``shape`` (a Linear's change fits a 1×1
        convolution and the other way round)."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "lora":
            up, down = f["up"].flatten(1), f["down"]
            rank = down.shape[0]
            if "mid" in f:                     # Tucker: up (1×1) · mid (kh×kw, r×r) · down (1×1)
                d = torch.einsum("pi,ijkl,jq->pqkl", up, f["mid"], down.flatten(1))
            else:
                d = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        elif self.kind == "loha":
            rank = f["hada_w1_b"].shape[0]
            d = _factor(f, "hada_w1_a", "hada_w1_b", "hada_t1") * _factor(f, "hada_w2_a", "hada_w2_b", "hada_t2")
        elif self.kind == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else _factor(f, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
            rank = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else None
            d = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim())), w2)
        else:
            rank, d = None, f["diff"]
        scale = self.alpha / rank if self.alpha is not None and rank else 1.0
        if d.numel() != shape.numel():
            raise ValueError(f"{tuple(d.shape)} vs {tuple(shape)}")
        d = d.reshape(shape) * (scale * multiplier)
        return torch.cat(d.chunk(2)[::-1]) if self.target.swapped else d


def _factor(f: dict, a: str, b: str, t: str) -> torch.Tensor:
    """``a @ b``, or with a Tucker core ``t`` [r, r, kh, kw]: the kernel a · t · b."""
    if t in f:
        return torch.einsum("pi,ijkl,jq->pqkl", f[a], f[t], f[b].flatten(1))
    return f[a] @ f[b].flatten(1)


@dataclasses.dataclass
class LoraFile:
    path: str
    name: str                         # the file's name without its extension, as prompts call it
    short_hash: str                   # A1111's: 12 hex digits (docs/core.md, "LoRA")
    patches: list[Patch]


def _normalise(path: str) -> str:
    return path.replace(".", "_")


def _module_key(key: str) -> tuple[str, str, str] | None:
    """A file key -> (network, module path with underscores, factor), None for keys that are not factors."""
    m = _FACTOR_END.search(key)
    if m is None:
        return None
    module, factor = key[:m.start()], FACTORS[m.group(1)]
    for prefix, network in NETWORK_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    else:
        network = "unet"                  # attention-processor files name UNet paths bare
    module = module.replace(".processor.", ".")
    module = re.sub(r"\.(to_[qkv])_lora$", r".\1", module)
    module = re.sub(r"\.to_out_lora$", ".to_out.0", module)
    return network, _normalise(module), factor


def fused_rows(shape, n: int) -> list[tuple[int, int] | None]:
    """The rows each of ``n`` projections stacked in a weight of ``shape`` [out, in] holds: q, k and v read the
    width they write (``in`` rows each); a last one beyond them (FLUX's single blocks' MLP input) the rest."""
    if n == 1:
        return [None]
    bounds = [i * shape[1] for i in range(n)] + [shape[0]]
    return list(zip(bounds[:-1], bounds[1:]))


def target_table(networks: dict) -> dict[str, dict[str, Target]]:
    """Per network ("unet", "text", "text_2", "text_3"): module path (underscores) -> Target, under every name the
    module has in the layouts we read: ours (LDM, Stability's or Black Forest Labs'; OpenCLIP's for CLIP) and
    diffusers' / Hugging Face's. A name two different parameters would share is left out (a file naming it is
    refused as unknown)."""
    tables = {}
    for network, module in networks.items():
        if module is None:
            continue
        shapes = weight_shapes(module)
        keys = list(shapes)
        names: dict[str, Target | None] = {}

        def add(name, target):
            name = _normalise(name[:-len(".weight")])
            names[name] = target if names.get(name, target) == target else None

        if network == "unet" and isinstance(module.cfg, UNetConfig):
            theirs = layouts.unet_name_map(keys, module.cfg)
            for k in keys:
                add(k, Target(network, k))
                add(theirs[k], Target(network, k))
        elif network == "unet":                          # SD3's MMDiT, FLUX
            pairs, swapped = layouts.transformer_names(module.cfg)
            weights = set(keys)
            for ours, hf in pairs:
                if ours in weights:
                    add(ours, Target(network, ours))
                    for name, rows in zip(hf, fused_rows(shapes[ours], len(hf))):
                        add(name, Target(network, ours, rows, ours in swapped))
        elif network == "text_3":                        # T5: Hugging Face's names are ours
            for k in keys:
                add(k, Target(network, k))
        else:
            for k in keys:
                if k in layouts.TEXT_NAMES:           # embeddings and projection: adapters leave them
                    continue
                hf = layouts.text_hf_names(k)
                for name, rows in zip(hf, fused_rows(shapes[k], len(hf))):
                    add("text_model." + name, Target(network, k, rows))
                    if len(hf) == 1:
                        add(k, Target(network, k))
        tables[network] = {n: t for n, t in names.items() if t is not None}
    return tables


def weight_shapes(network) -> dict[str, torch.Size]:
    """The shapes of a network's matrices and kernels by key; a layer whose weight is kept quantized (sdcore.quant)
    is listed under the ``.weight`` key its float twin has."""
    out = {k: v.shape for k, v in network.state_dict().items() if v.dim() >= 2 and k.endswith("weight")}
    for name, m in network.named_modules():
        if hasattr(m, "weight_shape"):
            out[f"{name}.weight"] = m.weight_shape
    return out


def kept_layer(network, key: str):
    """The layer (sdcore.quant.QuantLinear) whose kept-quantized weight ``key`` names, or None for a parameter."""
    path, _, leaf = key.rpartition(".")
    m = network.get_submodule(path) if leaf == "weight" else None
    return m if hasattr(m, "weight_shape") else None


def target_shape(network, target: Target) -> torch.Size:
    kept = kept_layer(network, target.key)
    shape = kept.weight_shape if kept is not None else network.get_parameter(target.key).shape
    return torch.Size((target.rows[1] - target.rows[0], *shape[1:])) if target.rows else shape


def short_hash(path: str) -> str:
    """A1111's short hash of an adapter: the ``sshs_model_hash`` its trainer wrote into a safetensors file's
    metadata, else sha256 of the file's tensor data (after its header, so editing the metadata keeps the
    hash; a pickle: the whole file); the first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", f.read(8))
            written = json.loads(f.read(n)).get("__metadata__", {}).get("sshs_model_hash")
            if isinstance(written, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", written):
                return written[:12].lower()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def read_lora(path: str, networks: dict, family: str) -> LoraFile:
    """Read ``path`` and match every module it changes to ``networks`` ({"unet": UNet, MMDiT or Flux, "text":
    TextEncoder, "text_2": TextEncoder or None, "text_3": T5Encoder or None}) of a ``family`` model; LoraError when
    it does not fit them."""
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        tensors = from_file(TensorFile(path))
    except CheckpointError as e:
        raise LoraError(f"LoRA {name!r}: {e}") from None
    modules: dict[tuple[str, str], dict] = {}
    for key in tensors.keys():
        parsed = _module_key(key)
        if parsed is not None and parsed[2] != "ignored":
            modules.setdefault(parsed[:2], {})[parsed[2]] = key
    if not modules:
        raise LoraError(f"LoRA {name!r} ({path}) holds no LoRA/LyCORIS tensors (lora_down/lora_up, lora_A/lora_B, "
                        "hada_*, lokr_*, diff)")
    tables = target_table(networks)
    patches, unknown = [], []
    for (network, module), factors in sorted(modules.items()):
        target = tables.get(network, {}).get(module)
        if target is None:
            unknown.append(module)
            continue
        if "dora_scale" in factors:
            raise LoraError(f"LoRA {name!r} is a DoRA (weight-decomposed) adapter, which this server does not apply")
        kind = ("loha" if "hada_w1_a" in factors else "lokr" if any(k.startswith("lokr_") for k in factors)
                else "full" if "diff" in factors else "lora")
        if kind == "lora" and not {"up", "down"} <= factors.keys():
            raise LoraError(f"LoRA {name!r}: module {module} has {sorted(factors)} but not both up and down factors")
        alpha = float(tensors.get(factors.pop("alpha"))) if "alpha" in factors else None
        factors.pop("diff_b", None)                  # bias changes: rare, and A1111 ignores them too
        patch = Patch(target, kind, {k: tensors.get(v) for k, v in factors.items()}, alpha)
        shape = target_shape(networks[network], target)
        try:                                         # the shapes alone, on the meta device
            Patch(target, kind, {k: v.to("meta") for k, v in patch.factors.items()}, alpha).delta(shape)
        except (ValueError, RuntimeError, KeyError) as e:
            raise LoraError(f"LoRA {name!r} changes {module} with a {type(e).__name__} {e} where this {family} model's "
                            f"weight is {tuple(shape)}: it was made for another model family") from None
        patches.append(patch)
    if not patches:
        raise LoraError(f"LoRA {name!r} changes none of this {family} model's modules (it names e.g. "
                        f"{', '.join(unknown[:2])}): it was made for another model family")
    if len(unknown) > len(patches):
        raise LoraError(f"LoRA {name!r} names {len(unknown)} modules this {family} model lacks (e.g. "
                        f"{', '.join(unknown[:2])}) and matches {len(patches)}: it was made for another model family")
    if unknown:                                      # as A1111 does: the rest still applies
        log.warning("LoRA %r: %d of its modules are not in this %s model and are skipped, e.g. %s",
                    name, len(unknown), family, ", ".join(unknown[:3]))
    return LoraFile(path, name, short_hash(path), patches)
