"""Replay the UNet (and a ControlNet) as one CUDA graph per input shape: by default on CUDA
(``StableDiffusion.use_cuda_graphs``, eager kernels) and under ``StableDiffusion.compile`` (inductor's).

A 512² CFG step of the SD1.5 UNet is ~1000 kernel launches of a few microseconds of work each; on an
H200 the launches, not the arithmetic, set its time, and replaying them from a graph removes most of it,
eager or compiled (docs/BENCHMARKS.md has the figures). torch.compile's
own CUDA graphs (mode="reduce-overhead") keep their state per thread, and the server generates on
whichever request thread took the request; a graph captured here replays from any thread.

Each new input signature (shapes, dtypes, with or without ControlNet residuals) is captured once: two
warm-up calls on a side stream (compilation for that shape, cuBLAS/cuDNN workspaces), then the capture.
Inputs are copied into the graph's static buffers and the output is copied out, so a caller may keep
results across calls. Calls outside ``torch.inference_mode`` or on CPU tensors run the network as it is.
Replays must not overlap: ``generate`` runs one request at a time per process (api.runtime's queue).
At most MAX_GRAPHS signatures are kept (the least recently used is dropped, and captured again if it
returns), so a client cycling through image sizes cannot grow the process without bound.
"""
import logging
import threading
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)
MAX_GRAPHS = 32


def unwrapped(net):
    """The network itself, whether or not it is replayed as CUDA graphs or runs as torch.compile'd code."""
    net = net.module if isinstance(net, CUDAGraphed) else net
    return getattr(net, "_orig_mod", net)


def _flatten(args, named):
    """(the tensors of a call, in order, and its layout: what _rebuild needs to call again with other tensors of
    the same shapes). Positional arguments are tensors; a named one is a tensor, a list of tensors (ControlNet
    residuals) or a constant that is part of the signature (None, SD3's skipped layers)."""
    tensors, layout = list(args), [len(args)]
    for name in sorted(named):
        value = named[name]
        if torch.is_tensor(value):
            tensors.append(value)
            layout.append((name, "tensor"))
        elif isinstance(value, list) and all(torch.is_tensor(v) for v in value):
            tensors.extend(value)
            layout.append((name, "list", len(value)))
        else:
            layout.append((name, "constant", tuple(value) if isinstance(value, list) else value))
    return tensors, tuple(layout)


def _rebuild(tensors, layout):
    """(args, named) from _flatten's tensors and layout."""
    n_args, *rest = layout
    args, at, named = tensors[:n_args], n_args, {}
    for name, kind, *extra in rest:
        if kind == "tensor":
            named[name], at = tensors[at], at + 1
        elif kind == "list":
            named[name], at = list(tensors[at:at + extra[0]]), at + extra[0]
        else:
            named[name] = extra[0]
    return args, named


class CUDAGraphed:
    def __init__(self, fn, module: torch.nn.Module):
        """``fn(*tensors, **named)``: the network to capture (``module`` or ``torch.compile(module)``):
        the UNet ``(x, t, ctx, control=residuals)``, SDXL's and the transformers' ``(x, t, context=, y=, ...)`` or
        the ControlNet ``(x, t, ctx, guided_hint)``, returning a tensor or a list of them; ``module``: the plain
        one, whose attributes (``cfg``, ...) this wrapper exposes."""
        self.fn, self.module = fn, module
        self.graphs = OrderedDict()     # input signature -> (static inputs, static output, graph) or None
        self.pool = None                # one memory pool shared by all graphs (they never run at once)
        self.lock = threading.Lock()

    def __getattr__(self, name):        # only reached for names this wrapper does not have
        return getattr(self.__dict__["module"], name)

    def __call__(self, *args, **named):
        if not self._replayable(args[0]):
            return self.fn(*args, **named)
        inputs, layout = _flatten(args, named)
        key = (layout, args[0].device) + tuple((tuple(v.shape), v.dtype) for v in inputs)
        with self.lock:
            if key in self.graphs:
                self.graphs.move_to_end(key)
            else:
                self.graphs[key] = self._capture(inputs, layout)
                if len(self.graphs) > MAX_GRAPHS:
                    self.graphs.popitem(last=False)
            if self.graphs[key] is None:
                return self.fn(*args, **named)
            static_inputs, out, graph = self.graphs[key]
            for static, value in zip(static_inputs, inputs):
                static.copy_(value)
            graph.replay()
            return out.clone() if isinstance(out, torch.Tensor) else [o.clone() for o in out]

    @staticmethod
    def _replayable(x) -> bool:
        return x.is_cuda and torch.is_inference_mode_enabled()

    def _capture(self, inputs, layout):
        """(static inputs, static output, graph), or None where this network cannot be captured (it
        then runs uncaptured for this signature, with a warning)."""
        try:
            return self._try_capture(inputs, layout)
        except Exception as e:          # e.g. a host sync inside the network: capture is an optimisation
            log.warning("CUDA graph capture failed for shapes %s; running without a graph: %s",
                        [tuple(a.shape) for a in inputs], e)
            return None

    def _try_capture(self, inputs, layout):
        static = [a.clone() for a in inputs]

        def run():
            args, named = _rebuild(static, layout)
            return self.fn(*args, **named)

        out, graph = self._record(run, inputs[0].device)
        return static, out, graph

    def _record(self, run, device):
        """(the output of ``run()`` captured as a CUDA graph, that graph): two warm-up runs on a side
        stream, then the capture into the shared pool."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = run()
        self.pool = graph.pool()
        return out, graph
