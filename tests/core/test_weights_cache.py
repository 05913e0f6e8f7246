"""The converted-weights cache: a load that casts writes the converted networks once; later loads
memory-map them (no conversion), bit-identical to converting in memory; a changed source, a damaged
entry or an unusable cache directory never gives wrong weights or a failed load."""
import fcntl
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import requests
import torch
from safetensors.torch import save_file

import sdcore
from sdcore import weights_cache
from sdcore.formats import build
from sdcore.formats.write import save_controlnet, save_single_file
from tiny_models import random_controlnet
from weights.make_default import UNET as TINY_UNET
from weights.make_default import build_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkpoint(path, seed=0, dtype=torch.float16):
    save_single_file(path, *build_tiny(seed), family="sd1", dtype=dtype, native_size=64)
    return str(path)


def _entries(cache):
    return sorted(n for n in os.listdir(cache) if n.endswith(".safetensors")) if os.path.isdir(cache) else []


def _networks(model):
    nets = [model.unet, model.vae, model.text_encoder] + ([model.controlnet] if model.controlnet else [])
    return {f"{i}.{k}": v for i, n in enumerate(nets) for k, v in n.state_dict().items()}


def _assert_same_weights(a, b):
    wa, wb = _networks(a), _networks(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype == torch.bfloat16, k
        assert torch.equal(wa[k], wb[k]), k


def _mapped_files(tensors) -> set:
    """The files whose memory mappings hold these tensors' data (from /proc/self/maps)."""
    maps = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[5]))
    return {next((f for lo, hi, f in maps if lo <= t.data_ptr() < hi), None) for t in tensors if t.numel()}


def test_later_loads_map_the_converted_weights_bit_identical(tmp_path, monkeypatch, caplog):
    src, cache = _checkpoint(tmp_path / "model.safetensors"), str(tmp_path / "cache")
    cn_path = tmp_path / "cn.safetensors"
    save_controlnet(cn_path, random_controlnet(TINY_UNET), dtype=torch.float16)
    in_memory = sdcore.load_model(src, dtype=torch.bfloat16, control_net=str(cn_path))
    first = sdcore.load_model(src, dtype=torch.bfloat16, control_net=str(cn_path), cache_dir=cache)
    assert len(_entries(cache)) == 4                                 # UNet, VAE, text encoder, ControlNet
    _assert_same_weights(first, in_memory)

    def no_conversion(*a, **k):
        raise AssertionError("a cached load converted a tensor")
    monkeypatch.setattr(build, "cast", no_conversion)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdcore.weights_cache"):
        later = sdcore.load_model(src, dtype=torch.bfloat16, control_net=str(cn_path), cache_dir=cache)
    assert caplog.text.count("mapped from") == 4 and "converted" not in caplog.text
    _assert_same_weights(later, in_memory)
    entries = {os.path.join(cache, n) for n in _entries(cache)}
    assert _mapped_files(_networks(later).values()) == entries       # every weight lives in a mapped cache file
    assert _mapped_files(_networks(first).values()) == entries       # the converting load maps what it wrote
    assert not _mapped_files(_networks(in_memory).values()) & entries
    x, t, ctx = torch.randn(2, 4, 8, 8).bfloat16(), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 32).bfloat16()
    with torch.inference_mode():
        assert torch.equal(later.unet(x, t, ctx), in_memory.unet(x, t, ctx))


def test_gunicorn_workers_share_one_converted_copy(tmp_path):
    """Two workers booting together on an fp16 model in bf16: each network is converted once, and
    both workers generate from the same mapped files."""
    from bench.harness import API_KEY, Gunicorn, require_pipeline
    require_pipeline()
    src, cache = _checkpoint(tmp_path / "model.safetensors"), tmp_path / "cache"
    srv = Gunicorn(tmp_path / "data", tmp_path / "gunicorn.log", SD_MODEL=src, SD_DTYPE="bfloat16", SD_WORKERS="2",
                   SD_WEIGHTS_CACHE=str(cache))
    try:
        srv.wait_healthy()
        srv.wait_log(r"loaded model[\s\S]*loaded model")              # both workers
        entries = {str(cache / n) for n in _entries(cache)}
        assert len(entries) == 3 and srv.log_text().count("converted ") == 3
        for pid in srv.worker_pids():
            maps = {line.split()[5] for line in open(f"/proc/{pid}/maps") if len(line.split()) >= 6}
            assert entries <= maps, pid
        r = requests.post(srv.base + "/v1/images/generations", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"prompt": "a fox", "size": "64x64", "steps": 2, "response_format": "b64_json"}, timeout=120)
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    finally:
        srv.stop()


def test_nothing_is_cached_when_the_load_converts_nothing(tmp_path):
    src, cache = _checkpoint(tmp_path / "model.safetensors", dtype=torch.bfloat16), str(tmp_path / "cache")
    sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    assert _entries(cache) == []


def test_a_changed_source_replaces_its_entries(tmp_path):
    src, cache = _checkpoint(tmp_path / "model.safetensors", seed=0), str(tmp_path / "cache")
    sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    old = _entries(cache)
    _checkpoint(src, seed=7)                                         # same path and size, new weights
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    cached = sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    _assert_same_weights(cached, sdcore.load_model(src, dtype=torch.bfloat16))
    new = _entries(cache)
    assert len(new) == 3 and not set(new) & set(old)                 # the old conversions are gone
    assert len(set(n.split("-")[0] for n in new)) == 3


def test_a_killed_writers_file_is_removed(tmp_path):
    src, cache = _checkpoint(tmp_path / "model.safetensors"), str(tmp_path / "cache")
    sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    entry = _unet_entry(cache)
    with open(f"{entry}.4242.tmp", "wb") as f:          # what a worker killed mid-write leaves
        f.write(b"\0" * 4096)
    sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    assert sorted(os.listdir(cache)) == sorted(_entries(cache) + [n.split("-")[0] + ".lock" for n in _entries(cache)])


