"""Tests of `python -m sftfast.prep` and the shard reader (issue 4).

The oracle is sftfast.reference.render_conversation on a tiktoken.Encoding built from the
same cl100k ranks: a shard read back must hold exactly its ids and masks, whatever the
input format, thread count or chunking.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftfast import _core, prep
from sftfast.reference import chat_encoding, render_conversation
from sftfast.shards import ShardDataset, is_shard
from sftfast.train_data import read_training_data

CL100K_FILE = Path(importlib.util.find_spec("tiktoken_ext").submodule_search_locations[0]) / "data" / "cl100k_base.tiktoken"
PY = sys.executable
PYTHONPATH = str(Path(prep.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def enc():
    from tiktoken.load import load_tiktoken_bpe

    return chat_encoding(load_tiktoken_bpe(str(CL100K_FILE)), prep.PATTERNS["cl100k"])


@pytest.fixture(scope="module")
def tok():
    return prep.load_tokenizer(CL100K_FILE, "cl100k")


WORDS = ["hello", "world", " 12/60", "日本語", "héllo", "<|bos|>", "<|assistant_end|>", "\n\n", "  ", "1234567",
         "don't", "emoji 🤖", "tab\tbed", "x" * 40, "The answer is 0.2.", "'ll", "?!"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", "\n"]) for _ in range(n))


def random_conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": random_text(rng, 3)})
    for turn in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": random_text(rng, rng.randint(0, 12))})
        if rng.random() < 0.5:
            content = random_text(rng, rng.randint(0, 30))
        else:
            content = [{"type": rng.choice(["text", "python", "python_output"]), "text": random_text(rng, rng.randint(0, 6))}
                       for _ in range(rng.randint(0, 4))]
        messages.append({"role": "assistant", "content": content})
    if rng.random() < 0.1:
        messages.append({"role": "user", "content": "a last question?"})
    return {"messages": messages, "id": rng.randint(0, 10**6)}


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [random_conversation(rng) for _ in range(n)]


def write_jsonl(path: Path, records, raw_lines: dict[int, str] | None = None) -> None:
    """records as JSON lines; raw_lines {line_number: text} inserts lines verbatim (1-based)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for lineno, text in sorted((raw_lines or {}).items()):
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_prep(*args, tokenizer=CL100K_FILE, pattern="cl100k", capsys=None):
    argv = [str(a) for a in args] + ["--tokenizer", str(tokenizer), "--pattern", pattern, "--no-progress"]
    rc = prep.main(argv)
    out = capsys.readouterr() if capsys else None
    return rc, out


def assert_matches_reference(data: ShardDataset, enc, convs, max_tokens: int) -> None:
    assert len(data) == len(convs)
    for i, conv in enumerate(convs):
        ids, mask = data[i]
        ref_ids, ref_mask = render_conversation(enc, conv, max_tokens)
        assert ids.dtype == np.uint32 and mask.dtype == np.uint8
        assert ids.tolist() == ref_ids, f"conversation {i}"
        assert mask.tolist() == ref_mask, f"conversation {i}"


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


# --------------------------------------------------------------------------------------
# Read-back equals the reference renderer


@pytest.mark.parametrize("num_threads", [1, 2])
def test_jsonl_round_trip_matches_reference(tmp_path, enc, num_threads, capsys):
    convs = conversations(300)
    src = tmp_path / "train.jsonl"
    write_jsonl(src, convs)
    max_tokens = 96  # small enough that some conversations are truncated
    rc, out = run_prep(src, "--out", tmp_path / "shard", "--max-tokens", max_tokens, "--num-threads", num_threads, capsys=capsys)
    assert rc == prep.EXIT_OK, out.err
    data = ShardDataset(tmp_path / "shard")
    assert_matches_reference(data, enc, convs, max_tokens)
    full = [len(render_conversation(enc, c, 10**9)[0]) for c in convs]
    m = data.manifest
    assert m["num_truncated"] == sum(n > max_tokens for n in full) > 0
    assert m["num_tokens"] == sum(min(n, max_tokens) for n in full)
    assert m["num_supervised_tokens"] == int(data.mask.sum())
    assert m["sources"] == [{"name": str(src), "first": 0, "conversations": 300, "tokens": m["num_tokens"],
                             "supervised_tokens": m["num_supervised_tokens"], "truncated": m["num_truncated"], "skipped": 0}]
    assert data.bos_id == enc.encode_single_token("<|bos|>") == data[0][0][0]
    assert m["tokenizer"]["fingerprint"].startswith("sha256:") and m["renderer"]["version"] == _core.RENDERER_VERSION
    assert "conversations 300" in out.out and "length histogram" in out.out
    assert leftovers(tmp_path) == []


def test_lone_surrogate_escapes_render_like_the_loaders_path(tmp_path, enc, capsys):
    """JSON text with an unpaired \\ud800 escape: json.loads (the loader's path) accepts it and
    the text renders with U+FFFD; prep parses the same lines and writes the same tokens."""
    lines = [r'{"messages": [{"role": "user", "content": "lone \ud800 high"}, {"role": "assistant", "content": "x\udc00"}]}',
             r'{"messages": [{"role": "user", "content": "pair \ud83d\ude00"}, {"role": "assistant", "content": "ok \\ud800"}]}']
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, out = run_prep(src, "--out", tmp_path / "shard", capsys=capsys)
    assert rc == prep.EXIT_OK, out.err
    assert_matches_reference(ShardDataset(tmp_path / "shard"), enc, [json.loads(line) for line in lines], 2048)


