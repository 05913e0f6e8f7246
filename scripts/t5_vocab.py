#!/usr/bin/env python3
"""Makes ``sdcore/vocab/t5_tokenizer.json.gz``: the T5 tokenizer for single-file SD3 and FLUX checkpoints, which
carry no ``tokenizer_3/`` folder. Not part of the build: the output is committed, and this records where it came
from so that it can be made again and checked.

Where the data comes from: stable-diffusion.cpp compiles a whole Hugging Face ``tokenizer.json`` for T5 into its
binary, as the byte array ``t5_tokenizer_json_str`` (``src/tokenizers/vocab/clip_t5.hpp`` in recent versions,
``vocab.hpp`` in older ones), and the PyPI source distribution of ``stable-diffusion-cpp-python`` vendors it. That
JSON is the conversion of T5's SentencePiece model (the same ``spiece.model`` for T5 and T5 v1.1, so for SD3's and
FLUX's T5-XXL): 32000 unigram pieces with their scores, T5's ``nmt_nfkc`` normalization table, then the 100
sentinels ``<extra_id_99>`` .. ``<extra_id_0>`` as ids 32000..32099.

Licences: the SentencePiece model is Google's, Apache-2.0 (google-research/text-to-text-transfer-transformer);
stable-diffusion.cpp (leejet) and stable-diffusion-cpp-python (William Murray) are MIT, as their LICENSE files in
the source distribution say. This script copies the array's bytes unchanged and gzips them (no timestamp, so the
output is the same byte for byte on every run):

    cd /tmp && /path/to/.venv/bin/pip download stable-diffusion-cpp-python --no-deps --no-binary :all: -d sdcpp
    .venv/bin/python scripts/t5_vocab.py /tmp/sdcpp/stable_diffusion_cpp_python-*.tar.gz

(made from stable-diffusion-cpp-python 0.4.7). The argument may also be an unpacked source distribution or a
stable-diffusion.cpp checkout. Before writing, it checks that the JSON is the T5 vocabulary the tokenizer expects.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import sys
import tarfile

ARRAY = "t5_tokenizer_json_str"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdcore", "vocab", "t5_tokenizer.json.gz")


def _headers(source: str):
    """(name, text) of each C++ header in an sdist tarball or a folder, the likely ones first."""
    first = lambda name: (os.path.basename(name) not in ("clip_t5.hpp", "vocab.hpp"), name)
    if os.path.isdir(source):
        names = [os.path.join(d, f) for d, _, files in os.walk(source) for f in files if f.endswith(".hpp")]
        for name in sorted(names, key=first):
            with open(name, "rb") as f:
                yield name, f.read()
    else:
        with tarfile.open(source) as tar:
            for member in sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".hpp")),
                                 key=lambda m: first(m.name)):
                yield member.name, tar.extractfile(member).read()


def extract(source: str) -> tuple[str, bytes]:
    """(header it was found in, the bytes of the ``t5_tokenizer_json_str`` array)."""
    pattern = re.compile(rb"\b" + ARRAY.encode() + rb"\s*\[\s*\]\s*=\s*\{(.*?)\}\s*;", re.DOTALL)
    for name, text in _headers(source):
        match = pattern.search(text)
        if match:
            return name, bytes(int(v, 0) for v in re.findall(rb"0[xX][0-9a-fA-F]+|\d+", match.group(1)))
    sys.exit(f"no {ARRAY} array in any .hpp file of {source}")


def check(tokenizer: dict) -> None:
    """The facts sdcore.t5_tokenizer relies on: T5's ids, a unigram model and the Metaspace pre-tokenizer."""
    model, added = tokenizer["model"], {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    pieces = [piece for piece, _ in model["vocab"]]
    sentinels = {f"<extra_id_{n}>": 32099 - n for n in range(100)}
    problems = [what for what, ok in [
        ("a Unigram model", model["type"] == "Unigram"),
        ("32100 ids", len(pieces) == 32100),
        ("<pad> 0, </s> 1, <unk> 2", pieces[:3] == ["<pad>", "</s>", "<unk>"] and model["unk_id"] == 2),
        ("<extra_id_N> at 32099 - N", all(added.get(s) == i and pieces[i] == s for s, i in sentinels.items())),
        ("special <pad>, </s>, <unk>", all(added.get(s) == i for i, s in enumerate(pieces[:3]))),
        ("a Metaspace pre-tokenizer", tokenizer["pre_tokenizer"]["type"] == "Metaspace"),
        ("T5's nmt_nfkc table", tokenizer["normalizer"]["normalizers"][0]["type"] == "Precompiled"),
    ] if not ok]
    if problems:
        sys.exit("not the T5 vocabulary: expected " + "; ".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="stable-diffusion-cpp-python sdist (.tar.gz) or an unpacked folder")
    parser.add_argument("-o", "--output", default=os.path.normpath(OUT), help="default: %(default)s")
    args = parser.parse_args()
    name, data = extract(args.source)
    check(json.loads(data))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    print(f"{name}: {len(data)} bytes of JSON, sha256 {hashlib.sha256(data).hexdigest()}\n"
          f"-> {args.output} ({os.path.getsize(args.output)} bytes)")


if __name__ == "__main__":
    main()
