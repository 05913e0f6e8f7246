"""Server settings: one definition per setting, from which the command line (``sd-api-server``), the
environment reader (``gunicorn -c gunicorn.conf.py``), gunicorn's own settings and the settings table
of docs/operating.md (``python -m api.config``) are all produced.

Each field of :class:`Settings` is declared with :func:`setting`: its default, its help text and, where it
differs from the rule, its environment variable (rule: ``SD_`` + the name in capitals) or command-line
flag (rule: ``--`` + the name with dashes). The type is the field's annotation. Precedence: command-line
option > environment variable > default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import weights

# The trained shapes model when it is there (committed in weights/, installed with the package), else the
# generated random one.
WEIGHTS_DIR = Path(weights.__file__).resolve().parent
TRAINED_MODEL = WEIGHTS_DIR / "shapes-sd1.safetensors"
DEFAULT_MODEL = TRAINED_MODEL if TRAINED_MODEL.exists() else WEIGHTS_DIR / "tiny-sd1.safetensors"
TRAINED_TAESD = WEIGHTS_DIR / "shapes-taesd.safetensors"      # distilled from TRAINED_MODEL's VAE (weights/README.md)

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
VAE_TILING_MODES = ("auto", "on", "off")          # sdcore.tiling.MODES (this module stays free of torch)
QUANTIZED_WEIGHTS = ("dequantize", "keep")       # sdcore.model.QUANTIZED_WEIGHTS
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    pass


def setting(default=None, help="", *, env=None, flag=None, metavar=None, choices=None, shown=None,
            factory=None, secret=False):
    """A Settings field with what the CLI, the environment reader and the docs need to know of it.
    ``shown``: the default as the docs table writes it, where the value itself says little."""
    meta = dict(help=help, env=env, flag=flag, metavar=metavar, choices=choices, shown=shown)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, repr=not secret, metadata=meta)


@dataclass
class Settings:
    # --- models -------------------------------------------------------------------------------------
    models: list = setting(factory=list, flag="--model", env="SD_MODEL", metavar="[NAME=]PATH",
                           shown="weights/shapes-sd1.safetensors",
                           help="single-file checkpoint or diffusers folder; repeat the option (or separate "
                                "entries with commas in the variable) for several models, all loaded at start, "
                                "the first being the default")
    model_name: str | None = setting(None, "id of the default model in /v1/models and the `model` field",
                                     shown="the file stem of the first model")
    model_alias: list = setting(factory=list, metavar="NAME=SERVED",
                                help="another name for a served model (repeat the option, or separate entries "
                                     "with commas in the variable), e.g. dall-e-3=sd15")
    native_size: list = setting(factory=list, metavar="NAME=SIDE",
                                help="the default image side of a served model whose file does not record it "
                                     "(repeat the option, or separate entries with commas in the variable), "
                                     "e.g. turbo=512 for SDXL-Turbo")
    strict_models: bool = setting(False, "answer 404 model_not_found for a `model` the server does not serve "
                                         "(off: such a request gets the default model, as clients that send "
                                         "their own model name expect)")
    lora_model_dir: str | None = setting(None, "directory of LoRA/LyCORIS files: <lora:NAME:WEIGHT> in a prompt, or "
                                               "the `lora` field, applies NAME.safetensors (.ckpt, .pt) from it",
                                         metavar="DIR", shown="none (LoRAs refused)")
    embd_dir: str | None = setting(None, "directory of textual-inversion embeddings: a prompt naming one (its file "
                                         "name without extension) gets its learned vectors", metavar="DIR",
                                   shown="none")
    vae: str | None = setting(None, "VAE weights replacing the checkpoint's own")
    diffusion_model: str | None = setting(None, "a transformer-only file (flux1-dev.safetensors, a FLUX or SD3 GGUF), "
                                                "served as --model is, beside --vae, --clip-l and --t5xxl (LlamaEdge's "
                                                "and stable-diffusion.cpp's option)", metavar="PATH", shown="none")
    clip_l: str | None = setting(None, "the CLIP-L text encoder (clip_l.safetensors) of an SD3 or FLUX checkpoint "
                                       "without it", metavar="PATH", shown="none: the checkpoint's own")
    clip_g: str | None = setting(None, "SD3's OpenCLIP bigG text encoder (clip_g.safetensors) for a checkpoint without it",
                                 metavar="PATH", shown="none: the checkpoint's own")
    t5xxl: str | None = setting(None, "the T5-XXL text encoder (t5xxl_fp16.safetensors, or a GGUF such as "
                                      "t5-v1_1-xxl-encoder-Q8_0.gguf) of SD3 and FLUX; without one (in "
                                      "the checkpoint or here) SD3 runs on its CLIPs alone, T5's tokens zeros",
                                metavar="PATH", shown="none: the checkpoint's own, if any")
    control_net: str | None = setting(None, "ControlNet weights (enables control_image; SD1/SD2/SDXL)")
    clip_on_cpu: bool = setting(False, "run the text encoders (CLIPs, T5) on the CPU while the model runs on the GPU: "
                                       "they take no card memory and run once per request (stable-diffusion.cpp's "
                                       "option)")
    quantized_weights: str = setting("dequantize", "how GGUF-quantized and float8 weights are held: dequantize "
                                                   "(to the compute dtype at load: fastest) or keep (as stored, each "
                                                   "layer expanded when it runs: SD3's and FLUX's transformers and T5 "
                                                   "take their file's size in memory)", choices=QUANTIZED_WEIGHTS)
    taesd: str | None = setting(None, "TAESD decoder weights (taesd_decoder.safetensors, taesdxl_decoder.safetensors "
                                      "or a diffusers AutoencoderTiny) for previews while sampling", metavar="PATH",
                                shown="none: previews by a linear projection fitted to the VAE (the embedded default "
                                      "model: weights/shapes-taesd.safetensors)")
    taesd_decode: bool = setting(False, "decode final images with the TAESD decoder as well: several times faster, "
                                        "visibly softer (docs/BENCHMARKS.md); needs --taesd")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "weights dtype; auto: bfloat16 on CPUs with AVX512-BF16/AMX and on CUDA cards "
                                 "with bf16, float16 on other CUDA cards, else float32", choices=DTYPES)
    vae_tiling: str = setting("auto", "decode and encode large images in overlapping tiles, blended (less memory; "
                                      "the normalisation statistics are estimated from the shrunk image, so it "
                                      "differs slightly); auto: only when the whole image would not fit in the free "
                                      "memory", choices=VAE_TILING_MODES)
    compile: bool = setting(False, "torch.compile the UNet (inductor, weights frozen; on CUDA replayed as CUDA "
                                   "graphs): faster steps, minutes of compiling at start and at each new size")
    cuda_graphs: bool = setting(True, "on CUDA, replay the UNet (and ControlNet) as one CUDA graph per image "
                                      "shape, captured at its first use")
    weights_cache: str = setting("auto", "keep weights converted to the dtype in DIR: later loads and the other "
                                         "workers memory-map them, sharing one copy (off: convert at every load)",
                                 metavar="DIR",
                                 shown="auto: $XDG_CACHE_HOME/sd-api-server/weights or ~/.cache/sd-api-server/weights")
    threads: int | None = setting(None, "torch CPU threads per worker",
                                  shown="the cores, divided among the workers")
    # --- HTTP server --------------------------------------------------------------------------------
    host: str = setting("127.0.0.1", "listen address")
    port: int = setting(8080, "listen port")
    workers: int = setting(1, "worker processes, each with its own copy of the models (through the weights "
                              "cache they share the weights' memory)")
    http_threads: int = setting(8, "requests a worker handles at once (one generates, the others wait in the "
                                   "queue or are answered at once); keep it above max_queue + 1")
    timeout: int = setting(600, "worker heartbeat timeout in seconds; also bounds the model load at start")
    header_timeout: int = setting(20, "seconds a client has to send a request's line and headers, counted from "
                                      "its first byte (or from the connection, for a first request)")
    body_timeout: int = setting(30, "seconds a request body may stall between two reads")
    keepalive: int = setting(5, "seconds an idle keep-alive connection stays open between requests "
                                "(0: close after each response)")
    max_connections: int = setting(1000, "open client connections per worker; more wait in the listen backlog")
    forwarded_allow_ips: str = setting("127.0.0.1,::1", "proxies whose X-Forwarded-* headers gunicorn trusts")
    access_log: str = setting("-", "gunicorn access log file ('-': standard output, empty: none)")
    control_socket: str | None = setting(None, "path of gunicorn's control socket", shown="none (off)")
    # --- images and files ---------------------------------------------------------------------------
    data_dir: str = setting("data", "where images returned as URLs are stored")
    download_url_prefix: str | None = setting(None, "base of returned URLs, e.g. https://img.example.com",
                                              shown="the request's own (X-Forwarded-* honoured)")
    file_ttl: int = setting(3600, "seconds stored images live (0: forever)")
    # --- limits and security ------------------------------------------------------------------------
    api_key: str | None = setting(None, "require this Bearer token on every request but /health (prefer the "
                                        "variable: command lines are visible in ps)", env="API_KEY",
                                  shown="none (a warning is logged)", secret=True)
    api_auth: str | None = setting(None, "comma-separated user:password pairs accepted as HTTP Basic credentials, "
                                         "as AUTOMATIC1111's --api-auth (the API key is accepted as a Basic "
                                         "password too)", metavar="USER:PASS[,USER:PASS]",
                                   shown="none", secret=True)
    max_n: int = setting(10, "most images per request")
    max_steps: int = setting(150, "most sampler steps per image")
    max_pixels: int = setting(1024 * 1024, "largest width*height of an output image")
    max_input_pixels: int = setting(4096 * 4096, "largest width*height of an uploaded image")
    max_upload_bytes: int = setting(20 * 1024 * 1024, "largest request body in bytes")
    max_prompt_chars: int = setting(32000, "longest prompt / negative_prompt")
    max_queue: int = setting(4, "generations that may wait per worker before 503")
    cors_origins: str | None = setting(None, "comma-separated browser origins allowed by CORS "
                                             "(e.g. https://app.example.com), or *", shown="none (CORS off)")
    proxy_hops: int = setting(1, "trusted reverse-proxy hops for X-Forwarded-* (0: ignore them)")
    log_level: str = setting("info", "log level", choices=LOG_LEVELS)

    def __post_init__(self):
        self.models = [_model_entry(m) for m in self.models]
        self.validate()

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: dict) -> "Settings":
        """Defaults overridden by ``mapping`` (keys are field names); the environment is not read."""
        unknown = set(mapping) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**mapping)

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = next((env[name] for name in env_names(f) if env.get(name, "").strip()), None)
            if raw is not None:
                values[f.name] = convert(f, raw.strip())
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    # --- derived values -----------------------------------------------------------------------------
    def model_specs(self) -> list[tuple[str, str]]:
        """(id, path) of each model to load; the first is the default."""
        entries = list(self.models) + ([(None, self.diffusion_model)] if self.diffusion_model else [])
        entries = entries or [(None, str(DEFAULT_MODEL))]
        out: list[tuple[str, str]] = []
        for i, (name, path) in enumerate(entries):
            if name is None:
                name = self.model_name if (i == 0 and self.model_name) else _stem(path)
            out.append((name, path))
        ids = [n for n, _ in out]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate model names: {ids}; use --model NAME=PATH")
        return out

    def aliases(self) -> dict[str, str]:
        """Alias -> served model id (``--model-alias NAME=SERVED``)."""
        out = {}
        for entry in self.model_alias:
            name, sep, served = str(entry).partition("=")
            if not sep or not name.strip() or not served.strip():
                raise ConfigError(f"bad model alias {entry!r}; expected NAME=SERVED")
            out[name.strip()] = served.strip()
        return out

    def native_sizes(self) -> dict[str, int]:
        """Served model id -> default side (``--native-size NAME=SIDE``)."""
        out = {}
        for entry in self.native_size:
            name, sep, side = str(entry).partition("=")
            if not sep or not name.strip() or not side.strip().isdigit() or int(side) < 64 or int(side) % 8:
                raise ConfigError(f"bad native size {entry!r}; expected NAME=SIDE, SIDE a multiple of 8 from 64")
            out[name.strip()] = int(side)
        return out

    def api_auth_pairs(self) -> list[tuple[str, str]]:
        """(user, password) of each --api-auth entry."""
        pairs = []
        for entry in (self.api_auth or "").split(","):
            if not entry.strip():
                continue
            user, sep, password = entry.strip().partition(":")
            if not sep or not user or not password:
                raise ConfigError("bad --api-auth entry: expected USER:PASSWORD pairs separated by commas")
            pairs.append((user, password))
        return pairs

    def weights_cache_dir(self) -> str | None:
        """Where converted weights are kept (None: off)."""
        choice = self.weights_cache.strip().lower()
        if choice in ("off", "none", "0", "false", "no"):
            return None
        if choice == "auto":
            from sdcore.weights_cache import default_dir
            return default_dir()
        return self.weights_cache

    def validate(self) -> None:
        def at_least(name, minimum):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")
        for name in ("max_n", "max_steps", "max_pixels", "max_input_pixels", "max_upload_bytes", "max_prompt_chars",
                     "workers", "http_threads", "timeout", "header_timeout", "body_timeout", "max_connections"):
            at_least(name, 1)
        for name in ("file_ttl", "max_queue", "proxy_hops", "keepalive"):
            at_least(name, 0)
        if self.threads is not None:
            at_least("threads", 1)
        if not (0 < int(self.port) < 65536):
            raise ConfigError(f"port out of range: {self.port}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if not (self.device in DEVICES or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.download_url_prefix is not None and not self.download_url_prefix.startswith(("http://", "https://")):
            raise ConfigError("download_url_prefix must start with http:// or https://")
        if self.taesd_decode and not self.taesd:
            raise ConfigError("taesd_decode needs a TAESD decoder: set taesd as well")
        if self.taesd and not os.path.exists(self.taesd):
            raise ConfigError(f"taesd: {self.taesd} does not exist")
        for name in ("clip_l", "clip_g", "t5xxl"):
            if getattr(self, name) and not os.path.exists(getattr(self, name)):
                raise ConfigError(f"{name}: {getattr(self, name)} does not exist")
        for name in ("lora_model_dir", "embd_dir"):
            if getattr(self, name) and not os.path.isdir(getattr(self, name)):
                raise ConfigError(f"{name}: {getattr(self, name)} is not a directory")
        self.api_auth_pairs()
        if self.max_pixels < 64 * 64:
            raise ConfigError(f"max_pixels must be at least 4096 (64x64), got {self.max_pixels}")
        self.cors_origin_list()

    def taesd_for(self, model_path) -> str | None:
        """The TAESD decoder of a served model: --taesd, else the one distilled for the embedded default model."""
        if self.taesd:
            return self.taesd
        if Path(model_path).resolve() == TRAINED_MODEL.resolve() and TRAINED_TAESD.exists():
            return str(TRAINED_TAESD)
        return None

    def cors_origin_list(self) -> list[str]:
        """The allowed CORS origins ([] = CORS off; ["*"] = any origin)."""
        raw = self.cors_origins
        if raw is None:
            return []
        raw = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        items = [o.strip().rstrip("/") for o in raw if o.strip()]
        for o in items:
            if o != "*" and not _ORIGIN_RE.fullmatch(o):
                raise ConfigError(f"bad CORS origin {o!r}: use scheme://host[:port] or *")
        if "*" in items and len(items) > 1:
            raise ConfigError("CORS origin '*' cannot be combined with other origins")
        return items


_ORIGIN_RE = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_TYPES = typing.get_type_hints(Settings)


def value_type(f: dataclasses.Field) -> type:
    """The field's type without ``| None``: bool, int, str or list."""
    t = _TYPES[f.name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def env_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The variables a setting is read from, first one first (the key also answers to SD_API_KEY)."""
    name = f.metadata.get("env") or "SD_" + f.name.upper()
    return (name, "SD_API_KEY") if name == "API_KEY" else (name,)


def flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def convert(f: dataclasses.Field, raw: str):
    """An environment variable's text as the setting's type."""
    t, var = value_type(f), env_names(f)[0]
    if t is list:
        return [m.strip() for m in raw.split(",") if m.strip()]
    if t is bool:
        if raw.lower() not in _BOOLS:
            raise ConfigError(f"{var} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")
        return _BOOLS[raw.lower()]
    if t is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{var} must be an integer, got {raw!r}") from None
    return raw


def _stem(path: str) -> str:
    p = Path(path.rstrip("/\\"))
    return p.stem if p.suffix else p.name


def _model_entry(entry) -> tuple[str | None, str]:
    if isinstance(entry, (tuple, list)):
        name, path = entry
        return (name or None), str(path)
    entry = str(entry).strip()
    if "=" in entry:
        name, path = entry.split("=", 1)
        if not name.strip() or not path.strip():
            raise ConfigError(f"bad model entry {entry!r}; expected PATH or NAME=PATH")
        return name.strip(), path.strip()
    return None, entry


# --- the command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd-api-server",
                                description="OpenAI-compatible Stable Diffusion image server (gunicorn; --dev for "
                                            "Flask's development server). Every option has an environment variable.")
    for f in dataclasses.fields(Settings):
        t, meta = value_type(f), f.metadata
        kw = dict(dest=f.name, help=f"{meta['help']} [{env_names(f)[0]}; default: {shown_default(f)}]")
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t is list:
            kw["action"] = "append"
        elif t is int:
            kw["type"] = int
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        p.add_argument(flag(f), **kw)
    p.add_argument("--dev", action="store_true", help="run Flask's development server instead of gunicorn")
    return p


def parse_args(argv=None, environ=None) -> tuple[Settings, argparse.Namespace]:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        base = Settings.from_env(environ)
        changes = {f.name: getattr(ns, f.name) for f in dataclasses.fields(Settings)
                   if getattr(ns, f.name) is not None}
        settings = base.replace(**changes)
        served = {n for n, _ in settings.model_specs()}
        for option, names in (("--model-alias", settings.aliases().values()), ("--native-size", settings.native_sizes())):
            if set(names) - served:
                raise ConfigError(f"{option} names a model that is not served: {', '.join(sorted(set(names) - served))}")
    except ConfigError as e:
        parser.error(str(e))
    return settings, ns


# --- the docs' table ----------------------------------------------------------------------------------
def shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    value = None if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def settings_table() -> str:
    """The markdown table of every setting, as docs/operating.md carries it."""
    rows = ["| option | environment variable | default | what it sets |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        option = flag(f) + (f" {f.metadata['metavar']}" if f.metadata.get("metavar") else "")
        if value_type(f) is bool:
            option = f"{flag(f)} / --no-{flag(f)[2:]}"
        env = " / ".join(env_names(f))
        rows.append(f"| `{option}` | `{env}` | {shown_default(f)} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
