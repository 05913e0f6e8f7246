"""The body of a successful images response."""
from __future__ import annotations

import base64


def image_item(img, prompt: str, response_format: str, store=None, url_for_file=None) -> dict:
    """One element of the response's ``data``."""
    if response_format == "b64_json":
        item = {"b64_json": base64.b64encode(img.png).decode("ascii")}
    else:
        stored = store.save(img.png, f"image-{int(img.seed)}.png")
        item = {"url": url_for_file(stored)}
    item["prompt"] = prompt
    item["seed"] = int(img.seed)
    return item
