"""The T5 tokenizer (sdcore.t5_tokenizer) against three references.

1. transformers' T5TokenizerFast, called as diffusers' SD3 and FLUX pipelines call it: ids and masks equal. It runs
   the same ``tokenizers`` library on the same JSON, so this checks our padding, truncation and mask. Loaded as the
   pipelines load it (``from_pretrained``), transformers 5 strips trailing whitespace: the one difference.
2. SentencePiece itself (Google's C++ library, the one T5's vocabulary was made with), given the same pieces and
   scores: an independent normalizer and unigram search. It agrees everywhere except two documented corners of
   the tokenizer.json conversion that diffusers inherits (trailing whitespace, literal special tokens).
3. Ids published for the real T5 vocabulary (T5 and T5 v1.1 share one SentencePiece model).
"""
import base64
import gzip
import io
import json
import shutil

import pytest
import torch

from sdcore.formats import CheckpointError
from sdcore.t5_tokenizer import VOCAB, T5Tokenizer

EOS, PAD = 1, 0
LONG = ("a breathtaking matte painting of a lighthouse on a cliff at dusk, crashing waves, volumetric light, "
        "by a famous artist, trending, 8k, ultra detailed, ") * 12          # ends with a space: see TRAILING

# prompts with no trailing whitespace and no literal special tokens: every reference must agree on these
TEXTS = [
    "Hello world",
    "",
    "a photograph of an astronaut riding a horse on the moon",
    "A RED circle, on a BLUE background!!! (masterpiece:1.2), [best quality], {curly} <angle> ~tilde~ `back` a|b \\ /",
    "naïve café — Ünïcödé façade, 東京タワー, Москва, Ελληνικά, العربية, हिन्दी, 한국어, ไทย",
    "emoji 😀🎨🔥 and a family 👨\u200d👩\u200d👧 joined by zero-width joiners",
    "numbers 1234567890 3.14159 1e-5 -42 +7 50% $9.99 €5 #hashtag @mention snake_case CamelCase",
    "full width ＦＵＬＬ ｗｉｄｔｈ, ligature ﬁne, circled ①②, x² ™ ½ … “curly quotes” ‘single’",
    "tab\tand\nnewline   many    spaces\r\nCRLF\n\n\nparagraphs",
    "  two leading spaces",
    "it's they're we'll I'd \"quoted\" 'single'",
    "e\u0301 combining acute, A\u030a ring, Å precomposed",
    "\u200b zero\u00a0width space and no-break space\u3000ideographic space",
    "\x00\x07 control characters\x1b[0m",
    " ".join(["long"] * 300),
    LONG.rstrip(),
    "word" * 200,
]
# where the tokenizer.json conversion (used as it is by transformers 4, so by diffusers) and SentencePiece part ways
TRAILING = [" ", "a cat ", "a cat\n", "a cat \t \n", "\u200d"]        # U+200D: T5's table maps it to a space
SPECIALS = ["x</s>y", "<extra_id_0> a <extra_id_99>", "<pad><unk>", "</s>"]
ALL = TEXTS + TRAILING + SPECIALS + [LONG]

# ids that public code and documentation show for T5's vocabulary (t5-small, t5-base: the same spiece.model)
PUBLISHED = [
    ("Hello world", [8774, 296, 1]),                                             # a tokenizer port's fixtures for t5-base
    ("Hello\tworld\nagain", [8774, 296, 541, 1]),
    ("translate English to German: The house is wonderful.", [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]),
    ("Das Haus ist wunderbar.", [644, 4598, 229, 19250, 5, 1]),                  # transformers' T5 docs, the labels
    ("translate English to German: How old are you?", [13959, 1566, 12, 2968, 10, 571, 625, 33, 25, 58, 1]),
    ("translate English to German: Hello, how are you?", [13959, 1566, 12, 2968, 10, 8774, 6, 149, 33, 25, 58, 1]),
]


@pytest.fixture(scope="module")
def vocab_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "tokenizer.json"
    with gzip.open(VOCAB, "rb") as f:
        path.write_bytes(f.read())
    return path


@pytest.fixture(scope="module")
def ours():
    return T5Tokenizer()


def ids_of(tokenizer: T5Tokenizer, text: str) -> list[int]:
    ids, mask = tokenizer.encode([text], length=2048)
    return ids[0][mask[0].bool()].tolist()


