"""Reading checkpoint files lazily: safetensors (memory-mapped) and pickled ``.ckpt``/``.bin`` files,
diffusers component folders, and the ``sdcore.config`` metadata our writers record.

Nothing here knows what a tensor means: a ``Tensors`` view maps a name to a thunk that reads the
tensor when asked, so the layouts can rename, fuse or reshape a whole checkpoint without reading it,
and ``build`` then reads each tensor once, straight into the network.
"""
import dataclasses
import glob
import json
import os
import re
import struct

import torch

# Training bookkeeping that LDM files carry next to the weights: never part of a network.
IGNORED = re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|posterior_.*|log_one_minus_alphas_cumprod"
                     r"|model_ema\.(decay|num_updates))$")
METADATA_KEY = "sdcore.config"
MAX_HEADER = 100 << 20        # safetensors' own limit on the JSON header


class CheckpointError(Exception):
    """A one-line, user-facing reason why a checkpoint cannot be loaded (and what to do)."""


class TensorFile:
    """Name -> tensor on demand, from one safetensors file, a GGUF file or a pickled state dict.

    GGUF (stable-diffusion.cpp's converter, llama.cpp's format): the tensors keep the names of the file they were
    converted from; read with the ``gguf`` package, memory-mapped. F32 and F16 tensors come as they are stored;
    BF16 and the quantized types (Q8_0, Q4_0, the K-quants, ...) are dequantized by ``gguf.quants`` when asked
    for, to float32 (which holds every one of their values exactly) or, for BF16, back to bfloat16."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path, self.metadata = path, {}
        if path.endswith(".gguf"):
            self._gguf, self.metadata = read_gguf(path)
            self._keys = list(self._gguf)
        elif path.endswith(".safetensors"):
            check_safetensors(path)
            from safetensors import safe_open
            self._file = safe_open(path, framework="pt")
            self.metadata = self._file.metadata() or {}
            self._keys = list(self._file.keys())
        else:
            self._dict = load_pickle(path)
            self._keys = list(self._dict)

    # methods, not lambdas stored on self: a self-referencing attribute would keep the memory map
    # (and its resident pages) alive after loading until the garbage collector finds the cycle
    def get(self, key):
        if hasattr(self, "_gguf"):
            return gguf_tensor(self._gguf[key])
        return self._file.get_tensor(key) if hasattr(self, "_file") else self._dict[key]

    def shape(self, key):
        if hasattr(self, "_gguf"):
            return gguf_shape(self._gguf[key])
        return tuple(self._file.get_slice(key).get_shape()) if hasattr(self, "_file") else tuple(self._dict[key].shape)

    def keys(self):
        return self._keys

    def stored_kind(self, key) -> str | None:
        """How a tensor is stored when sdcore.quant can keep it so in memory: a GGUF block type ("Q8_0" ...) or
        "float8"; None for the others (they are dequantized or cast at load)."""
        from ..quant import BLOCK_SIZES, FLOAT8
        if hasattr(self, "_gguf"):
            name = self._gguf[key].tensor_type.name
            return name if name in BLOCK_SIZES else None
        if hasattr(self, "_file"):
            return "float8" if self._file.get_slice(key).get_dtype() in ("F8_E4M3", "F8_E5M2") else None
        return "float8" if self._dict[key].dtype in FLOAT8 else None

    def stored(self, key) -> torch.Tensor:
        """A tensor of ``stored_kind`` as stored: GGUF blocks as uint8 [blocks, bytes] (mapped from the file, not
        copied), float8 as it is."""
        if hasattr(self, "_gguf"):
            import warnings

            import numpy as np
            t = self._gguf[key]
            with warnings.catch_warnings():          # the map is read-only; nothing writes to it
                warnings.simplefilter("ignore")
                raw = torch.from_numpy(np.asarray(t.data).view(np.uint8))
            from ..quant import BLOCK_SIZES
            return raw.reshape(-1, BLOCK_SIZES[t.tensor_type.name][1])
        return self.get(key)


def read_gguf(path) -> tuple[dict, dict]:
    """(name -> the GGUF reader's tensor record, the file's string key-values: our metadata entry among them); a
    file that is not GGUF, or is cut short, is a CheckpointError."""
    import gguf
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    strings = {name: bytes(f.parts[f.data[0]]).decode("utf-8", "replace") for name, f in reader.fields.items()
               if f.types == [gguf.GGUFValueType.STRING]}
    return {t.name: t for t in reader.tensors}, strings


def gguf_shape(t) -> tuple:
    return tuple(int(n) for n in reversed(t.shape.tolist()))         # GGUF lists the fastest dimension first


def gguf_tensor(t) -> torch.Tensor:
    import gguf
    import numpy as np
    kind = gguf.GGMLQuantizationType
    if t.tensor_type in (kind.F32, kind.F16):
        return torch.from_numpy(np.array(t.data)).reshape(gguf_shape(t))
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name}: the GGUF type {t.tensor_type.name} is not supported") from None
    out = torch.from_numpy(values).reshape(gguf_shape(t))
    return out.to(torch.bfloat16) if t.tensor_type == kind.BF16 else out


def check_safetensors(path):
    """A clear error for what safetensors would report obscurely: not a safetensors file, or cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or n > min(size - 8, MAX_HEADER):
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


