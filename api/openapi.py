"""The OpenAPI 3.0 document served at ``GET /openapi.json``.

It is built per request from the same tables the validators use (``api.params``: the choices,
ranges and defaults, and the configured :class:`~api.params.Limits`), so the bounds it states are
the bounds the server enforces, samplers registered at run time included.
``tests/api/test_api_openapi.py`` checks that every field the request parsers read appears here (by
recording what they read, not from a copied list).

What JSON Schema cannot say is in the descriptions: width*height <= max_pixels, seed + n - 1
within 64 bits, uploads must be PNG/JPEG/WebP of at most max_input_pixels, a mask has the
image's size. Unknown fields are ignored (``additionalProperties`` is true).
"""
from __future__ import annotations

from . import a1111 as A
from . import params as P
from .errors import SDAPI_PREFIX
from .storage import ID_RE, NAME_RE

OPENAPI_VERSION = "3.0.3"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(description: str, headers: dict | None = None) -> dict:
    out = {"description": description,
           "content": {"application/json": {"schema": _ref("Error")}}}
    if headers:
        out["headers"] = headers
    return out


def _lora_field() -> dict:
    """The adapters field, the same on every route (api.params.get_loras)."""
    lo, hi = P.LORA_MULTIPLIER_RANGE
    return {"type": "array", "maxItems": P.MAX_LORAS, "nullable": True,
            "items": {"type": "object", "required": ["name"],
                      "properties": {"name": {"type": "string", "maxLength": 256},
                                     "multiplier": {"type": "number", "minimum": lo, "maximum": hi, "default": 1.0}}},
            "description": "LoRAs from the server's --lora-model-dir, by file name without extension, each with its "
                           "multiplier; the same as <lora:NAME:MULTIPLIER> tags in the prompt (both may be used; "
                           "a name given twice adds its multipliers). In a multipart form: this list as JSON text."}


def _micro_fields(defaults: dict) -> dict:
    lo, hi = P.MICRO_SIDE_RANGE
    size = {"type": "string", "maxLength": 64, "pattern": r"^\s*[0-9]{1,9}[xX][0-9]{1,9}\s*$", "nullable": True}
    return {
        "original_size": {**size, "description": "SDXL: WIDTHxHEIGHT the picture had before it was cropped and "
                                                 "resized (micro-conditioning); default: the image size."},
        "target_size": {**size, "description": "SDXL base: WIDTHxHEIGHT it was resized to; default: the image size."},
        **{name: {"type": "integer", "minimum": lo, "maximum": hi, "default": defaults[name],
                  "description": f"SDXL: the crop's {name.removeprefix('crop_')} offset in pixels."}
           for name in ("crop_top", "crop_left")},
        **{name: {"type": "number", "minimum": P.AESTHETIC_RANGE[0], "maximum": P.AESTHETIC_RANGE[1],
                  "default": defaults[name], "description": f"SDXL refiner: the aesthetic score of the {what}."}
           for name, what in (("aesthetic_score", "prompt"), ("negative_aesthetic_score", "negative prompt"))},
    }


def _slg_fields(defaults: dict) -> dict:
    lo, hi = P.SKIP_LAYER_RANGE
    return {
        "slg_scale": {"type": "number", "minimum": P.SLG_SCALE_RANGE[0], "maximum": P.SLG_SCALE_RANGE[1],
                      "default": defaults["slg_scale"], "description": "SD3 models only: skip-layer guidance scale (0: "
                      "off; it acts only with cfg_scale guidance). SD3.5 medium's card uses 2.5."},
        "skip_layers": {"type": "array", "minItems": 1, "maxItems": hi, "default": list(defaults["skip_layers"]),
                        "items": {"type": "integer", "minimum": lo, "maximum": hi},
                        "description": "With slg_scale: the joint blocks the weakened pass leaves out (each below the "
                                       "model's depth). In a form: \"7,8,9\"."},
        **{name: {"type": "number", "minimum": P.FRACTION_RANGE[0], "maximum": P.FRACTION_RANGE[1],
                  "default": defaults[name], "description": f"With slg_scale: the fraction of the steps where it "
                  f"{what} (steps i with steps·start < i < steps·end); start < end."}
           for name, what in (("skip_layer_start", "starts"), ("skip_layer_end", "ends"))},
    }


