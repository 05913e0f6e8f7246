"""The `model` names clients send: a name the server does not serve gets the default model (most clients
send their own: dall-e-2, gpt-image-1, the seed document's "sd"), unless --strict-models; aliases route to
a served model; GPT image model names always get b64_json, as from OpenAI."""
import os

import pytest

from api.config import ConfigError, parse_args
from api_helpers import StubModel, error_of, make_app

GEN = "/v1/images/generations"


@pytest.fixture
def two(tmp_path):
    a, b = StubModel("a"), StubModel("b")
    app, stub = make_app(tmp_path, model={"a": a, "b": b}, model_alias=["dall-e-3=b"])
    return app.test_client(), stub, a, b


def test_unknown_names_get_the_default_model_and_served_names_and_aliases_route(two):
    client, stub, a, b = two
    for name, model in (("sd", a), ("dall-e-2", a), ("b", b), ("dall-e-3", b), ("a", a)):
        r = client.post(GEN, json={"prompt": "p", "model": name})
        assert r.status_code == 200, (name, r.get_json())
        assert stub.calls[-1][0] is model, name
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["a", "b"]     # what is served
    assert client.get("/v1/models/dall-e-3").status_code == 200
    assert error_of(client.get("/v1/models/sd"), 404)["code"] == "model_not_found"          # a lookup stays strict


def test_strict_models_answers_404(tmp_path):
    app, _ = make_app(tmp_path, model={"a": StubModel("a")}, strict_models=True, model_alias=["x=a"])
    client = app.test_client()
    err = error_of(client.post(GEN, json={"prompt": "p", "model": "dall-e-2"}), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found")
    assert client.post(GEN, json={"prompt": "p", "model": "x"}).status_code == 200


@pytest.mark.parametrize("model, sent, want", [
    ("gpt-image-1", None, "b64_json"), ("gpt-image-1", "url", "b64_json"), ("chatgpt-image-latest", None, "b64_json"),
    ("dall-e-2", None, "url"), ("dall-e-2", "b64_json", "b64_json"), (None, None, "url")])
def test_gpt_image_names_always_answer_in_base64(two, model, sent, want):
    client = two[0]
    body = {"prompt": "p", **({"model": model} if model else {}), **({"response_format": sent} if sent else {})}
    item = client.post(GEN, json=body).get_json()["data"][0]
    assert set(item) & {"url", "b64_json"} == {want}


def test_an_alias_of_a_model_that_is_not_served_stops_the_start(tmp_path):
    with pytest.raises(ConfigError, match="not served"):
        make_app(tmp_path, model={"a": StubModel("a")}, model_alias=["dall-e-3=b"])
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m/a.safetensors", "--model-alias", "dall-e-3=b"], {})
    with pytest.raises(SystemExit):
        parse_args(["--model-alias", "no-equals-sign"], {})
    s, _ = parse_args(["--model", "/m/a.safetensors", "--model-alias", "dall-e-3=a", "--strict-models"], {})
    assert (s.aliases(), s.strict_models) == ({"dall-e-3": "a"}, True)
    s, _ = parse_args([], {"SD_MODEL": "/m/a.safetensors", "SD_MODEL_ALIAS": "x=a, y=a"})
    assert s.aliases() == {"x": "a", "y": "a"}


def test_native_size_names_a_served_model_and_sets_its_default_side(default_model_path):
    """--native-size: the default side of a model whose file does not record it (SDXL-Turbo's 512);
    load_models also hands each model --vae-tiling."""
    from api.config import Settings
    from api.models import load_models
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m/a.safetensors", "--native-size", "b=512"], {})
    for bad in ("a", "a=500", "a=32", "a=x"):
        with pytest.raises(SystemExit):
            parse_args(["--model", "/m/a.safetensors", "--native-size", bad], {})
    s, _ = parse_args([], {"SD_MODEL": "/m/a.safetensors,t=/m/b.safetensors", "SD_NATIVE_SIZE": "t=512, a=768"})
    assert s.native_sizes() == {"t": 512, "a": 768}
    stem = os.path.splitext(os.path.basename(default_model_path))[0]
    plain = load_models(Settings(models=[default_model_path], weights_cache="off", dtype="float32"))
    sized = load_models(Settings(models=[default_model_path], native_size=[f"{stem}=128"], weights_cache="off",
                                 dtype="float32", vae_tiling="on"))
    assert sized.models[stem].native_size == 128 != plain.models[stem].native_size
    assert (sized.models[stem].vae_tiling, plain.models[stem].vae_tiling) == ("on", "auto")   # --vae-tiling too


def test_vae_tiling_modes_are_the_cores():
    from api.config import VAE_TILING_MODES
    from sdcore.tiling import MODES
    assert VAE_TILING_MODES == MODES
    with pytest.raises(SystemExit):
        parse_args(["--vae-tiling", "sometimes"], {})
