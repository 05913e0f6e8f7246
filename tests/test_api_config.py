"""Settings from environment variables and the command line; gunicorn.conf.py; main()."""
import runpy
from pathlib import Path

import pytest

from api.config import DEFAULT_MODEL, ConfigError, Settings, parse_args

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    s = Settings.from_env({})
    assert s.model_specs() == [("shapes-sd1", str(DEFAULT_MODEL))]
    assert DEFAULT_MODEL == ROOT / "weights" / "shapes-sd1.safetensors"      # the committed trained model
    assert (s.host, s.port, s.workers, s.device, s.dtype, s.threads) == ("127.0.0.1", 8080, 1, "auto", "auto", None)
    assert (s.max_n, s.max_steps, s.file_ttl, s.api_key, s.download_url_prefix) == (10, 150, 3600, None, None)
    assert (s.max_pixels, s.max_upload_bytes, s.data_dir, s.proxy_hops) == (1024 * 1024, 20 * 1024 * 1024, "data", 1)


def test_from_env():
    env = {"SD_MODEL": "sd=/m/a.safetensors, /m/b-folder/", "SD_VAE": "/v.safetensors", "SD_DEVICE": "cuda:1",
           "SD_DTYPE": "float16", "SD_THREADS": "4", "SD_PORT": "9000", "SD_HOST": "0.0.0.0",
           "SD_DATA_DIR": "/srv/img", "SD_DOWNLOAD_URL_PREFIX": "https://x.example", "SD_FILE_TTL": "60",
           "API_KEY": "k", "SD_MAX_N": "4", "SD_MAX_STEPS": "50", "SD_MAX_PIXELS": "4096",
           "SD_MAX_UPLOAD_BYTES": "1000", "SD_CONTROL_NET": "/c.safetensors", "SD_PROXY_HOPS": "0"}
    s = Settings.from_env(env)
    assert s.model_specs() == [("sd", "/m/a.safetensors"), ("b-folder", "/m/b-folder/")]
    assert (s.vae, s.device, s.dtype, s.threads, s.port, s.host) == ("/v.safetensors", "cuda:1", "float16", 4, 9000, "0.0.0.0")
    assert (s.data_dir, s.download_url_prefix, s.file_ttl, s.api_key) == ("/srv/img", "https://x.example", 60, "k")
    assert (s.max_n, s.max_steps, s.max_pixels, s.max_upload_bytes, s.control_net, s.proxy_hops) == (
        4, 50, 4096, 1000, "/c.safetensors", 0)
    assert Settings.from_env({"SD_API_KEY": "k2"}).api_key == "k2"
    assert "kkkkk" not in repr(Settings.from_env({"API_KEY": "kkkkk"}))


@pytest.mark.parametrize("flags, want", [("fpu sse avx2 avx512f avx512_bf16 avx512vl", "bfloat16"),
                                         ("fpu sse avx2 amx_bf16 amx_tile", "bfloat16"),
                                         ("fpu sse avx2 avx512f avx512vl", "float32"),       # bf16 emulated: slower
                                         (None, "float32")])                                 # no /proc/cpuinfo
def test_auto_dtype_on_cpu_follows_native_bf16(tmp_path, monkeypatch, flags, want):
    import torch
    from api import runtime
    info = tmp_path / "cpuinfo"
    if flags is not None:
        info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(runtime, "CPUINFO", str(info))
    assert runtime.resolve_dtype("auto", "cpu") == getattr(torch, want)
    assert runtime.resolve_dtype("float32", "cpu") == torch.float32          # an explicit dtype is kept
    assert runtime.resolve_dtype("float16", "cpu") == torch.float16


def test_model_name_names_the_first_model():
    s = Settings.from_env({"SD_MODEL": "/m/a.safetensors,/m/b.ckpt", "SD_MODEL_NAME": "sd"})
    assert s.model_specs() == [("sd", "/m/a.safetensors"), ("b", "/m/b.ckpt")]


@pytest.mark.parametrize("env", [{"SD_PORT": "http"}, {"SD_MAX_N": "0"}, {"SD_DTYPE": "float8"},
                                 {"SD_DEVICE": "tpu"}, {"SD_FILE_TTL": "-1"}, {"SD_PORT": "70000"},
                                 {"SD_DOWNLOAD_URL_PREFIX": "ftp://x"}, {"SD_MODEL": "=/x"}])
