"""The body of a successful images response."""
from __future__ import annotations

import base64


def image_item(img, prompt: str, response_format: str, store=None, url_for_file=None,
               output_format: str = "png", output_compression: int = 100) -> dict:
    """One element of the response's ``data``."""
    data = img.encoded(output_format, output_compression)
    if response_format == "b64_json":
        item = {"b64_json": base64.b64encode(data).decode("ascii")}
    else:
        stored = store.save(data, f"image-{int(img.seed)}.{output_format}")
        item = {"url": url_for_file(stored)}
    item["prompt"] = prompt
    item["seed"] = int(img.seed)
    return item