def test_shipped_vocabulary_is_t5_v1_1(vocab_json):
    tok = json.loads(vocab_json.read_text("utf-8"))
    pieces = [piece for piece, _ in tok["model"]["vocab"]]
    added = {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}
    assert tok["model"]["type"] == "Unigram" and tok["model"]["unk_id"] == 2
    assert len(pieces) == 32100 and pieces[:3] == ["<pad>", "</s>", "<unk>"]
    assert added == {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"<extra_id_{n}>": 32099 - n for n in range(100)}}
    assert all(pieces[32099 - n] == f"<extra_id_{n}>" for n in range(100))
    assert tok["pre_tokenizer"]["type"] == "Metaspace" and tok["pre_tokenizer"]["replacement"] == "▁"
    assert [n["type"] for n in tok["normalizer"]["normalizers"]] == ["Precompiled", "Replace"]


@pytest.mark.parametrize("length", [256, 77, 512])
def test_ids_and_mask_match_transformers(ours, vocab_json, length):
    from transformers import T5TokenizerFast
    reference = T5TokenizerFast(tokenizer_file=str(vocab_json))
    want = reference(ALL, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                     return_tensors="pt")
    ids, mask = ours.encode(ALL, length)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (len(ALL), length)
    for i, text in enumerate(ALL):
        assert ids[i].tolist() == want["input_ids"][i].tolist(), text
        assert mask[i].tolist() == want["attention_mask"][i].tolist(), text
    if length == 256:
        assert [ours.count(t) for t in ALL] == [len(ids) for ids in reference(ALL)["input_ids"]]


def test_diffusers_loading_path(ours, vocab_json, tmp_path):
    """Pipelines load ``from_pretrained(<repo>/tokenizer_3)``. transformers 4 then uses tokenizer.json as it is;
    transformers 5 keeps its vocabulary and table but rebuilds T5's pre-tokenizer in code (WhitespaceSplit, then
    Metaspace), which drops trailing whitespace as SentencePiece does. Both agree with us except there."""
    from transformers import T5TokenizerFast
    shutil.copy(vocab_json, tmp_path / "tokenizer.json")
    reference = T5TokenizerFast.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert reference(text)["input_ids"] == ids_of(ours, text), text
    for text in TRAILING + SPECIALS + [LONG]:
        ids = ids_of(ours, text)
        whitespace_split = [t for t, after in zip(ids, ids[1:] + [None]) if not (t == 3 and after in (EOS, 32000))]
        assert reference(text)["input_ids"] in (ids, whitespace_split), repr(text)


@pytest.mark.parametrize("length", [256, 77])
def test_truncation_keeps_the_first_tokens_then_eos(ours, length):
    full = ids_of(ours, LONG)
    assert ours.count(LONG) == len(full) > 256
    ids, mask = ours.encode([LONG, "Hello world"], length)
    assert ids[0].tolist() == full[: length - 1] + [EOS] and mask[0].all()
    assert ids[1].tolist() == [8774, 296, EOS] + [PAD] * (length - 3)
    assert mask[1].tolist() == [1, 1, 1] + [0] * (length - 3)


def test_edges(ours):
    assert ours.count("") == 1 and ours.encode([""], 4)[0].tolist() == [[EOS, PAD, PAD, PAD]]
    assert ours.encode(["Hello world"], 1)[0].tolist() == [[EOS]]
    assert ours.encode([], 8)[0].shape == (0, 8)
    with pytest.raises(ValueError):
        ours.encode(["x"], 0)


@pytest.mark.parametrize("text, ids", PUBLISHED)
def test_published_ids(ours, text, ids):
    assert ids_of(ours, text) == ids


# ---- SentencePiece, an independent implementation ----

