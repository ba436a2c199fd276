"""Tokenize-only preprocessing: render an SFT mixture once into memory-mapped shards.

    python -m sftfast.prep INPUT... --tokenizer PATH --out DIR [--max-tokens 2049]
                           [--on-error fail|skip] [--num-threads N] [--force]
    python -m sftfast.prep --mixture seed --tokenizer ~/.cache/nanochat/tokenizer --out shards/seed
    python -m sftfast.prep --inspect DIR [--index i]

INPUT is any of
  - a JSONL file (one conversation per line: `{"messages": [...]}` or a bare list of
    messages), a JSON file (an array of conversations, or one), a parquet file (rows with
    a `messages` column), or a directory of such files (recursively, sorted by path);
  - `hf:NAME[:CONFIG][@SPLIT]`, a Hugging Face dataset through `datasets` (split defaults
    to train and takes `datasets` slicing), e.g. `hf:HuggingFaceTB/smol-smoltalk@test[:1000]`;
  - `mixture:NAME[@train|@val]`, a mixture of sftfast.tasks (`seed` is the seed
    recipe's default mixture: ARC-Easy, ARC-Challenge, GSM8K, SmolTalk 10K, identity,
    SimpleSpelling, SpellingBee; `@val` its validation part); `--mixture NAME [--mixture-split val]` is the same.

--tokenizer takes a saved sftfast tokenizer file, a nanochat tokenizer directory, or a
`.tiktoken` rank file (with `--pattern nanochat|cl100k|o200k|REGEX`).

The output directory (layout in sftfast/shards.py) is built under a temporary name and
renamed into place, so an interrupted run never leaves a shard that looks whole. Its
manifest holds a key over (inputs' contents, tokenizer, renderer, max_tokens):
a second run with the same key reuses the shard (and says so); any change rebuilds it.
--on-error is not part of the key (a shard without bad records is the same under both); a
fail-mode run over a shard built with skipped records stops at the first of them.

Bad records: `--on-error fail` (default) stops at the first one with `file:line: reason`;
`--on-error skip` goes on and lists every one, `location: reason`, in DIR/bad_records.txt.
A mixture record its task cannot produce (a malformed dataset row: a TaskError) is a bad
record like one that fails to render: `mixture:NAME@SPLIT[i]: TASK SPLIT index j: reason`.

Exit status: 0 shard written or reused, no bad records; 3 shard written or reused but
records were skipped; 1 a bad record (fail mode) or any other error, no shard written;
2 command-line usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sftfast import _core
from sftfast.cli import at_least
from sftfast.shards import MANIFEST_FILE, REPORT_FILE, ShardDataset, is_shard
from sftfast import tokenizer as tokenizer_io
from sftfast.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERNS, Tokenizer, split_pattern

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3

PATTERNS = SPLIT_PATTERNS  # --pattern names
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
PY_BATCH = 1024  # records per call into Rust for Python-side sources (datasets, mixtures)


class PrepError(Exception):
    """A usage or input problem that stops preprocessing before any shard is written."""


# --------------------------------------------------------------------------------------
# Tokenizer and fingerprints


def load_tokenizer(path, pattern: str | None = None) -> Tokenizer:
    """sftfast.tokenizer.load_tokenizer, with its errors as PrepError (one line, exit 1)."""
    try:
        return tokenizer_io.load_tokenizer(path, pattern)
    except (OSError, ValueError) as e:
        raise PrepError(f"--tokenizer {path}: {e}") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's ranks, pattern and special tokens."""
    core = getattr(tokenizer, "_core", tokenizer)
    return "sha256:" + hashlib.sha256(_core.tokenizer_identity(core)).hexdigest()


def renderer_fingerprint(tokenizer) -> str:
    """sha256 over the renderer's version and its output on fixed probe conversations."""
    core = getattr(tokenizer, "_core", tokenizer)
    return "sha256:" + hashlib.sha256(_core.renderer_probe(core)).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _dumps(record) -> str:
    # default=str: dataset rows can carry dates or numpy scalars in extra fields we ignore.
    return json.dumps(record, ensure_ascii=False, default=str)


