"""Training step: tokens/s, MFU and peak memory of sftfast's step vs nanochat's eager path.

    python -m sftfast.bench train --json                       # CPU: a small model
    python -m sftfast.bench train --device cuda --json         # GPU: nanochat d12 (12 x 768, vocab 65536, seq 2048)

Configurations, each measured in its own child process (so peak memory is its own):
  sftfast       fused linear cross-entropy (sftfast.loss, impl auto: Triton on CUDA, chunked on
                CPU) + the Rust loader (sftfast.dataloader) + attention within each conversation
  fused_rust    sftfast without per-conversation attention (same attention as the two below)
  eager_rust    full-logit eager cross-entropy (nanochat's loss: (N, V) logits, softcap, fp32
                cast) + the Rust loader + cross-conversation attention (isolates the loss)
  eager_python  nanochat's path: full-logit eager cross-entropy + the Python data path (tiktoken
                encoding, Python rendering and best-fit packing in the training loop)
A step is a full optimizer step (forward, backward, Muon + AdamW) on device_batch_size rows of
seq_len tokens, including fetching the batch. Data: the bundled demo mixture (no downloads),
tokenized with a tokenizer trained on the bundled text; when the Rust extension is missing, every
configuration uses synthetic token batches (uniform random ids, 50% masked) and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from sftfast.cli import at_least

CONFIGS = ["sftfast", "fused_rust", "eager_rust", "eager_python"]
PRESETS = {
    # depth, width, heads, kv heads, vocab, seq, rows per step
    "cpu": dict(depth=4, width=256, heads=4, kv_heads=2, vocab=8192, seq_len=512, batch_size=4),
    "cuda": dict(depth=12, width=768, heads=6, kv_heads=6, vocab=65536, seq_len=2048, batch_size=8),
}


def add_arguments(p):
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    p.add_argument("--steps", type=at_least(1), default=None, help="measured steps (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=at_least(0), default=None, help="unmeasured steps first (default: 2 on CPU, 5 on CUDA)")
    for k, v in PRESETS["cpu"].items():
        p.add_argument("--" + k.replace("_", "-"), type=at_least(1), default=None, help=f"default: {v} (cpu), {PRESETS['cuda'][k]} (cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads in each child (default: torch's)")
    p.add_argument("--synthetic", action="store_true", help="synthetic token batches even when the Rust loader is present")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds per configuration (default: none)")


def _settings(args) -> dict:
    s = dict(PRESETS[args.device])
    for k in s:
        v = getattr(args, k)
        if v is not None:
            s[k] = v
    s["steps"] = args.steps if args.steps is not None else (5 if args.device == "cpu" else 20)
    s["warmup"] = args.warmup if args.warmup is not None else (2 if args.device == "cpu" else 5)
    s.update(device=args.device, compile=args.compile, synthetic=args.synthetic, threads=getattr(args, "threads", None))
    return s


def run(args) -> dict:
    s = _settings(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {CONFIGS}")
    results = {}
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    for name in configs:
        # run as a script, not -m: a machine without the Rust extension cannot import sftfast/__init__
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(dict(s, config=name))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            results[name] = dict(error=f"timed out after {args.child_timeout}s")
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[name] = dict(error=(proc.stderr or proc.stdout)[-2000:])
        else:
            results[name] = json.loads(lines[-1])
    base = results.get("eager_python", {}).get("tokens_per_s")
    for r in results.values():
        if base and "tokens_per_s" in r:
            r["speedup_vs_eager_python"] = r["tokens_per_s"] / base
    return dict(settings=s, configs=results)


# ---------------------------------------------------------------------------------------------
# the child: one configuration

def _import_sftfast():
    """The package, or (Rust extension missing) its pure-Python modules without sftfast/__init__."""
    try:
        import sftfast  # noqa: F401

        return True
    except ImportError:
        import types

        for name in [m for m in sys.modules if m == "sftfast" or m.startswith("sftfast.")]:
            del sys.modules[name]
        pkg = types.ModuleType("sftfast")
        pkg.__path__ = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        sys.modules["sftfast"] = pkg
        return False


def _batches(s, loader_impl, vocab, device):
    """An iterator of train_data.Batch from the demo mixture, or synthetic ones; and a description."""
    import torch

    from sftfast import train_data

    if s["synthetic"] or loader_impl is None:
        g = torch.Generator().manual_seed(0)

        def synth():
            while True:
                x = torch.randint(0, vocab, (s["batch_size"], s["seq_len"] + 1), generator=g)
                y = x[:, 1:].clone()
                y[torch.rand(y.shape, generator=g) < 0.5] = -1
                # conversations of 256 tokens, so per-conversation attention has boundaries to respect
                docs = (torch.arange(s["seq_len"], dtype=torch.int32) // 256).expand(s["batch_size"], -1).contiguous()
                yield train_data.Batch(x[:, :-1].contiguous(), y, docs, 0.0)

        return synth(), "synthetic token batches (uniform ids, 50% masked, 256-token conversations)"
    from sftfast import tasks
    from sftfast.tokenizer import Tokenizer, bundled_text_path

    with open(bundled_text_path(), encoding="utf-8") as f:
        tok = Tokenizer.train(f.read().split("\n"), min(vocab, 4096))
    # the demo mixture, oversampled so no epoch ends during the measurement
    mix = tasks.build_mixture("SimpleSpelling:size=2000,SpellingBee:size=2000,Arithmetic:size=4000,identity*4")
    loader = train_data.make_loader(mix, tok, s["batch_size"], s["seq_len"], 0, 1, "bestfit", loader_impl, device)

    def real():
        while True:
            yield loader.next()

    return real(), f"demo mixture ({len(mix)} conversations), {loader_impl} loader, tokenizer of {tok.n_vocab} tokens"


def _child(s) -> dict:
    have_core = _import_sftfast()
    import torch
    import torch.nn.functional as F

    from sftfast import train
    from sftfast.model import GPT, GPTConfig
    from sftfast.optim import build_optimizers

    name = s["config"]
    if s.get("threads"):
        torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    cfg = GPTConfig(sequence_len=s["seq_len"], vocab_size=s["vocab"], n_layer=s["depth"], n_head=s["heads"],
                    n_kv_head=s["kv_heads"], n_embd=s["width"])
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.init_weights(seed=0)
    optimizers = build_optimizers(model, init_lr_frac=0.02)
    fwd = torch.compile(model, dynamic=False) if s["compile"] else model
    loader_impl = {"sftfast": "rust", "fused_rust": "rust", "eager_rust": "rust", "eager_python": "python"}[name] if have_core else None
    batches, data_note = _batches(s, loader_impl, cfg.vocab_size, device)
    doc_mask = name == "sftfast"
    fused = name in ("sftfast", "fused_rust")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        b = next(batches)
        x, y = b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True)
        d = b.doc_ids.to(device, non_blocking=True) if doc_mask else None
        with autocast:
            if fused:
                loss = fwd(x, y, doc_ids=d)
            else:  # nanochat: full (B, T, V) logits, softcap, fp32 cast, then cross-entropy
                logits = fwd(x, doc_ids=d)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return x.numel(), int((y >= 0).sum())

    for _ in range(s["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n_tok = n_sup = 0
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        a, b = step()
        n_tok += a
        n_sup += b
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = dict(config=name, data=data_note, tokens_per_s=n_tok / dt, supervised_tokens_per_s=n_sup / dt,
               step_ms=1000 * dt / s["steps"], params=model.num_params(), attention="per-conversation" if doc_mask else "causal across the row",
               loss="fused (sftfast.loss)" if fused else "eager full-logit")
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = train.gpu_peak_flops(device)
        if peak:
            out["mfu"] = model.estimate_flops(s["seq_len"]) * out["tokens_per_s"] / peak
            out["gpu_peak_flops"] = peak
    else:
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


if __name__ == "__main__":
    import argparse

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # .../python, not bench/

    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    a = p.parse_args()
    print(json.dumps(_child(json.loads(a.child))), flush=True)
