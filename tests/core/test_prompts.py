"""The A1111 prompt language (sdcore.prompts): the parser against the examples A1111's own prompt_parser
documents and further cases worked out by hand from its rules; chunking by the rules of its tokenize_line
(75 tokens, comma backtrack of 20, BREAK); and the conditioning of the model against the same computation
written out here on the text encoder (weights on the hidden states, mean restored, chunks encoded alone
and concatenated, negative padded with the empty prompt's chunk, SDXL's pooled output of the first chunk)."""
from types import SimpleNamespace

import pytest
import torch

import sdcore
from sdcore import prompts
from sdcore.clip import TextEncoder
from sdcore.formats.write import random_init_
from sdcore.model import StableDiffusion
from sdcore.prompts import BREAK, CHUNK
from sdcore.tokenizer import BOS, EOS, Tokenizer
from tiny_models import SDXL_TEXT, SDXL_TEXT_2

# (prompt, what A1111's parse_prompt_attention returns). The first block is the docstring of
# modules/prompt_parser.py in AUTOMATIC1111/stable-diffusion-webui, weights to the last digit.
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]
BY_THE_RULES = [
    ("", [("", 1.0)]),
    ("a ((b) c", [("a ", 1.0), ("b", 1.1 * 1.1), (" c", 1.1)]),         # the open one reaches the end
    ("x) y]", [("x y", 1.0)]),                                           # closers with nothing open: dropped
    ("[(mixed])", [("mixed", 1 / 1.1 * 1.1)]),                           # each kind closes its own
    ("(a:1e2)", [("a:1e2", 1.1)]),                 # no scientific notation: ':' is text, ')' closes at 1.1
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),             # not a number (A1111 would fail on it)
    ("x:1.2) y", [("x:1.2) y", 1.0)]),             # a weight with no bracket open stays text
    ("( spaced : 1.5 )", [(" spaced ", 1.5)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("a \\ b \\\\", [("a  b \\", 1.0)]),          # a lone backslash is dropped, an escaped one kept
    ("a 🐱 (cat)", [("a 🐱 ", 1.0), ("cat", 1.1)]),
    ("a BREAK (b)", [("a", 1.0), BREAK, ("", 1.0), ("b", 1.1)]),
    ("aBREAKb, Break", [("aBREAKb, Break", 1.0)]),  # only the capitalised word on its own
]


@pytest.mark.parametrize("text, expected", DOCUMENTED + BY_THE_RULES)
def test_parse(text, expected):
    assert prompts.parse(text) == expected


WORDS = "red blue green cat dog house tree sky sun moon".split()         # one token each


def _words(n, comma_at=()):
    """A prompt of n one-token words (w0 w1 ...), a comma after each position in ``comma_at``, and its
    tokenisation by a stub: word k -> token 1000 + k, ',' -> 7."""
    return " ".join(f"w{k}" + ("," if k in comma_at else "") for k in range(n))


def _stub(text):
    return [7 if t == "," else 1000 + int(t[1:]) for t in text.replace(",", " , ").split()]


def _sizes(text):
    return [len(c.tokens) for c in prompts.chunks(prompts.parse(text), _stub, comma=7)]


def test_chunks_split_as_a1111():
    assert _sizes(_words(75)) == [75]
    assert _sizes(_words(76)) == [75, 1]
    assert _sizes(_words(160)) == [75, 75, 10]
    # a comma 15 tokens before the end of a full chunk: what follows it moves on (80 words + 1 comma)
    assert _sizes(_words(80, comma_at=(59,))) == [61, 20]
    # a comma 25 tokens before: too far back, the chunk is cut at 75
    assert _sizes(_words(80, comma_at=(49,))) == [75, 6]
    assert _sizes("w0 BREAK w1") == [1, 1]
    assert _sizes(_words(75) + " BREAK w99") == [75, 1]        # BREAK at a chunk's edge adds no empty chunk
    assert _sizes(_words(3) + " BREAK") == [3]
    assert _sizes("") == [0]
    weights = prompts.chunks(prompts.parse("w0 (w1:1.5) [w2]"), _stub, comma=7)[0].weights
    assert weights == [1.0, 1.5, 1 / 1.1]


def test_token_rows_pad_after_the_end_token():
    ids, w = prompts.token_rows(prompts.chunks(prompts.parse("w0 (w1:2)"), _stub, comma=7), BOS, EOS, 0, count=2)
    assert ids.shape == (2, CHUNK + 2) and ids[0, :4].tolist() == [BOS, 1000, 1001, EOS] and ids[0, 4:].eq(0).all()
    assert ids[1, :2].tolist() == [BOS, EOS] and ids[1, 2:].eq(0).all()              # the empty prompt's chunk
    assert w[0, :4].tolist() == [1, 1, 2, 1] and w[1].eq(1).all()


@pytest.fixture(scope="module")
def model(default_model_path):
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


def _encode(m, ids):
    with torch.inference_mode():
        return m.text_encoder(ids)


def test_a_plain_prompt_is_encoded_exactly_as_before(model):
    plain = ["a red circle on a blue background", ""]
    with torch.inference_mode():
        assert torch.equal(model.encode_text(plain), _encode(model, model.tokenizer(plain)))


def test_weights_scale_the_hidden_states_and_the_mean_is_restored(model):
    tok = model.tokenizer
    ids = tok(["a red circle"])
    hidden = _encode(model, ids)
    w = torch.ones(1, 77)
    w[0, 2] = 1.5                                            # "red": BOS a red circle EOS
    scaled = hidden * w[..., None]
    expect = scaled * (hidden.mean() / scaled.mean())
    with torch.inference_mode():
        ours = model.encode_text(["a (red:1.5) circle"])
    assert torch.allclose(ours, expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, hidden, atol=1e-3)


def test_long_prompts_are_chunks_encoded_alone_and_the_negative_is_padded(model):
    tok = model.tokenizer
    long = " ".join(WORDS[k % len(WORDS)] for k in range(100))      # 100 tokens: two chunks
    ids = tok.encode(long)
    assert len(ids) == 100
    with torch.inference_mode():
        context = model.encode_text([long, "blurry"])
        first = torch.tensor([[BOS, *ids[:CHUNK], EOS]])
        second = torch.full((1, 77), tok.pad_id)
        second[0, :len(ids) - CHUNK + 2] = torch.tensor([BOS, *ids[CHUNK:], EOS])
    assert context.shape == (2, 154, model.text_encoder.cfg.width)
    assert torch.equal(context[0, :77], _encode(model, first)[0])
    assert torch.equal(context[0, 77:], _encode(model, second)[0])
    assert torch.equal(context[1, :77], _encode(model, tok(["blurry"]))[0])
    assert torch.equal(context[1, 77:], _encode(model, tok([""]))[0])          # the empty prompt's encoding


def test_sdxl_pooled_output_comes_from_the_first_chunk():
    """The model's text path with SDXL's two (small) encoders: the pooled output is bigG's of the first chunk."""
    torch.manual_seed(0)
    te, te2 = random_init_(TextEncoder(SDXL_TEXT), 3), random_init_(TextEncoder(SDXL_TEXT_2), 4)
    m = SimpleNamespace(family="sdxl", device=torch.device("cpu"), dtype=torch.float32,
                        encoders=[(te, Tokenizer(pad_id=EOS)), (te2, Tokenizer(pad_id=0))])
    long = " ".join(WORDS[k % len(WORDS)] for k in range(100))
    with torch.inference_mode():
        context, pooled = StableDiffusion.encode_text(m, [long])
        short_ctx, short_pooled = StableDiffusion.encode_text(m, [" ".join(long.split()[:60])])
        ids = Tokenizer(pad_id=0)([long])
        _, ref_pooled = te2(ids, output_layer=-2, pooled=True)          # the first 75 tokens, as one chunk
    assert context.shape == (1, 154, 64 + 128)
    assert torch.equal(pooled, ref_pooled)
    assert not torch.equal(pooled, short_pooled)


def test_over_http_a_long_prompt_reaches_past_75_tokens(model, tmp_path):
    import base64
    import io

    from PIL import Image

    from app import create_app
    client = create_app({"data_dir": str(tmp_path / "d"), "api_key": None}, model=model).test_client()
    first = " ".join(WORDS[k % len(WORDS)] for k in range(CHUNK))
    rest = " ".join(WORDS[(k * 3) % len(WORDS)] for k in range(75))

    def image(prompt):
        r = client.post("/v1/images/generations", json={"prompt": prompt, "steps": 2, "size": "64x64", "seed": 3,
                                                        "response_format": "b64_json"})
        assert r.status_code == 200, r.get_json()
        return Image.open(io.BytesIO(base64.b64decode(r.get_json()["data"][0]["b64_json"]))).tobytes()   # pixels

    assert image(f"{first} {rest}") != image(first)                  # the second chunk is read
    assert image(f"{first} BREAK {rest}") == image(f"{first} {rest}")   # a BREAK where the chunk ends anyway
    assert image("a (red:1.4) circle") != image("a red circle")
