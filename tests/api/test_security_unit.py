"""Security settings in isolation: CORS origins (off by default, from --cors-origins or
SD_CORS_ORIGINS, validated), the key comparison (constant time, on fixed-length digests), and the
new limits' command-line and environment names."""
import hmac

import pytest

from api.config import ConfigError, Settings, parse_args
from api_helpers import error_of, make_app

KEY = "sk-unit-key"


def test_cors_off_by_default(tmp_path):
    assert Settings().cors_origins is None and Settings().cors_origin_list() == []
    c = make_app(tmp_path)[0].test_client()
    r = c.get("/v1/models", headers={"Origin": "https://a.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = c.options("/v1/models", headers={"Origin": "https://a.example",
                                         "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_cors_origins_from_cli_and_env():
    s, _ = parse_args(["--cors-origins", "https://a.example, http://localhost:8080/"], environ={})
    assert s.cors_origin_list() == ["https://a.example", "http://localhost:8080"]
    s, _ = parse_args([], environ={"SD_CORS_ORIGINS": "*"})
    assert s.cors_origin_list() == ["*"]
    s = Settings.from_env({"SD_CORS_ORIGINS": "https://b.example", "SD_MAX_PROMPT_CHARS": "99"})
    assert s.cors_origin_list() == ["https://b.example"] and s.max_prompt_chars == 99


@pytest.mark.parametrize("bad", ["a.example", "ftp://a.example", "https://a.example/path",
                                 "*, https://a.example", "https://a b.example"])
def test_bad_cors_origins_refused(bad):
    with pytest.raises(ConfigError):
        Settings(cors_origins=bad)


def test_cors_wildcard(tmp_path):
    c = make_app(tmp_path, cors_origins="*", api_key=KEY)[0].test_client()
    r = c.get("/v1/models", headers={"Origin": "https://any.example",
                                     "Authorization": f"Bearer {KEY}"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    pre = c.options("/v1/images/generations", headers={
        "Origin": "https://any.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type"})
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "*"
    assert pre.headers["Access-Control-Max-Age"] == "600"


def test_cors_preflight_headers_are_sanitised(tmp_path):
    c = make_app(tmp_path, cors_origins="https://a.example")[0].test_client()
    pre = c.options("/v1/images/generations", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type;<script>"})
    assert pre.status_code == 204 and "Access-Control-Allow-Headers" not in pre.headers


def test_key_compared_in_constant_time_on_digests(tmp_path, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    c = make_app(tmp_path, api_key=KEY)[0].test_client()
    for token in ("x", "sk-unit-ke", KEY + "-and-much-longer", KEY):
        c.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert calls == [(32, 32)] * 4      # same length whatever the token: no length leak
    error_of(c.get("/v1/models", headers={"Authorization": "Bearer x"}), 401)
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_openapi_and_new_limits_on_the_command_line():
    s, _ = parse_args(["--max-prompt-chars", "1000", "--max-queue", "0"], environ={})
    assert (s.max_prompt_chars, s.max_queue) == (1000, 0)
    with pytest.raises(ConfigError):
        Settings(max_prompt_chars=0)
    with pytest.raises(ConfigError):
        Settings(max_pixels=64 * 63)
