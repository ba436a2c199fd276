"""GPU check of the training step: nanochat d12 (12 x 768, vocab 65536, seq 2048) on one CUDA GPU.

    PYTHONPATH=python python3 scripts/gpu_train_check.py [--out results.json] [--budget 170]

Runs `python -m sftfast.bench train --device cuda` configuration by configuration (each in its
own process, so each has its own peak memory): sftfast's step (fused Triton loss, Rust loader,
per-conversation FlexAttention), the same without per-conversation attention, nanochat's eager
full-logit cross-entropy with the Rust loader, and with the Python data path. Prints one JSON
object (tokens/s, MFU, peak memory per configuration, speedups vs the eager Python path).

Without the compiled Rust extension (a machine that only received the source tree) every
configuration trains on synthetic token batches and the JSON says so ("data" field and
"rust_extension": false). Never raises: a configuration that fails or overruns its share of the
budget is reported with its error. Budget: ~170 s in all on an H100 (the FlexAttention
configuration compiles its kernel first, ~30-60 s; it runs last).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_bench():
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import sftfast  # noqa: F401

        have_core = True
    except ImportError:
        for name in [m for m in sys.modules if m == "sftfast" or m.startswith("sftfast.")]:
            del sys.modules[name]
        pkg = types.ModuleType("sftfast")
        pkg.__path__ = [str(ROOT / "python" / "sftfast")]
        sys.modules["sftfast"] = pkg
        have_core = False
    from sftfast.bench import train as bench_train

    return bench_train, have_core


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--budget", type=float, default=170.0, help="seconds for the whole check")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="rows of 2048 tokens per step (eager CE holds 8 x 2048 x 65536 fp32 logits)")
    a = p.parse_args(argv)
    t0 = time.time()
    out = dict(check="gpu_train", ok=False)
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.cuda.is_available()
        if not torch.cuda.is_available():
            out["error"] = "CUDA is not available"
            print(json.dumps(out, indent=2))
            return 1
        out["gpu"] = torch.cuda.get_device_name(0)
        bench_train, have_core = _import_bench()
        out["rust_extension"] = have_core
        # cheapest first, FlexAttention (compiles) last; each gets a share of what is left
        order = ["fused_rust", "eager_rust", "eager_python", "sftfast"]
        configs = {}
        for i, name in enumerate(order):
            left = a.budget - (time.time() - t0)
            if left < 20:
                configs[name] = dict(error="skipped: the check's time budget is spent")
                continue
            share = left if name == "sftfast" else min(left / (len(order) - i) * 1.5, left - 20)
            ns = argparse.Namespace(device="cuda", configs=name, steps=a.steps, warmup=a.warmup, depth=None, width=None,
                                    heads=None, kv_heads=None, vocab=None, seq_len=None, batch_size=a.batch_size,
                                    compile=False, synthetic=not have_core, child_timeout=share, threads=None)
            res = bench_train.run(ns)
            out["settings"] = res["settings"]
            configs[name] = res["configs"][name]
        base = configs.get("eager_python", {}).get("tokens_per_s")
        for r in configs.values():
            if base and "tokens_per_s" in r:
                r["speedup_vs_eager_python"] = r["tokens_per_s"] / base
        out["configs"] = configs
        out["ok"] = all("error" not in r for r in configs.values())
    except Exception as e:  # report, never raise
        import traceback

        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-3000:]
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