def _common_fields(limits: P.Limits, model_ids: list[str]) -> dict:
    lo_seed, hi_seed = P.SEED_RANGE
    defaults = P.defaults()
    return {
        "model": {"type": "string", "nullable": True, "maxLength": 256,
                  "description": "Model id (GET /v1/models); absent, null or empty: the default "
                                 f"model. Loaded: {', '.join(model_ids)}."},
        "prompt": {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars,
                   "pattern": r"\S", "description": "What to draw; must not be blank."},
        "negative_prompt": {"type": "string", "maxLength": limits.max_prompt_chars,
                            "default": defaults["negative_prompt"],
                            "description": "What to avoid."},
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n,
              "default": defaults["n"],
              "description": "Number of images (seeds seed..seed+n-1)."},
        "size": {"type": "string", "maxLength": 64,
                 "pattern": r"^(auto|[0-9]{1,9}x[0-9]{1,9})$",
                 "description": "WIDTHxHEIGHT (overrides width and height); each side a multiple "
                                f"of {P.SIDE_MULTIPLE} of at least {P.MIN_SIDE}, and "
                                f"width*height <= {limits.max_pixels}. 'auto': width/height. "
                                "Without size, width and height: the model's native size (from "
                                "its metadata; 512 for SD1/SD2 files without one)."},
        "width": {"type": "integer", "minimum": P.MIN_SIDE, "maximum": limits.max_side,
                  "multipleOf": P.SIDE_MULTIPLE, "default": limits.default_side,
                  "description": f"Output width; width*height <= {limits.max_pixels}."},
        "height": {"type": "integer", "minimum": P.MIN_SIDE, "maximum": limits.max_side,
                   "multipleOf": P.SIDE_MULTIPLE, "default": limits.default_side,
                   "description": f"Output height; width*height <= {limits.max_pixels}."},
        "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps,
                  "default": limits.default_steps, "description": "Sampler steps."},
        "cfg_scale": {"type": "number", "minimum": P.CFG_SCALE_RANGE[0],
                      "maximum": P.CFG_SCALE_RANGE[1], "default": defaults["cfg_scale"],
                      "description": "Classifier-free guidance scale."},
        "guidance": {"type": "number", "minimum": P.GUIDANCE_RANGE[0], "maximum": P.GUIDANCE_RANGE[1],
                     "description": "FLUX dev models only: the distilled guidance (default 3.5)."},
        "sample_method": {"type": "string", "enum": list(P.sample_methods()),
                          "default": defaults["sample_method"],
                          "description": "Sampler (case-insensitive)."},
        "scheduler": {"type": "string", "enum": list(P.schedulers()),
                      "description": "Noise schedule (case-insensitive); default: the sampler's "
                                     "own (discrete; lcm for the lcm sampler)."},
        "seed": {"type": "integer", "minimum": lo_seed, "maximum": hi_seed,
                 "default": defaults["seed"],
                 "description": "Seed of the first image; negative: a random one. seed + n - 1 "
                                "must stay within 64 bits. Each item reports its seed."},
        "control_strength": {"type": "number", "minimum": P.CONTROL_STRENGTH_RANGE[0],
                             "maximum": P.CONTROL_STRENGTH_RANGE[1],
                             "default": defaults["control_strength"],
                             "description": "ControlNet strength (with control_image)."},
        "apply_canny_preprocessor": {"type": "boolean", "default": defaults["apply_canny_preprocessor"],
                                     "description": "Turn control_image into a Canny edge map first "
                                                    "(thresholds 100/200), so a photo can be sent."},
        "refiner": {"type": "string", "maxLength": 256, "nullable": True,
                    "description": "A served model (an SDXL refiner) that takes the steps after refiner_switch_at."},
        "refiner_switch_at": {"type": "number", "minimum": P.REFINER_SWITCH_RANGE[0],
                              "maximum": P.REFINER_SWITCH_RANGE[1], "default": defaults["refiner_switch_at"],
                              "description": "With refiner: the fraction of the steps drawn before it takes over."},
        **_micro_fields(defaults),
        **_slg_fields(defaults),
        "lora": _lora_field(),
        "response_format": {"type": "string", "enum": list(P.RESPONSE_FORMATS),
                            "default": defaults["response_format"],
                            "description": "url: a download URL (GET /v1/files/download/...); "
                                           "b64_json: the PNG in base64."},
        "output_format": {"type": "string", "enum": list(P.OUTPUT_FORMATS), "default": "png", "nullable": True,
                          "description": "The image file format; JPEG and WebP carry the generation parameters "
                                         "as EXIF UserComment."},
        "output_compression": {"type": "integer", "minimum": P.COMPRESSION_RANGE[0],
                               "maximum": P.COMPRESSION_RANGE[1], "default": P.COMPRESSION_RANGE[1],
                               "nullable": True, "description": "JPEG/WebP quality (PNG is lossless)."},
        "background": {"type": "string", "enum": list(P.BACKGROUNDS), "nullable": True,
                       "description": "transparent is refused (400): these models draw opaque images."},
        "stream": {"type": "boolean", "default": False, "nullable": True,
                   "description": f"Answer server-sent events: partial_images previews, then the image as b64_json "
                                  f"(n at most {P.STREAM_MAX_N}; response_format url is refused)."},
        "partial_images": {"type": "integer", "minimum": P.PARTIAL_IMAGES_RANGE[0],
                           "maximum": P.PARTIAL_IMAGES_RANGE[1], "default": 0, "nullable": True,
                           "description": "With stream: how many previews, evenly spaced over the steps."},
        "quality": {"type": "string", "nullable": True, "maxLength": 64,
                    "description": "Accepted for OpenAI compatibility and echoed in the response; steps set "
                                   "the work here."},
        **{name: {"type": "string", "nullable": True, "maxLength": 256,
                  "description": "Accepted for OpenAI compatibility and ignored."}
           for name in P.IGNORED_FIELDS},
    }


