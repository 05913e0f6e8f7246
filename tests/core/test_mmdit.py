"""Our MMDiT (sdcore.mmdit) against diffusers' SD3Transformer2DModel on the same random weights: the weights are
made in Stability AI's single-file names (ours) and converted to diffusers' by diffusers' own single-file
converter, so the names are checked as well as the arithmetic. SD3 (no q/k norm), SD3.5 large (q/k RMS norm)
and SD3.5 medium (MMDiT-X: an image-only attention in the first blocks)."""
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from bench.references import max_rel
from sdcore.mmdit import MMDiT, MMDiTConfig


def _random(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "ln_" in name:                       # RMS-norm gains around 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


@pytest.mark.parametrize("qk_norm,dual", [(False, ()), (True, ()), (True, (0, 1))],
                         ids=["sd3", "sd3.5-large", "sd3.5-medium"])
def test_mmdit_equals_diffusers(qk_norm, dual):
    cfg = MMDiTConfig(depth=3, width=64, head_dim=16, in_channels=4, context_dim=48, pooled_dim=40,
                      pos_embed_max_size=12, qk_norm=qk_norm, dual_attention_layers=dual)
    ours = MMDiT(cfg).eval()
    _random(ours, seed=len(dual) + qk_norm)
    state = {f"model.diffusion_model.{k}": v.clone() for k, v in ours.state_dict().items()}
    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=64,
                                pooled_projection_dim=40, out_channels=4, pos_embed_max_size=12,
                                dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None).eval()
    missing, unexpected = ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(state), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    g = torch.Generator().manual_seed(7)
    for h, w in ((16, 16), (12, 20)):                  # square, and a crop of the positions off the centre
        x = torch.randn(2, 4, h, w, generator=g)
        t = torch.tensor([999.0, 250.5])
        ctx = torch.randn(2, 9, 48, generator=g)
        y = torch.randn(2, 40, generator=g)
        with torch.no_grad():
            got = ours(x, t, ctx, y)
            want = ref(x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        assert want.std() > 0.1
        assert max_rel(got, want) < 1e-5, max_rel(got, want)


def test_positions_beyond_the_table_are_refused():
    model = MMDiT(MMDiTConfig(depth=1, width=32, head_dim=16, in_channels=4, context_dim=8, pooled_dim=8,
                              pos_embed_max_size=4))
    with pytest.raises(ValueError, match="at most 4×4"):
        model(torch.zeros(1, 4, 10, 8), torch.zeros(1), torch.zeros(1, 2, 8), torch.zeros(1, 8))


@pytest.mark.parametrize("qk_norm,dual", [(False, ()), (True, (0,))], ids=["sd3", "sd3.5-medium"])
def test_mmdit_files_in_both_layouts_load_equal(tmp_path, qk_norm, dual):
    """A diffusers transformer folder, the same weights in one file under diffusers' names, and Stability's
    single file (under model.diffusion_model.): each read by our loader gives diffusers' output, and the
    configuration read off the single file's shapes is the one it was made with (the head width, which the shapes
    do not tell without q/k norms, from our metadata entry: released models all have 64)."""
    from safetensors.torch import save_file

    from sdcore.formats.build import build
    from sdcore.formats.checkpoints import MMDIT, read_transformer
    from sdcore.formats.files import config_to_metadata
    cfg = MMDiTConfig(depth=2, width=64, head_dim=16, in_channels=4, context_dim=48, pooled_dim=40,
                      pos_embed_max_size=12, qk_norm=qk_norm, dual_attention_layers=dual)
    ours = MMDiT(cfg).eval()
    _random(ours, seed=3)
    state = {k: v.clone().contiguous() for k, v in ours.state_dict().items()}
    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=64,
                                pooled_projection_dim=40, out_channels=4, pos_embed_max_size=12,
                                dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None).eval()
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v.clone() for k, v in state.items()}))
    ref.save_pretrained(tmp_path / "transformer")
    head = config_to_metadata(mmdit={"head_dim": 16})
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "diffusers-names.safetensors"),
              metadata=head)
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(tmp_path / "sd3.safetensors"),
              metadata=head)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0])
    ctx, y = torch.randn(1, 5, 48, generator=g), torch.randn(1, 40, generator=g)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    for name in ("transformer", "diffusers-names.safetensors", "sd3.safetensors"):
        part = read_transformer(str(tmp_path / name), MMDIT)
        assert part.cfg == cfg, (name, part.cfg)
        model = build(MMDiT, part.cfg, part.tensors, "cpu", torch.float32, "MMDiT", part.source)
        with torch.no_grad():
            assert max_rel(model(x, t, ctx, y), want) < 1e-5, name