def test_bad_env(env):
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_weights_cache_setting(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert Settings.from_env({}).weights_cache_dir() == "/xdg/sd-api-server/weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/op")
    assert Settings.from_env({}).weights_cache_dir() == "/home/op/.cache/sd-api-server/weights"
    assert Settings.from_env({"SD_WEIGHTS_CACHE": "off"}).weights_cache_dir() is None
    assert Settings.from_env({"SD_WEIGHTS_CACHE": "/srv/cache"}).weights_cache_dir() == "/srv/cache"
    assert parse_args(["--weights-cache", "off"], {"SD_WEIGHTS_CACHE": "/srv/cache"})[0].weights_cache_dir() is None


def test_workers_split_the_cores_unless_threads_is_set():
    from api.runtime import worker_threads
    assert worker_threads(Settings.from_env({}), 8) is None                          # one worker: torch's default
    assert worker_threads(Settings.from_env({"SD_WORKERS": "2"}), 8) == 4
    assert worker_threads(Settings.from_env({"SD_WORKERS": "3"}), 2) == 1
    assert worker_threads(Settings.from_env({"SD_WORKERS": "2", "SD_THREADS": "3"}), 8) == 3


def test_duplicate_model_names():
    with pytest.raises(ConfigError):
        Settings.from_env({"SD_MODEL": "/a/m.safetensors,/b/m.safetensors"}).model_specs()


def test_cli_overrides_env():
    env = {"SD_PORT": "9000", "SD_DATA_DIR": "/env", "API_KEY": "envkey"}
    s, ns = parse_args(["--model", "x=/a.safetensors", "--model", "/b/c.safetensors", "--port", "7000",
                        "--threads", "2", "--device", "cpu", "--dtype", "bfloat16", "--api-key", "clikey",
                        "--download-url-prefix", "http://h:1", "--max-n", "3", "--file-ttl", "0"], env)
    assert s.model_specs() == [("x", "/a.safetensors"), ("c", "/b/c.safetensors")]
    assert (s.port, s.data_dir, s.api_key, s.threads, s.device, s.dtype) == (7000, "/env", "clikey", 2, "cpu", "bfloat16")
    assert (s.download_url_prefix, s.max_n, s.file_ttl, ns.dev) == ("http://h:1", 3, 0, False)
    s, ns = parse_args(["--dev", "--model-name", "sd"], {})
    assert ns.dev and s.model_specs()[0][0] == "sd"


def test_cli_errors_exit():
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "int8"], {})
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "0"], {})


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ConfigError):
        Settings.from_mapping({"no_such_setting": 1})


def _gunicorn_conf(monkeypatch, env):
    for k in ("SD_HOST", "SD_PORT", "SD_WORKERS", "SD_HTTP_THREADS", "SD_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_gunicorn_conf(monkeypatch):
    c = _gunicorn_conf(monkeypatch, {})
    assert c["workers"] == 1 and c["worker_class"] == "gthread" and c["threads"] >= 2
    assert c["timeout"] >= 600 and c["graceful_timeout"] >= 600 and c["preload_app"] is False
    assert c["bind"] == ["127.0.0.1:8080"]
    c = _gunicorn_conf(monkeypatch, {"SD_HOST": "0.0.0.0", "SD_PORT": "9001", "SD_WORKERS": "2",
                                     "SD_HTTP_THREADS": "3", "SD_TIMEOUT": "1200"})
    assert (c["bind"], c["workers"], c["threads"], c["timeout"]) == (["0.0.0.0:9001"], 2, 3, 1200)


def test_main_starts_gunicorn_with_conf_and_cli(monkeypatch):
    import app as app_module
    from gunicorn.app.base import BaseApplication
    seen = {}

    def fake_run(self):
        seen["cfg"] = self.cfg
        seen["app"] = self

    monkeypatch.setattr(BaseApplication, "run", fake_run)
    monkeypatch.setenv("SD_HTTP_THREADS", "5")
    assert app_module.main(["--port", "8123", "--host", "0.0.0.0", "--workers", "2", "--timeout", "900"]) == 0
    cfg = seen["cfg"]
    assert cfg.bind == ["0.0.0.0:8123"] and cfg.workers == 2 and cfg.threads == 5
    assert cfg.preload_app is False and cfg.timeout == 900
    # several workers: the balancing worker class (api/gworker.py), without keep-alive; one: plain gthread
    assert cfg.worker_class_str == "api.gworker.BalancedThreadWorker" and cfg.keepalive == 0
    assert app_module.main(["--workers", "1"]) == 0
    assert seen["cfg"].worker_class_str == "gthread" and seen["cfg"].keepalive == 5
