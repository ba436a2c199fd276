"""Peak memory of the Triton loss's backward buffers, counted on CPU without a GPU.

    PYTHONPATH=python python scripts/loss_memory_accounting.py [--module FILE] [N D V ...]

Runs `lce_backward` from sftfast/kernels/fused_linear_ce.py (or FILE, e.g. an older version from
`git show REV:python/sftfast/kernels/fused_linear_ce.py > /tmp/old.py`) with the Triton kernel
and the GEMMs replaced by plain writes of their outputs, so that what is measured is the
backward's own allocations (dW, dH, its fp32 accumulator, dZ scratch) and not the kernels.
Memory is the process's high-water resident set (getrusage) above the resident set once the
inputs exist; every buffer is written, so every page counts. One shape per process (the
high-water mark never falls), each in a process of its own. cuBLAS workspaces and allocator
rounding on a GPU are not modelled: `scripts/gpu_loss_check.py` measures the real thing.
Shapes default to the issue's three GPU shapes (bf16).
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


def measure(module, n, D, V, dtype=torch.bfloat16) -> float:
    module.dlogits_chunk = lambda h, w, t, lse, scale, v0, out, *a, **k: out.fill_(1e-3)
    module._accumulate_fp32 = lambda acc32, a, b: acc32.add_(1e-3)
    module.torch = GemmsAsWrites()
    h = torch.randn(n, D, dtype=dtype)  # made in dtype: no fp32 temporary raises the high-water mark
    weight = torch.randn(V, D, dtype=dtype)
    targets = torch.randint(0, V, (n,))
    lse, scale = torch.zeros(n), torch.tensor(1.0)
    base, high_before = resident_mib(), max_resident_mib()
    dh, dw = module.lce_backward(h, weight, targets, lse, scale)
    high = max_resident_mib()
    if high <= high_before:
        raise SystemExit("the backward never rose above the earlier high-water mark: nothing measured")
    assert dh.shape == (n, D) and dw.shape == (V, D)
    return high - base


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="a fused_linear_ce.py to measure instead of the package's")
    parser.add_argument("shape", nargs="*", type=int, help="N D V [N D V ...]")
    args = parser.parse_args()
    shapes = args.shape or [8192, 4096, 128256, 8192, 2304, 256000, 16384, 2048, 131072]
    if len(shapes) % 3:
        parser.error("shapes come in threes: N D V")
    if len(shapes) > 3:  # the high-water mark never falls: one process per shape
        for i in range(0, len(shapes), 3):
            extra = ["--module", args.module] if args.module else []
            subprocess.run([sys.executable, __file__, *extra, *map(str, shapes[i:i + 3])], check=True)
        return
    n, D, V = shapes
    peak = measure(load_module(args.module), n, D, V)
    print(f"N={n} D={D} V={V} bf16: backward peak {peak:.0f} MiB above inputs "
          f"(dW {V * D * 2 / 2**20:.0f}, dH {n * D * 2 / 2**20:.0f}, fp32 dH {n * D * 4 / 2**20:.0f})")

if __name__ == "__main__":
    main()
