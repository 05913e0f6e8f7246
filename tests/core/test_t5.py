"""The T5 v1.1 encoder (sdcore.t5) against transformers' T5EncoderModel on the same random weights: a small
gated-GELU T5 with T5-XXL's 32 buckets and max distance 128, on 77 tokens and on 300 (past max_distance, so
the far log-spaced buckets and the last shared one all occur), with and without a padding mask, both of
transformers' attention paths; float16 (with the overflow clamp) and bfloat16 loosely."""
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from bench.references import max_rel
from sdcore import t5
from sdcore.t5 import T5Config, T5Encoder, relative_position_bucket

SMALL = dict(d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=3, vocab_size=200, feed_forward_proj="gated-gelu",
             relative_attention_num_buckets=32, relative_attention_max_distance=128)


def _reference(attn="sdpa", seed=0) -> transformers.T5EncoderModel:
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(**SMALL, attn_implementation=attn)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():          # T5's init leaves the blocks near identity: give each a say
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return ref


def _ours(ref) -> T5Encoder:
    c = ref.config
    ours = T5Encoder(T5Config(vocab=c.vocab_size, width=c.d_model, d_kv=c.d_kv, heads=c.num_heads, d_ff=c.d_ff,
                              layers=c.num_layers, relative_attention_num_buckets=c.relative_attention_num_buckets,
                              relative_attention_max_distance=c.relative_attention_max_distance,
                              eps=c.layer_norm_epsilon))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def _inputs(length, masked, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (3, length), generator=g)
    if not masked:
        return ids, None
    mask = torch.zeros(3, length, dtype=torch.long)
    for row, n in enumerate([length, length // 2, 5]):           # padding on the tail, as a tokenizer pads
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_buckets_equal_transformers():
    distance = torch.arange(-1000, 1001)[None, :]
    for buckets, max_distance in [(32, 128), (16, 64), (64, 256), (32, 20)]:
        ref = T5Attention._relative_position_bucket(distance, bidirectional=True, num_buckets=buckets,
                                                    max_distance=max_distance)
        assert torch.equal(relative_position_bucket(distance, buckets, max_distance), ref)
    starts = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 23, 32, 46, 64, 91]       # T5-XXL's buckets, per direction
    d = torch.arange(300)
    before, after = relative_position_bucket(-d, 32, 128), relative_position_bucket(d, 32, 128)
    assert [int(d[before == k].min()) for k in range(16)] == starts
    assert [int(d[after == k].min()) for k in range(17, 32)] == starts[1:]
    assert after[0] == 0 and not (after == 16).any()                 # distance 0 is "before": bucket 16 unused


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("length", [77, 300])
def test_encoder_equals_transformers(length, masked, attn):
    ref = _reference(attn)
    ours = _ours(ref)
    ids, mask = _inputs(length, masked)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == (3, length, SMALL["d_model"])
    assert want.abs().max() > 1 and want.std() > 0.3           # O(1) outputs, not a vanished stream
    assert max_rel(got, want) < 1e-5
    if masked:                                                  # the mask does change the padded rows' tokens
        assert max_rel(ours(ids), want) > 1e-2


def test_every_block_and_the_position_bias_matter():
    """The random weights make each part count, so that the comparisons above test it."""
    ref = _reference()
    ids, _ = _inputs(77, False)
    with torch.no_grad():
        base = _ours(ref)(ids)
        ours = _ours(ref)
        ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
        assert max_rel(ours(ids), base) > 0.05
        for i in range(SMALL["num_layers"]):
            for sub, name in [(0, "SelfAttention.o"), (1, "DenseReluDense.wo")]:
                ours = _ours(ref)
                ours.encoder.block[i].layer[sub].get_submodule(name).weight.zero_()
                assert max_rel(ours(ids), base) > 0.05, (i, name)


def test_names_and_loading():
    ref = _reference()
    sd = ref.state_dict()
    ours = _ours(ref)
    assert set(ours.state_dict()) == set(sd) - {"encoder.embed_tokens.weight"}   # the tied alias is not ours
    only_shared = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    only_alias = {k: v for k, v in sd.items() if k != "shared.weight"}
    for part in (only_shared, only_alias):
        other = T5Encoder(ours.cfg)
        other.load_state_dict(part, strict=True)
        assert torch.equal(other.shared.weight, ref.shared.weight)
    with torch.device("meta"):                                  # the defaults are T5-XXL v1.1's encoder
        xxl = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        mine = T5Encoder(T5Config())
    want = {k: v.shape for k, v in xxl.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: v.shape for k, v in mine.state_dict().items()} == want


def _tanh_gelu(ref):
    """transformers' "gelu_new" is written out op by op, each rounded to a half dtype; F.gelu(approximate="tanh")
    (ours) rounds once. The same in float32 (up to 1e-7), the only difference in float16 and bfloat16: with it
    swapped in, transformers' sdpa path gives our every bit."""
    for block in ref.encoder.block:
        block.layer[1].DenseReluDense.act = torch.nn.GELU(approximate="tanh")
    return ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_transformers(dtype):
    ref = _reference()
    ours = _ours(ref)
    ids, mask = _inputs(300, True)
    with torch.no_grad():
        full = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ref, ours = ref.to(dtype), ours.to(dtype)
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        assert got.dtype == dtype
        assert max_rel(got, want) < (5e-2 if dtype == torch.bfloat16 else 1e-2)
        assert max_rel(got, full) < 1.25 * max_rel(want, full)        # as close to float32 as transformers is
        assert torch.equal(got, _tanh_gelu(ref)(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_float16_overflow_is_clamped_as_transformers_does(monkeypatch):
    """A feed-forward output past float16's range: both clamp (to ±65504, then ±(65504 − 1000) once an inf has
    appeared) and stay finite; and with wo kept in float32 (transformers' float16 loading), both carry the
    residual stream in float32."""
    ref = _reference()
    with torch.no_grad():
        ref.encoder.block[1].layer[1].DenseReluDense.wo.weight.mul_(3e4)
    ours = _ours(ref)
    ref, ours = _tanh_gelu(ref).half(), ours.half()
    ids, _ = _inputs(77, False)
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
        assert torch.isfinite(got).all() and torch.equal(got, want)
        with monkeypatch.context() as m:                       # the clamp is what keeps it finite
            m.setattr(t5, "clamp_fp16", lambda x: x)
            assert not torch.isfinite(ours(ids)).all()
        for model in (ref, ours):
            for block in model.encoder.block:
                block.layer[1].DenseReluDense.wo.float()
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.dtype == torch.float16 and torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_a_gguf_in_llama_cpps_names_loads(tmp_path, kind):
    """A T5 encoder GGUF as llama.cpp's converter writes it (the t5encoder files FLUX guides link): its names from
    the gguf package's own tensor-name map, the one that converter uses, the whole-block 2-D weights Q8_0 or
    float32. read_t5 sees it under transformers' names and, dequantized at load or kept quantized, it computes what
    transformers' T5EncoderModel computes on the same (dequantized) weights."""
    import gguf

    from sdcore.formats.build import build
    from sdcore.formats.checkpoints import read_t5
    from sdcore.quant import QuantLinear
    ref = _reference()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, SMALL["num_layers"])
    path = tmp_path / "t5-v1_1-encoder.gguf"
    w = gguf.GGUFWriter(str(path), "t5encoder")
    held, quantized = {}, 0
    for key, t in ref.state_dict().items():
        if key == "encoder.embed_tokens.weight":                  # the tied alias: the converter writes one table
            continue
        name = names.get_name(key, try_suffixes=(".weight",))
        a = t.numpy()
        if kind == "Q8_0" and a.ndim == 2 and a.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            a, quantized = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape), quantized + 1
        else:
            w.add_tensor(name, a)
        held[key] = torch.from_numpy(a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert quantized == (0 if kind == "F32" else 1 + 7 * SMALL["num_layers"])  # the table; q k v o wi_0 wi_1 wo
    with torch.no_grad():
        ref.load_state_dict(held, strict=False)
    part = read_t5(str(path))
    assert part.cfg == _ours(ref).cfg
    ids, mask = _inputs(77, True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        for keep in (False, True):
            model = build(T5Encoder, part.cfg, part.tensors, "cpu", torch.float32, "T5", str(path), keep_quantized=keep)
            kept = sum(isinstance(m, QuantLinear) for m in model.modules())
            assert kept == (7 * SMALL["num_layers"] if keep and kind == "Q8_0" else 0)
            assert max_rel(model(ids, mask), want) < 1e-5, keep
