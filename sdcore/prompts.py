"""The prompt language of AUTOMATIC1111's web UI, which most users type (docs/core.md, "The prompt language").

Emphasis: ``(text)`` multiplies the weight of its tokens by 1.1, ``[text]`` divides it by 1.1, ``(text:w)``
sets the factor to w; brackets nest (``((text))`` is 1.21), ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the
characters themselves, and a bracket left open applies to the end of the prompt while a closing one with
nothing open is dropped. ``BREAK`` (the word, in capitals) ends the current 75-token chunk. Adapter tags,
``<lora:NAME>`` and ``<lora:NAME:MULTIPLIER>`` (``<lyco:...>`` alike, as the older LyCORIS extension wrote
them), are taken out of the text (``extract_loras``; sdcore.lora applies what they name).

A prompt becomes chunks of 75 tokens, each encoded alone between its start and end tokens and the results
concatenated (so the length is unlimited). A chunk that fills up in the middle of a phrase moves the words
after its last comma, when that comma is at most ``COMMA_BACKTRACK`` tokens from the end, to the next chunk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

CHUNK = 75                      # tokens of text per chunk (77 with the start and end tokens)
COMMA_BACKTRACK = 20            # A1111's default "comma padding backtrack"
EMPHASIS = 1.1                  # the factor of one pair of round brackets (square: its inverse)
BREAK = object()                # marks a forced chunk end in the parsed list
ESCAPABLE = ("(", ")", "[", "]", "\\")
_NUMBER = re.compile(r"\s*([+-]?[.\d]+)\s*$")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")


def extract_loras(text: str) -> tuple[str, list[tuple[str, float]]]:
    """``text`` without its adapter tags, and the (name, multiplier) of each tag in order (multiplier 1 when
    the tag gives none). ValueError for a tag whose multiplier is not a number or that has more parts."""
    found = []

    def take(m):
        name, *rest = m.group(1).split(":")
        if len(rest) > 1 or not name.strip():
            raise ValueError(f"{m.group(0)}: an adapter tag is <lora:NAME> or <lora:NAME:MULTIPLIER>")
        try:
            multiplier = float(rest[0]) if rest and rest[0].strip() else 1.0
        except ValueError:
            raise ValueError(f"{m.group(0)}: the multiplier must be a number") from None
        if multiplier != multiplier or abs(multiplier) == float("inf"):
            raise ValueError(f"{m.group(0)}: the multiplier must be a finite number")
        found.append((name.strip(), multiplier))
        return ""
    return LORA_TAG.sub(take, text), found


def parse(text: str) -> list[tuple[str, float] | object]:
    """``text`` -> [(fragment, weight) or BREAK, ...], runs of equal weight merged; never empty. Adapter tags
    are left out."""
    if "<" in text:
        text = LORA_TAG.sub("", text)
    out: list = []                                   # [text, weight] pairs (lists, so weights can be scaled)
    opened: list[tuple[str, int]] = []               # open brackets: (kind, index in ``out`` where they start)

    def scale(start: int, factor: float):
        for item in out[start:]:
            if item is not BREAK:
                item[1] *= factor

    def add_text(s: str):
        for i, part in enumerate(_BREAK.split(s)):
            if i:
                out.append(BREAK)
            out.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":                                # an escaped bracket or backslash; a lone one is dropped
            escaped = text[i + 1:i + 2] in ESCAPABLE
            if escaped:
                out.append([text[i + 1], 1.0])
            i += 2 if escaped else 1
        elif c in "([":
            opened.append((c, len(out)))
            i += 1
        elif c == ")" and any(kind == "(" for kind, _ in opened):
            kind, start = _pop(opened, "(")
            scale(start, EMPHASIS)
            i += 1
        elif c == "]" and any(kind == "[" for kind, _ in opened):
            kind, start = _pop(opened, "[")
            scale(start, 1 / EMPHASIS)
            i += 1
        elif c in ")]":                              # nothing of its kind open: dropped
            i += 1
        elif c == ":" and _weight_at(text, i) is not None:
            weight, end = _weight_at(text, i)
            if any(kind == "(" for kind, _ in opened):
                _, start = _pop(opened, "(")
                scale(start, weight)
            else:                                    # nothing to weigh: the ':w)' stays text
                add_text(text[i:end])
            i = end
        else:                                        # plain text up to the next special character
            j = i + 1
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add_text(text[i:j])
            i = j
    for kind, start in reversed(opened):             # left open: applies to the end
        scale(start, EMPHASIS if kind == "(" else 1 / EMPHASIS)
    merged: list = []
    for item in out or [["", 1.0]]:
        if item is not BREAK and merged and merged[-1] is not BREAK and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [item if item is BREAK else (item[0], item[1]) for item in merged]


def _pop(opened: list, kind: str) -> tuple[str, int]:
    """Close the innermost open bracket of ``kind`` (the other kind's brackets inside it stay open)."""
    for k in range(len(opened) - 1, -1, -1):
        if opened[k][0] == kind:
            return opened.pop(k)
    raise ValueError(kind)


def _weight_at(text: str, i: int) -> tuple[float, int] | None:
    """At a ':' in ``text[i]``: a ``:number)`` weight -> (weight, index after the ')'), else None."""
    close = text.find(")", i)
    if close < 0:
        return None
    m = _NUMBER.match(text, i + 1, close)
    if m is None or m.end() != close:
        return None
    try:
        return float(m.group(1)), close + 1
    except ValueError:                              # "1.2.3": not a number, so the ':' is text
        return None


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def plain(parsed: list) -> str:
    """The words of a parsed prompt without its weights (BREAK: a space), for encoders that read plain text."""
    return "".join(" " if item is BREAK else item[0] for item in parsed)


def chunks(parsed: list, encode, comma: int) -> list[Chunk]:
    """Parsed fragments -> chunks of at most CHUNK (token, weight) pairs, split as A1111 splits them:
    at CHUNK tokens, moving the words after a comma at most COMMA_BACKTRACK tokens back to the next chunk,
    and at BREAK. ``encode``: text -> token ids (no start/end tokens), a textual-inversion embedding as one
    tuple of ids (it moves whole to the next chunk where it does not fit); ``comma``: the id of ','."""
    done: list[Chunk] = []
    current, last_comma = Chunk(), -1

    def close():
        nonlocal current, last_comma
        done.append(current)
        current, last_comma = Chunk(), -1

    for item in parsed:
        if item is BREAK:
            close()
            continue
        text, weight = item
        for token in encode(text):
            if isinstance(token, tuple):                 # an embedding's vectors: never split across chunks
                if len(current.tokens) + len(token) > CHUNK:
                    close()
                current.tokens += token
                current.weights += [weight] * len(token)
                continue
            if token == comma:
                last_comma = len(current.tokens)
            elif len(current.tokens) == CHUNK and last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK:
                moved = Chunk(current.tokens[last_comma + 1:], current.weights[last_comma + 1:])
                del current.tokens[last_comma + 1:], current.weights[last_comma + 1:]
                close()
                current = moved
            if len(current.tokens) == CHUNK:
                close()
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not done:
        close()
    return done


def token_rows(chunk_list: list[Chunk], bos: int, eos: int, pad: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` rows of 77 token ids [count, 77] and their weights, the chunks' then empty ones: start token,
    the chunk's tokens, the end token, then ``pad`` (the end token again for CLIP ViT-L, 0 for OpenCLIP's)."""
    ids = torch.full((count, CHUNK + 2), pad, dtype=torch.long)
    weights = torch.ones(count, CHUNK + 2)
    for row, chunk in enumerate(chunk_list + [Chunk()] * (count - len(chunk_list))):
        n = len(chunk.tokens)
        ids[row, :n + 2] = torch.tensor([bos, *chunk.tokens, eos])
        weights[row, 1:n + 1] = torch.tensor(chunk.weights)
    return ids, weights


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's hidden state [R, 77, C] by its weight [R, 77], then restore each row's mean over
    tokens and channels (A1111's rule: emphasis changes the balance between words, not the overall level)."""
    if bool((weights == 1).all()):
        return hidden                                # bit for bit what an unweighted prompt gives
    w = weights.to(hidden.device, hidden.dtype)[..., None]
    mean = hidden.float().mean(dim=(1, 2), keepdim=True)
    scaled = (hidden * w).float()
    return (scaled * (mean / scaled.mean(dim=(1, 2), keepdim=True))).to(hidden.dtype)
