"""SFTLoader: same batches as packing the rank's stream directly, rank sharding, progress by
consumption, exact resume from state_dict, statistics, bad conversations, shards hook."""

import json
import os

import numpy as np
import pytest
import torch

from sftfast import ConversationError, Packer, Tokenizer
from sftfast.dataloader import SFTLoader

# A byte-level tokenizer (256 ranks + the specials) keeps these tests fast and vocab-free.
RANKS = {bytes([b]): b for b in range(256)}

# The head of the scripts that the exit tests run in a fresh interpreter.
SCRIPT_HEAD = (
    "import sys, time\n"
    "from sftfast import Tokenizer\n"
    "from sftfast.dataloader import SFTLoader\n"
    "from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN\n"
    f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
    "from test_dataloader import make_convs\n"
    "tok = Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, NANOCHAT_SPLIT_PATTERN)\n"
)


@pytest.fixture(scope="module")
def tok():
    from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN

    return Tokenizer.from_ranks(RANKS, NANOCHAT_SPLIT_PATTERN)


def make_convs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = "q" * int(rng.integers(1, 30))
        a = f"answer {i} " + "a" * int(rng.integers(0, 60))
        if i % 5 == 0:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": [{"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}, {"type": "text", "text": a}]}]})
        else:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def collect(loader, limit=None):
    out = []
    for b in loader:
        out.append((b.inputs.numpy().copy(), b.targets.numpy().copy(), b.position_ids.numpy().copy(), b.last))
        if limit is not None and len(out) == limit:
            break
    return out


def expected(tok, convs, rank, world, epochs, mode, B, T, max_tokens):
    idx = [i for _ in range(epochs) for i in range(rank, len(convs), world)]
    rendered = tok.render_batch([convs[i] for i in idx], max_tokens=max_tokens)
    return Packer(mode, B, T, tok.bos_id).pack(rendered)


@pytest.mark.parametrize("mode", ["bestfit", "padded"])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
def test_loader_equals_packing_the_rank_stream(tok, mode, rank, world):
    convs = make_convs(200)
    loader = SFTLoader(convs, tok, batch_size=3, seq_len=64, mode=mode, rank=rank, world_size=world, num_epochs=2, chunk_size=7)
    got = collect(loader)
    want = expected(tok, convs, rank, world, 2, mode, 3, 64, 66)
    assert len(got) == len(want)
    for (i, t, p, last), w in zip(got, want):
        np.testing.assert_array_equal(i, w.inputs)
        np.testing.assert_array_equal(t, w.targets)
        np.testing.assert_array_equal(p, w.position_ids)
    assert [g[3] for g in got] == [False] * (len(got) - 1) + [True]
    assert loader.epoch == pytest.approx(2.0) and loader.progress == pytest.approx(1.0)
    assert next(iter(loader), None) is None


def test_progress_counts_consumption_not_fetching(tok):
    convs = make_convs(300)
    loader = SFTLoader(convs, tok, batch_size=2, seq_len=64, num_epochs=1, chunk_size=64, prefetch=4)
    b = next(loader)
    # the producer has fetched and rendered far ahead; progress counts only yielded conversations
    assert 0 < b.num_conversations < 64
    assert loader.stats()["conversations"] == b.num_conversations
    assert loader.epoch == pytest.approx(b.num_conversations / 300)
    assert b.epoch == loader.epoch
    b2 = next(loader)
    assert loader.epoch == pytest.approx((b.num_conversations + b2.num_conversations) / 300)
    loader.close()