def test_json_parquet_and_directory_inputs(tmp_path, enc, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = conversations(60, seed=1)
    # parquet needs one type per column: string-content conversations only
    plain = [c for c in conversations(200, seed=2) if all(isinstance(m["content"], str) for m in c["messages"])][:40]
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", convs[:30])
    (d / "b.json").write_text(json.dumps(convs[30:]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"messages": c["messages"]} for c in plain]), d / "sub" / "c.parquet")
    (d / "notes.txt").write_text("ignored: not an input type")
    rc, out = run_prep(d, "--out", tmp_path / "shard", capsys=capsys)
    assert rc == 0, out.err
    data = ShardDataset(tmp_path / "shard")
    # directory files in sorted path order: a.jsonl, b.json, sub/c.parquet
    assert_matches_reference(data, enc, convs + [{"messages": c["messages"]} for c in plain], 2048)
    assert [s["name"] for s in data.manifest["sources"]] == [str(d / "a.jsonl"), str(d / "b.json"), str(d / "sub" / "c.parquet")]
    assert [s["kind"] for s in data.manifest["inputs"]] == ["jsonl", "json", "parquet"]


def test_bare_message_lists_and_blank_lines(tmp_path, enc, capsys):
    convs = conversations(5, seed=3)
    src = tmp_path / "x.jsonl"
    src.write_text("\n".join(json.dumps(c["messages"]) for c in convs) + "\n\n  \n", encoding="utf-8")
    rc, out = run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    assert rc == 0, out.err
    assert_matches_reference(ShardDataset(tmp_path / "s"), enc, convs, 2048)


def test_hf_dataset_input_from_local_files(tmp_path, enc, capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    convs = [{"messages": c["messages"]} for c in conversations(40, seed=4)
             if all(isinstance(m["content"], str) for m in c["messages"])]
    d = tmp_path / "smol"
    d.mkdir()
    write_jsonl(d / "train.jsonl", convs)
    rc, out = run_prep(f"hf:{d}@train", "--out", tmp_path / "s", capsys=capsys)
    assert rc == 0, out.err
    data = ShardDataset(tmp_path / "s")
    assert_matches_reference(data, enc, convs, 2048)
    assert data.manifest["inputs"][0]["hash"].startswith("hf-fingerprint:")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.text(max_size=40), min_size=2, max_size=12),
    max_tokens=st.integers(1, 64),
)
def test_property_builder_round_trip(tmp_path_factory, enc, tok, texts, max_tokens):
    # Direct use of the builder with tiny chunks: chunk boundaries never change the result.
    convs = [{"messages": [{"role": "user", "content": texts[i]}, {"role": "assistant", "content": texts[i + 1]}]}
             for i in range(len(texts) - 1)]
    d = tmp_path_factory.mktemp("prop")
    src = d / "p.jsonl"
    write_jsonl(src, convs)
    b = _core.ShardBuilder(str(d / "s"), tok._core, max_tokens, "fail", 2)
    b.begin_source("p")
    reader = _core.JsonlReader(str(src))
    while b.feed_jsonl(reader, max_records=3) is not None:
        pass
    b.finish("{}")
    assert_matches_reference(ShardDataset(d / "s"), enc, convs, max_tokens)


# --------------------------------------------------------------------------------------
# Bad records


BAD = {
    2: '{"messages": [{"role": "assistant", "content": "hi"}]}',  # wrong role order
    5: "{not json",
    7: '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}]}',
    9: '{"no_messages": 1}',
}


