"""SFTLoader(num_workers=N): worker processes prepare (read + render) the chunks, the batches
stay exactly those of the in-process loader; errors, resume, dead and stuck workers, exit.
Also RenderedChunk pickling, which carries the chunks between the processes."""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sftfast import ConversationError, Packer, RenderedChunk, Tokenizer
from sftfast.dataloader import SFTLoader
from test_dataloader import RANKS, SCRIPT_HEAD, FlakySource, RenderedSource, collect, expected, make_convs


@pytest.fixture(scope="module")
def tok():
    from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN

    return Tokenizer.from_ranks(RANKS, NANOCHAT_SPLIT_PATTERN)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for x, y in zip(g, w):
            np.testing.assert_array_equal(x, y)


def test_rendered_chunk_pickles_by_value(tok):
    convs = make_convs(50)
    convs[9] = {"messages": [{"role": "assistant", "content": "first"}]}
    chunk = tok.render_chunk(convs, 66, None, "skip", list(range(50)))
    copy = pickle.loads(pickle.dumps(chunk))
    assert isinstance(copy, RenderedChunk) and len(copy) == 50
    assert copy.num_tokens == chunk.num_tokens and copy.errors == chunk.errors
    a, b = Packer("bestfit", 2, 64, tok.bos_id), Packer("bestfit", 2, 64, tok.bos_id)
    assert a.feed_rendered(chunk, list(range(50))) == b.feed_rendered(copy, list(range(50)))
    for x, y in zip(iter(lambda: a.next_batch(flush=True), None), iter(lambda: b.next_batch(flush=True), None)):
        assert (x.inputs == y.inputs).all() and (x.targets == y.targets).all() and x.tags == y.tags
    # a fed chunk stays fed across pickling
    with pytest.raises(ValueError, match="already fed"):
        Packer("bestfit", 2, 64, tok.bos_id).feed_rendered(pickle.loads(pickle.dumps(chunk)), list(range(50)))


def test_rendered_chunk_rejects_a_corrupt_state(tok):
    rebuild, (n, fed, index, ids, mask, errors) = tok.render_chunk(make_convs(3), 66).__reduce__()
    assert rebuild(n, fed, index, ids, mask, errors).num_tokens == len(mask)
    for args, what in [
        ((n, fed, index, ids[:-4], mask, errors), "do not fit together"),
        ((n, fed, index, ids[:-4], mask[:-1], errors), "add up to more than"),
        ((n, fed, index[:16], ids, mask, errors), "add up to"),
        ((2, fed, index, ids, mask, errors), "outside a chunk of 2"),
        ((n, fed, index, ids, mask, [(5, "x")]), "error at position 5"),
        ((n + 1, fed, index, ids, mask, errors), "3 rendered \\+ 0 bad != 4"),
        ((n + 1, fed, index, ids, mask, [(1, "x")]), "position 1 is listed twice"),
        ((n + 2, fed, index, ids, mask, [(3, "x"), (3, "y")]), "position 3 is listed twice"),
        ((2**63, True, b"", b"", b"", []), "a chunk of 9223372036854775808"),
    ]:
        with pytest.raises(ValueError, match=f"corrupt RenderedChunk state: .*{what}"):
            rebuild(*args)


@pytest.mark.parametrize("mode", ["bestfit", "padded"])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
def test_workers_give_the_same_batches(tok, mode, rank, world):
    convs = make_convs(200)
    loader = SFTLoader(convs, tok, batch_size=3, seq_len=64, mode=mode, rank=rank, world_size=world, num_epochs=2,
                       chunk_size=7, num_workers=2)
    got = collect(loader)
    want = expected(tok, convs, rank, world, 2, mode, 3, 64, 66)
    assert_same([g[:3] for g in got], [(w.inputs, w.targets, w.position_ids) for w in want])
    assert [g[3] for g in got] == [False] * (len(got) - 1) + [True]
    assert loader.epoch == pytest.approx(2.0)