def test_resume_yields_exactly_the_same_batches(tok):
    convs = make_convs(250, seed=1)
    kw = dict(batch_size=2, seq_len=48, num_epochs=2, chunk_size=11, buffer_size=16)
    full = collect(SFTLoader(convs, tok, **kw))
    first = SFTLoader(convs, tok, **kw)
    head = collect(first, limit=37)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoint-safe
    first.close()
    resumed = SFTLoader(convs, tok, **dict(kw, chunk_size=5))  # chunking does not change batches
    resumed.load_state_dict(state)
    tail = collect(resumed)
    assert len(head) + len(tail) == len(full)
    for (a, b) in zip(head + tail, full):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert resumed.epoch == pytest.approx(2.0)
    with pytest.raises(ValueError, match="other settings"):
        SFTLoader(convs, tok, **dict(kw, seq_len=32)).load_state_dict(state)


def test_stats_padding_truncation_empty(tok):
    convs = make_convs(60)
    convs[3] = {"messages": [{"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y"}]}  # longer than a row
    convs[4] = {"messages": [{"role": "user", "content": "no answer"}]}  # no supervised token
    loader = SFTLoader(convs, tok, batch_size=1, seq_len=256, mode="padded", num_epochs=1)
    batches = list(loader)
    s = loader.stats()
    assert s["truncated"] == 1 and s["truncated_pct"] == pytest.approx(100 / 60)
    assert s["empty_rows"] >= 2 and s["empty_batches"] >= 2  # conv 3 (truncated before the answer) and conv 4
    assert s["padding_pct"] == 0.0  # batch_size 1: padded rows have no padding
    assert sum(b.num_supervised for b in batches) == s["supervised_tokens"]


def test_bad_conversation_fail_and_skip(tok):
    convs = make_convs(40)
    convs[21] = {"messages": [{"role": "assistant", "content": "first"}]}
    with pytest.raises(ConversationError, match=r"conversation 21: message 0: expected role user"):
        list(SFTLoader(convs, tok, batch_size=2, seq_len=64))
    # rank 1 of 2 sees 21 as its 11th item: the error names the source index, not the stream tag
    with pytest.raises(ConversationError, match=r"conversation 21: "):
        list(SFTLoader(convs, tok, batch_size=2, seq_len=64, rank=1, world_size=2))
    loader = SFTLoader(convs, tok, batch_size=2, seq_len=64, on_error="skip")
    with pytest.warns(UserWarning, match="conversation 21"):
        batches = list(loader)
    assert loader.stats()["skipped"] == 1 and loader.errors[0][0] == 21
    assert sum(b.num_conversations for b in batches) == 39
    assert loader.epoch == pytest.approx(1.0)


def test_rendered_chunk_feeds_like_feed_conversations(tok):
    """Tokenizer.render_chunk + Packer.feed_rendered (the loader's render-ahead path) give the
    packer exactly what feed_conversations does, errors included, and a chunk feeds once."""
    convs = make_convs(30)
    convs[7] = {"messages": [{"role": "assistant", "content": "first"}]}
    tags = list(range(100, 130))
    a, b = Packer("bestfit", 2, 64, tok.bos_id), Packer("bestfit", 2, 64, tok.bos_id)
    want_errors = a.feed_conversations(tok, convs, tags, 66, None, "skip", list(range(30)))
    chunk = tok.render_chunk(convs, 66, None, "skip", list(range(30)))
    assert len(chunk) == 30 and chunk.num_tokens > 0
    assert [i for i, _ in chunk.errors] == [7] and "conversation 7: message 0" in chunk.errors[0][1]
    assert b.feed_rendered(chunk, tags) == want_errors == [(107, chunk.errors[0][1])]
    assert chunk.num_tokens == 0 and a.held_tags() == b.held_tags()
    for x, y in zip(iter(lambda: a.next_batch(flush=True), None), iter(lambda: b.next_batch(flush=True), None)):
        assert (x.inputs == y.inputs).all() and (x.targets == y.targets).all() and x.tags == y.tags
    with pytest.raises(ValueError, match="already fed"):
        b.feed_rendered(chunk, tags)
    with pytest.raises(ValueError, match="tags has 2 entries for 30 conversations in the chunk"):
        Packer("bestfit", 2, 64, tok.bos_id).feed_rendered(tok.render_chunk(convs, 66, on_error="skip"), [0, 1])
    with pytest.raises(ConversationError, match="conversation 7: message 0"):
        tok.render_chunk(convs, 66)


