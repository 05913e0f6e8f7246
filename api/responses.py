"""The body of a successful images response (OpenAI's shape)."""
from __future__ import annotations

import base64


def image_items(images, prompt: str, encoded: list[bytes], urls: list[str] | None,
                revised_prompt: bool = False) -> list[dict]:
    """The response's ``data``: each image as ``b64_json`` (``urls`` None) or as its stored file's url,
    with the prompt and the seed it was drawn with (and the prompt as ``revised_prompt``, if asked)."""
    items = []
    for i, img in enumerate(images):
        item = {"url": urls[i]} if urls is not None else {"b64_json": base64.b64encode(encoded[i]).decode("ascii")}
        if revised_prompt:
            item["revised_prompt"] = prompt
        item["prompt"] = prompt
        item["seed"] = int(img.seed)
        items.append(item)
    return items
