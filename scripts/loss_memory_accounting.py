"""Peak memory of the Triton loss's forward + backward buffers, counted on CPU without a GPU.

    PYTHONPATH=python python scripts/loss_memory_accounting.py [--module FILE] [--ignored F] [N D V ...]

Runs `FusedLinearCrossEntropy` (forward, then backward into leaf tensors' .grad) from
sftfast/kernels/fused_linear_ce.py, or from FILE (e.g. an older version:
`git show REV:python/sftfast/kernels/fused_linear_ce.py > /tmp/old.py`), with the Triton kernels
and the GEMMs replaced by plain writes of their outputs. What is measured is then the
function's own allocations: the compacted rows, dW, dH and its fp32 accumulator, the dZ
scratch, the expansion of dH to all N rows when targets are ignored. Memory is the process's
high-water resident set (getrusage) above the resident set once the inputs exist; every buffer
is written, so every page counts; one shape per process. cuBLAS workspaces and the GPU
allocator's rounding are not modelled: `scripts/gpu_loss_check.py` measures the real thing.
Shapes default to the issue's three GPU shapes (bf16); --ignored sets the fraction of targets
that are ignore_index.
"""

import argparse
import importlib.util
import resource
import subprocess
import sys

import torch


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def max_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_module(path):
    if path is None:
        from sftfast.kernels import fused_linear_ce

        return fused_linear_ce
    spec = importlib.util.spec_from_file_location("fused_linear_ce_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GemmsAsWrites:
    """Stands in for `torch` inside the module: torch.mm only writes its output."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def mm(a, b, out):
        return out.fill_(1.0)


def measure(module, N, D, V, ignored=0.0, dtype=torch.bfloat16) -> float:
    """MiB above the inputs at the peak of loss forward + backward (gradients included)."""
    module.lse_forward = lambda h, w, t, softcap=None, config=None: (
        torch.zeros(h.shape[0], dtype=torch.float32), torch.zeros(h.shape[0], dtype=torch.float32))
    module.dlogits_chunk = lambda h, w, t, lse, scale, v0, out, *a, **k: out.fill_(1e-3)
    module._accumulate_fp32 = lambda acc32, a, b: acc32.add_(1e-3)
    module.torch = GemmsAsWrites()
    hidden = torch.randn(N, D, dtype=dtype).requires_grad_()  # made in dtype: no fp32 temporary
    weight = torch.randn(V, D, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignored] = -1
    base, high_before = resident_mib(), max_resident_mib()
    module.FusedLinearCrossEntropy.apply(hidden, weight, targets, -1, None, "mean").backward()
    high = max_resident_mib()
    if high <= high_before:
        raise SystemExit("the loss never rose above the earlier high-water mark: nothing measured")
    assert hidden.grad.shape == (N, D) and weight.grad.shape == (V, D)
    return high - base


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="a fused_linear_ce.py to measure instead of the package's")
    parser.add_argument("--ignored", type=float, default=0.0, help="fraction of targets ignored")
    parser.add_argument("shape", nargs="*", type=int, help="N D V [N D V ...]")
    args = parser.parse_args()
    shapes = args.shape or [8192, 4096, 128256, 8192, 2304, 256000, 16384, 2048, 131072]
    if len(shapes) % 3:
        parser.error("shapes come in threes: N D V")
    if len(shapes) > 3:  # the high-water mark never falls: one process per shape
        for i in range(0, len(shapes), 3):
            extra = (["--module", args.module] if args.module else []) + ["--ignored", str(args.ignored)]
            subprocess.run([sys.executable, __file__, *extra, *map(str, shapes[i:i + 3])], check=True)
        return
    N, D, V = shapes
    peak = measure(load_module(args.module), N, D, V, args.ignored)
    print(f"N={N} D={D} V={V} bf16, {args.ignored:.0%} ignored: loss forward+backward peak {peak:.0f} MiB above "
          f"inputs (gradients dW {V * D * 2 / 2**20:.0f} + dH {N * D * 2 / 2**20:.0f} MiB included)")


if __name__ == "__main__":
    main()