def test_fingerprint_of_a_folder_follows_its_files(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"1234")
    fp = weights_cache._fingerprint(str(tmp_path), "UNet", "cfg", torch.bfloat16)
    assert fp["files"][0][:2] == (os.path.join("unet", "w.safetensors"), 4)
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"12345")
    assert weights_cache._fingerprint(str(tmp_path), "UNet", "cfg", torch.bfloat16) != fp
    assert weights_cache._fingerprint(str(tmp_path), "UNet", "cfg", torch.float16) != \
        weights_cache._fingerprint(str(tmp_path), "UNet", "cfg", torch.bfloat16)


def _unet_entry(cache):
    return max((os.path.join(cache, n) for n in _entries(cache)), key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "wrong dtype", "missing key"])
def test_a_damaged_entry_is_written_again(tmp_path, damage):
    src, cache = _checkpoint(tmp_path / "model.safetensors"), str(tmp_path / "cache")
    reference = sdcore.load_model(src, dtype=torch.bfloat16)
    sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    entry = _unet_entry(cache)
    size = os.path.getsize(entry)
    if damage == "truncated":
        os.truncate(entry, size // 2)
    else:
        from safetensors.torch import load_file
        sd = load_file(entry)
        sd = {k: v.float() for k, v in sd.items()} if damage == "wrong dtype" else dict(list(sd.items())[1:])
        save_file(sd, entry)
    _assert_same_weights(sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache), reference)
    assert os.path.getsize(entry) == size


def test_an_unusable_cache_directory_falls_back_to_converting(tmp_path, caplog):
    src = _checkpoint(tmp_path / "model.safetensors")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with caplog.at_level(logging.WARNING, logger="sdcore.weights_cache"):
        model = sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=str(not_a_dir))
    _assert_same_weights(model, sdcore.load_model(src, dtype=torch.bfloat16))
    assert "converting in memory" in caplog.text and not_a_dir.read_text() == "x"


def test_too_little_free_space_writes_nothing(tmp_path, monkeypatch, caplog):
    src, cache = _checkpoint(tmp_path / "model.safetensors"), str(tmp_path / "cache")
    real = weights_cache.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(weights_cache.shutil, "disk_usage", lambda p: real._replace(free=2**29))      # 0.5 GiB
    with caplog.at_level(logging.WARNING, logger="sdcore.weights_cache"):
        model = sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    _assert_same_weights(model, sdcore.load_model(src, dtype=torch.bfloat16))
    assert _entries(cache) == [] and "GiB free on its disk" in caplog.text


def test_a_write_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    """E.g. the disk filling up while writing: no partial entry, no temporary file, a correct load."""
    src, cache = _checkpoint(tmp_path / "model.safetensors"), str(tmp_path / "cache")
    reference = sdcore.load_model(src, dtype=torch.bfloat16)
    real_cast, calls = build.cast, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_cast(*args)
    monkeypatch.setattr(build, "cast", failing_once)
    model = sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    _assert_same_weights(model, reference)
    leftovers = [n for n in os.listdir(cache) if not n.endswith(".lock")]
    assert len(leftovers) == 2 and all(n.endswith(".safetensors") for n in leftovers)   # the VAE and text encoder


def test_processes_starting_together_convert_once(tmp_path):
    """Workers booting at the same time: the first converts (slowly here), the others wait for its
    file and map it; every process ends up with the same weights."""
    src, cache = _checkpoint(tmp_path / "model.safetensors"), str(tmp_path / "cache")
    code = textwrap.dedent(f"""
        import time, torch, sdcore
        from sdcore import weights_cache
        real, writes = weights_cache._write, []
        def slow_write(*a):
            writes.append(a[0]); time.sleep(0.5); return real(*a)
        weights_cache._write = slow_write
        m = sdcore.load_model({src!r}, dtype=torch.bfloat16, cache_dir={cache!r})
        print(len(writes), float(sum(p.float().sum() for p in m.unet.parameters())))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(o[0]) for o in outs) == 3                         # three networks, each converted once
    assert len({o[1] for o in outs}) == 1 and len(_entries(cache)) == 3


def test_entries_of_a_deleted_source_are_removed_unless_locked(tmp_path):
    cache = str(tmp_path / "cache")
    kept, gone, locked = (os.path.realpath(_checkpoint(tmp_path / f"{name}.safetensors", seed=seed))   # as recorded
                          for seed, name in enumerate(("kept", "gone", "locked")))
    for src in (kept, gone, locked):
        sdcore.load_model(src, dtype=torch.bfloat16, cache_dir=cache)
    assert len(_entries(cache)) == 9
    before = set(_entries(cache))
    locked_entries = {n for n in before if _source_of(cache, n) == locked}
    os.remove(gone)
    os.remove(locked)
    held = [open(os.path.join(cache, n.split("-")[0] + ".lock"), "a") for n in locked_entries]
    for f in held:                              # another process converting or replacing that source
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    sdcore.load_model(kept, dtype=torch.bfloat16, cache_dir=cache)
    assert {_source_of(cache, n) for n in _entries(cache)} == {kept, locked}
    assert len(_entries(cache)) == 6
    for f in held:
        f.close()
    sdcore.load_model(kept, dtype=torch.bfloat16, cache_dir=cache)
    assert {_source_of(cache, n) for n in _entries(cache)} == {kept} and len(_entries(cache)) == 3


def _source_of(cache, name):
    from safetensors import safe_open
    with safe_open(os.path.join(cache, name), framework="pt") as f:
        return json.loads(f.metadata()["sdcore.weights_cache"])["source"]
