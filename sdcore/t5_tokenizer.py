"""T5's SentencePiece unigram tokenizer: the tokenizer of the T5-XXL text encoder in SD3 and FLUX.

Encoding is left to Hugging Face's ``tokenizers`` library, reading a ``tokenizer.json``: the one a diffusers
folder ships (SD3's ``tokenizer_3/``, FLUX's ``tokenizer_2/``), or, for single-file checkpoints that carry no
tokenizer, the copy of the same T5 vocabulary in ``sdcore/vocab/`` (scripts/t5_vocab.py says where it comes
from). The unigram model is a Viterbi search over 32000 scored pieces after Unicode normalization, which is
well worth not writing again. What this module adds is the call diffusers' SD3 and FLUX pipelines make,
``T5TokenizerFast(texts, padding="max_length", max_length=L, truncation=True)``: the same ids and attention
mask (tests check), without transformers.

Truncation keeps the first L - 1 tokens and ends with ``</s>``, so a long prompt loses its end silently:
``count`` lets the caller warn. The ``tokenizer.json`` is used as it is, as transformers 4 uses it (and 5 when
given the file); it differs from T5's own SentencePiece in two corners. Trailing whitespace (also before a
special token) becomes one more "▁" token, which SentencePiece strips; transformers 5's ``from_pretrained``
rebuilds the pre-tokenizer in code and strips it too. And a literal ``</s>`` or ``<extra_id_N>`` in a prompt is
read as that special token, where SentencePiece reads the characters.
"""
import functools
import gzip
import os

import tokenizers
import torch

from .formats.files import CheckpointError

VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab", "t5_tokenizer.json.gz")
MAX_LENGTH = 256          # SD3's default max_sequence_length (FLUX.1-dev's is 512)


def _tokenizer_file(path: str | None) -> str:
    """The tokenizer.json a path names: the file itself, or the one in a diffusers tokenizer folder."""
    if path is None:
        return VOCAB
    if os.path.isdir(path):
        found = os.path.join(path, "tokenizer.json")
        if os.path.isfile(found):
            return found
        if os.path.isfile(os.path.join(path, "spiece.model")):
            raise CheckpointError(f"{path} has T5's spiece.model but no tokenizer.json, which is what the server reads: copy "
                                  "the model's tokenizer.json there, or give no tokenizer path to use the built-in T5 vocabulary")
        raise CheckpointError(f"{path} has no tokenizer.json (a diffusers tokenizer_3/ folder has one)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such T5 tokenizer file or folder")
    return path


@functools.lru_cache(maxsize=None)
def _load(file: str) -> tokenizers.Tokenizer:
    """Read once per process (about a tenth of a second): every model with this tokenizer shares it."""
    try:
        if file.endswith(".gz"):
            with gzip.open(file, "rb") as f:
                tokenizer = tokenizers.Tokenizer.from_str(f.read().decode("utf-8"))
        else:
            tokenizer = tokenizers.Tokenizer.from_file(file)
    except Exception as e:       # tokenizers raises a bare Exception for unreadable JSON
        raise CheckpointError(f"{file} is not a tokenizer.json that the tokenizers library reads: {str(e)[:200]}") from None
    if tokenizer.token_to_id("</s>") is None or tokenizer.token_to_id("<pad>") is None:
        raise CheckpointError(f"{file} is not a T5 tokenizer (it has no </s> or <pad> token)")
    # padding and truncation are done below, per call; a file may carry its own settings of both
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class T5Tokenizer:
    """``encode(["a cat"]) -> (ids [B, L], attention mask [B, L])``: tokens, ``</s>``, then ``<pad>`` (id 0).

    ``path``: a diffusers tokenizer folder or a tokenizer.json file; None is the built-in T5 vocabulary.
    """

    def __init__(self, path: str | None = None):
        self.tokenizer = _load(os.path.abspath(_tokenizer_file(path)))
        self.eos_id = self.tokenizer.token_to_id("</s>")
        self.pad_id = self.tokenizer.token_to_id("<pad>")

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids without ``</s>``, untruncated (literal special tokens included, as transformers reads them)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: list[str], length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        if length < 1:
            raise ValueError(f"length must be at least 1 (room for </s>), not {length}")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, tokens in enumerate(self._tokens(texts)):
            tokens = tokens[: length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def count(self, text: str) -> int:
        """How many tokens ``text`` takes, ``</s>`` included: more than ``length`` means ``encode`` cuts it."""
        return len(self._tokens([text])[0]) + 1