class FlakySource:
    """A sequence whose __getitem__ cannot produce some records, as a task raises TaskError for
    a malformed dataset row."""

    def __init__(self, convs, bad):
        self.convs, self.bad = convs, set(bad)

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        if i in self.bad:
            from sftfast.tasks import TaskError

            raise TaskError(f"GSM8K train index {i + 100}: answer has no final '#### N' line")
        return self.convs[i]


class BrokenSource:
    """A source whose __getitem__ fails with something other than a bad record (a bug, I/O)."""

    def __init__(self, convs, at):
        self.convs, self.at = convs, at

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        if i == self.at:
            raise KeyError("boom")
        return self.convs[i]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_source_failure_names_the_conversation(tok, num_workers):
    """A RuntimeError or KeyError from the source surfaced bare: nothing said which conversation
    was being read. It is not skippable (not a bad record), but it is located."""
    loader = SFTLoader(BrokenSource(make_convs(60), at=37), tok, batch_size=2, seq_len=64, rank=1, world_size=3,
                       on_error="skip", num_epochs=1, num_workers=num_workers)
    try:
        with pytest.raises(KeyError) as info:
            list(loader)
    finally:
        loader.close()
    assert "while the loader read conversation 37 of the source" in getattr(info.value, "__notes__", [])


def test_a_loader_that_skipped_everything_saves_a_state_it_can_load(tok):
    """With every conversation skipped no batch carried the final position: the state said 10
    consumed at position 0, which load_state_dict (rightly) refuses as impossible."""
    convs = make_convs(10)
    loader = SFTLoader(FlakySource(convs, bad=range(10)), tok, batch_size=2, seq_len=64, on_error="skip", num_epochs=1)
    with pytest.warns(UserWarning):
        assert list(loader) == []
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["cursor"], state["consumed"], state["held"]) == (10, 10, [])
    resumed = SFTLoader(FlakySource(convs, bad=range(10)), tok, batch_size=2, seq_len=64, on_error="skip", num_epochs=1)
    resumed.load_state_dict(state)
    assert list(resumed) == [] and len(resumed.errors) == 10


def test_records_the_source_cannot_produce_are_bad_conversations(tok):
    convs = make_convs(40)
    convs[30] = {"messages": [{"role": "assistant", "content": "first"}]}  # fails to render
    source = FlakySource(convs, bad=[7, 33])
    # fail: the first bad record in stream order, named by source index and the task's location,
    # whether the render failure comes after it in the same chunk ...
    with pytest.raises(ConversationError, match=r"conversation 7: GSM8K train index 107: answer has no final"):
        list(SFTLoader(source, tok, batch_size=2, seq_len=64, chunk_size=64))
    # ... or before it
    with pytest.raises(ConversationError, match=r"conversation 30: message 0"):
        list(SFTLoader(FlakySource(convs, bad=[33]), tok, batch_size=2, seq_len=64, chunk_size=64))
    # skip: counted and listed exactly as render failures, in source order
    loader = SFTLoader(source, tok, batch_size=2, seq_len=64, on_error="skip", chunk_size=16)
    with pytest.warns(UserWarning, match="conversation 7: GSM8K train index 107"):
        batches = list(loader)
    assert [i for i, _ in loader.errors] == [7, 30, 33]
    assert "GSM8K train index 133" in loader.errors[2][1] and "message 0" in loader.errors[1][1]
    assert loader.stats()["skipped"] == 3 and loader.epoch == pytest.approx(1.0)
    assert sum(b.num_conversations for b in batches) == 37
    # the batches are those of the source without the three bad records
    good = [c for i, c in enumerate(convs) if i not in (7, 30, 33)]
    want = collect(SFTLoader(good, tok, batch_size=2, seq_len=64, chunk_size=16))
    got = [(b.inputs.numpy(), b.targets.numpy()) for b in batches]
    assert len(got) == len(want) and all((g[0] == w[0]).all() and (g[1] == w[1]).all() for g, w in zip(got, want))
    # rank 1 of 2: its items are 1, 3, ..., 39; 7 and 33 are skipped under their source index
    loader = SFTLoader(source, tok, batch_size=2, seq_len=64, rank=1, world_size=2, on_error="skip")
    with pytest.warns(UserWarning):
        list(loader)
    assert [i for i, _ in loader.errors] == [7, 33] and loader.stats()["skipped"] == 2


