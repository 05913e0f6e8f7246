"""Server settings, from the command line (``sd-api-server``) or environment variables (gunicorn).

Precedence: command-line option > environment variable > default. ``API_KEY`` (or ``SD_API_KEY``)
is read from the environment too and can be given as ``--api-key``; it is never logged.

| option | env var | default |
|---|---|---|
| --model PATH or NAME=PATH (repeatable) | SD_MODEL (comma-separated entries) | weights/shapes-sd1.safetensors |
| --model-name | SD_MODEL_NAME | file stem of the first model |
| --vae | SD_VAE | none |
| --control-net | SD_CONTROL_NET | none |
| --device auto/cpu/cuda/cuda:N | SD_DEVICE | auto (cuda when available) |
| --dtype auto/float32/float16/bfloat16 | SD_DTYPE | auto (bfloat16 where the hardware computes it natively, else float32) |
| --compile (torch.compile the UNet, on CUDA + CUDA graphs; warm-up compile at start) | SD_COMPILE (1/0) | off |
| --cuda-graphs / --no-cuda-graphs (on CUDA, replay the UNet and ControlNet as one CUDA graph per image shape) | SD_CUDA_GRAPHS (1/0) | on |
| --weights-cache DIR or off (weights converted to the dtype, memory-mapped by later loads and shared by workers) | SD_WEIGHTS_CACHE | auto: $XDG_CACHE_HOME/sd-api-server/weights or ~/.cache/sd-api-server/weights |
| --threads (torch CPU threads per worker) | SD_THREADS | torch's default (the cores), divided among the workers |
| --host / --port | SD_HOST / SD_PORT | 127.0.0.1 / 8080 |
| --workers (gunicorn worker processes) | SD_WORKERS | 1 |
| --http-threads (gunicorn gthread threads) | SD_HTTP_THREADS | 8 |
| --timeout (gunicorn worker timeout, s) | SD_TIMEOUT | 600 |
| --data-dir | SD_DATA_DIR | ./data |
| --download-url-prefix | SD_DOWNLOAD_URL_PREFIX | from the request (X-Forwarded-* honoured) |
| --file-ttl (s; 0 = keep forever) | SD_FILE_TTL | 3600 |
| --api-key | API_KEY / SD_API_KEY | none (warning logged) |
| --max-n | SD_MAX_N | 10 |
| --max-steps | SD_MAX_STEPS | 150 |
| --max-pixels (width*height of an output) | SD_MAX_PIXELS | 1048576 (1024x1024) |
| --max-input-pixels (uploaded image) | SD_MAX_INPUT_PIXELS | 16777216 (4096x4096) |
| --max-upload-bytes (request body) | SD_MAX_UPLOAD_BYTES | 20971520 (20 MiB) |
| --max-prompt-chars (prompt, negative_prompt) | SD_MAX_PROMPT_CHARS | 32000 |
| --max-queue (generations waiting per worker) | SD_MAX_QUEUE | 4 |
| --cors-origins (comma-separated origins, or *) | SD_CORS_ORIGINS | none (CORS off) |
| --proxy-hops (trusted X-Forwarded-* hops; 0 = ignore) | SD_PROXY_HOPS | 1 |
| --log-level | SD_LOG_LEVEL | info |

gunicorn.conf.py alone also reads SD_FORWARDED_ALLOW_IPS (127.0.0.1,::1), SD_ACCESS_LOG (-) and
SD_CONTROL_SOCKET (unset: gunicorn's control socket is off).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The trained shapes model when it is there (committed in weights/), else the generated random one.
TRAINED_MODEL = REPO_ROOT / "weights" / "shapes-sd1.safetensors"
DEFAULT_MODEL = TRAINED_MODEL if TRAINED_MODEL.exists() else REPO_ROOT / "weights" / "tiny-sd1.safetensors"

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(ValueError):
    pass


@dataclass
class Settings:
    # models: list of (name or None, path); the first is the default model
    models: list = field(default_factory=list)
    model_name: str | None = None
    vae: str | None = None
    control_net: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    cuda_graphs: bool = True
    weights_cache: str = "auto"
    threads: int | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    http_threads: int = 8
    timeout: int = 600
    data_dir: str = "data"
    download_url_prefix: str | None = None
    file_ttl: int = 3600
    api_key: str | None = field(default=None, repr=False)
    max_n: int = 10
    max_steps: int = 150
    max_pixels: int = 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    max_upload_bytes: int = 20 * 1024 * 1024
    max_prompt_chars: int = 32000
    max_queue: int = 4
    cors_origins: str | None = None
    proxy_hops: int = 1
    log_level: str = "info"

    def __post_init__(self):
        self.validate()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: dict) -> "Settings":
        """Defaults overridden by ``mapping`` (keys are field names); the environment is not read."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(mapping) - names
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values = dict(mapping)
        if "models" in values:
            values["models"] = [_model_entry(m) for m in values["models"]]
        return cls(**values)

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in dataclasses.fields(cls):
            if f.name in ("models", "api_key"):
                continue
            raw = env.get("SD_" + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _convert(f.name, raw.strip())
        models = env.get("SD_MODEL", "").strip()
        if models:
            values["models"] = [_model_entry(m) for m in models.split(",") if m.strip()]
        key = env.get("API_KEY") or env.get("SD_API_KEY")
        if key:
            values["api_key"] = key
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    # --- derived values -----------------------------------------------------------------------
    def model_specs(self) -> list[tuple[str, str]]:
        """(id, path) of each model to load; the first is the default."""
        entries = self.models or [(None, str(DEFAULT_MODEL))]
        out: list[tuple[str, str]] = []
        for i, (name, path) in enumerate(entries):
            if name is None:
                name = self.model_name if (i == 0 and self.model_name) else _stem(path)
            out.append((name, path))
        ids = [n for n, _ in out]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate model names: {ids}; use --model NAME=PATH")
        return out

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
        def positive(name, minimum=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")
        for name in ("max_n", "max_steps", "max_pixels", "max_input_pixels", "max_upload_bytes",
                     "max_prompt_chars", "workers", "http_threads", "timeout"):
            positive(name)
        for name in ("file_ttl", "max_queue", "proxy_hops"):
            positive(name, 0)
        if self.threads is not None:
            positive("threads")
        if not (0 < int(self.port) < 65536):
            raise ConfigError(f"port out of range: {self.port}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device in DEVICES or (self.device.startswith("cuda:")
                                            and self.device[5:].isdigit())):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.download_url_prefix is not None and not self.download_url_prefix.startswith(
                ("http://", "https://")):
            raise ConfigError("download_url_prefix must start with http:// or https://")
        if self.max_pixels < 64 * 64:
            raise ConfigError(f"max_pixels must be at least 4096 (64x64), got {self.max_pixels}")
        self.cors_origin_list()

    def cors_origin_list(self) -> list[str]:
        """The allowed CORS origins ([] = CORS off; ["*"] = any origin)."""
        raw = self.cors_origins
        if raw is None:
            return []
        items = [o.strip().rstrip("/") for o in (raw if isinstance(raw, (list, tuple))
                                                  else str(raw).split(",")) if o.strip()]
        for o in items:
            if o != "*" and not _ORIGIN_RE.fullmatch(o):
                raise ConfigError(f"bad CORS origin {o!r}: use scheme://host[:port] or *")
        if "*" in items and len(items) > 1:
            raise ConfigError("CORS origin '*' cannot be combined with other origins")
        return items


_ORIGIN_RE = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


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


_INT_FIELDS = {f.name for f in dataclasses.fields(Settings) if f.type in ("int", "int | None")}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(Settings) if f.type == "bool"}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(name: str, raw: str):
    if name in _BOOL_FIELDS:
        if raw.lower() not in _BOOLS:
            raise ConfigError(f"SD_{name.upper()} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")
        return _BOOLS[raw.lower()]
    if name in _INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"SD_{name.upper()} must be an integer, got {raw!r}") from None
    return raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd-api-server",
        description="OpenAI-compatible Stable Diffusion image server (gunicorn; --dev for Flask).")
    a = p.add_argument
    a("--model", action="append", metavar="[NAME=]PATH",
      help="single-file checkpoint or diffusers folder; repeat for several models (all are loaded "
           "at start; the first is the default). Default: weights/shapes-sd1.safetensors")
    a("--model-name", help="id of the default model in /v1/models and the `model` field")
    a("--vae", help="VAE weights replacing the checkpoint's own")
    a("--control-net", help="ControlNet weights (enables control_image)")
    a("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    a("--dtype", choices=DTYPES, help="weights dtype (default auto: bfloat16 on CPUs with AVX512-BF16/AMX and on "
      "CUDA cards with bf16, float16 on other CUDA cards, else float32)")
    a("--compile", action="store_const", const=True, help="torch.compile the UNet (inductor, weights frozen): "
      "faster steps (0.8x eager measured on CPU, bf16; on CUDA also replayed as CUDA graphs: 0.3x eager on an "
      "H200, fp16), minutes of compiling at start and at each new image size")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, help="on CUDA, replay the UNet (and ControlNet) "
      "as one CUDA graph per image shape, captured at its first use (default on: 12.2 instead of 22.0 ms per "
      "512² fp16 step on an H200, the same kernels)")
    a("--weights-cache", metavar="DIR|off", help="keep weights converted to the dtype in DIR: later loads (and "
      "the other workers) memory-map them instead of converting again, sharing one copy in memory "
      "(default auto: ~/.cache/sd-api-server/weights, or under $XDG_CACHE_HOME)")
    a("--threads", type=int, help="torch CPU threads per worker (default: the cores divided among the workers)")
    a("--host", help="listen address (default 127.0.0.1)")
    a("--port", type=int, help="listen port (default 8080)")
    a("--workers", type=int, help="gunicorn worker processes, each loads its own model (default 1; "
      "through the weights cache they share the weights' memory)")
    a("--http-threads", type=int, help="gunicorn threads per worker (default 8)")
    a("--timeout", type=int, help="gunicorn worker timeout in seconds (default 600)")
    a("--data-dir", help="where images returned as URLs are stored (default ./data)")
    a("--download-url-prefix", help="base of returned URLs, e.g. https://img.example.com")
    a("--file-ttl", type=int, help="seconds stored images live (default 3600; 0 = forever)")
    a("--api-key", help="require this Bearer token on every request but /health (prefer the "
                         "API_KEY environment variable: command lines are visible in ps)")
    a("--max-n", type=int)
    a("--max-steps", type=int)
    a("--max-pixels", type=int, help="largest width*height of an output image")
    a("--max-input-pixels", type=int, help="largest width*height of an uploaded image")
    a("--max-upload-bytes", type=int, help="largest request body (default 20 MiB)")
    a("--max-prompt-chars", type=int, help="longest prompt / negative_prompt (default 32000)")
    a("--max-queue", type=int, help="generations that may wait per worker before 503 (default 4)")
    a("--cors-origins", help="comma-separated browser origins allowed by CORS (e.g. "
                             "https://app.example.com), or *; default: CORS off")
    a("--proxy-hops", type=int, help="trusted reverse-proxy hops for X-Forwarded-* (default 1)")
    a("--log-level", choices=("debug", "info", "warning", "error"))
    a("--dev", action="store_true", help="run Flask's development server instead of gunicorn")
    return p


def parse_args(argv=None, environ=None) -> tuple[Settings, argparse.Namespace]:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        base = Settings.from_env(environ)
        changes = {}
        for f in dataclasses.fields(Settings):
            if f.name == "models":
                continue
            v = getattr(ns, f.name, None)
            if v is not None:
                changes[f.name] = v
        if ns.model:
            changes["models"] = [_model_entry(m) for m in ns.model]
        settings = base.replace(**changes)
        settings.model_specs()
    except ConfigError as e:
        parser.error(str(e))
    return settings, ns
