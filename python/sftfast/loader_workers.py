"""How the loader prepares chunks of conversations: fetch from the source, walk and render.

    SFTLoader(source, tokenizer, ..., num_workers=4)    # 4 processes prepare, this one packs

A chunk is a range of stream positions ("tags"); preparing it reads each conversation from the
source and renders the chunk in Rust into a `RenderedChunk`. Packing stays in the loader's
producer thread, in order. Two ways to prepare, one interface (`submit`, `take`, `close`):

- `ThreadPreparer` (num_workers=0, the default): a helper thread per chunk, one chunk ahead.
  Rendering releases the GIL and runs on all cores, but reading the source and walking the
  Python dicts (~1.3 us a conversation) hold it, as does everything else in the process that
  runs Python: with a source whose `__getitem__` does real Python work (a task building a
  conversation from a dataset row), that is what bounds the loader, whatever the core count.
- `WorkerPool` (num_workers=N): N processes, each with its own interpreter and GIL, prepare
  chunks round-robin (chunk j on worker j % N, 2 chunks in flight per worker) and send them
  back pickled (a RenderedChunk pickles as three bytes buffers: ids, masks and an index,
  ~0.1-0.4 ms for 88 K tokens); results are taken in stream order. The source and tokenizer
  reach the workers by fork (Linux's default), or pickled with a "spawn"/"forkserver" context.

The stream, and so every batch, is the same either way and whatever N: workers only change
who prepares a chunk, not which. Errors keep their meaning: a bad conversation raises (or is
skipped) at its chunk's turn, with the worker's traceback as text in `__cause__`
(`RemoteTraceback`); a worker that dies makes the loader raise, naming it and how it ended.
Workers stop with their loader (close(), the end of the stream, the exit hook) and exit by
themselves when the loader's process is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from sftfast._core import ConversationError, RenderedChunk


@dataclass(frozen=True)
class ChunkSpec:
    """What preparing needs besides the source and tokenizer (plain values: pickles)."""

    rank: int
    world_size: int
    per_epoch: int  # conversations this rank sees per epoch
    max_tokens: int
    num_threads: int | None  # rendering threads (None: all cores)
    on_error: str  # "fail" | "skip"

    def source_index(self, tag: int) -> int:
        """Source index of stream position `tag`: r, r+W, ... epoch after epoch."""
        return self.rank + self.world_size * (tag % self.per_epoch)


def prepare(source, tokenizer, spec: ChunkSpec, tags):
    """Fetches and renders the items of `tags`: (fed tags, their RenderedChunk, [(tag, message)]
    the source could not produce, the error to raise after feeding the records before it)."""
    rank, world, per_epoch = spec.rank, spec.world_size, spec.per_epoch
    if tokenizer is None and hasattr(source, "rendered_chunk"):
        # a shard: the whole chunk in one Rust call (GIL released), no Python per conversation
        tags = list(tags)
        return tags, source.rendered_chunk([rank + world * (t % per_epoch) for t in tags], None, spec.on_error), [], None
    items, fed_tags, indices, failed, error = [], [], [], [], None
    for t in tags:
        i = rank + world * (t % per_epoch)  # spec.source_index(t), inlined: this runs per conversation
        try:
            item = source[i]
        except ValueError as e:  # the source could not produce record i (e.g. a TaskError)
            msg = f"conversation {i}: {e}"
            if spec.on_error == "fail":
                # The records before it go first, so the first bad record in stream order is
                # the one reported, whichever stage it failed in.
                error = ConversationError(msg)
                error.__cause__ = e
                break
            failed.append((t, msg))
            continue
        except Exception as e:  # a bug or an I/O failure in the source: not skippable, but located
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(f"while the loader read conversation {i} of the source")
            raise
        items.append(item)
        fed_tags.append(t)
        indices.append(i)  # errors name the source index, not the stream tag
    if tokenizer is not None:
        chunk = tokenizer.render_chunk(items, spec.max_tokens, spec.num_threads, spec.on_error, indices)
    else:  # pre-rendered (ids, mask) pairs: checked here, so skip/fail and the messages work alike
        chunk = RenderedChunk.from_pairs(items, indices, spec.on_error)
    return fed_tags, chunk, failed, error


class _Ahead:
    """fn(*args) on a daemon thread, its result (or exception) taken later with result().
    Not a ThreadPoolExecutor: its workers are joined at interpreter exit, so a source stuck in
    __getitem__ would hang the exit; the producer waits for this thread before it ends."""

    def __init__(self, fn, *args):
        self._out = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name="sftfast-render")
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._out = (True, fn(*args))
        except BaseException as e:
            self._out = (False, e)

    def result(self):
        self._thread.join()
        ok, value = self._out
        if not ok:
            raise value
        return value


class ThreadPreparer:
    """Prepares chunks on helper threads in this process, one chunk ahead of the packer."""

    depth = 2  # chunks in flight: the one the packer waits for and the next

    def __init__(self, source, tokenizer, spec: ChunkSpec):
        self.source, self.tokenizer, self.spec = source, tokenizer, spec
        self.pending = deque()  # (tags, _Ahead), oldest first

    def __len__(self):
        return len(self.pending)

    def submit(self, tags):
        self.pending.append((tags, _Ahead(prepare, self.source, self.tokenizer, self.spec, tags)))

    def take(self, stop: threading.Event):
        """(tags, prepared) of the oldest chunk; raises what preparing it raised."""
        tags, ahead = self.pending.popleft()
        return tags, ahead.result()

    def close(self, timeout: float | None = None):
        """Waits for the helpers (no helper outlives the producer; close() waits for that)."""
        while self.pending:
            try:
                self.pending.popleft()[1].result()
            except BaseException:
                pass


# The loader-side ends of every worker pipe in this process. A forked child inherits copies of
# them all and closes those copies first: otherwise a worker blocked sending a chunk its loader
# will never read keeps waiting after the loader closes its end (a sibling still holds it open)
# instead of failing at once and exiting. _FORK_LOCK is held from making a pipe to closing our
# copy of its child end, and around closing a loader end, so that loaders started from other
# threads never fork in between (the child would inherit a stray child end, or an end that is
# being closed).
_LOADER_ENDS: set = set()
_FORK_LOCK = threading.Lock()


def _fresh_fork_lock():  # a child forked while the lock was held must not inherit it held
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_fork_lock)


class RemoteTraceback(Exception):
    """The text of a traceback from a loader worker: set as `__cause__` of what it raised."""

    def __str__(self):
        return self.args[0]


def _for_the_loader(e: BaseException, worker_id: int, tags) -> tuple[BaseException, str]:
    """What to send for exception `e`: itself if it survives pickling both ways (some pickle but
    fail to unpickle, e.g. a custom __init__), else a RuntimeError with its text; and its
    traceback as text, causes included (pickling drops tracebacks and __cause__)."""
    tb = "".join(traceback.format_exception(e))
    try:
        pickle.loads(pickle.dumps(e))
        return e, tb
    except Exception as why:
        return RuntimeError(f"loader worker {worker_id}, preparing {_where(tags)}: {type(e).__name__}: {e} "
                            f"(the exception itself cannot cross to the loader's process: {why!r})"), tb


def _where(tags) -> str:
    return f"stream positions {tags[0]}..{tags[-1]}" if len(tags) else "an empty chunk"


def _exit_with_parent(parent_pid: int):
    """Ends this worker when the loader's process is gone (killed), even if the main thread
    is stuck in the source's __getitem__."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(conn, source, tokenizer, spec: ChunkSpec, worker_id: int, inherited=()):
    """A worker process: prepares the chunks it is sent until it gets None or the pipe closes."""
    for c in inherited:  # fork only: copies of loader-side ends (see _LOADER_ENDS)
        try:
            c.close()
        except OSError:
            pass
    # Ctrl-C goes to the whole process group: the loader's process handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        while True:
            tags = conn.recv()
            if tags is None:
                return
            try:
                prepared = prepare(source, tokenizer, spec, tags)
                error = prepared[3]  # a record the source could not produce: raised at commit
                result = ("ok", prepared, None if error is None else "".join(traceback.format_exception(error)))
            except BaseException as e:
                result = ("raise", *_for_the_loader(e, worker_id, tags))
            try:
                conn.send(result)  # pickled whole before anything is written
            except OSError:
                raise  # the pipe: the loader went away
            except Exception as e:  # an item that does not pickle
                conn.send(("raise", RuntimeError(f"loader worker {worker_id} could not send back {_where(tags)}: {e!r}"),
                           "".join(traceback.format_exception(e))))
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the loader went away


