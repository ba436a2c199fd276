"""GPU check of the fused linear cross-entropy: CUDA correctness tests, then the GPU benchmark.

    PYTHONPATH=python python3 scripts/gpu_loss_check.py [--out results.json] [--quick]

Meant for one short session on an H100/H200 with torch + triton and the repository copied (not
installed). Liger Kernel and Cut Cross-Entropy are optional: install their wheels first if you
have them (pip install --no-deps liger_kernel-*.whl cut_cross_entropy-*.whl); missing peers are
reported as unavailable. Never raises: every stage's failure is caught and reported in the JSON,
and the exit status is 1 if the tests failed or the benchmark could not run. Budget, seen on
an H200: ~1.5 min of CUDA tests, ~1.5 min of benchmark (torch.compile of the eager loss
dominates; --quick drops it, ~0.7 min left), ~0.5 min for a second pass with half the targets
ignored (--masked-frac 0 drops it). A --quick run took 189 s of wall time in all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import traceback
import types
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_sftfast():
    """Import sftfast; if its compiled extension is missing here, use the package without __init__.

    The loss needs only Python + Triton, but sftfast/__init__ imports the Rust tokenizer, which
    is not built on a machine that only received the source tree.
    """
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import sftfast  # noqa: F401

        return "package"
    except ImportError as e:
        for name in [m for m in sys.modules if m == "sftfast" or m.startswith("sftfast.")]:
            del sys.modules[name]
        pkg = types.ModuleType("sftfast")
        pkg.__path__ = [str(ROOT / "python" / "sftfast")]
        sys.modules["sftfast"] = pkg
        return f"namespace (sftfast/__init__ failed: {e})"


def run_tests(extra_args):
    import pytest

    buf = io.StringIO()
    t0 = time.time()
    args = ["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_loss.py"), "-k", "cuda", *extra_args]
    with redirect_stdout(buf):
        rc = pytest.main(args)
    text = buf.getvalue()
    print(text[-4000:])
    return {"pytest_exit_code": int(rc), "seconds": round(time.time() - t0, 1),
            "summary": text.strip().splitlines()[-1] if text.strip() else ""}


def run_bench(quick, configs, shapes, ignore_frac=0.0):
    from sftfast.bench import loss as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--device", "cuda", "--ignore-frac", str(ignore_frac)]
    if quick:
        argv += ["--impls", "eager", "torch_lce", "liger", "cce", "triton"]
    if shapes:
        argv += ["--shapes", *shapes]
    for c in configs:
        argv += ["--triton-config", c]
    args = parser.parse_args(argv)
    t0 = time.time()
    res = bench.run(args)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def table(bench_res):
    lines = []
    for s in bench_res.get("shapes", []):
        lines.append(f"N={s['N']} D={s['D']} V={s['V']} softcap={s['softcap']} {s['dtype']} "
                     f"ignored={s['ignore_frac']} on {s.get('gpu')}")
        for r in s["results"]:
            if r.get("available"):
                lines.append(
                    f"  {r['impl']:<60} {r['time_s'] * 1e3:8.2f} ms  {r['peak_mem_above_inputs_mb']:9.1f} MB  "
                    f"{r['effective_tflops']:6.1f} TFLOP/s  fwd {r['forward_only_s'] * 1e3:7.2f} ms  loss {r['loss']:.5f}"
                )
            else:
                lines.append(f"  {r['impl']:<60} unavailable: {r.get('reason', '')[:150]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the full JSON here (default $OUT/gpu_loss_check.json if $OUT is set)")
    ap.add_argument("--quick", action="store_true", help="skip torch.compile in the benchmark")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=None, help="override benchmark shapes N,D,V[,softcap]")
    ap.add_argument("--triton-config", action="append", default=[], help="extra Triton configs to time")
    ap.add_argument("--masked-frac", type=float, default=0.5,
                    help="second benchmark pass with this fraction of targets ignored (0 skips it)")
    ap.add_argument("--pytest-arg", action="append", default=[], help="extra pytest argument")
    args = ap.parse_args()

    report = {"import": _import_sftfast()}
    try:
        import torch
        import triton

        report["env"] = {"torch": torch.__version__, "triton": triton.__version__,
                         "cuda": torch.cuda.is_available(),
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
        for peer in ("liger_kernel", "cut_cross_entropy"):
            try:
                mod = __import__(peer)
                report["env"][peer] = getattr(mod, "__version__", "importable")
            except Exception as e:
                report["env"][peer] = f"unavailable: {type(e).__name__}: {e}"
    except Exception:
        report["env_error"] = traceback.format_exc()
    print(json.dumps(report, indent=1), flush=True)

    ok = True
    if not args.skip_tests:
        try:
            report["tests"] = run_tests(args.pytest_arg)
            ok &= report["tests"]["pytest_exit_code"] == 0
        except Exception:
            report["tests"] = {"error": traceback.format_exc()}
            ok = False
        print(json.dumps(report["tests"]), flush=True)
    if not args.skip_bench:
        try:
            report["bench"] = run_bench(args.quick, args.triton_config, args.shapes)
            ok &= "error" not in report["bench"]
            print(table(report["bench"]), flush=True)
        except Exception:
            report["bench"] = {"error": traceback.format_exc()}
            print(report["bench"]["error"], flush=True)
            ok = False
    if not args.skip_bench and args.masked_frac > 0:
        # SFT masks prompts: half the targets ignored is typical. Peers without torch.compile.
        try:
            report["bench_masked"] = run_bench(True, [], args.shapes, args.masked_frac)
            print(table(report["bench_masked"]), flush=True)
        except Exception:
            report["bench_masked"] = {"error": traceback.format_exc()}
            print(report["bench_masked"]["error"], flush=True)
            ok = False

    out = args.out or (os.path.join(os.environ["OUT"], "gpu_loss_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    print("GPU LOSS CHECK:", "OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
