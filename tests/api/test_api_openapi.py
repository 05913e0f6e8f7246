"""/openapi.json is in sync with the application: every route and method is documented, every
field the request parsers read is documented for its content type (found by recording what the
parsers read, not from a copied list), and the bounds, choices and defaults it states are the
ones the validators enforce (each documented minimum/maximum is accepted, one step beyond is
refused, each enum value is accepted)."""
import io
import json
import re

import pytest

from api import params
from api_helpers import StubModel, error_of, make_app, png_bytes

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
KEY = "sk-openapi"


@pytest.fixture
def app_stub(tmp_path):
    return make_app(tmp_path, api_key=KEY, max_n=3, max_steps=40, max_pixels=128 * 128)


@pytest.fixture
def client(app_stub):
    return app_stub[0].test_client()


@pytest.fixture
def doc(client):
    r = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.mimetype == "application/json"
    return r.get_json()


def schema(doc, name):
    return doc["components"]["schemas"][name]


def resolve(doc, s):
    if "$ref" in s:
        return schema(doc, s["$ref"].rsplit("/", 1)[1])
    return s


def test_document_basics(client, doc):
    assert doc["openapi"].startswith("3.0.") and doc["info"]["title"] == "sd-api-server"
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert doc["paths"]["/health"]["get"]["security"] == []
    error_of(client.get("/openapi.json"), 401)                  # the key guards it too
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', __import__("json").dumps(doc))
    assert refs and set(refs) <= set(doc["components"]["schemas"])


def test_no_security_without_key(tmp_path):
    app, _ = make_app(tmp_path)
    doc = app.test_client().get("/openapi.json").get_json()
    assert "security" not in doc and "securitySchemes" not in doc["components"]
    assert not any("401" in op["responses"] for p in doc["paths"].values() for op in p.values())


def test_every_route_and_method_documented(app_stub, doc):
    app = app_stub[0]
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented


class Recorder:
    """Wraps params._Fields to record every field name the parsers look at."""

    def __init__(self, monkeypatch):
        self.names = set()
        real_has = params._Fields.has
        real_from_form = params._Fields.from_form.__func__
        rec = self

        def has(fields, name):
            rec.names.add(name)
            return real_has(fields, name)

        class Files:
            def __init__(self, files):
                self.files = files

            def getlist(self, name):
                rec.names.add(name)
                return self.files.getlist(name)

            def __bool__(self):
                return True

        def from_form(cls, form, files):
            f = real_from_form(cls, form, files)
            f.files = Files(files)
            return f

        monkeypatch.setattr(params._Fields, "has", has)
        monkeypatch.setattr(params._Fields, "from_form", classmethod(from_form))


def _properties(doc, path, content_type):
    body = doc["paths"][path]["post"]["requestBody"]["content"][content_type]["schema"]
    return set(resolve(doc, body)["properties"])


