"""Where a UNet step's time goes, ours vs diffusers on the same weights: the torch profiler's op table.

    python -m bench.profile [--model sdxl] [--size 256] [--dtype bfloat16] [--threads 1] [--rows 12] [--compile]
"""
import argparse

import torch

from bench.util import cfg_step_inputs, sd15_checkpoint, sdxl_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("sd15", "sdxl"), default="sd15", help="the shapes (bench --model)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="ours under torch.compile (inductor, frozen weights)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    from torch.profiler import profile

    import sdcore
    from bench.peers import reference_modules
    diffusers.utils.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    model = sdcore.load_model(str(sdxl_checkpoint()[0] if args.model == "sdxl" else sd15_checkpoint()), dtype=dtype)
    du = reference_modules(model)[0].to(dtype)
    x, x_pair, t, ctx, kw, peer_kw = cfg_step_inputs(args.size, dtype, cfg=model.unet.cfg)
    unet = model.compile().unet if args.compile else model.unet
    with torch.inference_mode():
        for name, fn in (("ours" + (", compiled" if args.compile else ""), lambda: unet(x, t, ctx, **kw)),
                         ("diffusers", lambda: du(x_pair, t, encoder_hidden_states=ctx, **peer_kw).sample)):
            fn()                                            # warm-up
            with profile() as prof:
                fn()
            print(f"===== {name}: UNet step, batch 2 (CFG), {args.size}², {args.dtype}, {torch.get_num_threads()} threads")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