def test_resume_keeps_the_skipped_conversations(tok):
    """stats()["skipped"] and loader.errors agree after a resume: the state carries the list."""
    source = FlakySource(make_convs(120, seed=3), bad=[5, 50, 100])
    kw = dict(batch_size=2, seq_len=48, chunk_size=8, buffer_size=4, on_error="skip")
    full = SFTLoader(source, tok, **kw)
    with pytest.warns(UserWarning):
        collect(full)
    first = SFTLoader(source, tok, **kw)
    with pytest.warns(UserWarning):
        collect(first, limit=20)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert [i for i, _ in first.errors] == [i for i, _ in state["errors"]] and first.errors  # some before the cut
    resumed = SFTLoader(source, tok, **kw)
    resumed.load_state_dict(state)
    with pytest.warns(UserWarning):
        collect(resumed)
    assert resumed.errors == full.errors and resumed.stats() == full.stats()


class RenderedSource:
    """What a preprocessed-shards reader provides: (ids, mask) by index, and the pad id."""

    def __init__(self, pairs, bos_id):
        self.pairs, self.bos_id = pairs, bos_id

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def test_skips_after_the_final_batch_are_counted(tok):
    """Bad records in the last chunk, fed after the final batch was made, still reach stats(),
    errors and progress, and the state after the final batch is past them."""
    convs = make_convs(12, seed=1)
    for i in (9, 10, 11):
        convs[i] = {"messages": [{"role": "assistant", "content": "x"}]}
    loader = SFTLoader(FlakySource(convs, bad=[8]), tok, batch_size=1, seq_len=16, chunk_size=4, buffer_size=1, on_error="skip")
    with pytest.warns(UserWarning, match="skipping bad conversation"):
        batches = list(loader)
    assert batches[-1].last and sum(b.num_conversations for b in batches) == 8
    assert loader.stats()["skipped"] == 4 and [i for i, _ in loader.errors] == [8, 9, 10, 11]
    assert loader.epoch == pytest.approx(1.0) and loader.state_dict()["cursor"] == 12


def test_fail_mode_yields_every_batch_made_before_the_error(tok):
    loader = SFTLoader(FlakySource(make_convs(40), bad=[36]), tok, batch_size=1, seq_len=16, chunk_size=4, buffer_size=1)
    got = []
    with pytest.raises(ConversationError, match="conversation 36"):
        for b in loader:
            got.append(b.num_conversations)
    assert sum(got) == 36  # one conversation a row here: all that precede the bad record


def test_prerendered_source_hook(tok):
    convs = make_convs(120)
    rendered = tok.render_batch(convs, max_tokens=66)
    src = RenderedSource([(np.array(i, np.uint32), np.array(m, np.uint8)) for i, m in rendered], tok.bos_id)
    a = collect(SFTLoader(src, None, batch_size=2, seq_len=64))
    b = collect(SFTLoader(convs, tok, batch_size=2, seq_len=64))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])