class WorkerPool:
    """`n` worker processes preparing chunks: chunk j goes to worker j % n, 2 chunks in flight
    each, results taken in submission order (each worker answers its chunks in order)."""

    def __init__(self, n: int, source, tokenizer, spec: ChunkSpec, context=None):
        if n < 1:
            raise ValueError(f"num_workers must be >= 1 here, got {n}")
        ctx = context if isinstance(context, multiprocessing.context.BaseContext) else multiprocessing.get_context(context)
        self.depth = 2 * n
        self.procs, self.conns = [], []
        self.pending = deque()  # (worker, tags), oldest first
        self.sent = 0
        fork = ctx.get_start_method() == "fork"
        try:
            for w in range(n):
                with _FORK_LOCK:
                    parent_end, child_end = ctx.Pipe()
                    _LOADER_ENDS.add(parent_end)
                    self.conns.append(parent_end)
                    inherited = list(_LOADER_ENDS) if fork else []  # spawn/forkserver children inherit none
                    p = ctx.Process(target=_worker_main, args=(child_end, source, tokenizer, spec, w, inherited),
                                    daemon=True, name=f"sftfast-loader-worker-{w}")
                    try:
                        p.start()
                    finally:
                        child_end.close()  # the child's copy is the only one left: its exit reads as EOF here
                self.procs.append(p)
        except BaseException:
            self.close()
            raise

    def __len__(self):
        return len(self.pending)

    def submit(self, tags: range):
        # A range pickles in a few bytes whatever its length. A long list could fill the pipe
        # towards a worker that is itself blocked sending us a chunk: both would wait forever.
        if not isinstance(tags, range):
            raise TypeError(f"a worker chunk is a range of stream positions, got {type(tags).__name__}")
        w = self.sent % len(self.procs)
        try:
            self.conns[w].send(tags)
        except OSError:
            pass  # the worker has died: take() names it when this chunk's turn comes
        self.pending.append((w, tags))
        self.sent += 1

    def take(self, stop: threading.Event):
        """(tags, prepared) of the oldest chunk, or None once `stop` is set; raises what
        preparing it raised, or RuntimeError naming a worker that died."""
        w, tags = self.pending[0]
        conn, proc = self.conns[w], self.procs[w]
        while not conn.poll(0.05):  # wakes up to see a close() or a dead worker
            if stop.is_set():
                return None
            if not proc.is_alive() and not conn.poll(0):
                # dead, and nothing left to read (no blocking recv: a process the source
                # forked may still hold the worker's end open, and no EOF would come)
                raise self._died(w, tags)
        try:
            kind, value, remote_tb = conn.recv()
        except (EOFError, OSError):
            raise self._died(w, tags) from None
        except Exception as e:  # an item that pickled in the worker but does not unpickle here
            raise RuntimeError(f"loader worker {w}: could not read back {_where(tags)}: {e!r}") from e
        self.pending.popleft()
        # pickling dropped the traceback and the cause: the worker sent them as text
        error = value if kind == "raise" else value[3]
        if remote_tb and error is not None:
            error.__cause__ = RemoteTraceback(f'\n"""\n{remote_tb}"""')
        if kind == "raise":
            raise value
        return tags, value

    def _died(self, w, tags) -> RuntimeError:
        proc = self.procs[w]
        proc.join(1.0)
        code = proc.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by signal {-code} ({signal.Signals(-code).name})"
        else:
            how = f"exited with code {code}"
        return RuntimeError(f"loader worker {w} (pid {proc.pid}) {how} while preparing {_where(tags)}")

    def close(self, timeout: float | None = 1.0):
        """Asks each worker to stop, then terminates any still running after `timeout` seconds
        (one stuck in the source's __getitem__, or blocked sending a chunk nobody will read)."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
            with _FORK_LOCK:
                conn.close()  # a worker blocked sending to us gets an error and exits
                _LOADER_ENDS.discard(conn)
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.procs:
            p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join()
        self.conns, self.pending = [], deque()