def _finite(value):
    """value with every NaN / inf float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _record_json(record) -> str:
    """A Python-side record (a dataset row, a task's conversation) as the renderer reads it: its
    messages only. Other columns are never rendered, and one of them holding a NaN float (common
    in hub datasets), which JSON cannot write, must not fail the row as "invalid JSON"."""
    if isinstance(record, dict):
        record = {"messages": record["messages"]} if "messages" in record else {}
    try:
        return json.dumps(record, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # a NaN inside the messages: null, which the renderer names as not a string
        return json.dumps(_finite(record), ensure_ascii=False, default=str)


# --------------------------------------------------------------------------------------
# Sources: each knows its content hash and how to feed itself to the builder


@dataclass
class FailedRecord:
    """A record the source could not produce (a task's TaskError): where, and why."""

    index: int  # position in the source, as feed_json_strings numbers records
    line: str  # "location: reason", as the builder writes a bad record


@dataclass
class Source:
    kind: str  # jsonl | json | parquet | hf | mixture
    name: str  # what error locations and the summary call it
    arg: object = None  # path, (name, config, split) or (mixture, split, data_dir)
    _hash: str | None = field(default=None, repr=False)
    _length: int | None = field(default=None, repr=False)

    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        if self.kind in ("jsonl", "json", "parquet"):
            return _sha256_file(self.arg)
        if self.kind == "hf":
            ds = self._dataset()
            return f"hf-fingerprint:{ds._fingerprint}"
        # A mixture is code + data: hash exactly the records it yields (and the failures).
        h = hashlib.sha256()
        for conv in self._records():
            h.update(("\0failed: " + conv.line if isinstance(conv, FailedRecord) else _dumps(conv)).encode())
            h.update(b"\n")
        return "sha256:" + h.hexdigest()

    def length(self) -> int | None:
        if self.kind == "hf":
            return len(self._dataset())
        if self.kind == "mixture":
            return len(self._mixture())
        return None

    def _dataset(self):
        if self._length is None:
            import datasets

            name, config, split = self.arg
            try:
                self._ds = datasets.load_dataset(name, config, split=split)
            except Exception as e:  # datasets raises many types; all mean "cannot load"
                raise PrepError(f"{self.name}: cannot load dataset: {type(e).__name__}: {e}") from None
            self._length = len(self._ds)
        return self._ds

    def _mixture(self):
        if self._length is None:
            try:
                from sftfast.tasks import build_mixture
            except ImportError as e:
                raise PrepError(f"--mixture needs sftfast.tasks, which is unavailable: {e}") from None
            name, split, data_dir = self.arg
            try:
                self._mix = build_mixture(name, split=split, data_dir=data_dir)
            except Exception as e:  # TaskError, missing datasets, ...
                raise PrepError(f"mixture {name!r}: {type(e).__name__}: {e}") from None
            self._length = len(self._mix)
        return self._mix

    def _records(self):
        if self.kind == "hf":
            yield from self._dataset()
        elif self.kind == "mixture":
            mix = self._mixture()
            for i in range(len(mix)):
                try:
                    conv = mix[i]
                except ValueError as e:  # TaskError: the task cannot make conversation i from its row
                    yield FailedRecord(i, f"{self.name}[{i}]: {e}")
                    continue
                yield conv
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.arg).iter_batches(batch_size=PY_BATCH):
                yield from batch.to_pylist()

    def feed(self, builder, on_progress, on_error: str = "fail") -> list[FailedRecord]:
        """Renders every record into `builder`; calls on_progress(conversations, tokens).

        Returns the records the source itself could not produce (skip mode; fail mode raises
        BadRecordError at the first bad record, whichever stage it failed in). The builder
        never sees those: build() adds them to the shard's report and counts."""
        if self.kind == "jsonl":
            reader = _core.JsonlReader(str(self.arg))
            while (counts := builder.feed_jsonl(reader)) is not None:
                on_progress(counts[1] + counts[3], counts[2])
        elif self.kind == "json":
            counts = builder.feed_json_file(str(self.arg))
            on_progress(counts[1] + counts[3], counts[2])
        else:
            batch, first, failed = [], 0, []  # batch holds records first, first+1, ...

            def flush():
                if batch:
                    counts = builder.feed_json_strings(self.name, first, batch)
                    on_progress(counts[1] + counts[3], counts[2])

            for rec in self._records():
                if isinstance(rec, FailedRecord):
                    # Render what came before it first: in fail mode the first bad record in
                    # source order is the one reported; in skip mode positions stay exact.
                    flush()
                    if on_error == "fail":
                        raise _core.BadRecordError(rec.line)
                    failed.append(rec)
                    on_progress(1, 0)
                    batch, first = [], rec.index + 1
                    continue
                batch.append(_record_json(rec))
                if len(batch) == PY_BATCH:
                    flush()
                    first += len(batch)
                    batch = []
            flush()
            return failed
        return []

    def task_names(self) -> list[str] | None:
        """For a mixture: the task name of each record, in order (for the per-task summary)."""
        if self.kind != "mixture":
            return None
        mix = self._mixture()
        index_map = getattr(mix, "index_map", None)
        if index_map is None:
            return None
        return [getattr(mix.tasks[t], "name", type(mix.tasks[t]).__name__) for t, _ in index_map]

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "hash": self.content_hash()}


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    body = spec[len("hf:"):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise PrepError(f"{spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or "train"


def _inside_shard(file: Path, root: Path) -> bool:
    """Whether `file` belongs to a shard (its manifest, report) or to a build's temporary
    directory below `root`: a directory input that also holds the shards written from it (a
    second run with the same --out under it) must not read them as conversations."""
    for parent in file.relative_to(root).parents:
        d = root / parent
        if d != root and (is_shard(d) or (d.name.startswith(".") and ".tmp-" in d.name)):
            return True
    return False


def resolve_inputs(inputs, mixture=None, mixture_split="train", data_dir=None) -> list[Source]:
    sources = []
    for spec in inputs:
        if spec.startswith("mixture:"):
            name, _, split = spec[len("mixture:"):].partition("@")
            if not name or split not in ("", "train", "val"):
                raise PrepError(f"{spec!r}: expected mixture:NAME[@train|@val]")
            split = split or "train"
            sources.append(Source("mixture", f"mixture:{name}@{split}", (name, split, data_dir)))
            continue
        if spec.startswith("hf:"):
            name, config, split = parse_hf(spec)
            sources.append(Source("hf", spec, (name, config, split)))
            continue
        path = Path(spec)
        if is_shard(path):
            raise PrepError(f"{path}: is an sftfast shard (rendered output), not conversations; "
                            "train on it with --data, or give the files it was built from")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix in INPUT_SUFFIXES and not _inside_shard(p, path))
            if not files:
                raise PrepError(f"{path}: directory holds no {', '.join(INPUT_SUFFIXES)} files")
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise PrepError(f"{path}: unknown input type (expected {', '.join(INPUT_SUFFIXES)}, a directory, or hf:NAME)")
            files = [path]
        else:
            raise PrepError(f"{path}: no such file or directory (Hugging Face datasets are written hf:NAME[:CONFIG][@SPLIT])")
        sources.extend(Source(f.suffix[1:], str(f), f) for f in files)
    if mixture:
        sources.append(Source("mixture", f"mixture:{mixture}@{mixture_split}", (mixture, mixture_split, data_dir)))
    if not sources:
        raise PrepError("no inputs: give files, directories, hf:NAME, or --mixture NAME")
    return sources


def cache_key(tok_fp: str, rend_fp: str, max_tokens: int, sources: list[Source]) -> str:
    """What the shard's contents depend on. --on-error is not part of it: a shard without bad
    records is the same under both modes (see build for the case with bad records)."""
    material = {
        "format_version": _core.SHARD_FORMAT_VERSION,
        "tokenizer": tok_fp,
        "renderer": rend_fp,
        "max_tokens": max_tokens,
        "inputs": [s.describe() for s in sources],
    }
    return "sha256:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _what_changed(old: dict, tok_fp, rend_fp, max_tokens, sources) -> str:
    changes = []
    old_renderer = old.get("renderer") or {}
    if (old.get("tokenizer") or {}).get("fingerprint") != tok_fp:
        changes.append("tokenizer")
        # The renderer probe renders with the tokenizer, so it moves with it: name the
        # renderer too only when its version moved.
        if old_renderer.get("version") != _core.RENDERER_VERSION:
            changes.append("renderer")
    elif old_renderer.get("fingerprint") != rend_fp:
        changes.append("renderer")
    if old.get("max_tokens") != max_tokens:
        changes.append("max_tokens")
    if old.get("inputs") != [s.describe() for s in sources]:
        changes.append("inputs")
    return ", ".join(changes) or "format"


# --------------------------------------------------------------------------------------
# Summary and inspection


def length_histogram(lengths, max_tokens: int, width: int = 40) -> list[str]:
    """Text histogram of conversation lengths in power-of-two bins up to max_tokens."""
    import numpy as np

    if len(lengths) == 0:
        return ["  (no conversations)"]
    edges = [0]
    b = 16
    while b < max_tokens:
        edges.append(b)
        b *= 2
    edges.append(max_tokens)
    edges.append(max_tokens + 1)  # last bin: exactly max_tokens (likely truncated)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    lines = []
    for i, c in enumerate(counts):
        lo, hi = edges[i], edges[i + 1] - 1
        label = f"{lo:>6}-{hi:<6}" if i < len(counts) - 1 else f"{'=' + str(max_tokens):>13}"
        bar = "#" * int(round(width * int(c) / top))
        lines.append(f"  {label} {int(c):>9} {bar}")
    return lines


def task_breakdown(data: ShardDataset, source: dict, task_of: list[str]) -> list[tuple[str, int, int, int]]:
    """(task, conversations, tokens, supervised tokens) for a mixture source, in first-seen
    order. Skipped records are found by their index in the bad-records report."""
    import numpy as np

    skipped = set()
    report = data.path / REPORT_FILE
    if source["skipped"] and report.is_file():
        prefix = source["name"] + "["
        with open(report, encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefix):
                    skipped.add(int(line[len(prefix):line.index("]", len(prefix))]))
    kept = [task_of[i] for i in range(len(task_of)) if i not in skipped]
    first, n = source["first"], source["conversations"]
    if len(kept) != n:
        return []
    off = data.offsets[first:first + n + 1].astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(data.mask[off[0]:off[-1]], dtype=np.int64)])
    sup = csum[off[1:] - off[0]] - csum[off[:-1] - off[0]]
    tokens = np.diff(off)
    rows: dict[str, list[int]] = {}
    for name, t, s in zip(kept, tokens.tolist(), sup.tolist()):
        row = rows.setdefault(name, [0, 0, 0])
        row[0] += 1
        row[1] += t
        row[2] += s
    return [(name, *row) for name, row in rows.items()]


