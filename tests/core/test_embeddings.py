"""Textual-inversion embeddings (sdcore.embeddings, sdcore.formats.embeddings) against transformers: the
reference adds the embedding's vectors as new tokens the way diffusers' load_textual_inversion does (a resized
token-embedding table with the vectors in the new rows) and encodes the token ids; ours must give the same
hidden states. Files in the four layouts people share; the A1111 rule that an embedding never straddles a chunk;
refusal of an embedding made for another text-encoder width; the infotext's TI hashes."""
import hashlib

import pytest
import torch
from safetensors.torch import save_file

import sdcore
from bench import references as refs
from sdcore.clip import TextEncoder
from sdcore.embeddings import EmbeddingDir, EmbeddingError
from sdcore.formats.embeddings import read_embedding
from sdcore.formats.write import random_init_, save_single_file
from sdcore.pipeline import GenerationParams, generate, parse_infotext
from sdcore.prompts import CHUNK, Chunk, chunks, parse
from sdcore.tokenizer import BOS, EOS
from sdcore.unet import UNet
from sdcore.vae import AutoencoderKL
from tests.tiny_models import SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE


@pytest.fixture(scope="module")
def sd1(default_model_path):
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture()
def emb_dir(tmp_path, sd1):
    g = torch.Generator().manual_seed(0)
    width = sd1.text_encoder.cfg.width
    torch.save({"string_to_param": {"*": torch.randn(3, width, generator=g)}, "name": "oldstyle", "step": 500},
               tmp_path / "OldStyle.pt")
    save_file({"emb_params": torch.randn(2, width, generator=g)}, str(tmp_path / "neg-hands.safetensors"))
    torch.save({"<cat-toy>": torch.randn(width, generator=g)}, tmp_path / "cattoy.bin")
    save_file({"clip_l": torch.randn(2, 64, generator=g), "clip_g": torch.randn(2, 128, generator=g)},
              str(tmp_path / "xlstyle.safetensors"))
    return tmp_path


def _reference(model, pieces):
    """transformers' CLIPTextModel with the embeddings' vectors as new tokens: hidden states of the one chunk
    [BOS] pieces... [EOS] pad..., where a piece is text or a vectors tensor."""
    ref = refs.transformers_text_from_ours(model.text_encoder)
    vocab = model.text_encoder.cfg.vocab_size
    ids, new = [BOS], []
    for piece in pieces:
        if isinstance(piece, torch.Tensor):
            ids += list(range(vocab + sum(len(v) for v in new), vocab + sum(len(v) for v in new) + len(piece)))
            new.append(piece)
        else:
            ids += model.tokenizer.encode(piece)
    ids += [EOS] + [model.tokenizer.pad_id] * (CHUNK + 1 - len(ids))
    ref.resize_token_embeddings(vocab + sum(len(v) for v in new))
    with torch.no_grad():
        ref.get_input_embeddings().weight[vocab:] = torch.cat(new)
        out = ref(torch.tensor([ids]), output_hidden_states=True)
    return out.last_hidden_state if model.text_encoder.cfg.final_norm else out.hidden_states[-1]


def test_the_four_file_layouts_read(emb_dir, sd1):
    width = sd1.text_encoder.cfg.width
    assert read_embedding(str(emb_dir / "OldStyle.pt"))[width].shape == (3, width)
    assert read_embedding(str(emb_dir / "neg-hands.safetensors"))[width].shape == (2, width)
    assert read_embedding(str(emb_dir / "cattoy.bin"))[width].shape == (1, width)
    assert {k: v.shape for k, v in read_embedding(str(emb_dir / "xlstyle.safetensors")).items()} == {
        64: (2, 64), 128: (2, 128)}


