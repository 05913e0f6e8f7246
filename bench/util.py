"""Timing, statistics, machine facts and the cached inputs (checkpoint, diffusers folder, tokenizer)."""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
GENERATOR_VERSION = 1          # bump when sd15_checkpoint's recipe changes, so caches are rebuilt
SDXL_GENERATOR_VERSION = 1     # bump when sdxl_checkpoint's recipe changes, so caches are rebuilt
SD3_GENERATOR_VERSION = 1      # bump when sd3_medium_transformer's recipe changes, so caches are rebuilt
# stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json
SD3_MEDIUM_DIFFUSERS = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    seconds: list = field(default_factory=list)      # or MiB, when unit is "MiB"
    unit: str = "s"

    @property
    def median(self):
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def min(self):
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def max(self):
        return max(self.seconds) if self.seconds else float("nan")

    def __str__(self):
        if len(self.seconds) == 1:
            return fmt(self.median, self.unit)
        return f"{fmt(self.median, self.unit)} [{fmt(self.min, self.unit)}–{fmt(self.max, self.unit)}]"


def fmt(s: float, unit: str = "s") -> str:
    """Seconds, with the precision that matters at that magnitude (or MiB)."""
    if s != s:
        return "–"
    if unit == "MiB":
        return f"{s:.0f} MiB"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def interleave(fns: dict, runs: int, warmup: int = 1, sync=lambda: None) -> dict:
    """Run every callable ``warmup`` times, then ``runs`` rounds of ours, peer, ours, peer, ...
    (the order of ``fns``), so that a change in the machine's load hits all of them alike.
    Returns {name: Stats}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    out = {name: Stats() for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out[name].seconds.append(time.perf_counter() - t0)
    return out


def cfg_step_inputs(size: int, dtype, device="cpu", seed=0, cfg=None):
    """One classifier-free-guidance UNet step at size² px for a UNet of configuration ``cfg`` (default SD1.5's):
    (x once [1, 4, h, w], the same x repeated [2, ...], t [2], context [2, 77, C] = [uncond, cond], and the
    keywords of SDXL's label vector: ours {"y": pooled + embedded size numbers}, diffusers'
    {"added_cond_kwargs": {"text_embeds", "time_ids"}}, empty without one). Ours takes the latent once, as
    the pipeline hands it (the UNet shares it up to the first cross-attention); diffusers the repeated
    batch, as its pipeline does."""
    import torch

    from sdcore.unet import UNetConfig, timestep_embedding
    cfg = cfg or UNetConfig()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device, dtype)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(device, dtype)
    ours_kw, peer_kw = {}, {}
    if cfg.adm_in_channels:
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        from bench.references import SDXL_TIME_EMBED_DIM as dim
        pooled = torch.randn(2, cfg.adm_in_channels - 6 * dim, generator=g)
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), dim).reshape(2, -1)], dim=-1)
        ours_kw = {"y": y.to(device, dtype)}
        peer_kw = {"added_cond_kwargs": {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(device, dtype)}}
    return x, x.repeat(2, 1, 1, 1), torch.tensor([500.0, 500.0], device=device), ctx, ours_kw, peer_kw


def paired_ratios(a: Stats, b: Stats) -> list:
    """a/b round by round (each pair ran back to back, so it shares the machine's load)."""
    return [x / y for x, y in zip(a.seconds, b.seconds)]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    import diffusers
    import torch
    import transformers
    cpu = "?"
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = "?"
    try:
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_gib = f"{kb / 2 ** 20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem_gib,
        "cpu_features": ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "–",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root): the next read of the checkpoint comes from disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def run_worker(*args, python=sys.executable, timeout=1800) -> dict:
    """``python -m bench.workers ARGS`` in a fresh process; its last stdout line is a JSON object."""
    import torch
    env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))     # the same threads as this process
    proc = subprocess.run([python, "-m", "bench.workers", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Cached inputs
# ------------------------------------------------------------------------------------------------
def sd15_checkpoint() -> Path:
    """The full-size SD1.5-shaped random checkpoint, single-file LDM layout, fp16 on disk, built once under
    .cache/ (shared with tests/core/test_full_size.py)."""
    path = ROOT / ".cache" / f"sd15-random-v{GENERATOR_VERSION}.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        from sdcore.clip import TextConfig, TextEncoder
        from sdcore.formats.write import ldm_state_dict
        from sdcore.unet import UNet, UNetConfig
        from sdcore.vae import AutoencoderKL, VAEConfig
        log(f"building {path} (once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = (random_float16(UNet, UNetConfig(), 1), random_float16(AutoencoderKL, VAEConfig(), 2),
                 random_float16(TextEncoder, TextConfig(), 3))
        save_file(ldm_state_dict(*parts, family="sd1"), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    return path


def sd15_files() -> tuple[Path, Path]:
    ckpt = sd15_checkpoint()
    return ckpt, diffusers_folder(ckpt)


def clip_tokenizer_files() -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, written from the BPE vocabulary our
    tokenizer reads (open_clip's copy), so diffusers' pipeline can be built offline."""
    folder = CACHE / "clip-tokenizer"
    if not (folder / "merges.txt").exists():
        from sdcore.tokenizer import SPECIAL, _tables
        encoder, ranks = _tables()                      # ranks: "a b" lines, in rank order
        names = dict(zip(SPECIAL, ["<|startoftext|>", "<|endoftext|>"]))   # transformers' spelling
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({names.get(t, t): i for t, i in encoder.items()}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(ranks) + "\n")
    return folder


def clip_tokenizer(pad_token="<|endoftext|>"):
    from transformers import CLIPTokenizer
    folder = clip_tokenizer_files()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def diffusers_folder(ckpt: Path) -> Path:
    """The same weights as a diffusers pipeline folder (fp16 variant), for diffusers' own loading path.
    Reuses tests/core/test_full_size.py's copy when present."""
    shared = ckpt.with_name(ckpt.name.removesuffix(".safetensors") + "-diffusers")
    if (shared / "model_index.json").exists():
        return shared
    folder = CACHE / shared.name
    if not (folder / "model_index.json").exists():
        import torch

        import sdcore
        from bench import references as refs
        log(f"building {folder} (once)")
        m = sdcore.load_model(str(ckpt), device="cpu", dtype=torch.float32)
        refs.save_diffusers_folder(str(folder) + ".tmp", refs.diffusers_unet_from_ours(m.unet),
                                   refs.diffusers_vae_from_ours(m.vae), refs.transformers_text_from_ours(m.text_encoder),
                                   dtype=torch.float16)
        os.replace(str(folder) + ".tmp", folder)
    return folder


def random_float16(cls, cfg, seed):
    """A network in float16 (as released files hold it) with deterministic random weights, built without
    a float32 copy."""
    import torch

    from sdcore.formats.write import random_init_
    with torch.device("meta"):
        module = cls(cfg).to(torch.float16)
    return random_init_(module.to_empty(device="cpu"), seed)


def sdxl_checkpoint() -> tuple[Path, Path]:
    """A full-size SDXL base checkpoint in sd_xl_base_1.0's layout (random weights, fp16, no config inside,
    6.9 GB) and its diffusers-folder twin (the fp16 variant), built once under .cache/ (shared with
    tests/core/test_sdxl_full_size.py)."""
    path = ROOT / ".cache" / f"sdxl-random-v{SDXL_GENERATOR_VERSION}.safetensors"
    folder = path.with_name(path.name.removesuffix(".safetensors") + "-diffusers")
    if not (path.exists() and (folder / "model_index.json").exists()):
        import shutil

        import torch

        from bench import references as refs
        from sdcore.clip import TextEncoder
        from sdcore.formats.write import save_single_file
        from sdcore.unet import UNet
        from sdcore.vae import AutoencoderKL
        log(f"building {path} and {folder} (once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(f"{folder}.tmp", ignore_errors=True)
        nets = (random_float16(UNet, refs.SDXL_BASE_UNET, 1), random_float16(AutoencoderKL, refs.SDXL_BASE_VAE, 2),
                random_float16(TextEncoder, refs.SDXL_CLIP_L, 3), random_float16(TextEncoder, refs.SDXL_BIGG, 4))
        save_single_file(f"{path}.tmp", *nets[:3], family="sdxl", text_2=nets[3], with_config=False)
        refs.save_sdxl_folder(f"{folder}.tmp", *nets, dtype=torch.float16)
        os.replace(f"{path}.tmp", path)
        shutil.rmtree(folder, ignore_errors=True)          # a folder left without its file is rebuilt
        os.replace(f"{folder}.tmp", folder)
    return path, folder


def sd3_medium_config():
    """SD3 medium's MMDiT (sd3_medium.safetensors): 24 joint blocks of 1536 (24 heads of 64), 16 latent channels,
    T5-XXL's 4096-wide text tokens, CLIP-L + bigG's 2048 pooled, a 192×192 positions table, no q/k norms."""
    from sdcore.mmdit import MMDiTConfig
    return MMDiTConfig(depth=24, width=1536, head_dim=64, in_channels=16, patch_size=2, context_dim=4096,
                       pooled_dim=2048, pos_embed_max_size=192, qk_norm=False, dual_attention_layers=())


def random_mmdit_float16(cfg, seed):
    """An MMDiT with random_float16's weights, except its positions table: N(0, 1), of the O(1) size of the
    sin-cos table it stands for, so that which crop of it is taken shows in the output (random_init_ divides by
    the whole table's size: nothing would show). Filled a slice at a time (a 384² table is 0.9 GB in float32)."""
    import torch

    from sdcore.mmdit import MMDiT
    model = random_float16(MMDiT, cfg, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rows in model.pos_embed[0].split(4096):
            rows.copy_(torch.randn(rows.shape, generator=g))
    return model


def save_sd3_transformer(model, path, folder, **config):
    """``model`` (sdcore.mmdit.MMDiT) as Stability AI's single file (``model.diffusion_model.*``, no metadata, as
    released) at ``path``, and as a diffusers ``transformer/`` folder at ``folder``: config.json as
    SD3Transformer2DModel(**config) writes it, and the weights converted to diffusers' names by diffusers' own
    single-file converter (its q, k, v copies are the only new tensors; the rest are the model's own)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    with torch.device("meta"):
        SD3Transformer2DModel(**config).save_config(folder)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(sd)          # takes each tensor it converts out of sd
    if sd:
        raise ValueError(f"diffusers' converter left {len(sd)} tensors unconverted, e.g. {next(iter(sd))}")
    save_file(theirs, os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def sd3_medium_transformer() -> tuple[Path, Path]:
    """A full-size SD3 medium transformer in Stability AI's single-file names (``model.diffusion_model.*``, random
    weights, fp16, no config inside, 4.1 GB) and its diffusers twin, a ``transformer/`` folder with SD3 medium's
    config.json, built once under .cache/ (tests/core/test_sd3_full_size.py). Returns (file, transformer folder)."""
    path = ROOT / ".cache" / f"sd3-medium-transformer-random-v{SD3_GENERATOR_VERSION}.safetensors"
    root = path.with_name(path.name.removesuffix(".safetensors") + "-diffusers")
    if not (path.exists() and (root / "transformer" / "config.json").exists()):
        import shutil
        log(f"building {path} and {root} (once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(f"{root}.tmp", ignore_errors=True)
        save_sd3_transformer(random_mmdit_float16(sd3_medium_config(), 21), f"{path}.tmp", f"{root}.tmp/transformer",
                             **SD3_MEDIUM_DIFFUSERS)
        os.replace(f"{path}.tmp", path)
        shutil.rmtree(root, ignore_errors=True)          # a folder left without its file is rebuilt
        os.replace(f"{root}.tmp", root)
    return path, root / "transformer"