def test_prep_and_the_training_loader_read_a_jsonl_file_alike(tmp_path, capsys):
    """prep (Rust) and the loader's JSONL reader (CustomJSON, Python) disagreed: a lone CR
    ended a line for one and not the other (records merged, line numbers shifted); a line of
    Unicode white space was a bad record for prep; a message field that rendering drops
    ("weight": 0) and a conversation with no assistant message were trained on by prep;
    NaN/Infinity were read by Python only. Now both skip, refuse and name the same lines."""
    from sftfast.tasks import CustomJSON, TaskError

    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    dropped = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]})
    dropped_part = json.dumps({"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": [{"type": "text", "text": "a", "lang": "en"}]}]})
    user_only = json.dumps([{"role": "user", "content": "q"}])
    named = json.dumps([{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a", "name": None}])
    lines = {good: None, dropped: "not rendered", dropped_part: "not rendered", user_only: "assistant",
             '{"messages": [], "x": NaN}': "JSON", named: None, "\u00a0\u2028\x1f": "blank"}
    text = "\r".join([good, good]) + "\n" + "\n".join(lines) + "\r\n" + good  # two lone-CR lines, then LF, then CRLF
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(text.encode())
    bad_lines = [3 + k for k, why in enumerate(lines.values()) if why not in (None, "blank")]
    rc, out = run_prep(src, "--out", tmp_path / "shard", "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_SKIPPED, out.err
    report = (tmp_path / "shard" / "bad_records.txt").read_text().splitlines()
    assert [int(line.split(":")[1]) for line in report] == bad_lines, report
    assert "not rendered" in report[0] and "assistant" in report[2] and "JSON" in report[3]
    assert len(ShardDataset(tmp_path / "shard")) == 5  # good x2, good, named, the last good
    for n in bad_lines:  # the loader's reader refuses each of them, at the same line
        one = tmp_path / f"only{n}.jsonl"
        one.write_bytes(("\n" * (n - 1) + text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[n - 1]).encode())
        with pytest.raises(TaskError, match=f"{one}:{n}: "):
            CustomJSON(str(one))
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(text.replace("\n".join(lines), "\n".join(k for k, v in lines.items() if v in (None, "blank"))).encode())
    assert len(CustomJSON(str(clean))) == 5


def test_on_error_fail_names_first_bad_record_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    write_jsonl(src, conversations(3000, seed=5), BAD)  # many good lines after: parallel chunks
    rc, out = run_prep(src, "--out", tmp_path / "shard", capsys=capsys)
    assert rc == prep.EXIT_ERROR
    assert f"{src}:2: message 0:" in out.err and "no shard written" in out.err
    assert not (tmp_path / "shard").exists()
    assert leftovers(tmp_path) == []


def test_on_error_fail_keeps_existing_shard_intact(tmp_path, enc, capsys):
    good = tmp_path / "good.jsonl"
    convs = conversations(20, seed=6)
    write_jsonl(good, convs)
    assert run_prep(good, "--out", tmp_path / "shard", capsys=capsys)[0] == 0
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, convs, BAD)
    rc, out = run_prep(bad, "--out", tmp_path / "shard", capsys=capsys)
    assert rc == prep.EXIT_ERROR
    assert_matches_reference(ShardDataset(tmp_path / "shard"), enc, convs, 2048)
    assert leftovers(tmp_path) == []


def test_on_error_skip_reports_every_bad_record(tmp_path, enc, capsys):
    src = tmp_path / "bad.jsonl"
    convs = conversations(30, seed=7)
    write_jsonl(src, convs, BAD)
    rc, out = run_prep(src, "--out", tmp_path / "shard", "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_SKIPPED
    assert "4 bad records skipped" in out.out
    data = ShardDataset(tmp_path / "shard")
    assert_matches_reference(data, enc, convs, 2048)
    report = (tmp_path / "shard" / "bad_records.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in report] == [f"{src}:{n}" for n in sorted(BAD)]
    assert "expected role user" in report[0] and "invalid JSON" in report[1]
    assert "unknown part type" in report[2] and 'missing field "messages"' in report[3]
    assert data.manifest["num_skipped"] == 4 and data.manifest["sources"][0]["skipped"] == 4


def test_on_error_modes_share_the_cache(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    write_jsonl(src, conversations(10, seed=12), BAD)
    out = tmp_path / "shard"
    assert run_prep(src, "--out", out, "--on-error", "skip", capsys=capsys)[0] == prep.EXIT_SKIPPED
    rc, o = run_prep(src, "--out", out, "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_SKIPPED and o.out.startswith("reusing")
    # fail mode on inputs known to hold bad records: fails with the first one, shard kept
    rc, o = run_prep(src, "--out", out, capsys=capsys)
    assert rc == prep.EXIT_ERROR and f"{src}:2: message 0:" in o.err
    assert len(ShardDataset(out)) == 10
    # clean inputs: a shard built in skip mode is reused in fail mode
    good = tmp_path / "good.jsonl"
    write_jsonl(good, conversations(10, seed=12))
    assert run_prep(good, "--out", out, "--on-error", "skip", capsys=capsys)[0] == 0
    rc, o = run_prep(good, "--out", out, capsys=capsys)
    assert rc == 0 and o.out.startswith("reusing")
    # a damaged shard with the same key is rebuilt, not trusted
    (out / "mask.u8").write_bytes(b"")
    rc, o = run_prep(good, "--out", out, capsys=capsys)
    assert rc == 0 and "damaged" in o.out and len(ShardDataset(out)) == 10


def test_json_file_errors_name_the_index(tmp_path, capsys):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([conversations(1)[0], {"messages": "nope"}]))
    rc, out = run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    assert rc == prep.EXIT_ERROR and f"{src}[1]: message -:" in out.err
    src.write_text('[{"messages": [}')
    rc, out = run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    assert rc == prep.EXIT_ERROR and f"{src}:1: invalid JSON" in out.err


def test_usage_errors(tmp_path, capsys):
    rc, out = run_prep(tmp_path / "missing.jsonl", "--out", tmp_path / "s", capsys=capsys)
    assert rc == prep.EXIT_ERROR and "no such file" in out.err
    (tmp_path / "x.csv").write_text("a,b\n")
    rc, out = run_prep(tmp_path / "x.csv", "--out", tmp_path / "s", capsys=capsys)
    assert rc == prep.EXIT_ERROR and "unknown input type" in out.err
    # an existing directory that is not a shard is never replaced
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(2))
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep me")
    rc, out = run_prep(src, "--out", home, capsys=capsys)
    assert rc == prep.EXIT_ERROR and "not an sftfast shard" in out.err
    assert (home / "precious.txt").read_text() == "keep me"
    for argv in (["--on-error", "ignore"], [str(src), "--out", "x"], [str(src), "--tokenizer", "t"],
                 ["--out", "x", "--tokenizer", "t"], [str(src), "--out", "x", "--tokenizer", "t", "--max-tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            prep.main(argv)
        assert e.value.code == prep.EXIT_USAGE, argv


# --------------------------------------------------------------------------------------
# Atomicity, reuse and invalidation


def test_interrupted_build_leaves_no_shard(tmp_path, monkeypatch, capsys):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(50))
    real_feed = prep.Source.feed

    def feed_then_crash(self, builder, on_progress, *args):
        real_feed(self, builder, on_progress, *args)
        raise KeyboardInterrupt  # after records were written to the temporary directory

    monkeypatch.setattr(prep.Source, "feed", feed_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_prep(src, "--out", tmp_path / "shard")
    assert not (tmp_path / "shard").exists() and leftovers(tmp_path) == []


def test_killed_process_leaves_no_whole_looking_shard(tmp_path):
    src = tmp_path / "big.jsonl"
    write_jsonl(src, conversations(4000, seed=8))
    src.write_bytes(src.read_bytes() * 30)  # ~6 M tokens: seconds of work even on a fast core
    out = tmp_path / "shard"
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    proc = subprocess.Popen([PY, "-m", "sftfast.prep", str(src), "--tokenizer", str(CL100K_FILE), "--pattern", "cl100k",
                             "--out", str(out), "--quiet", "--num-threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".tmp-" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.005)
    time.sleep(0.05)  # let it write part of the shard
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if finished:
        pytest.fail("the build finished before it could be killed: make the input bigger")
    assert not out.exists() and not is_shard(out)
    assert leftovers(tmp_path)  # the crash left only a hidden temporary directory
    # the next build removes what the dead one left
    small = tmp_path / "small.jsonl"
    write_jsonl(small, conversations(3))
    rc, _ = run_prep(small, "--out", out, "--quiet")
    assert rc == 0 and len(ShardDataset(out)) == 3 and leftovers(tmp_path) == []


def test_reuse_and_invalidation(tmp_path, capsys, monkeypatch):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(40, seed=9))
    out = tmp_path / "shard"
    assert run_prep(src, "--out", out, capsys=capsys)[0] == 0
    ino = (out / "ids.u32").stat().st_ino
    key = json.loads((out / "manifest.json").read_text())["key"]

    rc, o = run_prep(src, "--out", out, capsys=capsys)
    assert rc == 0 and o.out.startswith(f"reusing {out}")
    assert (out / "ids.u32").stat().st_ino == ino

    rc, o = run_prep(src, "--out", out, "--max-tokens", 64, capsys=capsys)
    assert rc == 0 and "rebuilding" in o.out and "max_tokens changed" in o.out
    assert ShardDataset(out).max_tokens == 64

    rc, o = run_prep(src, "--out", out, "--max-tokens", 64, pattern="nanochat", capsys=capsys)
    assert rc == 0 and "(tokenizer changed)" in o.out

    with open(src, "a") as f:
        f.write(json.dumps(conversations(1, seed=10)[0]) + "\n")
    rc, o = run_prep(src, "--out", out, "--max-tokens", 64, pattern="nanochat", capsys=capsys)
    assert rc == 0 and "inputs changed" in o.out and len(ShardDataset(out)) == 41

    monkeypatch.setattr(prep, "renderer_fingerprint", lambda tok: "sha256:another-renderer")
    rc, o = run_prep(src, "--out", out, "--max-tokens", 64, pattern="nanochat", capsys=capsys)
    assert rc == 0 and "renderer changed" in o.out

    rc, o = run_prep(src, "--out", out, "--max-tokens", 64, pattern="nanochat", capsys=capsys)
    assert o.out.startswith("reusing")
    rc, o = run_prep(src, "--out", out, "--max-tokens", 64, "--force", pattern="nanochat", capsys=capsys)
    assert "rebuilding" in o.out and "--force" in o.out
    assert json.loads((out / "manifest.json").read_text())["key"] != key
    assert leftovers(tmp_path) == []


def test_fingerprints(tok):
    fp = prep.tokenizer_fingerprint(tok)
    assert fp == prep.tokenizer_fingerprint(prep.load_tokenizer(CL100K_FILE, "cl100k"))
    assert fp != prep.tokenizer_fingerprint(prep.load_tokenizer(CL100K_FILE, "nanochat"))
    assert prep.renderer_fingerprint(tok) == prep.renderer_fingerprint(tok)


# --------------------------------------------------------------------------------------
# Reader: ranks, orders, validation; inspection


def test_shard_dataset_orders_and_ranks(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(23, seed=11))
    run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    data = ShardDataset(tmp_path / "s")
    assert np.array_equal(data.order(), np.arange(23))
    perm = data.order(seed=42, epoch=1)
    assert sorted(perm.tolist()) == list(range(23)) and np.array_equal(perm, data.order(seed=42, epoch=1))
    assert not np.array_equal(perm, data.order(seed=42, epoch=2))
    parts = [data.rank_indices(r, 4, seed=42, epoch=1) for r in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))
    assert parts[1].tolist() == perm[1::4].tolist()
    ids, mask = data[-1]
    assert np.array_equal(ids, data[22][0])
    with pytest.raises(IndexError):
        data[23]
    with pytest.raises(ValueError):
        data.rank_indices(4, 4)
    assert data.lengths().sum() == data.num_tokens == len(data.ids)
    assert np.shares_memory(data[0][0], data.ids)  # views into the map, not copies
    reader = _core.ShardReader(str(tmp_path / "s"))
    assert len(reader) == 23 and np.array_equal(reader.get(5)[0], data[5][0])
    assert np.array_equal(reader.lengths(), data.lengths())


def test_corrupt_shard_is_rejected(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(5))
    run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    with open(tmp_path / "s" / "ids.u32", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(_core.ShardError, match="mask bytes"):
        ShardDataset(tmp_path / "s")


def test_input_without_conversations_is_refused(tmp_path, capsys):
    """An empty input gave an empty shard and exit 0; as --val-data it failed the run only at
    its final evaluation, after all the training, with no checkpoint saved."""
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    rc, out = run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    assert rc == prep.EXIT_ERROR and "error: the inputs hold no conversations:" in out.err
    assert "no shard written" in out.err and not (tmp_path / "s").exists() and leftovers(tmp_path) == []
    write_jsonl(src, [{"messages": [{"role": "assistant", "content": "x"}]}] * 2)
    rc, out = run_prep(src, "--out", tmp_path / "s", "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_ERROR and "no conversations (2 bad records skipped)" in out.err
    assert not (tmp_path / "s").exists()


def test_columns_that_are_not_rendered_never_fail_a_row(tmp_path, enc, capsys):
    """A NaN in an unused parquet column (common in hub datasets) failed the row as "invalid
    JSON" (prep wrote NaN into the JSON it passed to the renderer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = [c for c in conversations(100, seed=5) if all(isinstance(m["content"], str) for m in c["messages"])][:6]
    rows = [{"messages": c["messages"], "score": float("nan") if i % 2 else 1.5, "deep": [[[[i]]]]}
            for i, c in enumerate(convs)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    rc, out = run_prep(tmp_path / "a.parquet", "--out", tmp_path / "s", capsys=capsys)
    assert rc == 0, out.err
    assert_matches_reference(ShardDataset(tmp_path / "s"), enc, [{"messages": c["messages"]} for c in convs], 2049)
    # a NaN inside the messages is refused for what it is: content that is not a string
    bad = [{"messages": [{"role": "user", "content": float("nan")}, {"role": "assistant", "content": 2.0}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "b.parquet")
    rc, out = run_prep(tmp_path / "b.parquet", "--out", tmp_path / "t", capsys=capsys)
    assert rc == prep.EXIT_ERROR and "invalid JSON" not in out.err and "message 0" in out.err, out.err


def test_directory_input_skips_the_shards_written_under_it(tmp_path, enc, capsys):
    """A second run over a directory that holds the shard of the first read the shard's
    manifest.json as a conversation file (and never reused the shard)."""
    d = tmp_path / "data"
    d.mkdir()
    convs = conversations(8, seed=6)
    write_jsonl(d / "a.jsonl", convs)
    for _ in range(2):
        rc, out = run_prep(d, "--out", d / "shard", capsys=capsys)
        assert rc == 0, out.err
    assert "reusing" in out.out
    assert_matches_reference(ShardDataset(d / "shard"), enc, convs, 2049)
    (d / ".other.tmp-1-1").mkdir()
    (d / ".other.tmp-1-1" / "x.json").write_text("[]")  # a build's temporary directory
    rc, out = run_prep(d, "--out", d / "shard", capsys=capsys)
    assert rc == 0 and "reusing" in out.out, out.err
    rc, out = run_prep(d / "shard", "--out", tmp_path / "s2", capsys=capsys)
    assert rc == prep.EXIT_ERROR and "is an sftfast shard (rendered output), not conversations" in out.err


def test_a_summary_that_cannot_be_printed_does_not_fail_a_written_shard(tmp_path, capsys, monkeypatch):
    """stdout on a full disk (or a closed pipe) after the shard was in place gave exit 1 and
    "no shard written"."""
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(5, seed=7))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "summarize", full)
    monkeypatch.setattr(prep, "_stdout_to_devnull", lambda: None)  # pytest owns stdout here
    for _ in range(2):  # built, then reused
        rc, out = run_prep(src, "--out", tmp_path / "s", capsys=capsys)
        assert rc == 0 and "no shard written" not in out.err
        assert "is written, but its summary could not be printed: [Errno 28] No space left on device" in out.err
        assert len(ShardDataset(tmp_path / "s")) == 5


def test_inspect_loads_a_tokenizer_directory_with_the_pattern_used(tmp_path, capsys, monkeypatch):
    """A shard built from a directory holding tokenizer.tiktoken with --pattern recorded no
    pattern, so --inspect loaded nanochat's and refused the shard as another tokenizer's."""
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    (tokdir / "tokenizer.tiktoken").write_bytes(CL100K_FILE.read_bytes())
    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(3, seed=8))
    rc, out = run_prep(src, "--out", tmp_path / "s", tokenizer=tokdir, capsys=capsys)
    assert rc == 0, out.err
    assert ShardDataset(tmp_path / "s").manifest["tokenizer"]["pattern"] == "cl100k"
    assert prep.main(["--inspect", str(tmp_path / "s"), "--color", "never"]) == 0, capsys.readouterr().err
    assert "conversation 0 of 3" in capsys.readouterr().out

    # `--inspect ... | head -1`: the reader closing the pipe is not an error
    def closed(*a, **k):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(prep, "render_inspection", closed)
    monkeypatch.setattr(prep, "_stdout_to_devnull", lambda: None)
    assert prep.main(["--inspect", str(tmp_path / "s"), "--color", "never"]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


def test_inspect_highlights_trained_tokens(tmp_path, capsys):
    conv = {"messages": [{"role": "user", "content": "What is 12/60?"},
                         {"role": "assistant", "content": [{"type": "python", "text": "12/60"},
                                                           {"type": "python_output", "text": "0.2"},
                                                           {"type": "text", "text": "The answer is 0.2"}]}]}
    src = tmp_path / "a.jsonl"
    write_jsonl(src, [conv, conv])
    run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    assert prep.main(["--inspect", str(tmp_path / "s"), "--index", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert ("<|bos|><|user_start|>What is 12/60?<|user_end|><|assistant_start|>[[<|python_start|>12/60<|python_end|>]]"
            "<|output_start|>0.2<|output_end|>[[The answer is 0.2<|assistant_end|>]]") in out
    assert prep.main(["--inspect", str(tmp_path / "s"), "--color", "always"]) == 0
    assert "\033[92m" in capsys.readouterr().out
    assert prep.main(["--inspect", str(tmp_path / "s"), "--index", "7"]) == prep.EXIT_ERROR


def test_mixture_input(tmp_path, enc, capsys):
    tasks = pytest.importorskip("sftfast.tasks")
    mix = tasks.build_mixture("demo")
    rc, out = run_prep("--mixture", "demo", "--out", tmp_path / "s", capsys=capsys)
    assert rc == 0, out.err
    data = ShardDataset(tmp_path / "s")
    assert len(data) == len(mix)
    for i in range(0, len(mix), 97):
        assert data[i][0].tolist() == render_conversation(enc, mix[i], 2048)[0]
    for name, count in mix.counts().items():  # the summary breaks the mixture down per task
        assert f"    {name}" in out.out and f"{count:,}" in out.out
    rows = prep.task_breakdown(data, data.manifest["sources"][0], prep.resolve_inputs([], "demo")[0].task_names())
    assert sum(r[1] for r in rows) == len(data) and sum(r[2] for r in rows) == data.num_tokens
    assert sum(r[3] for r in rows) == data.manifest["num_supervised_tokens"]
    rc, out = run_prep("--mixture", "demo", "--out", tmp_path / "s", capsys=capsys)
    assert out.out.startswith("reusing")


def test_mixture_records_a_task_cannot_produce(tmp_path, enc, capsys):
    """A malformed dataset row (TaskError) is a bad record like one that fails to render."""
    tasks = pytest.importorskip("sftfast.tasks")
    from _tasks_support import GSM8K_BAD_ROW, GSM8K_ROWS, write_gsm8k_mirror

    rows = [GSM8K_ROWS[0], GSM8K_BAD_ROW, GSM8K_ROWS[1], GSM8K_BAD_ROW, GSM8K_ROWS[0]]
    data_dir = write_gsm8k_mirror(tmp_path / "hub", rows, splits=("train",))
    spec = "GSM8K,identity:stop=3"
    mix = tasks.build_mixture(spec, data_dir=data_dir)
    name = f"mixture:{spec}@train"
    # GSM8K examples are its rows shuffled with seed 42 (as nanochat's): example j is row order[j]
    order = datasets.Dataset.from_dict({"i": list(range(len(rows)))}).shuffle(seed=42)["i"]
    bad = sorted(i for i, (t, j) in enumerate(mix.index_map) if t == 0 and order[j] in (1, 3))  # mixture positions
    row_of = {i: f"row {order[mix.index_map[i][1]]} (shuffled index {mix.index_map[i][1]})" for i in bad}
    jsonl = tmp_path / "bad.jsonl"
    convs = conversations(12, seed=3)
    write_jsonl(jsonl, convs, BAD)
    out = tmp_path / "shard"
    args = ("--mixture", spec, "--data-dir", data_dir, "--out", out)

    # fail: stops at the first, named by mixture index and by dataset/split/row; nothing written
    rc, o = run_prep(*args, capsys=capsys)
    assert rc == prep.EXIT_ERROR and "no shard written" in o.err
    assert f"{name}[{bad[0]}]: GSM8K train {row_of[bad[0]]}: answer has no final '#### N' line" in o.err
    assert not out.exists() and leftovers(tmp_path) == []

    # skip: counted and reported exactly as records that fail to render, in source order
    rc, o = run_prep(jsonl, *args, "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_SKIPPED, o.err
    assert f"{len(BAD) + 2} bad records skipped" in o.out
    data = ShardDataset(out)
    m = data.manifest
    assert m["num_skipped"] == len(BAD) + 2 and [s["skipped"] for s in m["sources"]] == [len(BAD), 2]
    assert m["bad_records"] == "bad_records.txt" and not m["key"].startswith(prep.PENDING_KEY_PREFIX)
    report = (out / "bad_records.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in report] == [f"{jsonl}:{n}" for n in sorted(BAD)] + [f"{name}[{i}]" for i in bad]
    assert all(f"GSM8K train {row_of[i]}: answer has no final" in line for i, line in zip(bad, report[len(BAD):]))
    good = [mix.tasks[t][j] for i, (t, j) in enumerate(mix.index_map) if i not in bad]
    assert len(data) == len(convs) + len(good)
    for k, conv in enumerate(good):
        assert data[len(convs) + k][0].tolist() == render_conversation(enc, conv, 2048)[0]
    assert "    GSM8K" in o.out and "    identity" in o.out  # the per-task breakdown still adds up
    # same inputs: reused (skip), or the first bad record named (fail)
    rc, o = run_prep(jsonl, *args, "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_SKIPPED and o.out.startswith("reusing")
    rc, o = run_prep(jsonl, *args, capsys=capsys)
    assert rc == prep.EXIT_ERROR and f"{jsonl}:2: message 0:" in o.err
    # a build interrupted between the builder's rename and the report's completion is redone
    m["key"] = prep.PENDING_KEY_PREFIX + m["key"]
    (out / "manifest.json").write_text(json.dumps(m))
    rc, o = run_prep(jsonl, *args, "--on-error", "skip", capsys=capsys)
    assert rc == prep.EXIT_SKIPPED and "interrupted" in o.out
    assert (out / "bad_records.txt").read_text().splitlines() == report


def test_mixture_unavailable_is_a_clear_error(tmp_path, capsys):
    if importlib.util.find_spec("sftfast.tasks") is not None:
        rc, out = run_prep("--mixture", "no-such-mixture-xyz", "--out", tmp_path / "s", capsys=capsys)
        assert rc == prep.EXIT_ERROR and "no-such-mixture-xyz" in out.err
    else:
        rc, out = run_prep("--mixture", "seed", "--out", tmp_path / "s", capsys=capsys)
        assert rc == prep.EXIT_ERROR and "sftfast.tasks" in out.err
    assert not (tmp_path / "s").exists()


def test_shard_dataset_pickles_as_its_path(tmp_path, capsys):
    import pickle

    src = tmp_path / "a.jsonl"
    write_jsonl(src, conversations(4))
    run_prep(src, "--out", tmp_path / "s", capsys=capsys)
    data = ShardDataset(tmp_path / "s")
    blob = pickle.dumps(data)
    assert len(blob) < 500  # the path, not the arrays
    again = pickle.loads(blob)
    assert len(again) == 4 and np.array_equal(again[3][0], data[3][0])
    assert type(data[0][0]) is np.ndarray and not data[0][0].flags.writeable


def test_mixture_input_spec_form(tmp_path, capsys):
    with pytest.raises(prep.PrepError, match="mixture:NAME"):
        prep.resolve_inputs(["mixture:demo@test"])
    [s] = prep.resolve_inputs(["mixture:demo@val"])
    assert (s.kind, s.name, s.arg) == ("mixture", "mixture:demo@val", ("demo", "val", None))


def test_sftloader_trains_from_a_shard(tmp_path, tok, capsys):
    # The training loader reads a shard as its pre-rendered source: same batches as rendering
    # the same conversations on the fly, for every rank.
    dataloader = pytest.importorskip("sftfast.dataloader")
    convs = conversations(50, seed=13)
    src = tmp_path / "a.jsonl"
    write_jsonl(src, convs)
    assert run_prep(src, "--out", tmp_path / "s", "--max-tokens", 80, capsys=capsys)[0] == 0
    data = ShardDataset(tmp_path / "s")
    for rank in range(2):
        kw = dict(batch_size=2, seq_len=64, rank=rank, world_size=2)
        a = list(dataloader.SFTLoader(data, None, **kw))
        b = list(dataloader.SFTLoader(convs, tok, max_tokens=80, **kw))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert np.array_equal(x.inputs.numpy(), y.inputs.numpy())
            assert np.array_equal(x.targets.numpy(), y.targets.numpy())
            assert np.array_equal(x.position_ids.numpy(), y.position_ids.numpy())
    # worker processes read the shard themselves (it pickles as its path): same batches
    kw = dict(batch_size=2, seq_len=64, rank=1, world_size=2)
    a = list(dataloader.SFTLoader(data, None, num_workers=2, **kw))
    b = list(dataloader.SFTLoader(convs, tok, max_tokens=80, **kw))
    assert len(a) == len(b) and all(np.array_equal(x.inputs.numpy(), y.inputs.numpy()) for x, y in zip(a, b))


def test_rendered_chunk_reads_like_items_and_names_corrupt_records(tmp_path, capsys):
    """ShardDataset.rendered_chunk (the loader's one-call path) holds what [i] returns. Opening
    a shard checks every token; a record corrupted on disk after that (the files are mapped)
    is named by the shard, its index and the caller's name for it, and skipped with
    on_error="skip"; opening the shard again refuses it, naming conversation and token."""
    from sftfast import Packer

    convs = conversations(30, seed=3)
    write_jsonl(tmp_path / "a.jsonl", convs)
    assert run_prep(tmp_path / "a.jsonl", "--out", tmp_path / "s", capsys=capsys)[0] == 0
    data = ShardDataset(tmp_path / "s")
    order = [7, 3, 29, 3]

    def packed(feed):
        p = Packer("padded", 1, 4096, data.bos_id)
        feed(p)
        return [p.next_batch(flush=True).inputs.tolist() for _ in range(len(order))]

    want = packed(lambda p: p.feed([data[i] for i in order]))
    assert packed(lambda p: p.feed_rendered(data.rendered_chunk(order), list(range(len(order))))) == want
    with pytest.raises(_core.ShardError, match="out of range"):
        data.rendered_chunk([30])
    # corrupt conversation 3's second token on disk
    raw = np.memmap(tmp_path / "s" / "ids.u32", dtype="<u4", mode="r+")
    raw[int(data.offsets[3]) + 1] = 2**32 - 1
    raw.flush()
    del raw
    shard = re.escape(str(tmp_path / "s"))
    with pytest.raises(_core.ConversationError, match=rf"conversation 101: {shard}: conversation 3: ids\[1\] = 4294967295 does not fit"):
        data.rendered_chunk(order, names=[100, 101, 102, 103])
    chunk = data.rendered_chunk(order, on_error="skip")
    assert len(chunk) == 4 and [i for i, _ in chunk.errors] == [1, 3]
    with pytest.raises(_core.ShardError, match="conversation 3, token 1: id 4294967295 is not below the vocabulary size"):
        ShardDataset(tmp_path / "s")
    # a mask byte other than 0/1
    raw = np.memmap(tmp_path / "s" / "mask.u8", dtype="u1", mode="r+")
    raw[int(data.offsets[7]) + 2] = 2
    raw.flush()
    del raw
    with pytest.raises(_core.ConversationError, match=rf"conversation 7: {shard}: mask\[2\] = 2 \(must be 0 or 1\)"):
        data.rendered_chunk([7])


def test_opening_a_shard_checks_ids_masks_and_the_manifest_against_the_tokenizer(tmp_path, capsys, tok):
    """Corruptions the sizes cannot show were accepted: ids past the vocabulary reached the
    batches (and the model's embedding), a mask flip changed what is trained, the manifest's
    bos_id (the padding id) was trusted. Now opening, or checking against the tokenizer,
    refuses each, naming the shard and where."""
    write_jsonl(tmp_path / "a.jsonl", conversations(10, seed=4))
    assert run_prep(tmp_path / "a.jsonl", "--out", tmp_path / "s", capsys=capsys)[0] == 0
    data = ShardDataset(tmp_path / "s")
    n_vocab, first_len = data.manifest["tokenizer"]["n_vocab"], int(data.offsets[1])

    def corrupt(name, dtype, pos, value):
        raw = np.memmap(tmp_path / "s" / name, dtype=dtype, mode="r+")
        old, raw[pos] = int(raw[pos]), value
        raw.flush()
        return old

    old = corrupt("ids.u32", "<u4", first_len + 2, n_vocab)
    with pytest.raises(_core.ShardError, match=f"conversation 1, token 2: id {n_vocab} is not below the vocabulary size {n_vocab}"):
        ShardDataset(tmp_path / "s")
    corrupt("ids.u32", "<u4", first_len + 2, old)
    pos = int(np.flatnonzero(data.mask == 0)[-1])
    corrupt("mask.u8", "u1", pos, 1)
    with pytest.raises(_core.ShardError, match="supervised tokens, the manifest says"):
        ShardDataset(tmp_path / "s")
    corrupt("mask.u8", "u1", pos, 0)
    ShardDataset(tmp_path / "s")  # intact again

    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["bos_id"] = manifest["tokenizer"]["bos_id"] + 1  # still a token
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(_core.ShardError, match="bos_id"):
        ShardDataset(tmp_path / "s").check_tokenizer(tok)
    # a manifest that no longer parses is reported as such, not taken for a JSONL path
    manifest_path.write_text("{" + manifest_path.read_text())
    with pytest.raises(_core.ShardError, match="manifest.json"):
        read_training_data(tmp_path / "s", tok)


def test_from_pairs_names_the_conversation_of_a_pair_packer_feed_would_refuse():
    # the check_rendered errors of RenderedChunk.from_pairs name indices[i] (or i)
    from sftfast import ConversationError, RenderedChunk

    with pytest.raises(ConversationError, match=r"^conversation 11: ids has 3 tokens but mask has 2$"):
        RenderedChunk.from_pairs([([7, 1], [0, 1]), ([7, 1, 2], [0, 1])], [10, 11])
    chunk = RenderedChunk.from_pairs([([7, 1], [0, 1]), ([], [])], on_error="skip")
    assert chunk.errors == [(1, "conversation 1: empty (no tokens, not even <|bos|>)")]


def test_a_broken_json_file_raises_bad_record_error(tmp_path):
    from sftfast import Tokenizer
    from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN

    # Error::Record maps to BadRecordError (prep.py catches SftfastError, so only the text was tested)
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, NANOCHAT_SPLIT_PATTERN)
    src = tmp_path / "a.json"
    src.write_text('[{"messages": [}')
    builder = _core.ShardBuilder(str(tmp_path / "s"), tok._core, 64)
    try:
        with pytest.raises(_core.BadRecordError, match=r"a\.json:1: invalid JSON"):
            builder.feed_json_file(str(src))
    finally:
        builder.abort()
