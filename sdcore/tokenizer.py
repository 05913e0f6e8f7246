"""CLIP's byte-level BPE tokenizer (the one every SD text encoder was trained with).

The vocabulary is read from the copy that ships inside the open_clip_torch package; the package
itself is not imported (its import pulls in torchvision and timm). Cleaning, the split pattern and
the merge loop follow open_clip's ``SimpleTokenizer`` so token ids are identical (tests check).
"""
import functools
import gzip
import html
import importlib.util
import os

import ftfy
import regex
import torch

BOS, EOS, CONTEXT_LENGTH = 49406, 49407, 77
SPECIAL = ["<start_of_text>", "<end_of_text>"]


def _vocab_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed: it provides CLIP's BPE vocabulary "
                           "(pip install open_clip_torch)")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters (GPT-2's trick)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return dict(zip(printable + extra, [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]))


@functools.cache
def _tables() -> tuple[dict[str, int], dict[str, int]]:
    """(token -> id, merge "a b" -> rank), read once per process: every model's tokenizer shares them.
    Merges stay the vocabulary's "a b" lines (no 48 K tuples to build: a third of a cached model load)."""
    merges = gzip.open(_vocab_path()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges] + SPECIAL
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert encoder["<start_of_text>"] == BOS and encoder["<end_of_text>"] == EOS
    return encoder, {m: i for i, m in enumerate(merges)}


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """``tokenizer(["a cat"]) -> LongTensor [B, 77]``: bos, tokens, eos, then padding.

    SD1 pads with eos (``pad_id=EOS``); SD2/SDXL-bigG pad with 0. Truncation keeps eos last.
    """

    def __init__(self, pad_id: int = EOS, context_length: int = CONTEXT_LENGTH):
        self.pad_id, self.context_length = pad_id, context_length
        self.encoder, self.bpe_ranks = _tables()
        self.cache = {t: t for t in SPECIAL}
        self.pattern = regex.compile("|".join(SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.comma = self.encode(",")[0]           # where a long prompt prefers to break (sdcore.prompts)

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token].split(" ")
        word = list(token[:-1]) + [token[-1] + "</w>"]
        rank = lambda pair: self.bpe_ranks.get(f"{pair[0]} {pair[1]}", float("inf"))
        while len(word) > 1:
            # merge the lowest-ranked adjacent pair everywhere it occurs, until no known pair is left
            best = min(set(zip(word, word[1:])), key=rank)
            if rank(best) == float("inf"):
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = " ".join(word)
        return word

    def encode(self, text: str) -> list[int]:
        byte_encoder = _bytes_to_unicode()
        ids = []
        for piece in self.pattern.findall(_clean(text)):
            piece = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in zip(out, texts):
            ids = [BOS, *self.encode(text)][: self.context_length - 1] + [EOS]
            row[: len(ids)] = torch.tensor(ids)
        return out
