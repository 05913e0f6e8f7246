"""k-diffusion 0.1.1.post1 as a test reference, without its package __init__.

`import k_diffusion` runs k_diffusion/__init__.py, which imports every submodule and with them
packages the project does not depend on (clean-fid, kornia, wandb, jsonmerge, ...). The two
modules the tests need are light: `sampling` (scipy, torchdiffeq, torchsde, tqdm) and `external`
(torch only); both do `from . import utils` but only use `utils.append_dims`. So:

- a stub parent package `k_diffusion` (a bare module whose __path__ is the installed package
  directory, so that the real submodules are found there) is put into sys.modules;
- `k_diffusion.utils` is a stub holding a copy of `append_dims` (the real utils imports PIL,
  safetensors and torchvision at module level; a copy keeps the import fast and independent of
  them);
- then `k_diffusion.sampling` and `k_diffusion.external` are imported normally.

Install: pip install --no-deps k-diffusion==0.1.1.post1 scipy torchdiffeq torchsde tqdm
"""
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

VERSION = "0.1.1.post1"


def _append_dims(x, target_dims):
    # Verbatim behaviour of k_diffusion.utils.append_dims.
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f'input has {x.ndim} dims but target_dims is {target_dims}, which is less')
    return x[(...,) + (None,) * dims_to_append]


def _load():
    try:
        version = importlib.metadata.version("k-diffusion")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the sampler tests need k-diffusion=={VERSION}: "
                          f"pip install --no-deps k-diffusion=={VERSION} scipy torchdiffeq torchsde tqdm")
    if version != VERSION:
        raise ImportError(f"the sampler tests are pinned to k-diffusion=={VERSION}, found {version}")
    pkg = sys.modules.get("k_diffusion")
    if pkg is None or not hasattr(pkg, "sampling"):
        spec = importlib.util.find_spec("k_diffusion")  # locates the package without running it
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = [os.path.dirname(spec.origin)]
        pkg.__package__ = "k_diffusion"
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = _append_dims
        pkg.utils = utils
        sys.modules["k_diffusion"] = pkg
        sys.modules["k_diffusion.utils"] = utils
        pkg.sampling = importlib.import_module("k_diffusion.sampling")
        pkg.external = importlib.import_module("k_diffusion.external")
    return pkg.sampling, pkg.external


sampling, external = _load()
