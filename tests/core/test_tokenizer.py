"""Our BPE tokenizer against open_clip's SimpleTokenizer (the reference that ships the vocabulary)."""
import pytest
import torch

from sdcore.tokenizer import BOS, EOS, Tokenizer

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "A RED circle, on a BLUE background!!! (masterpiece:1.2), [best quality]",
    "naïve café — Ünïcödé façade, 東京タワー, Москва",
    "emoji 😀🎨🔥 and &amp; html &lt;tags&gt; it's they're we'll I'd",
    "numbers 1234567890 3.14159 1e-5 #hashtag @mention snake_case CamelCase",
    "tab\tand\nnewline   many    spaces",
    "<start_of_text> literal specials <end_of_text>",
    "long " * 120,
    "word" * 60,
]


@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def test_ids_match_open_clip(reference):
    ours = Tokenizer(pad_id=0)
    assert torch.equal(ours(PROMPTS), reference(PROMPTS))
    for p in PROMPTS:
        assert ours.encode(p) == reference.encode(p)


def test_sd1_pads_with_eos_and_truncation_keeps_eos(reference):
    ours = Tokenizer()                       # SD1 default
    ids = ours(PROMPTS)
    ref = reference(PROMPTS)
    for row, r in zip(ids, ref):
        n = int((r != 0).sum())
        assert torch.equal(row[:n], r[:n])
        assert row[n:].eq(EOS).all()
        assert row[0] == BOS
    long = ours(["long " * 120])[0]
    assert long.shape == (77,) and long[76] == EOS and long[75] != EOS
    assert ours([""])[0].tolist() == [BOS] + [EOS] * 76