def test_workers_with_a_prerendered_source(tok):
    convs = make_convs(120)
    src = RenderedSource([(np.array(i, np.uint32), np.array(m, np.uint8)) for i, m in tok.render_batch(convs, max_tokens=66)], tok.bos_id)
    assert_same(collect(SFTLoader(src, None, batch_size=2, seq_len=64, num_workers=2, chunk_size=16)),
                collect(SFTLoader(convs, tok, batch_size=2, seq_len=64)))


def test_resume_across_worker_counts(tok):
    convs = make_convs(250, seed=1)
    kw = dict(batch_size=2, seq_len=48, num_epochs=2, chunk_size=11, buffer_size=16)
    full = collect(SFTLoader(convs, tok, **kw))
    first = SFTLoader(convs, tok, **kw, num_workers=3)
    head = collect(first, limit=37)
    state = first.state_dict()
    first.close()
    for workers in (0, 2):
        resumed = SFTLoader(convs, tok, **kw, num_workers=workers)
        resumed.load_state_dict(state)
        assert_same(head + collect(resumed), full)


def test_bad_conversations_in_workers(tok):
    convs = make_convs(40)
    convs[30] = {"messages": [{"role": "assistant", "content": "first"}]}  # fails to render
    source = FlakySource(convs, bad=[7, 33])  # the source raises TaskError for these
    with pytest.raises(ConversationError, match=r"conversation 7: GSM8K train index 107") as err:
        list(SFTLoader(source, tok, batch_size=2, seq_len=64, chunk_size=8, num_workers=2))
    # the worker's traceback, with the source's TaskError, comes along as the cause
    assert "TaskError: GSM8K train index 107" in str(err.value.__cause__) and "__getitem__" in str(err.value.__cause__)
    with pytest.raises(ConversationError, match=r"conversation 30: message 0"):
        list(SFTLoader(FlakySource(convs, bad=[33]), tok, batch_size=2, seq_len=64, chunk_size=8, num_workers=2))
    threads = SFTLoader(source, tok, batch_size=2, seq_len=64, on_error="skip", chunk_size=8)
    workers = SFTLoader(source, tok, batch_size=2, seq_len=64, on_error="skip", chunk_size=8, num_workers=2)
    with pytest.warns(UserWarning, match="conversation 7: GSM8K train index 107"):
        want = collect(threads)
    with pytest.warns(UserWarning, match="conversation 7: GSM8K train index 107"):
        got = collect(workers)
    assert_same(got, want)
    assert workers.errors == threads.errors and [i for i, _ in workers.errors] == [7, 30, 33]
    assert workers.stats() == threads.stats()


class DiesAt(list):
    """A source whose process dies reading item `at` (a segfaulting reader, the OOM killer)."""

    def __init__(self, items, at):
        super().__init__(items)
        self.at = at

    def __getitem__(self, i):
        if i == self.at:
            os._exit(7)
        return list.__getitem__(self, i)


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()  # no pickle for this one


class RowError(Exception):
    """Pickles, but cannot unpickle (its __init__ takes two arguments, args holds one)."""

    def __init__(self, row, why):
        super().__init__(f"row {row}: {why}")


class Raises(list):
    def __init__(self, items, error):
        super().__init__(items)
        self.error = error

    def __getitem__(self, i):
        if i == 20:
            raise self.error
        return list.__getitem__(self, i)


def test_a_dead_worker_or_an_exception_that_cannot_cross_is_named(tok):
    loader = SFTLoader(DiesAt(make_convs(100), 45), tok, batch_size=2, seq_len=48, chunk_size=8, num_workers=2)
    with pytest.raises(RuntimeError, match=r"loader worker 1 \(pid \d+\) exited with code 7 while preparing stream positions 40\.\.47"):
        list(loader)
    for error, name in ((Unpicklable("the reader's own error"), "Unpicklable"), (RowError(20, "bad json"), "RowError")):
        loader = SFTLoader(Raises(make_convs(100), error), tok, batch_size=2, seq_len=48, chunk_size=8, num_workers=2)
        with pytest.raises(RuntimeError, match=rf"loader worker 0, preparing stream positions 16\.\.23: {name}: {error}") as err:
            list(loader)
        assert f"{name}: {error}" in str(err.value.__cause__)  # the worker's traceback