def load_pickle(path) -> dict:
    """The tensors of a pickled checkpoint, unpickled with ``weights_only`` (no code runs) and
    memory-mapped where the file is a zip archive."""
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
    """A merged, renamed view: ``key -> thunk producing the tensor`` (nothing read until asked)."""

    def __init__(self, entries=None, stored=None):
        self.entries: dict[str, tuple] = entries or {}     # key -> (thunk, shape)
        # key -> (kind, thunk of the tensor as stored) where sdcore.quant can keep it quantized (TensorFile.stored)
        self.stored: dict[str, tuple] = stored or {}

    def add(self, key, thunk, shape):
        self.entries[key] = (thunk, tuple(shape))

    def get(self, key):
        return self.entries[key][0]()

    def shape(self, key):
        return self.entries[key][1]

    def sub(self, prefix):
        """The keys under ``prefix``, with it stripped."""
        return Tensors({k[len(prefix):]: v for k, v in self.entries.items() if k.startswith(prefix)},
                       {k[len(prefix):]: v for k, v in self.stored.items() if k.startswith(prefix)})

    def count(self, prefix: str) -> int:
        """How many numbered blocks ``prefix``N. there are (e.g. count("joint_blocks."))."""
        return len({k[len(prefix):].split(".")[0] for k in self.entries if k.startswith(prefix)})

    def has_prefix(self, *prefixes) -> bool:
        return any(k.startswith(prefixes) for k in self.entries)

    def keys(self):
        return self.entries.keys()

    def __contains__(self, key):
        return key in self.entries


def from_file(tf: TensorFile) -> Tensors:
    t = Tensors()
    for k in tf.keys():
        if not IGNORED.match(k):
            t.add(k, (lambda k=k: tf.get(k)), tf.shape(k))
            kind = tf.stored_kind(k)
            if kind:
                t.stored[k] = (kind, lambda k=k: tf.stored(k))
    return t


# ------------------------------------------------------------------------------------------------
# Diffusers folders: one subfolder per network, each a config.json and its weights
# ------------------------------------------------------------------------------------------------
def read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the diffusers folder is incomplete") from None


def component_weights(folder, stem) -> Tensors:
    """The tensors of one diffusers component (``stem``: diffusion_pytorch_model or model), in any of
    the files diffusers writes: safetensors or pickled, full or fp16 variant, or sharded with an index."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return from_file(TensorFile(os.path.join(folder, name)))
    index = sorted(glob.glob(os.path.join(folder, f"{stem}*.index.json")))
    if index:
        merged = Tensors()
        for shard in sorted(set(read_json(index[0])["weight_map"].values())):
            merged.entries.update(from_file(TensorFile(os.path.join(folder, shard))).entries)
        return merged
    raise CheckpointError(f"{folder} has no {stem}.safetensors (or .fp16/.bin/sharded variant)")


# ------------------------------------------------------------------------------------------------
# The sdcore.config metadata: what shapes cannot tell (a VAE's scale, a tower's output layer, ...)
# ------------------------------------------------------------------------------------------------
def read_metadata(tf: TensorFile) -> dict:
    """The file's recorded configuration: our ``sdcore.config`` JSON, plus the prediction type and the
    native size of the modelspec / kohya metadata keys when ours does not give them."""
    raw = tf.metadata.get(METADATA_KEY)
    meta = {}
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            raise CheckpointError(f"{tf.path}: its {METADATA_KEY} metadata is not valid JSON") from None
    pt = (tf.metadata.get("modelspec.prediction_type") or tf.metadata.get("prediction_type") or "").lower()
    if "prediction" not in meta and pt:
        meta["prediction"] = "v" if pt.startswith("v") else "eps"
    res = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", tf.metadata.get("modelspec.resolution") or "")
    if "native_size" not in meta and res:          # "512x512" in SDXL-Turbo's file, "1024x1024" in SDXL's
        w, h = int(res.group(1)), int(res.group(2))
        meta["native_size"] = max(64, round((w * h) ** 0.5 / 8) * 8)   # a side of the same area, for a non-square one
    return meta


def config_to_metadata(**parts) -> dict[str, str]:
    """The ``__metadata__`` entry that records a checkpoint's full configuration (used by our writers)."""
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in parts.items()}
    return {METADATA_KEY: json.dumps(out, sort_keys=True)}


def with_overrides(cfg, overrides: dict | None):
    """``cfg`` with the recorded fields it has replaced (JSON lists back to tuples); unknown fields,
    e.g. from a newer writer, are ignored."""
    if not overrides:
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in overrides.items() if k in fields})