def test_hidden_states_equal_transformers_with_the_vectors_as_new_tokens(emb_dir, sd1):
    sd1.embeddings = EmbeddingDir(str(emb_dir))
    try:
        ours = sd1.encode_text(["a photo of oldstyle, red NEG-HANDS and cattoy"])
    finally:
        sd1.embeddings = None
    vec = {n: next(iter(read_embedding(str(emb_dir / f)).values())) for n, f in
           (("old", "OldStyle.pt"), ("neg", "neg-hands.safetensors"), ("cat", "cattoy.bin"))}
    want = _reference(sd1, ["a photo of", vec["old"], ", red", vec["neg"], "and", vec["cat"]])
    assert refs.max_rel(ours, want) < 1e-5


def test_a_prompt_naming_none_is_bit_identical(emb_dir, sd1):
    plain = sd1.encode_text(["an old style barn, oldstyles"])         # 'oldstyles' is not the word 'oldstyle'
    sd1.embeddings = EmbeddingDir(str(emb_dir))
    try:
        assert torch.equal(sd1.encode_text(["an old style barn, oldstyles"]), plain)
    finally:
        sd1.embeddings = None


def test_an_embedding_never_straddles_two_chunks():
    group = tuple(range(100, 105))

    def encode(text):
        return [group] if text == "EMB" else [7] * int(text)
    got = chunks([("73", 1.0), ("EMB", 1.2), ("3", 1.0)], encode, comma=999)
    assert [len(c.tokens) for c in got] == [73, 8]                    # 73 + 5 > 75: the five move on together
    assert got[1].tokens[:5] == list(group) and got[1].weights[:5] == [1.2] * 5
    assert chunks(parse("x"), lambda t: [1], 2)[0] == Chunk([1], [1.0])


def test_sdxl_pairs_give_each_encoder_its_vectors_and_other_widths_are_refused(emb_dir, sd1, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_single_file(path, random_init_(UNet(SDXL_UNET), 1), random_init_(AutoencoderKL(SDXL_VAE), 2),
                     random_init_(TextEncoder(SDXL_TEXT), 3), family="sdxl",
                     text_2=random_init_(TextEncoder(SDXL_TEXT_2), 4), with_config=False)
    xl = sdcore.load_model(path, device="cpu", dtype=torch.float32)
    xl.embeddings = EmbeddingDir(str(emb_dir))
    context, pooled = xl.encode_text(["a xlstyle house"])
    vectors = read_embedding(str(emb_dir / "xlstyle.safetensors"))
    for encoder, width, part in ((xl.text_encoder, 64, context[..., :64]), (xl.text_encoder_2, 128, context[..., 64:])):
        ref = refs.transformers_text_from_ours(encoder)
        vocab = encoder.cfg.vocab_size
        ids = [BOS] + xl.tokenizer.encode("a") + [vocab, vocab + 1] + xl.tokenizer.encode("house") + [EOS]
        ids += [encoder.cfg.pad_id] * (77 - len(ids))
        ref.resize_token_embeddings(vocab + 2)
        with torch.no_grad():
            ref.get_input_embeddings().weight[vocab:] = vectors[width]
            want = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
        assert refs.max_rel(part, want) < 1e-5
    with pytest.raises(EmbeddingError, match="another model family"):
        xl.encode_text(["oldstyle"])
    sd1.embeddings = EmbeddingDir(str(emb_dir))
    try:
        with pytest.raises(EmbeddingError, match="another model family"):
            sd1.encode_text(["xlstyle"])
    finally:
        sd1.embeddings = None


def test_the_infotext_lists_ti_hashes(emb_dir, sd1):
    sd1.embeddings = EmbeddingDir(str(emb_dir))
    try:
        image = generate(sd1, GenerationParams("oldstyle barn", negative_prompt="neg-hands", steps=1, width=64,
                                               height=64))[0]
    finally:
        sd1.embeddings = None
    hashes = parse_infotext(image.parameters)["embedding_hashes"]
    assert hashes == {name: hashlib.sha256((emb_dir / f).read_bytes()).hexdigest()[:12]
                      for name, f in (("oldstyle", "OldStyle.pt"), ("neg-hands", "neg-hands.safetensors"))}