def _sentencepiece(pieces, charsmap: bytes):
    """A SentencePiece unigram model with T5's pieces and scores and T5's normalizer settings."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb
    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type, spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = pb.TrainerSpec.UNIGRAM, 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name, norm.precompiled_charsmap = "nmt_nfkc", charsmap
    norm.add_dummy_prefix = norm.remove_extra_whitespaces = norm.escape_whitespaces = True
    kind = pb.ModelProto.SentencePiece
    for piece, score in pieces[:32000]:          # spiece.model ends there: transformers adds the sentinels
        p = model.pieces.add()
        p.piece, p.score = piece, score
        p.type = {"<pad>": kind.CONTROL, "</s>": kind.CONTROL, "<unk>": kind.UNKNOWN}.get(piece, kind.NORMAL)
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


@pytest.fixture(scope="module")
def t5_json(vocab_json):
    return json.loads(vocab_json.read_text("utf-8"))


@pytest.fixture(scope="module")
def sp_t5(t5_json):
    """With T5's own normalization table (the 2019 nmt_nfkc, as its spiece.model holds it)."""
    charsmap = base64.b64decode(t5_json["normalizer"]["normalizers"][0]["precompiled_charsmap"])
    return _sentencepiece(t5_json["model"]["vocab"], charsmap)


@pytest.fixture(scope="module")
def sp_today(t5_json):
    """With the nmt_nfkc table that today's SentencePiece compiles (read from a throwaway model trained with it)."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 20), model_writer=out, vocab_size=12,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc", hard_vocab_limit=False,
                                   minloglevel=2)
    model = pb.ModelProto()
    model.ParseFromString(out.getvalue())
    return _sentencepiece(t5_json["model"]["vocab"], model.normalizer_spec.precompiled_charsmap)


def test_sentencepiece_agrees(ours, sp_t5):
    for text in TEXTS:
        assert ids_of(ours, text) == sp_t5.encode(text) + [EOS], text


def test_sentencepiece_agrees_on_every_character(ours, sp_t5):
    """Each code point of the BMP and the emoji blocks, between two letters: normalization and pieces alike."""
    codes = [*range(0, 0xD800), *range(0xE000, 0x10000), *range(0x1F000, 0x1FB00)]
    texts = [f"x{chr(c)}y" for c in codes]
    got = [e.ids for e in ours.tokenizer.encode_batch(texts)]
    want = [ids + [EOS] for ids in sp_t5.encode(texts)]
    assert [hex(c) for c, g, w in zip(codes, got, want) if g != w] == []


def test_todays_nmt_nfkc_table_agrees_on_prompts(ours, sp_today):
    """T5's table is data we ship; SentencePiece's own build of the same rule checks it, except on the few code
    points the rule changed since 2019 (U+200D ZERO WIDTH JOINER is one: T5's table maps it to a space)."""
    for text in TEXTS:
        if "\u200d" not in text:
            assert ids_of(ours, text) == sp_today.encode(text) + [EOS], text


def test_documented_differences_from_sentencepiece(ours, sp_t5):
    # trailing whitespace: SentencePiece strips it; the conversion's normalizer only collapses runs of spaces,
    # and the Metaspace pre-tokenizer then makes a last "▁" (id 3) of it
    for text in TRAILING:
        assert ids_of(ours, text) == sp_t5.encode(text) + [3, EOS], repr(text)
    # literal special tokens: read as the special tokens; SentencePiece reads them as text (and has no sentinels)
    assert ids_of(ours, "x</s>y") == [3, 226, EOS, 3, 63, EOS]
    # (the space before one ends the text before it, so it is trailing whitespace too: a "▁" of its own)
    assert ids_of(ours, "<extra_id_0> a <extra_id_99>") == [32099, 3, 9, 3, 32000, EOS]
    assert EOS not in sp_t5.encode("x</s>y") and max(sp_t5.encode("<extra_id_0>")) < 32000


# ---- paths ----

def test_folder_and_file_load_the_same(ours, vocab_json, tmp_path):
    folder = tmp_path / "tokenizer_3"
    folder.mkdir()
    shutil.copy(vocab_json, folder / "tokenizer.json")
    want = ours.encode(ALL, 77)
    for path in [folder, folder / "tokenizer.json", vocab_json]:
        got = T5Tokenizer(str(path)).encode(ALL, 77)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # one load per file, shared by every tokenizer that names it
    assert T5Tokenizer(str(folder)).tokenizer is T5Tokenizer(str(folder / "tokenizer.json")).tokenizer
    assert T5Tokenizer().tokenizer is ours.tokenizer


def test_paths_without_a_tokenizer_json_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        T5Tokenizer(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="spiece.model but no tokenizer.json"):
        T5Tokenizer(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such"):
        T5Tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a tokenizer.json"):
        T5Tokenizer(str(tmp_path))
