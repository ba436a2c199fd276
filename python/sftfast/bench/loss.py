"""Fused linear cross-entropy: time and peak memory of forward+backward against eager and peers.

    python -m sftfast.bench loss --json                  # CPU: N=8192 D=256 V=65536 fp32
    python -m sftfast.bench loss --device cuda --json    # GPU: the three bf16 LLM head shapes

CPU: each implementation runs in a fresh subprocess; peak memory is the process's peak RSS
(ru_maxrss) minus its peak right before the timed loop (imports and inputs already there).
GPU: in one process; peak memory is torch.cuda.max_memory_allocated() above what was
allocated before the call (inputs), so it includes the gradients dH and dW themselves.
Time is the median of --repeats forward+backward calls after --warmup (CUDA events on GPU).

FLOP convention: effective TFLOP/s = 8 N D V / time for every implementation (forward logits
2 NDV + recomputed logits 2 NDV + dH 2 NDV + dW 2 NDV, what a fused recompute kernel executes).
Eager and Liger execute only 6 N D V, so the figure is a time ratio, not hardware utilisation.

Peers (each optional; an import failure is reported as unavailable):
- eager:          F.cross_entropy on (h @ W.T).float() (nanochat's loss), softcap in fp32
- compiled:       the same function under torch.compile (GPU only)
- torch_lce:      torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions()
                  (torch's own chunked path; reported absent on torch without it)
- liger:          liger_kernel's LigerFusedLinearCrossEntropyLoss (GPU only)
- cce:            cut_cross_entropy.linear_cross_entropy (GPU only)
- chunked/triton: sftfast.loss.fused_linear_cross_entropy(impl=...)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from sftfast.cli import at_least

CPU_SHAPES = ["8192,256,65536"]
GPU_SHAPES = ["8192,4096,128256", "8192,2304,256000,30", "16384,2048,131072"]
CPU_IMPLS = ["eager", "torch_lce", "chunked"]
GPU_IMPLS = ["eager", "compiled", "torch_lce", "liger", "cce", "triton"]


def add_arguments(parser):
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="*", type=_shape_flag, default=None, help="N,D,V[,softcap] (default per device)")
    parser.add_argument("--impls", nargs="*", default=None, help="subset of implementations to run")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of targets set to -1")
    parser.add_argument("--warmup", type=at_least(0), default=None)
    parser.add_argument("--repeats", type=at_least(1), default=None)
    parser.add_argument("--triton-config", action="append", default=[],
                        help="extra Triton launch config to time, e.g. BLOCK_M=128,BLOCK_V=256,BLOCK_K=64,"
                             "GROUP_M=16,num_warps=8,num_stages=3,CHUNK_MB=64,DH_IN_DW=0 (repeatable)")


def _parse_shape(s):
    parts = s.split(",")
    if len(parts) not in (3, 4):
        raise ValueError(f"shape must be N,D,V[,softcap], got {s!r}")
    N, D, V = (int(p) for p in parts[:3])
    return N, D, V, (float(parts[3]) if len(parts) == 4 else None)


def _shape_flag(s: str) -> str:
    """argparse type for --shapes: checked when read (a bad shape was a traceback mid-run)."""
    import argparse

    try:
        N, D, V, _ = _parse_shape(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (e.g. 8192,4096,128256 or 8192,2304,256000,30)") from None
    if min(N, D, V) < 1:
        raise argparse.ArgumentTypeError(f"N, D and V must be >= 1, got {s!r}")
    return s


def _parse_config(s):
    cfg = {}
    for kv in s.split(","):
        k, v = kv.split("=")
        cfg[k.strip()] = int(v)
    return cfg


def _make_inputs(N, D, V, dtype, device, ignore_frac, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    # std 1/sqrt(D)-ish head so logits have O(1) spread, as in a trained model's head
    w = (torch.randn(V, D, generator=g, dtype=torch.float32) * (2.0 / D**0.5)).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_frac > 0:
        t[torch.rand(N, generator=g) < ignore_frac] = -1
    return h.requires_grad_(), w.requires_grad_(), t.to(device)


def _loss_fn(impl, softcap, device):
    """Returns f(h, w, t) -> scalar loss for one implementation, or raises ImportError."""
    import torch
    import torch.nn.functional as F

    def eager(h, w, t):
        logits = (h @ w.t()).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, t, ignore_index=-1)

    if impl == "eager":
        return eager
    if impl == "compiled":
        return torch.compile(eager)
    if impl == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise ImportError(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        if softcap:
            raise ImportError("torch.nn.functional.linear_cross_entropy has no softcap")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-1, options=opts)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss(ignore_index=-1, softcap=softcap)
        return lambda h, w, t: mod(w, h, t)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=-1, softcap=softcap)
    if impl in ("chunked", "triton"):
        from sftfast.loss import fused_linear_cross_entropy

        return lambda h, w, t: fused_linear_cross_entropy(h, w, t, ignore_index=-1, softcap=softcap, impl=impl)
    raise ValueError(f"unknown impl {impl!r}")


# ----------------------------------------------------------------------------------------------
# CPU: one implementation per fresh process


def _max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_child(impl, shape, dtype_name, ignore_frac, warmup, repeats):
    import torch

    N, D, V, softcap = _parse_shape(shape)
    try:
        fn = _loss_fn(impl, softcap, "cpu")
    except ImportError as e:
        return {"impl": impl, "available": False, "reason": str(e)}
    h, w, t = _make_inputs(N, D, V, getattr(torch, dtype_name), "cpu", ignore_frac)
    base = _max_rss_mb()
    times, loss = [], None
    for i in range(warmup + repeats):
        h.grad = None
        w.grad = None
        t0 = time.perf_counter()
        loss = fn(h, w, t)
        loss.backward()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    peak = _max_rss_mb()
    return {
        "impl": impl, "available": True, "loss": float(loss),
        "time_s": statistics.median(times), "times_s": times,
        "peak_rss_mb": round(peak, 1), "peak_rss_above_inputs_mb": round(peak - base, 1),
        "torch_threads": torch.get_num_threads(),
    }


def _run_cpu(args, shapes, impls, dtype_name):
    warmup = 1 if args.warmup is None else args.warmup
    repeats = 3 if args.repeats is None else args.repeats
    out = []
    for shape in shapes:
        N, D, V, softcap = _parse_shape(shape)
        rows = []
        for impl in impls:
            cmd = [sys.executable, "-m", "sftfast.bench.loss", "--child", impl, shape, dtype_name,
                   str(args.ignore_frac), str(warmup), str(repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                rows.append({"impl": impl, "available": False, "reason": "child failed: " + proc.stderr[-1500:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        _add_ratios(rows, "peak_rss_above_inputs_mb")
        out.append({"N": N, "D": D, "V": V, "softcap": softcap, "dtype": dtype_name, "device": "cpu",
                    "ignore_frac": args.ignore_frac, "results": rows})
    return out


def _add_ratios(rows, mem_key):
    by = {r["impl"]: r for r in rows if r.get("available") and "time_s" in r}
    eager = by.get("eager")
    for r in by.values():
        if eager:
            r["speedup_vs_eager"] = round(eager["time_s"] / r["time_s"], 3)
            if r[mem_key] > 0:
                r["memory_reduction_vs_eager"] = round(eager[mem_key] / r[mem_key], 2)


# ----------------------------------------------------------------------------------------------
# GPU: one process, CUDA events and allocator peaks


def _gpu_measure(fn, h, w, t, warmup, repeats):
    import torch

    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    h.grad = None
    w.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    # forward alone (no graph kept), to split the time between forward and backward
    fwd = []
    with torch.no_grad():
        for _ in range(max(2, repeats // 2)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(h, w, t)
            end.record()
            end.synchronize()
            fwd.append(start.elapsed_time(end) / 1e3)
    return float(loss), times, peak, statistics.median(fwd)


def _run_gpu(args, shapes, impls, dtype_name):
    import torch

    from sftfast.kernels import fused_linear_ce

    warmup = 2 if args.warmup is None else args.warmup
    repeats = 5 if args.repeats is None else args.repeats
    dtype = getattr(torch, dtype_name)
    extra = [_parse_config(c) for c in args.triton_config]
    out = []
    for shape in shapes:
        N, D, V, softcap = _parse_shape(shape)
        h, w, t = _make_inputs(N, D, V, dtype, "cuda", args.ignore_frac)
        flops = 8.0 * N * D * V
        rows = []
        runs = [(impl, None) for impl in impls] + [("triton", cfg) for cfg in extra]
        for impl, cfg in runs:
            name = impl if cfg is None else "triton[" + ",".join(f"{k}={v}" for k, v in cfg.items()) + "]"
            row = {"impl": name}
            orig = fused_linear_ce.kernel_config
            orig_chunk, orig_dh_in_dw = fused_linear_ce.CHUNK_BYTES, fused_linear_ce.DH_IN_DW
            try:
                if cfg is not None:
                    cfg = dict(cfg)
                    # backward memory layout, not launch parameters: the dZ chunk budget, and
                    # whether dH's fp32 accumulator lives in dW's last rows
                    if "CHUNK_MB" in cfg:
                        fused_linear_ce.CHUNK_BYTES = cfg.pop("CHUNK_MB") * 2**20
                    if "DH_IN_DW" in cfg:
                        fused_linear_ce.DH_IN_DW = bool(cfg.pop("DH_IN_DW"))
                    base_cfg = orig(h.device, dtype, D)
                    fused_linear_ce.kernel_config = lambda *a, _c={**base_cfg, **cfg}: dict(_c)
                fn = _loss_fn(impl, softcap, "cuda")
                loss, times, peak, fwd_t = _gpu_measure(fn, h, w, t, warmup, repeats)
                tm = statistics.median(times)
                row.update(available=True, loss=loss, time_s=tm, times_s=times, forward_only_s=fwd_t,
                           peak_mem_above_inputs_mb=round(peak / 2**20, 1),
                           effective_tflops=round(flops / tm / 1e12, 1))
            except ImportError as e:
                row.update(available=False, reason=str(e))
            except Exception as e:  # a peer (or a config) failing must not stop the others
                row.update(available=False, reason=f"{type(e).__name__}: {str(e)[:500]}")
            finally:
                fused_linear_ce.kernel_config = orig
                fused_linear_ce.CHUNK_BYTES, fused_linear_ce.DH_IN_DW = orig_chunk, orig_dh_in_dw
                h.grad = None
                w.grad = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({"shape": shape, **{k: v for k, v in row.items() if k != "times_s"}}), file=sys.stderr)
        _add_ratios(rows, "peak_mem_above_inputs_mb")
        by = {r["impl"]: r for r in rows if r.get("available")}
        for r in by.values():
            for peer in ("liger", "cce", "compiled"):
                if peer in by and r is not by[peer]:
                    r[f"speedup_vs_{peer}"] = round(by[peer]["time_s"] / r["time_s"], 3)
                    if r["peak_mem_above_inputs_mb"] > 0:
                        r[f"memory_vs_{peer}"] = round(r["peak_mem_above_inputs_mb"] / by[peer]["peak_mem_above_inputs_mb"], 3)
        out.append({"N": N, "D": D, "V": V, "softcap": softcap, "dtype": dtype_name, "device": "cuda",
                    "gpu": torch.cuda.get_device_name(0), "ignore_frac": args.ignore_frac,
                    "flop_convention": "8*N*D*V", "results": rows})
        del h, w, t
        torch.cuda.empty_cache()
    return out


def run(args) -> dict:
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        return {"error": "--device cuda asked for but torch.cuda.is_available() is False"}
    if device != "cuda" and args.triton_config:
        return {"error": "--triton-config tunes the CUDA kernels: it needs --device cuda"}
    shapes = args.shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    impls = args.impls or (GPU_IMPLS if device == "cuda" else CPU_IMPLS)
    unknown = sorted(set(impls) - set(GPU_IMPLS) - set(CPU_IMPLS))
    if unknown:  # e.g. "eager,chunked": --impls takes names separated by spaces
        return {"error": f"unknown --impls {unknown}; choose from {sorted(set(GPU_IMPLS) | set(CPU_IMPLS))}"}
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    for s in shapes:
        _parse_shape(s)
    import torch.nn.functional as F

    info = {"torch_has_linear_cross_entropy": hasattr(F, "linear_cross_entropy")}
    if device == "cuda":
        return {**info, "shapes": _run_gpu(args, shapes, impls, dtype_name)}
    return {**info, "shapes": _run_cpu(args, shapes, impls, dtype_name)}


if __name__ == "__main__":
    # internal: python -m sftfast.bench.loss --child IMPL SHAPE DTYPE IGNORE_FRAC WARMUP REPEATS
    if len(sys.argv) == 8 and sys.argv[1] == "--child":
        impl, shape, dtype_name, frac, warmup, repeats = sys.argv[2:]
        print(json.dumps(_cpu_child(impl, shape, dtype_name, float(frac), int(warmup), int(repeats))))
    else:
        sys.exit("usage: python -m sftfast.bench loss [--json] [options]")