def test_a_worker_killed_between_chunks_is_named(tok):
    loader = SFTLoader(make_convs(100), tok, batch_size=2, seq_len=48, chunk_size=8, num_epochs=None, num_workers=2)
    next(loader)
    os.kill(_pool_of(loader).procs[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"loader worker 0 \(pid \d+\) was killed by signal 9 \(SIGKILL\) while preparing"):
        for _ in range(10_000):
            next(loader)


class DiesLeavingAChild(list):
    """Dies reading item 45 after forking a process that keeps the worker's pipe open."""

    def __getitem__(self, i):
        if i == 45:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            os._exit(7)
        return list.__getitem__(self, i)


def test_a_dead_worker_is_named_even_when_its_pipe_stays_open(tok):
    loader = SFTLoader(DiesLeavingAChild(make_convs(100)), tok, batch_size=2, seq_len=48, chunk_size=8,
                       num_workers=2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"loader worker 1 \(pid \d+\) exited with code 7"):
        list(loader)
    assert time.monotonic() - t0 < 15  # not the 30 s of the grandchild holding the pipe open


def test_a_large_chunk_does_not_fill_the_pipe(tok):
    """Chunks travel to workers as ranges: a chunk of 60,000 positions (a list of tags that
    size filled the socket buffer while the worker was blocked sending: both waited)."""
    loader = SFTLoader(make_convs(300), tok, batch_size=2, seq_len=48, chunk_size=60_000, num_epochs=None, num_workers=1)
    first = collect(loader, limit=3)
    loader.close()
    threads = SFTLoader(make_convs(300), tok, batch_size=2, seq_len=48, num_epochs=None)
    assert_same(first, collect(threads, limit=3))
    threads.close()


def test_loaders_with_workers_on_several_threads(tok):
    """Loaders started from several threads at once (forks from one thread while another
    closes its pipes) all give their batches."""
    convs = make_convs(80)
    want = collect(SFTLoader(convs, tok, batch_size=2, seq_len=48, chunk_size=8))
    failures = []

    def work():
        try:
            for _ in range(4):
                assert_same(collect(SFTLoader(convs, tok, batch_size=2, seq_len=48, chunk_size=8, num_workers=2)), want)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures


class Stuck(list):
    def __getitem__(self, i):
        if i == 12:
            time.sleep(1000)  # a hung network read
        return list.__getitem__(self, i)


def test_close_stops_workers_stuck_in_the_source(tok):
    loader = SFTLoader(Stuck(make_convs(400)), tok, batch_size=2, seq_len=48, prefetch=2, chunk_size=8, buffer_size=4,
                       num_workers=2)
    next(loader)
    procs = list(_pool_of(loader).procs)
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    t0 = time.monotonic()
    loader.close()
    assert time.monotonic() - t0 < 5.0
    assert not any(p.is_alive() for p in procs)


def _pool_of(loader):
    """The running producer's WorkerPool (white-box: found through the producer thread)."""
    return loader._thread._target.__self__.preparer


def test_spawn_context(tok):
    convs = make_convs(60)
    got = collect(SFTLoader(convs, tok, batch_size=2, seq_len=64, num_workers=1, multiprocessing_context="spawn"))
    assert_same(got, collect(SFTLoader(convs, tok, batch_size=2, seq_len=64)))


def test_exit_with_workers_running(tmp_path):
    """An abandoned loader's workers (one stuck in the source) do not hang or outlive the exit."""
    script = tmp_path / "exit_workers.py"
    script.write_text(
        SCRIPT_HEAD +
        "from test_loader_workers import Stuck\n"
        "loader = SFTLoader(Stuck(make_convs(400)), tok, batch_size=2, seq_len=48, prefetch=2, chunk_size=8, buffer_size=4, num_workers=2)\n"
        "next(loader)\n"
        "print(' '.join(str(p.pid) for p in loader._thread._target.__self__.preparer.procs))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    for pid in map(int, r.stdout.split()):
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"worker {pid} outlived the loader's process"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bad_num_workers(tok):
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        SFTLoader(make_convs(4), tok, batch_size=1, seq_len=8, num_workers=-1)
