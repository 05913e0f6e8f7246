"""Settings from environment variables and the command line; gunicorn.conf.py; main()."""
import runpy
from pathlib import Path

import pytest

from api.config import DEFAULT_MODEL, ConfigError, Settings, parse_args

ROOT = Path(__file__).resolve().parents[2]


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
    from api.models import worker_threads
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
    for k in [k for k in __import__("os").environ if k.startswith("SD_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_gunicorn_conf(monkeypatch):
    c = _gunicorn_conf(monkeypatch, {})
    assert c["workers"] == 1 and c["worker_class"].__name__ == "RequestBufferingWorker" and c["threads"] >= 2
    assert c["timeout"] >= 600 and c["graceful_timeout"] >= 600 and c["preload_app"] is False
    assert c["bind"] == ["127.0.0.1:8080"] and c["keepalive"] == 5 and c["worker_connections"] == 1000
    assert (c["worker_class"].header_timeout, c["worker_class"].body_timeout) == (20, 30)
    assert "control_socket" not in c and c["control_socket_disable"] is True
    c = _gunicorn_conf(monkeypatch, {"SD_HOST": "0.0.0.0", "SD_PORT": "9001", "SD_WORKERS": "2",
                                     "SD_HTTP_THREADS": "3", "SD_TIMEOUT": "1200", "SD_HEADER_TIMEOUT": "7",
                                     "SD_CONTROL_SOCKET": "/run/x.sock"})
    assert (c["bind"], c["workers"], c["threads"], c["timeout"]) == (["0.0.0.0:9001"], 2, 3, 1200)
    assert c["keepalive"] == 0 and c["worker_class"].header_timeout == 7 and c["control_socket"] == "/run/x.sock"
    with pytest.raises(ConfigError):         # validated as the server's own settings
        _gunicorn_conf(monkeypatch, {"SD_WORKERS": "zero"})


def test_main_starts_gunicorn_with_the_same_settings(monkeypatch):
    from gunicorn.app.base import BaseApplication

    from api import serve
    seen = {}

    def fake_run(self):
        seen["cfg"] = self.cfg

    monkeypatch.setattr(BaseApplication, "run", fake_run)
    monkeypatch.setenv("SD_HTTP_THREADS", "5")
    assert serve.main(["--port", "8123", "--host", "0.0.0.0", "--workers", "2", "--timeout", "900",
                       "--body-timeout", "11"]) == 0
    cfg = seen["cfg"]
    assert cfg.bind == ["0.0.0.0:8123"] and cfg.workers == 2 and cfg.threads == 5
    assert cfg.preload_app is False and cfg.timeout == 900 and cfg.keepalive == 0     # several workers: no keep-alive
    assert cfg.worker_class.__name__ == "RequestBufferingWorker" and cfg.worker_class.body_timeout == 11
    assert serve.main(["--workers", "1"]) == 0
    assert seen["cfg"].keepalive == 5


def test_settings_table_in_the_docs_is_the_definitions():
    from api.config import settings_table
    text = (ROOT / "docs" / "operating.md").read_text()
    start = "<!-- settings table: generated from api/config.py, do not edit by hand -->\n"
    table = text.split(start, 1)[1].split("<!-- end settings table -->", 1)[0]
    assert table.strip() == settings_table().strip(), "run: python -m api.config and paste it into docs/operating.md"


def test_every_setting_has_an_option_and_a_variable():
    import dataclasses
    from api.config import build_parser, env_names
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(Settings):
        assert f.name in dests and f.metadata["help"]
        name = env_names(f)[0]
        if f.name not in ("models", "api_key"):
            assert name == "SD_" + f.name.upper()


def test_taesd_settings(tmp_path):
    from api.config import TRAINED_MODEL, TRAINED_TAESD
    with pytest.raises(ConfigError, match="needs a TAESD"):
        Settings.from_mapping({"taesd_decode": True})
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.from_mapping({"taesd": str(tmp_path / "missing.safetensors")})
    (tmp_path / "t.safetensors").write_bytes(b"")
    s = Settings.from_mapping({"taesd": str(tmp_path / "t.safetensors")})
    assert s.taesd_for(TRAINED_MODEL) == s.taesd_for("other.safetensors") == str(tmp_path / "t.safetensors")
    plain = Settings.from_mapping({})
    assert plain.taesd_for("other.safetensors") is None
    assert plain.taesd_for(TRAINED_MODEL) == (str(TRAINED_TAESD) if TRAINED_TAESD.exists() else None)