def summarize(data: ShardDataset, elapsed: float | None = None, out=None, breakdowns=None) -> None:
    out = out or sys.stdout
    m = data.manifest
    n, t, sup = m["num_conversations"], m["num_tokens"], m["num_supervised_tokens"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"shard: {data.path}")
    p(f"  conversations {n:,}   tokens {t:,}   supervised {sup:,} ({sup / max(t, 1):.1%})   "
      f"truncated {m['num_truncated']:,} (at max_tokens={m['max_tokens']})   skipped {m['num_skipped']:,}")
    if elapsed:
        p(f"  {elapsed:.2f}s: {n / elapsed:,.0f} conversations/s, {t / elapsed:,.0f} tokens/s")
    p(f"  {'source':<48} {'convs':>9} {'tokens':>12} {'superv.':>8} {'trunc.':>7} {'skipped':>8}")
    for s in m["sources"]:
        frac = s["supervised_tokens"] / max(s["tokens"], 1)
        name = s["name"] if len(s["name"]) <= 48 else "..." + s["name"][-45:]
        p(f"  {name:<48} {s['conversations']:>9,} {s['tokens']:>12,} {frac:>8.1%} {s['truncated']:>7,} {s['skipped']:>8,}")
        for task, convs, tokens, sup in (breakdowns or {}).get(s["name"], []):
            p(f"    {task:<46} {convs:>9,} {tokens:>12,} {sup / max(tokens, 1):>8.1%}")
    p("  length histogram (tokens per conversation):")
    for line in length_histogram(data.lengths(), data.max_tokens):
        p(line)
    if m["num_skipped"]:
        p(f"  {m['num_skipped']:,} bad records skipped; each is listed in {data.path / REPORT_FILE}")