@pytest.mark.parametrize("path,content_type,send", [
    (GEN, "application/json", lambda c, h: c.post(GEN, json={"prompt": "p"}, headers=h)),
    (GEN, "multipart/form-data", lambda c, h: c.post(
        GEN, headers=h, content_type="multipart/form-data",
        data={"prompt": "p", "control_image": (io.BytesIO(png_bytes((64, 64))), "c.png")})),
    (GEN, "application/x-www-form-urlencoded", lambda c, h: c.post(
        GEN, headers=h, data={"prompt": "p"})),
    (EDIT, "multipart/form-data", lambda c, h: c.post(
        EDIT, headers=h, content_type="multipart/form-data",
        data={"prompt": "p", "image": (io.BytesIO(png_bytes((64, 64))), "i.png"),
              "mask": (io.BytesIO(png_bytes((64, 64), "RGBA")), "m.png")})),
])
def test_every_parsed_field_documented(client, doc, monkeypatch, path, content_type, send):
    rec = Recorder(monkeypatch)
    r = send(client, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.get_data(as_text=True)
    read = rec.names
    assert {"prompt", "n", "seed", "steps"} <= read            # the recorder works
    documented = _properties(doc, path, content_type)
    if content_type != "multipart/form-data":
        # file fields are only looked at there to refuse them ("upload it as a file"), unless the
        # JSON body documents them (control_image as base64)
        multipart = resolve(doc, doc["paths"][path]["post"]["requestBody"]["content"]
                            ["multipart/form-data"]["schema"])["properties"]
        read -= {n for n, p in multipart.items() if p.get("format") == "binary" and n not in documented}
    assert read - documented == set(), "fields the server reads but /openapi.json omits"
    # and nothing is documented that this content type does not read
    assert documented - read == set(), "fields /openapi.json lists but the server ignores"


def _send(client, path, content_type, field, value):
    h = {"Authorization": f"Bearer {KEY}"}
    base = {"prompt": "p", "size": "64x64"} if field not in ("width", "height", "size") \
        else {"prompt": "p"}
    if field in ("width", "height"):
        base["height" if field == "width" else "width"] = 64
    if path == EDIT:
        data = {**{k: str(v) for k, v in base.items()}, field: str(value),
                "image": (io.BytesIO(png_bytes((64, 64))), "i.png")}
        return client.post(EDIT, data=data, headers=h, content_type="multipart/form-data")
    return client.post(GEN, json={**base, field: value}, headers=h)


def _documented_fields(doc):
    for path, content_type in [(GEN, "application/json"), (EDIT, "multipart/form-data")]:
        body = doc["paths"][path]["post"]["requestBody"]["content"][content_type]["schema"]
        for name, prop in resolve(doc, body)["properties"].items():
            yield path, content_type, name, prop


def test_documented_bounds_are_enforced(client, doc):
    checked = 0
    for path, content_type, name, prop in _documented_fields(doc):
        if prop.get("type") not in ("integer", "number"):
            continue
        step = prop.get("multipleOf", 1) if prop["type"] == "integer" else 1e-3
        for edge in (prop["minimum"], prop["maximum"]):
            r = _send(client, path, content_type, name, edge)
            assert r.status_code == 200, (path, name, edge, r.get_data(as_text=True))
        for beyond in (prop["minimum"] - step, prop["maximum"] + step):
            err = error_of(_send(client, path, content_type, name, beyond), 400)
            assert err["param"] == name, (path, name, beyond, err)
        checked += 1
    assert checked >= 12


def test_documented_choices_are_the_accepted_ones(client, doc):
    for path, content_type, name, prop in _documented_fields(doc):
        if "enum" not in prop:
            continue
        for value in prop["enum"]:
            r = _send(client, path, content_type, name, value)
            assert r.status_code == 200, (name, value)
        err = error_of(_send(client, path, content_type, name, "not-a-choice"), 400)
        assert err["param"] == name
    # the enums are the validators' own tables
    props = resolve(doc, doc["paths"][GEN]["post"]["requestBody"]["content"]
                    ["application/json"]["schema"])["properties"]
    assert props["sample_method"]["enum"] == list(params.sample_methods())
    assert props["scheduler"]["enum"] == list(params.schedulers())
    assert props["response_format"]["enum"] == list(params.RESPONSE_FORMATS)


def test_documented_defaults_are_the_applied_ones(client, doc, app_stub):
    stub = app_stub[1]
    r = client.post(GEN, json={"prompt": "p"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    applied = vars(stub.params)
    props = resolve(doc, doc["paths"][GEN]["post"]["requestBody"]["content"]
                    ["application/json"]["schema"])["properties"]
    defaults = {n: p["default"] for n, p in props.items() if "default" in p}
    assert defaults.pop("response_format") == "url" and "url" in r.get_json()["data"][0]
    assert defaults.pop("output_format") == r.get_json()["output_format"] == "png"
    assert defaults.pop("output_compression") == params.COMPRESSION_RANGE[1]
    assert defaults.pop("stream") is False and r.mimetype == "application/json"        # not server-sent events
    assert defaults.pop("partial_images") == params.PARTIAL_IMAGES_RANGE[0]
    # as JSON has them (a tuple of the core's is an array)
    assert defaults and all(json.loads(json.dumps(applied[n])) == v for n, v in defaults.items()), (defaults, applied)
    assert (defaults["steps"], defaults["width"]) == (20, 128)   # 512 capped to max_pixels
    assert props["n"]["maximum"] == 3 and props["steps"]["maximum"] == 40
    assert props["width"]["maximum"] == 128 * 128 // 64


def test_prompt_rules(client, doc):
    props = resolve(doc, doc["paths"][GEN]["post"]["requestBody"]["content"]
                    ["application/json"]["schema"])["properties"]
    limit = props["prompt"]["maxLength"]
    h = {"Authorization": f"Bearer {KEY}"}
    r = client.post(GEN, json={"prompt": "x" * limit, "size": "64x64"}, headers=h)
    assert r.status_code == 200
    err = error_of(client.post(GEN, json={"prompt": "x" * (limit + 1)}, headers=h), 400)
    assert (err["param"], err["code"]) == ("prompt", "string_too_long")
    assert re.search(props["prompt"]["pattern"], " \t") is None      # blank: invalid on both sides
    assert error_of(client.post(GEN, json={"prompt": " \t"}, headers=h), 400)["param"] == "prompt"


def test_stub_model_name_in_description(doc):
    props = resolve(doc, schema(doc, "GenerationRequest"))["properties"]
    assert StubModel().name in props["model"]["description"]