def _file_field(description: str, limits: P.Limits) -> dict:
    return {"type": "string", "format": "binary",
            "description": f"{description} ({', '.join(P.IMAGE_FORMATS)}; at most "
                           f"{limits.max_input_pixels} pixels)."}


def request_schemas(limits: P.Limits, model_ids: list[str]) -> dict:
    """name -> schema of the request bodies (the components the paths refer to)."""
    common = _common_fields(limits, model_ids)
    control = _file_field("ControlNet conditioning image", limits)
    gen_json = {"type": "object", "required": ["prompt"], "additionalProperties": True,
                "properties": {**common, "control_image": {
                    "type": "string", "format": "byte", "nullable": True,
                    "description": "ControlNet conditioning image as base64 (PNG, JPEG or WebP; a "
                                   "data: URL prefix is allowed)."}}}
    gen_form = {"type": "object", "required": ["prompt"], "additionalProperties": True,
                "properties": {**common, "control_image": control}}
    # exactly one of image and image[] (the name the OpenAI client uses)
    edit_form = {"type": "object", "required": ["prompt"], "additionalProperties": True,
                 "oneOf": [{"required": ["image"]}, {"required": ["image[]"]}],
                 "properties": {
                     **common,
                     "image": _file_field("The image to edit (or send it as image[])", limits),
                     "image[]": _file_field("The image to edit, as the OpenAI client sends it; "
                                            "one image per request", limits),
                     "mask": _file_field("PNG of the image's size whose fully transparent "
                                         "pixels mark the area to repaint; without it, the "
                                         "image's own transparent pixels do", limits),
                     "control_image": control,
                     "strength": {"type": "number", "minimum": P.STRENGTH_RANGE[0],
                                  "maximum": P.STRENGTH_RANGE[1],
                                  "default": P.defaults()["strength"],
                                  "description": "How much of the image is repainted."},
                 }}
    return {"GenerationRequest": gen_json, "GenerationForm": gen_form, "EditForm": edit_form}