def save_length_plot(data: ShardDataset, path: Path) -> bool:
    """A PNG histogram of lengths, when matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(data.lengths(), bins=64)
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("conversations")
    ax.set_title(f"{data.path.name}: {len(data):,} conversations")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True




def render_inspection(tokenizer, ids, mask, color: bool) -> str:
    """Decoded conversation; trained tokens (mask 1) green, others red, as nanochat's
    visualize_tokenization. Without color, trained spans are wrapped in [[ ]]."""
    specials = {}
    for name in SPECIAL_TOKENS:
        try:
            specials[tokenizer.special_token_id(name)] = name
        except Exception:  # a tokenizer without that special: it just never matches
            pass
    # Decode runs of ordinary tokens with the same mask together so multi-byte characters split
    # across tokens still decode.
    segments = []  # (mask, text)
    run, run_mask = [], None
    def flush():
        if run:
            segments.append((run_mask, tokenizer.decode_bytes(run).decode("utf-8", errors="replace")))
    for tid, m in zip(ids.tolist(), mask.tolist()):
        if tid in specials:
            flush()
            run, run_mask = [], None
            segments.append((m, specials[tid]))
        else:
            if run_mask is not None and m != run_mask:
                flush()
                run = []
            run.append(tid)
            run_mask = m
    flush()
    # Adjacent segments with the same mask print as one span.
    spans = []
    for m, text in segments:
        if spans and spans[-1][0] == m:
            spans[-1][1].append(text)
        else:
            spans.append((m, [text]))
    out = []
    for m, texts in spans:
        text = "".join(texts)
        if color:
            out.append(("\033[92m" if m else "\033[91m") + text + "\033[0m")
        else:
            out.append(f"[[{text}]]" if m else text)
    return "".join(out)


def inspect(args) -> int:
    data = ShardDataset(args.inspect)
    n = len(data)
    if n == 0:
        print(f"{data.path}: the shard is empty")
        return EXIT_OK
    if not -n <= args.index < n:
        raise PrepError(f"--index {args.index}: the shard has {n} conversations")
    tok_info = data.manifest.get("tokenizer") or {}
    tok_path = args.tokenizer or tok_info.get("path")
    if not tok_path:
        raise PrepError("--inspect needs --tokenizer (the manifest names none)")
    tokenizer = load_tokenizer(tok_path, args.pattern or tok_info.get("pattern"))
    data.check_tokenizer(tokenizer)
    ids, mask = data[args.index]
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sources = data.manifest["sources"]
    i = args.index % n
    src = next((s["name"] for s in sources if s["first"] <= i < s["first"] + s["conversations"]), "?")
    print(f"conversation {i} of {n} (source {src}): {len(ids)} tokens, {int(mask.sum())} trained"
          + (" (truncated at max_tokens?)" if len(ids) == data.max_tokens else ""))
    print("legend: " + ("\033[92mtrained\033[0m \033[91mnot trained\033[0m" if color else "[[trained]] not trained"))
    print(render_inspection(tokenizer, ids, mask, color))
    return EXIT_OK


# --------------------------------------------------------------------------------------
# The build


def build(args) -> int:
    out = Path(args.out)
    sources = resolve_inputs(args.inputs, args.mixture, args.mixture_split, args.data_dir)
    pattern_name = args.pattern or "nanochat"
    tokenizer = load_tokenizer(args.tokenizer, pattern_name)
    tok_fp, rend_fp = tokenizer_fingerprint(tokenizer), renderer_fingerprint(tokenizer)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    t0 = time.perf_counter()
    key = cache_key(tok_fp, rend_fp, args.max_tokens, sources)
    remove_stale_temporaries(out, say)
    if out.exists():
        if is_shard(out):
            with open(out / MANIFEST_FILE, encoding="utf-8") as f:
                old = json.load(f)
            why = None
            if args.force:
                why = "--force"
            elif str(old.get("key")).startswith(PENDING_KEY_PREFIX):
                why = "the build that wrote it was interrupted before its bad-record report was complete"
            elif old.get("key") != key:
                why = _what_changed(old, tok_fp, rend_fp, args.max_tokens, sources) + " changed"
            else:
                try:
                    data = ShardDataset(out)  # validates the files too
                except _core.ShardError as e:
                    why = f"the existing shard is damaged: {e}"
            if why is None:
                skipped = data.manifest["num_skipped"]
                if skipped and args.on_error == "fail":
                    # Same inputs as a --on-error skip build that found bad records: a rebuild
                    # would stop at the first of them, which the report already names.
                    with open(out / REPORT_FILE, encoding="utf-8") as f:
                        first = f.readline().rstrip("\n")
                    raise PrepError(f"{first}\n(the shard at {out} was built from these inputs with --on-error skip: "
                                    f"{skipped} bad records, listed in {out / REPORT_FILE})")
                def report_reuse():
                    say(f"reusing {out}: same inputs, tokenizer, renderer and max_tokens (key {key[:19]}...)")
                    summarize(data)

                if not args.quiet:
                    _report_written(out, report_reuse)
                return EXIT_SKIPPED if skipped else EXIT_OK
            say(f"rebuilding {out} ({why})")
        elif out.is_dir() and any(out.iterdir()):
            raise PrepError(f"--out {out}: exists and is not an sftfast shard; refusing to replace it")
        elif not out.is_dir():
            raise PrepError(f"--out {out}: exists and is not a directory")

    extra = {
        "key": key,
        "tokenizer": {"fingerprint": tok_fp, "path": str(Path(args.tokenizer).resolve()),
                      # the pattern given to a .tiktoken rank file (also one found in a
                      # directory): --inspect must load the tokenizer the same way
                      "pattern": pattern_name if tokenizer.pattern == split_pattern(pattern_name) else None,
                      "n_vocab": tokenizer.n_vocab, "bos_id": tokenizer.bos_id},
        "renderer": {"version": _core.RENDERER_VERSION, "fingerprint": rend_fp},
        "inputs": [s.describe() for s in sources],
        "created_unix": int(time.time()),
        "sftfast_version": _version(),
    }
    builder = _core.ShardBuilder(str(out), tokenizer._core, args.max_tokens, args.on_error, args.num_threads)
    total = sum(s.length() or 0 for s in sources) if all(s.length() is not None for s in sources) else None
    bar = _progress(total, disable=args.quiet or args.no_progress)
    seen = {"tokens": 0}

    def on_progress(convs, tokens):
        seen["tokens"] += tokens
        bar.update(convs)
        dt = max(time.perf_counter() - t_build, 1e-9)
        bar.set_postfix_str(f"{seen['tokens'] / dt:,.0f} tok/s", refresh=False)

    t_build = time.perf_counter()
    failed: dict[int, list[FailedRecord]] = {}  # source position -> records it could not produce
    try:
        for k, s in enumerate(sources):
            builder.begin_source(s.name)
            if lost := s.feed(builder, on_progress, args.on_error):
                failed[k] = lost
        if builder.conversations == 0:
            bad = json.loads(builder.stats_json()).get("num_skipped", 0) + sum(map(len, failed.values()))
            raise PrepError("the inputs hold no conversations" + (f" ({bad} bad records skipped)" if bad else "")
                            + ": an empty shard would stop training only when it is read")
        if failed:
            # The builder knows only the records it rendered; the report and counts get these
            # after it has moved the shard into place. Until then the manifest's key matches no
            # run, so a build interrupted in between is rebuilt, never reused with short counts.
            extra["key"] = PENDING_KEY_PREFIX + key
        manifest = json.loads(builder.finish(json.dumps(extra)))
    except BaseException:
        builder.abort()  # the temporary directory goes; an older shard at --out stays as it was
        raise
    finally:
        bar.close()
    if failed:
        manifest = add_failed_records(out, manifest, failed, key)
    elapsed = time.perf_counter() - t0
    data = ShardDataset(out)

    def report():
        breakdowns = {}
        for s, stats in zip(sources, data.manifest["sources"]):
            task_of = s.task_names()
            if task_of:
                breakdowns[s.name] = task_breakdown(data, stats, task_of)
        summarize(data, elapsed, breakdowns=breakdowns)
        if save_length_plot(data, out / "lengths.png"):
            say(f"  length histogram plot: {out / 'lengths.png'}")

    if not args.quiet:
        _report_written(out, report)
    return EXIT_SKIPPED if manifest["num_skipped"] else EXIT_OK


def _report_written(out: Path, report) -> None:
    """Runs `report` (the summary of a shard that is in place). Its failure (stdout on a full
    disk, a closed pipe) is said on stderr and does not fail the run: the shard is written."""
    try:
        report()
        sys.stdout.flush()
    except OSError as e:
        print(f"warning: {out} is written, but its summary could not be printed: {e}", file=sys.stderr)
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """After a failed write to stdout: what is still buffered would fail again when Python
    flushes it at exit (status 120), so it goes nowhere instead."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