def test_prerendered_source_errors_name_the_source_index_and_skip(tok):
    """A bad (ids, mask) pair in a pre-rendered source is named by its index in the source (not
    its stream position) and on_error="skip" skips it, as for conversation dicts."""
    rendered = tok.render_batch(make_convs(40), max_tokens=66)
    pairs = [(np.array(i, np.uint32), np.array(m, np.uint8)) for i, m in rendered]
    pairs[33] = (pairs[33][0], pairs[33][1][:-1])
    src = RenderedSource(pairs, tok.bos_id)
    with pytest.raises(ConversationError, match=r"conversation 33: ids has \d+ tokens but mask has"):
        collect(SFTLoader(src, None, batch_size=2, seq_len=64, rank=1, world_size=2, num_epochs=2))
    with pytest.warns(UserWarning, match="conversation 33"):
        loader = SFTLoader(src, None, batch_size=2, seq_len=64, on_error="skip")
        got = collect(loader)
    assert [i for i, _ in loader.errors] == [33] and loader.stats()["skipped"] == 1
    good = collect(SFTLoader(RenderedSource(pairs[:33] + pairs[34:], tok.bos_id), None, batch_size=2, seq_len=64))
    assert len(got) == len(good) and all(np.array_equal(a[0], b[0]) for a, b in zip(got, good))