def _schemas(limits: P.Limits, model_ids: list[str]) -> dict:
    nullable_str = {"type": "string", "nullable": True}
    file_obj = {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename",
                                               "purpose"],
                "properties": {"id": {"type": "string", "pattern": ID_RE.pattern},
                               "object": {"type": "string", "enum": ["file"]},
                               "bytes": {"type": "integer", "minimum": 0},
                               "created_at": {"type": "integer"},
                               "expires_at": {"type": "integer", "nullable": True},
                               "filename": {"type": "string"},
                               "purpose": {"type": "string"},
                               "status": {"type": "string"}}}
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"],
             "properties": {"id": {"type": "string"},
                            "object": {"type": "string", "enum": ["model"]},
                            "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
    item = {"type": "object", "required": ["prompt", "seed"],
            "properties": {"url": {"type": "string", "format": "uri"},
                           "b64_json": {"type": "string", "format": "byte",
                                        "description": "PNG, base64 (no data: prefix)"},
                           "prompt": {"type": "string"}, "seed": {"type": "integer"},
                           "revised_prompt": {"type": "string", "description": "For model names starting with "
                                              + " or ".join(P.REVISED_PROMPT_MODELS) + ": the prompt drawn."}},
            "oneOf": [{"required": ["url"]}, {"required": ["b64_json"]}]}
    return {
        **request_schemas(limits, model_ids),
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
                  "properties": {"error": {
                      "type": "object", "required": ["message", "type", "param", "code"],
                      "additionalProperties": False,
                      "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                     "param": nullable_str, "code": nullable_str}}}},
        "ImageItem": item,
        "ImagesResponse": {"type": "object", "required": ["created", "data"],
                           "properties": {"created": {"type": "integer"},
                                          "output_format": {"type": "string", "enum": list(P.OUTPUT_FORMATS)},
                                          "size": {"type": "string"},
                                          "background": {"type": "string", "enum": ["opaque"]},
                                          "quality": {"type": "string"},
                                          "data": {"type": "array", "items": _ref("ImageItem"),
                                                   "minItems": 1, "maxItems": limits.max_n}}},
        "Model": model,
        "ModelList": {"type": "object", "required": ["object", "data"],
                      "properties": {"object": {"type": "string", "enum": ["list"]},
                                     "data": {"type": "array", "items": _ref("Model")}}},
        "File": file_obj,
        "FileList": {"type": "object", "required": ["object", "data"],
                     "properties": {"object": {"type": "string", "enum": ["list"]},
                                    "data": {"type": "array", "items": _ref("File")},
                                    "has_more": {"type": "boolean"}}},
        "FileDeleted": {"type": "object", "required": ["id", "object", "deleted"],
                        "properties": {"id": {"type": "string"},
                                       "object": {"type": "string", "enum": ["file"]},
                                       "deleted": {"type": "boolean"}}},
        "Health": {"type": "object", "required": ["status", "models", "queue", "jobs"],
                   "properties": {"status": {"type": "string", "enum": ["ok"]},
                                  "models": {"type": "array", "items": {"type": "string"}},
                                  "queue": {"type": "object", "description": "This worker's: requests waiting, "
                                            "and whether it is generating.",
                                            "properties": {"waiting": {"type": "integer"},
                                                           "running": {"type": "boolean"}}},
                                  "jobs": {"type": "array", "description": "The running generations of every "
                                           "worker: request id, process, image i of images, step of steps, size.",
                                           "items": {"type": "object"}}}},
    }


def _a1111_request(limits: P.Limits, img2img: bool) -> dict:
    """The fields the /sdapi/v1 parsers read; others are accepted and ignored, and null is "not sent",
    as in AUTOMATIC1111 (its fields are all optional)."""
    def f(schema: dict, description: str) -> dict:
        return {**schema, "nullable": True, "description": description}
    flag = {"anyOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]}
    side = {"type": "integer", "minimum": P.MIN_SIDE, "maximum": limits.max_side, "multipleOf": P.SIDE_MULTIPLE}
    props = {
        "prompt": f({"type": "string", "maxLength": limits.max_prompt_chars}, "What to draw (may be empty)."),
        "negative_prompt": f({"type": "string", "maxLength": limits.max_prompt_chars}, "What to avoid."),
        "seed": f({"type": "integer", "minimum": P.SEED_RANGE[0], "maximum": P.SEED_RANGE[1],
                   "default": A.TXT2IMG_DEFAULTS["seed"]},
                  "Seed of the first image (the others: seed + 1, ...); -1: a random one."),
        "steps": f({"type": "integer", "minimum": 1, "maximum": limits.max_steps,
                    "default": min(A.TXT2IMG_DEFAULTS["steps"], limits.max_steps)}, "Sampler steps."),
        "cfg_scale": f({"type": "number", "minimum": P.CFG_SCALE_RANGE[0], "maximum": P.CFG_SCALE_RANGE[1],
                        "default": A.TXT2IMG_DEFAULTS["cfg_scale"]}, "Classifier-free guidance scale."),
        "width": f(side, f"Output width; width*height <= {limits.max_pixels}; default: the model's native size."),
        "height": f(side, f"Output height; width*height <= {limits.max_pixels}."),
        "batch_size": f({"type": "integer", "minimum": 1, "maximum": limits.max_n, "default": 1},
                        f"Images per batch; batch_size × n_iter <= {limits.max_n}."),
        "n_iter": f({"type": "integer", "minimum": 1, "maximum": limits.max_n, "default": 1}, "Batches."),
        "sampler_name": f({"type": "string", "maxLength": 64}, "A sampler (GET /sdapi/v1/samplers: name or "
                          "alias), or a combined label such as 'DPM++ 2M Karras'; unknown: 400."),
        "sampler_index": f({"type": "string", "maxLength": 64, "default": A.DEFAULT_SAMPLER},
                           "The same, A1111's older field; sampler_name wins."),
        "scheduler": f({"type": "string", "maxLength": 64}, "A schedule (GET /sdapi/v1/schedulers), "
                       "default Automatic; unknown: 400."),
        "clip_skip": f({"type": "integer", "minimum": 1, "maximum": A.MAX_CLIP_SKIP},
                       "Text-encoder layers skipped from the end, plus one (stable-diffusion.cpp's field; "
                       "A1111 clients send override_settings.CLIP_stop_at_last_layers)."),
        "model": f({"type": "string", "maxLength": 256}, "A served model (stable-diffusion.cpp's field)."),
        "override_settings": f({"type": "object", "additionalProperties": True},
                               "sd_model_checkpoint and CLIP_stop_at_last_layers apply to this request; "
                               "other keys are logged and ignored."),
        "refiner_checkpoint": f({"type": "string", "maxLength": 256}, "A served checkpoint (an SDXL refiner) "
                                "that takes the steps after refiner_switch_at; 'None': none."),
        "refiner_switch_at": f({"type": "number", "minimum": P.REFINER_SWITCH_RANGE[0],
                                "maximum": P.REFINER_SWITCH_RANGE[1], "default": P.defaults()["refiner_switch_at"]},
                               "The fraction of the steps drawn before the refiner takes over."),
        "lora": _lora_field(),
        **{name: {**schema, "nullable": True} for name, schema in _slg_fields(P.defaults()).items()},
        "send_images": f(flag, "Return the images (default true)."),
        "save_images": f(flag, "Also store them in /v1/files (default false)."),
    }
    if img2img:
        props.update({
            "init_images": {"type": "array", "minItems": 1, "maxItems": limits.max_n,
                            "items": {"type": "string", "format": "byte"},
                            "description": "Base64 PNG/JPEG/WebP images; the first is edited."},
            "denoising_strength": f({"type": "number", "minimum": P.STRENGTH_RANGE[0],
                                     "maximum": P.STRENGTH_RANGE[1], "default": A.IMG2IMG_DEFAULTS["denoising_strength"]},
                                    "How much is repainted."),
            "mask": f({"type": "string", "format": "byte"}, "Base64 mask: white repaints (with transparency: "
                      "its opaque pixels do)."),
            "mask_blur": f({"type": "integer", "minimum": 0, "maximum": A.MAX_MASK_BLUR,
                            "default": A.IMG2IMG_DEFAULTS["mask_blur"]},
                           "Gaussian blur radius of the mask."),
            "inpainting_fill": f({"type": "integer", "minimum": 0, "maximum": len(A.INPAINT_FILL_CODES) - 1,
                                  "default": 0}, "What the masked area starts from: " + ", ".join(
                                      f"{k} {v}" for k, v in A.INPAINT_FILL_CODES.items()) + "."),
            "inpainting_mask_invert": f(flag, "Repaint the black part of the mask instead."),
            "resize_mode": f({"type": "integer", "minimum": 0, "maximum": len(A.RESIZE_MODES) - 1, "default": 0},
                             "; ".join(f"{i} {m}" for i, m in enumerate(A.RESIZE_MODES)) + "."),
        })
    out = {"type": "object", "additionalProperties": True, "properties": props}
    if img2img:
        out["required"] = ["init_images"]
    return out


def _a1111_paths(limits: P.Limits, auth: bool, max_upload_bytes: int) -> tuple[dict, dict]:
    """(paths, schemas) of AUTOMATIC1111's API, with its error shapes."""
    def error(description: str, schema: str = "A1111Error", headers: dict | None = None) -> dict:
        out = {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
        return {**out, "headers": headers} if headers else out

    def ok(schema: dict, description: str) -> dict:
        return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}

    common = {"401": error("Missing or wrong credentials (HTTP Basic or Bearer).")} if auth else {}
    body_errors = {"400": error("Bad JSON, an unknown sampler or scheduler, or a checkpoint not served."),
                   "413": error(f"Request body larger than {max_upload_bytes} bytes."),
                   "415": error("Unsupported Content-Type: send application/json."),
                   "422": error("A field is invalid; detail[0].loc names it.", "A1111ValidationError")}
    generation = {**body_errors, **common,
                  "500": error("A server fault; never with details."),
                  "503": error("Busy: the generation queue is full.", headers={"Retry-After": {
                      "description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}}),
                  "507": error("save_images could not store the images (disk full).")}
    any_object = {"type": "object", "additionalProperties": True}
    array = {"type": "array", "items": any_object}

    def get(op: str, summary: str, schema: dict) -> dict:
        return {"get": {"operationId": op, "summary": summary, "responses": {**ok(schema, summary), **common}}}

    def post(op: str, summary: str, body: dict, schema: dict, errors: dict) -> dict:
        return {"post": {"operationId": op, "summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                         "responses": {**ok(schema, summary), **errors}}}

    def empty_post(op: str, summary: str) -> dict:
        return {"post": {"operationId": op, "summary": summary,
                         "responses": {**ok({"nullable": True}, summary), **common}}}

    images = _ref("A1111ImagesResponse")
    paths = {
        "/txt2img": post("a1111Txt2img", "Text to image, AUTOMATIC1111's way.", _ref("A1111Txt2ImgRequest"),
                         images, generation),
        "/img2img": post("a1111Img2img", "Image to image (optionally masked), AUTOMATIC1111's way.",
                         _ref("A1111Img2ImgRequest"), images, generation),
        "/png-info": post("a1111PngInfo", "The generation parameters a PNG carries, read back.",
                          {"type": "object", "required": ["image"], "additionalProperties": True, "properties": {
                              "image": {"type": "string", "format": "byte", "description": "A base64 image."}}},
                          any_object, {**body_errors, **common}),
        "/options": {**get("a1111GetOptions", "The options: the current checkpoint, clip skip, and what clients "
                           "stored.", any_object),
                     **post("a1111SetOptions", "Store options; sd_model_checkpoint must name a served model.",
                            any_object, {"nullable": True}, {**body_errors, **common})},
        "/sd-models": get("a1111SdModels", "The served models with their files' sha256.", array),
        "/refresh-checkpoints": empty_post("a1111RefreshCheckpoints", "No-op: the models are fixed at start."),
        "/samplers": get("a1111Samplers", "The samplers by A1111 label.", array),
        "/schedulers": get("a1111Schedulers", "The schedules by A1111 name.", array),
        "/upscalers": get("a1111Upscalers", "None: no upscalers here.", array),
        "/latent-upscale-modes": get("a1111LatentUpscaleModes", "Empty: no hires fix here.", array),
        "/sd-vae": get("a1111SdVae", "Empty: the checkpoint's own VAE.", array),
        "/loras": get("a1111Loras", "The adapters in --lora-model-dir, with their metadata.", array),
        "/prompt-styles": get("a1111PromptStyles", "Empty.", array),
        "/embeddings": get("a1111Embeddings", "The embeddings in --embd-dir the model can take, and those it "
                           "cannot.", any_object),
        "/progress": get("a1111Progress", "The oldest running generation of any worker: fraction, time left, steps, "
                         "and its latest preview unless ?skip_current_image=true.", any_object),
        "/interrupt": empty_post("a1111Interrupt", "Stop every running generation at its next step; the image being "
                                 "drawn is finished from there and returned."),
        "/skip": empty_post("a1111Skip", "Finish every running generation's current image from its next step."),
        "/cmd-flags": get("a1111CmdFlags", "The flags clients look for.", any_object),
    }
    schemas = {
        "A1111Txt2ImgRequest": _a1111_request(limits, False),
        "A1111Img2ImgRequest": _a1111_request(limits, True),
        "A1111ImagesResponse": {"type": "object", "required": ["images", "parameters", "info"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                       "description": "Base64 PNGs (no data: prefix)."},
            "parameters": any_object,
            "info": {"type": "string", "description": "A JSON object as a string, with A1111's keys."}}},
        "A1111Error": {"type": "object", "required": ["error", "detail", "body", "errors"], "properties": {
            "error": {"type": "string"}, "detail": {"type": "string"}, "body": {"type": "string"},
            "errors": {"type": "string"}}},
        "A1111ValidationError": {"type": "object", "required": ["detail"], "properties": {"detail": {
            "type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"]}}}},
    }
    return {SDAPI_PREFIX + k: v for k, v in paths.items()}, schemas


def build_openapi(limits: P.Limits, model_ids: list[str], *, auth: bool,
                  max_upload_bytes: int, version: str = "0.1.0") -> dict:
    E = _error_response
    retry = {"Retry-After": {"description": "Seconds to wait before retrying.",
                             "schema": {"type": "integer", "minimum": 1}}}
    unauthorized = {"401": E("Missing or wrong API key (Authorization: Bearer <key>).")} \
        if auth else {}
    generation_errors = {
        "400": E("A field is invalid; error.param names it."),
        **unauthorized,
        "404": E("No such model."),
        "413": E(f"Request body larger than {max_upload_bytes} bytes."),
        "415": E("Unsupported Content-Type."),
        "500": E("A server fault (out of memory, ...); never with details."),
        "503": E("Busy: the generation queue is full; retry after Retry-After seconds.", retry),
        "507": E("The image could not be stored (disk full); response_format=b64_json "
                 "still works."),
    }
    images_ok = {"200": {"description": "The images, exactly n (fewer only when /sdapi/v1/interrupt stopped the "
                                        "generation). With stream: server-sent events, partial_images previews "
                                        "then the image (docs/api.md, Streaming).",
                         "content": {"application/json": {"schema": _ref("ImagesResponse")},
                                     "text/event-stream": {"schema": {"type": "string"}}}}}

    def ok(schema: str, description: str) -> dict:
        return {"200": {"description": description,
                        "content": {"application/json": {"schema": _ref(schema)}}}}

    def with_errors(responses: dict, *extra: str) -> dict:
        out = dict(responses)
        out.update(unauthorized)
        for code in extra:
            out[code] = E({"404": "Not found (or expired)."}[code])
        return out

    png = {"200": {"description": "The PNG image.",
                   "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
           "304": {"description": "Not modified (conditional request)."}}
    file_id = {"name": "file_id", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": ID_RE.pattern}}
    file_name = {"name": "name", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": NAME_RE.pattern}}
    paths = {
        "/v1/images/generations": {"post": {
            "operationId": "createImage", "summary": "Text to image.",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("GenerationRequest")},
                "multipart/form-data": {"schema": _ref("GenerationForm")},
                "application/x-www-form-urlencoded": {"schema": _ref("GenerationRequest")}}},
            "responses": {**images_ok, **generation_errors}}},
        "/v1/images/edits": {"post": {
            "operationId": "createImageEdit", "summary": "Image to image (optionally masked).",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": _ref("EditForm")}}},
            "responses": {**images_ok, **generation_errors}}},
        "/v1/models": {"get": {"operationId": "listModels", "summary": "The loaded models.",
                               "responses": with_errors(ok("ModelList", "The models."))}},
        "/v1/models/{model_id}": {"get": {
            "operationId": "retrieveModel", "summary": "One model.",
            "parameters": [{"name": "model_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": with_errors(ok("Model", "The model."), "404")}},
        "/v1/files": {"get": {"operationId": "listFiles", "summary": "Stored (url) images.",
                              "responses": with_errors(ok("FileList", "The files."))}},
        "/v1/files/{file_id}": {
            "get": {"operationId": "retrieveFile", "summary": "One stored image.",
                    "parameters": [file_id],
                    "responses": with_errors(ok("File", "The file object."), "404")},
            "delete": {"operationId": "deleteFile", "summary": "Delete a stored image.",
                       "parameters": [file_id],
                       "responses": with_errors(ok("FileDeleted", "Deleted."), "404")}},
        "/v1/files/{file_id}/content": {"get": {
            "operationId": "downloadFile", "summary": "The bytes of a stored image.",
            "parameters": [file_id], "responses": with_errors(png, "404")}},
        "/v1/files/download/{file_id}/{name}": {"get": {
            "operationId": "downloadImage", "summary": "The URL returned for an image.",
            "parameters": [file_id, file_name], "responses": with_errors(png, "404")}},
        "/health": {"get": {"operationId": "health", "summary": "Liveness (no key needed).",
                            "security": [], "responses": ok("Health", "Up, models loaded.")}},
        "/": {"get": {"operationId": "playground", "summary": "The playground page (no key needed).",
                      "security": [], "responses": {"200": {"description": "An HTML page.", "content": {
                          "text/html": {"schema": {"type": "string"}}}}}}},
        "/ui/{filename}": {"get": {"operationId": "playgroundFile", "summary": "The playground's script and style.",
                                   "security": [], "parameters": [{"name": "filename", "in": "path", "required": True,
                                                                   "schema": {"type": "string"}}],
                                   "responses": {"200": {"description": "The file."},
                                                 "404": {"description": "No such file."}}}},
        "/echo": {"get": {"operationId": "echo", "summary": "Liveness, as the original server.",
                          "responses": with_errors({"200": {
                              "description": "The text 'echo test'.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                  "responses": with_errors({"200": {
                                      "description": "OpenAPI 3.0 document.",
                                      "content": {"application/json": {
                                          "schema": {"type": "object"}}}}})}},
    }
    sdapi_paths, sdapi_schemas = _a1111_paths(limits, auth, max_upload_bytes)
    paths.update(sdapi_paths)
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "sd-api-server", "version": version,
                 "description": "OpenAI-compatible Stable Diffusion image server, with AUTOMATIC1111's API "
                                f"under {SDAPI_PREFIX}. Errors have the OpenAI shape "
                                "{\"error\": {message, type, param, code}}, under "
                                f"{SDAPI_PREFIX} A1111's."},
        "paths": paths,
        "components": {"schemas": {**_schemas(limits, model_ids), **sdapi_schemas}},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer"}, "basicAuth": {"type": "http", "scheme": "basic"}}
        doc["security"] = [{"bearerAuth": []}, {"basicAuth": []}]
    return doc
