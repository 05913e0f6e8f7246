"""Applying adapters (LoRA, LoCon, LoHa, LoKr; their files: sdcore.formats.lora) to a loaded model.

Merged, not hooked: each changed weight becomes W + multiplier · scale · ΔW in place, so a step costs what
it costs without adapters and every path that reads the weights (eager, CUDA graphs, the weights cache's
mapped tensors) sees the change. Before the first change to a weight its original is kept; taking the
adapters off copies the originals back, so the weights return bit for bit (no drift, however many sets
are applied in turn). A request asking for the set already applied changes nothing. The exception: a layer
whose weight is kept quantized (sdcore.quant) has no float weight to merge into; its changes are held beside it
and added to the weight it expands at each call (the same numbers as merged into the dequantized weight).

Cost (docs/BENCHMARKS.md): one matrix product per changed module on a change of set, plus the originals
of the changed weights held while adapters are on. A model compiled with torch.compile has its weights
frozen into the compiled code: a change of set compiles again on the next step.
"""
from __future__ import annotations

import os

import torch

from .cuda_graphs import CUDAGraphed, unwrapped
from .flux import LatentFlux
from .formats.lora import EXTENSIONS, LoraError, LoraFile, kept_layer, read_lora, target_shape
from .quant import QuantLinear

__all__ = ["EXTENSIONS", "LoraError", "apply_loras", "available", "find_lora", "networks", "remove_loras",
           "resolve_loras"]


def networks(model) -> dict:
    """The networks adapters change: the UNet (or transformer) and the text encoders, unwrapped from compiled code."""
    unet = unwrapped(model.unet)
    unet = unet.flux if isinstance(unet, LatentFlux) else unet      # its parameters under the layout's names
    return {"unet": unet, "text": model.text_encoder, "text_2": model.text_encoder_2,
            "text_3": model.text_encoder_3}


def find_lora(directory: str, name: str) -> str:
    """``directory/name`` + one of EXTENSIONS, resolved inside ``directory`` only (no ``..``, absolute
    paths or links out of it); LoraError naming what exists when there is none."""
    root = os.path.realpath(directory)
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or "\0" in name:
        raise LoraError(f"LoRA name {name!r} is not a file name inside the LoRA directory")
    for ext in ("",) + EXTENSIONS:
        path = os.path.realpath(os.path.join(root, name + ext))
        if os.path.commonpath([root, path]) != root:
            raise LoraError(f"LoRA {name!r} points outside the LoRA directory")
        if os.path.isfile(path) and path.endswith(EXTENSIONS):
            return path
    raise LoraError(f"no LoRA named {name!r}; available: {', '.join(available(directory)) or 'none'}")


def resolve_loras(directory: str | None, named: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """(name, multiplier) pairs -> (file, multiplier) pairs, the multipliers of a file named twice added (as the
    sd.cpp server does). LoraError for a name not in ``directory``, or any name when there is no directory."""
    if named and not directory:
        raise LoraError(f"LoRA {named[0][0]!r} asked for, but no LoRA directory is configured (--lora-model-dir)")
    total: dict[str, float] = {}
    for name, multiplier in named:
        path = find_lora(directory, name)
        total[path] = total.get(path, 0.0) + multiplier
    return list(total.items())


def available(directory: str) -> list[str]:
    """The names (file names without extension) of the adapters in ``directory``."""
    root = os.path.realpath(directory)
    try:
        files = [f for f in os.listdir(root) if f.endswith(EXTENSIONS)]
    except OSError:
        return []
    return sorted(os.path.splitext(f)[0] for f in files     # not links out of it: find_lora refuses them
                  if os.path.commonpath([root, os.path.realpath(os.path.join(root, f))]) == root)


def _set_key(loras) -> tuple:
    """What identifies an applied set: each file's identity and contents' age, and its multiplier."""
    out = []
    for path, multiplier in loras:
        st = os.stat(path)
        out.append((os.path.realpath(path), st.st_size, st.st_mtime_ns, float(multiplier)))
    return tuple(out)


@torch.inference_mode()
def apply_loras(model, loras: list[tuple[str, float]]) -> list[LoraFile]:
    """Make ``loras`` ((file, multiplier) pairs) the adapters applied to ``model``: nothing when they are
    already, else the previous set is taken off and these merged. Every file is read and checked before
    any weight changes (LoraError: none changed). The order of ``loras`` does not matter: they are merged in
    the order of their paths, so a set gives the same weights however it is listed. -> the files read (for
    their names and hashes)."""
    loras = sorted(loras)
    key = _set_key(loras)
    if key == model.lora_key:
        return model.lora_files
    nets = networks(model)
    files = [read_lora(path, nets, model.family) for path, _ in loras]
    remove_loras(model)
    originals, any_kept = {}, False
    model.lora_originals = originals
    for file, (_, multiplier) in zip(files, loras):
        for patch in file.patches:
            t = patch.target
            kept = kept_layer(nets[t.network], t.key)
            if kept is not None:            # no float weight to merge into: added at each call (sdcore.quant)
                kept.adapters.append((patch, t.rows, multiplier))
                any_kept = True
                continue
            param = nets[t.network].get_parameter(t.key)
            if (t.network, t.key) not in originals:
                originals[(t.network, t.key)] = param.detach().clone()
            view = param.data[t.rows[0]:t.rows[1]] if t.rows else param.data
            delta = patch.delta(target_shape(nets[t.network], t), multiplier).to(param.device)
            view.copy_(view.float().add_(delta))
    model.lora_key, model.lora_files = key, files
    _changed(model, recapture=any_kept)
    return files


@torch.inference_mode()
def remove_loras(model) -> None:
    """Copy the originals back: the weights are bit for bit those loaded."""
    originals, nets = model.lora_originals, networks(model)
    kept = [m for net in nets.values() if net is not None for m in net.modules()
            if isinstance(m, QuantLinear) and m.adapters]
    for m in kept:
        m.adapters.clear()
    for (network, key), original in originals.items():
        nets[network].get_parameter(key).data.copy_(original)
    if originals or kept:
        _changed(model, recapture=bool(kept))
    model.lora_originals, model.lora_key, model.lora_files = {}, (), []


def _changed(model, recapture: bool) -> None:
    """Compiled code holds the weights it was compiled with: compile again from the changed module. Captured CUDA
    graphs read merged weights where they lie, but not changes held beside kept-quantized layers (``recapture``)."""
    if recapture and isinstance(model.unet, CUDAGraphed):
        model.unet.graphs.clear()
    if model.compiled:
        torch._dynamo.reset()             # else the cache hands back the code holding the old weights
        model.unet = unwrapped(model.unet)
        model.compile()