PENDING_KEY_PREFIX = "pending:"


def _replace_file(path: Path, text: str) -> None:
    """Writes `path` through a synced temporary file and a rename: old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _report_index(line: str, name: str) -> int | None:
    """i of a report line `NAME[i]: reason`, else None."""
    prefix = name + "["
    if not line.startswith(prefix):
        return None
    end = line.find("]", len(prefix))
    digits = line[len(prefix):end] if end > 0 else ""
    return int(digits) if digits.isdigit() else None


def add_failed_records(out: Path, manifest: dict, failed: dict[int, list[FailedRecord]], key: str) -> dict:
    """Adds the records sources could not produce to a finished shard, as the builder adds
    the ones that fail to render: one report line each, in source order, and in the counts.
    The manifest is written last, with the real key, so the shard is whole only after both."""
    report = out / REPORT_FILE
    lines = report.read_text(encoding="utf-8").splitlines() if report.is_file() else []
    merged, pos = [], 0
    for k, stats in enumerate(manifest["sources"]):
        # The builder reports in feed order: source k's lines follow source k-1's.
        own = lines[pos:pos + stats["skipped"]]
        pos += stats["skipped"]
        if k in failed:
            ordered = [(_report_index(line, stats["name"]), line) for line in own]
            ordered += [(f.index, f.line.replace("\n", "\\n")) for f in failed[k]]  # one line per record
            ordered.sort(key=lambda x: -1 if x[0] is None else x[0])
            own = [line for _, line in ordered]
            stats["skipped"] += len(failed[k])
        merged.extend(own)
    merged.extend(lines[pos:])
    manifest["num_skipped"] = sum(s["skipped"] for s in manifest["sources"])
    manifest["bad_records"] = REPORT_FILE
    manifest["key"] = key
    _replace_file(report, "".join(line + "\n" for line in merged))
    _replace_file(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def remove_stale_temporaries(out: Path, say) -> None:
    """Deletes `.NAME.tmp-PID-*` directories left by builds of `out` that crashed (their PID
    is gone); a build still running elsewhere keeps its own."""
    import re
    import shutil

    pattern = re.compile(r"^\." + re.escape(out.name) + r"\.tmp-(\d+)-\d+(\.old)?$")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = pattern.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # that process is alive: not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(p, ignore_errors=True)
        say(f"removed {p} (left by an interrupted build, process {pid})")


def _version() -> str:
    try:
        from sftfast import __version__

        return __version__
    except ImportError:
        return "unknown"


class _NoBar:
    def update(self, n): ...
    def set_postfix_str(self, s, refresh=True): ...
    def close(self): ...


def _progress(total, disable: bool):
    if disable:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="conv", dynamic_ncols=True, file=sys.stderr)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftfast.prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="JSONL/JSON/parquet files, directories, or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--mixture", help="a named mixture of sftfast.tasks (e.g. seed), a mixture JSON, or a spec string")
    p.add_argument("--mixture-split", default="train", choices=["train", "val"])
    p.add_argument("--data-dir", default=None, help="local mirror of hub datasets for --mixture (see sftfast.tasks)")
    p.add_argument("--tokenizer", help="saved sftfast tokenizer, nanochat tokenizer dir, or .tiktoken rank file")
    p.add_argument("--pattern", default=None, help="split pattern for .tiktoken files: nanochat (default), cl100k, o200k, or a regex")
    p.add_argument("--out", help="output shard directory")
    p.add_argument("--max-tokens", type=at_least(1), default=2049,
                   help="truncate each conversation to this many tokens; the default is what a training row "
                        "holds with the trainer's default --max-seq-len 2048 (+1 for the shifted targets)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--num-threads", type=at_least(0), default=0, help="render threads (0 = all cores)")
    p.add_argument("--force", action="store_true", help="rebuild even when an identical shard exists")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--inspect", metavar="DIR", help="show one rendered conversation of a shard with its mask")
    p.add_argument("--index", type=at_least(0), default=0, help="conversation to --inspect")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    return p


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    # Usage errors exit 2 through argparse, before anything is read.
    if args.num_threads < 0:
        parser.error("--num-threads must be >= 0")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.inspect:
        if not args.out:
            parser.error("--out DIR is required")
        if not args.tokenizer:
            parser.error("--tokenizer PATH is required")
        if not args.inputs and not args.mixture:
            parser.error("no inputs: give files, directories, hf:NAME, mixture:NAME or --mixture NAME")
    try:
        return inspect(args) if args.inspect else build(args)
    except BrokenPipeError:
        if not args.inspect:
            raise
        # `--inspect ... | head`: the reader stopped reading, which is not an error
        _stdout_to_devnull()
        return EXIT_OK
    except (PrepError, _core.SftfastError, OSError) as e:
        # SftfastError covers ConversationError / BadRecordError (`file:line: ... reason`)
        # and ShardError; nothing was written (the builder aborted).
        print(f"error: {e}", file=sys.stderr)
        if not args.inspect:
            print("no shard written", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