def test_infinite_and_bad_settings(tok):
    convs = make_convs(10)
    loader = SFTLoader(convs, tok, batch_size=4, seq_len=32, num_epochs=None)
    n = len(collect(loader, limit=50))
    assert n == 50 and loader.epoch > 3
    loader.close()
    with pytest.raises(ValueError, match="rank"):
        SFTLoader(convs, tok, batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no conversations"):
        SFTLoader(convs[:1], tok, batch_size=1, seq_len=8, rank=1, world_size=2)
    with pytest.raises(ValueError, match="packing mode"):
        SFTLoader(convs, tok, batch_size=1, seq_len=8, mode="greedy")
    # prefetch 0 would unbound the queue past the ring of output buffers (overwritten batches),
    # chunk_size 0 would spin forever on empty chunks
    for name in ("prefetch", "chunk_size", "max_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            SFTLoader(convs, tok, batch_size=1, seq_len=8, **{name: 0})
    # a state saved at 1.5 of 2 epochs does not fit a 1-epoch loader
    two = SFTLoader(convs, tok, batch_size=1, seq_len=32, num_epochs=2)
    collect(two, limit=15)
    state = two.state_dict()
    two.close()
    with pytest.raises(ValueError, match="past the end of num_epochs=1"):
        SFTLoader(convs, tok, batch_size=1, seq_len=32, num_epochs=1).load_state_dict(state)


def _producers():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("sftfast-")]  # producer, render helper


def test_producer_thread_is_gone_when_the_stream_ends(tok):
    """A producer still freeing its ring of tensors while the interpreter finalizes is killed
    inside torch's deallocator and aborts the process: the loader joins it at the end."""
    assert not _producers()
    loader = SFTLoader(make_convs(30), tok, batch_size=2, seq_len=48)
    for batch in loader:
        if batch.last:  # joined before the final batch is handed out, not some time after
            assert loader._thread is None and not _producers()
    assert batch.last and not _producers()
    bad = SFTLoader([{"messages": []}] * 3, tok, batch_size=2, seq_len=48)
    with pytest.raises(ConversationError):
        next(bad)
    assert not _producers()


def test_interpreter_exit_with_loaders_running_or_finished(tok, tmp_path):
    """Exiting with one loader abandoned mid-stream (producer blocked on a full queue), one
    dropped while its producer still runs (the producer then runs its __del__), and others run
    to the end exits cleanly (status 0) every time."""
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(
        SCRIPT_HEAD +
        "for k in range(6):\n"
        "    for b in SFTLoader(make_convs(40, k), tok, batch_size=2, seq_len=48):\n"
        "        pass\n"
        "abandoned = SFTLoader(make_convs(400), tok, batch_size=2, seq_len=48, prefetch=2)\n"
        "next(abandoned)\n"
        "class Slow(list):\n"
        "    def __getitem__(self, i):\n"
        "        __import__('time').sleep(0.002)\n"
        "        return list.__getitem__(self, i)\n"
        "dropped = SFTLoader(Slow(make_convs(60)), tok, batch_size=2, seq_len=48, prefetch=64, chunk_size=8, buffer_size=4)\n"
        "next(dropped)\n"
        "del dropped  # its producer, still running, now holds the last reference\n"
        "print('ok')\n"
    )
    for _ in range(3):
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_non_blocking(tok):
    convs = make_convs(200)
    cpu = collect(SFTLoader(convs, tok, batch_size=3, seq_len=64, num_epochs=2))
    loader = SFTLoader(convs, tok, batch_size=3, seq_len=64, num_epochs=2, device="cuda", prefetch=2)
    got = []
    for b in loader:
        assert b.inputs.is_cuda and b.targets.dtype == torch.int64
        torch.cuda._sleep(1_000_000)  # a slow "training step": the ring must not be overwritten early
        got.append((b.inputs.cpu().numpy(), b.targets.cpu().numpy()))
    assert len(got) == len(cpu)
    for (i, t), c in zip(got, cpu):
        np.testing.assert_array_equal(i, c[0])
        np.testing.assert_array_equal(t, c[1])


def test_interpreter_exit_with_a_source_stuck_in_getitem(tmp_path):
    """A source that never returns (a hung network read) must not hang the exit: the helper
    threads are daemons and the exit hook stops waiting for the producer after 10 s."""
    import subprocess
    import sys

    script = tmp_path / "stuck.py"
    script.write_text(
        SCRIPT_HEAD +
        "class Stuck(list):\n"
        "    def __getitem__(self, i):\n"
        "        if i == 12:\n"
        "            time.sleep(1000)\n"
        "        return list.__getitem__(self, i)\n"
        "loader = SFTLoader(Stuck(make_convs(400)), tok, batch_size=2, seq_len=48, prefetch=2, chunk_size=8, buffer_size=4)\n"
        "next(loader)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_stats_definitions_with_bestfit_padding(tok):
    convs = make_convs(40)
    loader = SFTLoader(convs, tok, batch_size=4, seq_len=64, mode="bestfit", num_epochs=1)
    batches = list(loader)
    s = loader.stats()
    positions = sum(b.inputs.numel() for b in batches)
    assert s["padding_pct"] == pytest.approx(100.0 * sum(b.num_pad for b in batches) / positions)
    assert s["padding_pct"] > 0
    assert s["truncated_pct"] == pytest.approx(100.0 * s["truncated"] / 40)
    assert s["empty_batches"] == sum(b.num_supervised == 0 for b in batches)
    # a batch with one empty row (no assistant turn) is not an empty batch
    convs = make_convs(10)
    convs[1] = {"messages": [{"role": "user", "content": "no answer"}]}
    loader = SFTLoader(convs, tok, batch_size=2, seq_len=256, mode="padded", num_epochs=1)
    list(loader)
    s = loader.stats()
    assert s["empty_rows"] == 1 and s["empty_batches"] == 0


def test_loader_state_with_a_held_position_at_the_cursor_is_refused(tok):
    loader = SFTLoader(make_convs(20), tok, batch_size=2, seq_len=64, num_epochs=1)
    next(loader)
    state = loader.state_dict()
    loader.close()
    fresh = SFTLoader(make_convs(20), tok, batch_size=2, seq_len=64, num_epochs=1)
    bad = dict(state, held=list(state["held"]) + [state["cursor"]], consumed=state["consumed"] - 1)
    with pytest.raises(ValueError):
        fresh.load_state_dict(bad)
    # consumed + held must account for every position below the cursor
    with pytest.raises(ValueError, match="inconsistent"):
        fresh.load_state_dict(dict(state, consumed=state["consumed"] - 1))
    fresh.load_state_dict(state)
    fresh.close()
