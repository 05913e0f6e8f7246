"""The request contract has one source: the HTTP side takes its sampler and scheduler names from
the core's registries (at each request, so a sampler registered at run time is served and
documented) and its defaults from ``GenerationParams``; the core names its own fields in errors,
and the API maps them to request fields; the size is decided once, by the parser."""
import base64
import dataclasses
import io
import json

import pytest
import torch
from PIL import Image

import samplers
from api import params
from api_helpers import StubGenerate, StubModel, error_of, make_app
from sdcore.pipeline import GenerationParams, PipelineError

GEN = "/v1/images/generations"
NAME = "euler_copy"


@pytest.fixture
def runtime_sampler():
    """euler registered under a new name for the test's duration; records its calls."""
    euler, calls = samplers.SAMPLERS["euler"], []

    def euler_copy(denoise, x, sigmas, **kw):
        calls.append(len(sigmas) - 1)
        return euler(denoise, x, sigmas, **kw)

    samplers.SAMPLERS[NAME] = euler_copy
    try:
        yield calls
    finally:
        del samplers.SAMPLERS[NAME]


@pytest.fixture(scope="module")
def tiny_model(default_model_path):
    import sdcore
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture
def real_client(tmp_path, tiny_model):
    from app import create_app
    app = create_app({"data_dir": str(tmp_path / "data"), "api_key": None}, model=tiny_model)
    app.config["TESTING"] = True
    return app.test_client()


def _enum(client, field):
    doc = client.get("/openapi.json").get_json()
    return doc["components"]["schemas"]["GenerationRequest"]["properties"][field]["enum"]


# --- names: the core's registries, read at request time -------------------------------------------
def test_runtime_sampler_generates_over_http(real_client, runtime_sampler):
    r = real_client.post(GEN, json={"prompt": "a red circle", "sample_method": NAME, "steps": 2,
                                    "response_format": "b64_json"})
    assert r.status_code == 200, r.get_data(as_text=True)
    im = Image.open(io.BytesIO(base64.b64decode(r.get_json()["data"][0]["b64_json"])))
    assert im.size == (64, 64)                              # the tiny model's native size
    assert f"Sampler: {NAME}" in im.text["parameters"]
    assert runtime_sampler == [2]                           # the registered function ran


def test_runtime_sampler_in_openapi_and_gone_after(real_client, runtime_sampler):
    assert NAME in _enum(real_client, "sample_method")
    assert _enum(real_client, "sample_method") == list(samplers.SAMPLERS)
    assert _enum(real_client, "scheduler") == list(samplers.SCHEDULERS)
    del samplers.SAMPLERS[NAME]
    try:
        assert NAME not in _enum(real_client, "sample_method")
        err = error_of(real_client.post(GEN, json={"prompt": "p", "sample_method": NAME}), 400)
        assert err["param"] == "sample_method"
    finally:
        samplers.SAMPLERS[NAME] = samplers.SAMPLERS["euler"]     # for the fixture to remove


# --- defaults: GenerationParams' own ----------------------------------------------------------------
def test_minimal_request_gets_the_generation_params_defaults(tmp_path):
    app, stub = make_app(tmp_path)
    assert app.test_client().post(GEN, json={"prompt": "p"}).status_code == 200
    want = GenerationParams(prompt="p")
    for f in dataclasses.fields(GenerationParams):
        assert getattr(stub.params, f.name) == getattr(want, f.name), f.name


def test_documented_defaults_are_the_generation_params_defaults(tmp_path):
    app, _ = make_app(tmp_path)
    props = app.test_client().get("/openapi.json").get_json()[
        "components"]["schemas"]["EditForm"]["properties"]
    core = {f.name: f.default for f in dataclasses.fields(GenerationParams)}
    documented = {n: p["default"] for n, p in props.items() if "default" in p and n in core}
    assert {"n", "steps", "width", "cfg_scale", "sample_method", "seed", "strength"} <= set(documented)
    assert documented == {n: json.loads(json.dumps(core[n])) for n in documented}      # as JSON has them
    assert params.defaults() == {**{n: v for n, v in core.items() if v is not dataclasses.MISSING},
                                 "response_format": "url"}


# --- errors: core field names, mapped to request fields ---------------------------------------------
@pytest.mark.parametrize("field,param", [("control_image", "control_image"), ("steps", "steps"),
                                         ("init_image", "image"), ("mask", "mask")])
def test_pipeline_error_field_maps_to_the_request_param(tmp_path, field, param):
    app, _ = make_app(tmp_path, stub=StubGenerate(error=PipelineError("refused", field)))
    err = error_of(app.test_client().post(GEN, json={"prompt": "p", "size": "64x64"}), 400)
    assert (err["param"], err["message"]) == (param, "refused")


def test_core_names_its_own_fields(tiny_model):
    from sdcore.pipeline import generate
    with pytest.raises(PipelineError) as e:
        generate(tiny_model, GenerationParams("x", width=64, height=60))
    assert e.value.field == "height"
    assert "request_id" not in {f.name for f in dataclasses.fields(GenerationParams)}


# --- the size: decided once, by the parser -----------------------------------------------------------
@pytest.mark.parametrize("body,size", [({}, (64, 64)), ({"size": "auto"}, (64, 64)),
                                       ({"size": "128x64"}, (128, 64)),
                                       ({"width": 72}, (72, 512)), ({"height": 72}, (512, 72))])
def test_native_size_when_no_size_is_sent(tmp_path, body, size):
    model = StubModel()
    model.native_size = 64
    app, stub = make_app(tmp_path, model=model)
    assert app.test_client().post(GEN, json={"prompt": "p", **body}).status_code == 200
    assert (stub.params.width, stub.params.height) == size


def test_native_size_beyond_max_pixels_falls_back(tmp_path):
    model = StubModel()
    model.native_size = 1024
    app, stub = make_app(tmp_path, model=model, max_pixels=512 * 512)
    assert app.test_client().post(GEN, json={"prompt": "p"}).status_code == 200
    assert (stub.params.width, stub.params.height) == (512, 512)
