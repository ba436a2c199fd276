"""The SFT training loader: conversations -> packed, masked batches on the device, prepared ahead.

    from sftfast.dataloader import SFTLoader
    loader = SFTLoader(train_mixture, tokenizer, batch_size=4, seq_len=2048, mode="bestfit",
                       rank=ddp_rank, world_size=ddp_world_size, num_epochs=1, device="cuda")
    for batch in loader:                  # a LoaderBatch
        loss = model(batch.inputs, batch.targets)     # (B, T) int32 / int64 (-1 = ignore)
        last = batch.last                 # all-reduce it (MAX) across ranks: no rank hangs
        print(loader.progress, loader.stats())
    state = loader.state_dict()           # save with the checkpoint ...
    loader.load_state_dict(state)         # ... and a fresh loader continues with exactly the
                                          #     batches the uninterrupted one would have yielded

Benchmark: `python -m sftfast.bench data --json` (the `loader` section).

Interface (for the trainer):
- `source`: a sequence (`len`, `__getitem__`) of conversation dicts (a TaskMixture, a list)
  when `tokenizer` is given; or, with `tokenizer=None`, a sequence whose items are already
  rendered `(ids, mask)` pairs (lists or 1-D integer arrays): the hook for preprocessed shards.
- Rank `r` of `W` takes source items r, r+W, r+2W, ... in source order (the mixture's shuffle),
  epoch after epoch in the same order; `num_epochs=None` never ends.
- Each `LoaderBatch`: `inputs` (B, T) int32, `targets` (B, T) int64, `position_ids` (B, T)
  int32 restarting at each conversation, `cu_seqlens` (S+1,) int32 over the flattened batch
  (segments: conversations, and each row's padding tail), `doc_lens` (per row), counts
  (`num_supervised`, `num_pad`, `num_truncated`, `empty_rows`), `epoch` (progress by
  consumption, e.g. 0.37 = 37% of the first epoch) and `last` (True on the final batch).
  bestfit batches have T = seq_len; padded batches T = longest conversation - 1. With
  `num_epochs` set, the final batch may have fewer rows.
- Progress counts a conversation when a batch containing its tokens has been *yielded*
  (consumption, not fetching), so the loader can run ahead without skewing it.
- Threads: a producer packs batches into a ring of host buffers and queues them (`prefetch`
  ahead); a helper renders the next `chunk_size` conversations in Rust (all cores unless
  `num_threads`, GIL released) while the producer packs the current chunk. Both are stopped
  when the stream ends, by `close()` and at interpreter exit (a loader dropped mid-stream
  keeps its threads until one of those: call close() when you abandon one).
- `num_workers=N`: N processes read the source and render instead of the helper thread (each
  on one thread unless `num_threads`), so a source whose `__getitem__` is real Python work
  scales with cores instead of queueing on this process's GIL; the batches are the same for
  any N. Fork by default on Linux (`multiprocessing_context="spawn"`/`"forkserver"` pickle the
  source and tokenizer instead). Started at the first next(), stopped with the producer.
- Like any iterator, one loader is driven from one thread at a time: next(), close(),
  state_dict() and load_state_dict() are not meant to race each other.
- On CUDA, batches are written by Rust straight into page-locked host buffers (a ring of
  `prefetch + 3`) and copied with `non_blocking=True`; a slot is reused only after the copy
  out of it has finished (CUDA event). On CPU the tensors are fresh copies.
- Bad conversations: `on_error="fail"` raises ConversationError (naming the source index and
  message) from `next()`; `"skip"` drops them, counts them in `stats()["skipped"]` and keeps
  them in `loader.errors` as (source index, message). Nothing is dropped silently. A record
  the source cannot produce (its `__getitem__` raises ValueError, e.g. a task's TaskError for
  a malformed dataset row) is a bad conversation too: "conversation I: <the source's message>".
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from sftfast._core import ConversationError, Packer
from sftfast.loader_workers import ChunkSpec, ThreadPreparer, WorkerPool, prepare


@dataclass
class LoaderBatch:
    inputs: torch.Tensor  # (B, T) int32
    targets: torch.Tensor  # (B, T) int64, -1 = ignore
    position_ids: torch.Tensor  # (B, T) int32
    cu_seqlens: torch.Tensor  # (S + 1,) int32
    doc_lens: list  # per row: segment lengths (sum to T)
    num_supervised: int
    num_pad: int
    num_truncated: int
    empty_rows: int
    num_conversations: int
    epoch: float  # epochs consumed after this batch (progress by consumption)
    last: bool


class _Slot:
    """Host buffers for one batch (pinned on CUDA) and the event of the last copy out of them."""

    def __init__(self, n, pin):
        self.inputs = torch.empty(n, dtype=torch.int32, pin_memory=pin)
        self.targets = torch.empty(n, dtype=torch.int64, pin_memory=pin)
        self.position_ids = torch.empty(n, dtype=torch.int32, pin_memory=pin)
        self.numpy = (self.inputs.numpy(), self.targets.numpy(), self.position_ids.numpy())
        self.copied = None  # torch.cuda.Event


class _Producer:
    """The loader's background side: fetches, renders and packs into a ring of host buffers and
    queues the batches, with a copy of the loader's settings. It keeps the loader alive while it
    runs (`keepalive`): a loader collected by the garbage collector on the producer's or the
    helper's thread would have its __del__ wait for itself. So a loader dropped mid-stream
    lives until close() or the exit hook; one that ran to the end goes with its producer.

    Chunks of `chunk_size` stream positions go through two stages: prepare (fetch from the
    source, walk and render in Rust) runs ahead on helper threads or worker processes
    (`loader_workers.py`), commit (feed the packer) on the producer thread, so preparing the
    next chunks overlaps packing the current one and the consumer's work. Errors surface at
    commit, in stream order."""

    def __init__(self, loader, held, cursor, workers):
        self.source, self.tokenizer = loader.source, loader.tokenizer
        self.mode, self.batch_size, self.seq_len, self.buffer_size = loader.mode, loader.batch_size, loader.seq_len, loader.buffer_size
        self.spec = loader._spec()
        self.chunk_size, self.prefetch, self.pin = loader.chunk_size, loader.prefetch, loader._pin
        self.total = loader._total_tags()
        self.bos_id = loader.bos_id
        self.held, self.cursor = held, cursor
        # worker processes (num_workers > 0, started by the loader) or helper threads
        self.preparer = workers if workers is not None else ThreadPreparer(self.source, self.tokenizer, self.spec)
        self.queue = queue.Queue(maxsize=loader.prefetch)
        self.stop = threading.Event()
        self.keepalive = loader

    def commit(self, packer, prepared):
        """Feeds a prepared chunk; returns [(tag, message)] of its skipped records."""
        fed_tags, chunk, failed, error = prepared
        skipped = packer.feed_rendered(chunk, fed_tags) if fed_tags else []
        if error is not None:
            raise error
        return sorted(skipped + failed, key=lambda x: x[0])  # stream order

    def run(self):
        q, stop, held, cursor, prep = self.queue, self.stop, self.held, self.cursor, self.preparer
        pending = None  # held back one batch, so the final one can be flagged `last`
        try:
            packer = Packer(self.mode, self.batch_size, self.seq_len, self.bos_id, self.buffer_size)
            ring = [_Slot(self.batch_size * self.seq_len, self.pin) for _ in range(self.prefetch + 3)]
            if held:
                if self.commit(packer, prepare(self.source, self.tokenizer, self.spec, held)):
                    raise RuntimeError("a conversation that rendered before the checkpoint fails now: the source changed")
            total = self.total
            submitted = cursor  # chunks from `cursor` up to here are being prepared

            skipped = []
            k = 0
            while not stop.is_set():
                slot = ring[k % len(ring)]
                if slot.copied is not None:
                    slot.copied.synchronize()  # the H2D copy out of this slot has finished
                exhausted = total is not None and cursor >= total
                b = packer.next_batch(flush=exhausted, out=slot.numpy)
                if b is None:
                    if exhausted:
                        break
                    while len(prep) < prep.depth and (total is None or submitted < total):
                        n = self.chunk_size if total is None else min(self.chunk_size, total - submitted)
                        prep.submit(range(submitted, submitted + n))
                        submitted += n
                    taken = prep.take(stop)
                    if taken is None:  # stopped while waiting
                        break
                    tags, prepared = taken
                    cursor += len(tags)
                    skipped += self.commit(packer, prepared)
                    continue
                k += 1
                item = (b, slot, packer.held_tags(), cursor, skipped)
                skipped = []
                if pending is not None:
                    q.put(("batch", pending, False))
                pending = item
            if pending is not None and not stop.is_set():
                # records skipped after the final batch was made, and the final position, go
                # with it: the consumer stops at `last` and never reads the "end" message
                b, slot, _, _, before = pending
                pending, skipped = (b, slot, packer.held_tags(), cursor, before + skipped), []
                q.put(("batch", pending, True))
            q.put(("end", skipped, cursor))  # with no batch at all (everything skipped), the position too
        except BaseException as e:  # surfaced to the consumer by __next__
            if pending is not None and not stop.is_set():
                q.put(("batch", pending, False))  # a good batch made before the error comes first
            q.put(("error", e, None))
        finally:
            prep.close()  # no helper thread or worker process outlives the producer


# Loaders whose producer thread is running: stopped at interpreter exit (atexit runs before
# finalization), so no daemon producer is caught mid-way through freeing tensors (see _finish).
_RUNNING: "weakref.WeakSet[SFTLoader]" = weakref.WeakSet()


@atexit.register
def _close_running_loaders() -> None:
    for loader in list(_RUNNING):
        loader.close(timeout=10.0)  # a source stuck in __getitem__ must not hang the exit


def _check_positions(state: dict) -> None:
    """A loader state's stream positions must be what a loader can have saved: every fetched
    position (below `cursor`) either consumed (yielded or skipped) or held in the packer's
    buffer, once. A damaged checkpoint (held [10**12], or [3, 3, 3]) silently changed the data
    order; now it is refused."""
    cursor, held, consumed = state["cursor"], state["held"], state["consumed"]

    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not (count(cursor) and count(consumed) and isinstance(held, list) and all(count(t) for t in held)):
        raise ValueError(f"loader state: cursor, consumed and held must be non-negative ints (held a list), got "
                         f"cursor={cursor!r}, consumed={consumed!r}, held={str(held)[:80]}")
    if any(t >= cursor for t in held) or len(set(held)) != len(held) or consumed + len(held) != cursor:
        raise ValueError(f"loader state is inconsistent: {consumed} consumed + {len(held)} held positions "
                         f"(max {max(held, default=None)}, distinct {len(set(held))}) must account for cursor {cursor} once each")


class SFTLoader:
    def __init__(
        self,
        source,
        tokenizer=None,
        *,
        batch_size: int,
        seq_len: int,
        mode: str = "bestfit",
        buffer_size: int = 100,
        rank: int = 0,
        world_size: int = 1,
        num_epochs: int | None = 1,
        max_tokens: int | None = None,
        device="cpu",
        num_threads: int | None = None,
        chunk_size: int = 256,
        prefetch: int = 4,
        on_error: str = "fail",
        num_workers: int = 0,
        multiprocessing_context=None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if on_error not in ("fail", "skip"):
            raise ValueError(f'on_error must be "fail" or "skip", got {on_error!r}')
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        # prefetch bounds the queue; the ring of output buffers is sized from it, so an unbounded
        # queue (prefetch 0) would let the producer overwrite batches not yet copied out
        for name, value in (("prefetch", prefetch), ("chunk_size", chunk_size), ("max_tokens", max_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.mode, self.buffer_size = batch_size, seq_len, mode, buffer_size
        self.rank, self.world_size, self.num_epochs = rank, world_size, num_epochs
        # Render one token past the row so the packer sees (and counts) conversations that do not fit.
        self.max_tokens = max_tokens if max_tokens is not None else seq_len + 2
        self.device = torch.device(device)
        self.num_threads, self.chunk_size, self.prefetch, self.on_error = num_threads, chunk_size, prefetch, on_error
        self.num_workers, self.multiprocessing_context = num_workers, multiprocessing_context
        # conversations this rank sees per epoch: r, r+W, ... < len(source)
        self.per_epoch = len(range(rank, len(source), world_size))
        if self.per_epoch == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no conversations from a source of {len(source)}")
        self.errors: list[tuple[int, str]] = []
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.bos_id = self._bos_id()  # the padding id: checked now, not on every next()
        Packer(mode, batch_size, seq_len, 0, buffer_size)  # validate the settings now, not in the thread
        # Position in the stream of tags (tag t = epoch t // per_epoch, item t % per_epoch) and
        # what the packer held after the last *yielded* batch: together, the exact resume point.
        self._cursor = 0
        self._held: list[int] = []
        self._consumed = 0
        self._totals = dict(batches=0, rows=0, positions=0, pad=0, supervised=0, truncated=0, empty_rows=0, empty_batches=0, skipped=0)
        self._thread = None
        self._queue = None  # the running producer's queue and stop event
        self._stop = None
        self._done = False

    # --- source order ---
    def _spec(self) -> ChunkSpec:
        # in worker processes each renders on one thread unless told: the workers are the parallelism
        threads = self.num_threads if self.num_threads is not None or self.num_workers == 0 else 1
        return ChunkSpec(self.rank, self.world_size, self.per_epoch, self.max_tokens, threads, self.on_error)

    def _source_index(self, tag: int) -> int:
        return self._spec().source_index(tag)

    def _total_tags(self):
        return None if self.num_epochs is None else self.num_epochs * self.per_epoch

    def _bos_id(self):
        if self.tokenizer is not None:
            return self.tokenizer.special_token_id("<|bos|>") if hasattr(self.tokenizer, "special_token_id") else self.tokenizer.bos_id
        if getattr(self.source, "bos_id", None) is None:
            raise ValueError("with tokenizer=None the source must have a bos_id attribute (the padding id)")
        return self.source.bos_id

    def _start(self):
        # Worker processes start here, on the consumer's thread, before this run's producer
        # thread exists (fork copies only the calling thread).
        workers = None
        if self.num_workers > 0:
            workers = WorkerPool(self.num_workers, self.source, self.tokenizer, self._spec(), self.multiprocessing_context)
        try:
            producer = _Producer(self, list(self._held), self._cursor, workers)
            thread = threading.Thread(target=producer.run, daemon=True, name="sftfast-loader")
            thread.start()
        except BaseException:  # from here on the producer closes the workers; before, we do
            if workers is not None:
                workers.close()
            raise
        self._queue, self._stop, self._thread = producer.queue, producer.stop, thread
        _RUNNING.add(self)

    # --- iteration ---
    def __iter__(self):
        return self

    def __next__(self) -> LoaderBatch:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        kind, payload, last = self._queue.get()
        if kind == "error":
            self._finish()
            raise payload
        if kind == "end":
            self._note_skipped(payload)
            if last is not None:  # the cursor: every fetched conversation was consumed or skipped
                self._held, self._cursor = [], last
            self._finish()
            raise StopIteration
        b, slot, held, cursor, skipped = payload
        self._note_skipped(skipped)
        rows, t = b.num_rows, b.seq_len
        n = rows * t
        if self._pin:
            nb = dict(device=self.device, non_blocking=True)
            inputs = slot.inputs[:n].view(rows, t).to(**nb)
            targets = slot.targets[:n].view(rows, t).to(**nb)
            position_ids = slot.position_ids[:n].view(rows, t).to(**nb)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))  # the stream the copies went on
            slot.copied = ev
        else:
            # the slot is reused: copy out (NumPy's copy + from_numpy: 5 us a tensor, a third of
            # torch's slice/view/to dispatches, and this runs under the GIL once per batch)
            inputs, targets, position_ids = (torch.from_numpy(a[:n].reshape(rows, t).copy()) for a in slot.numpy)
            if self.device.type != "cpu":
                inputs, targets, position_ids = inputs.to(self.device), targets.to(self.device), position_ids.to(self.device)
        cu = torch.from_numpy(b.cu_seqlens).to(self.device)  # tiny, pageable: a plain copy
        # consumption: these conversations' tokens are now yielded
        self._consumed += len(b.tags)
        self._held, self._cursor = held, cursor
        tot = self._totals
        tot["batches"] += 1
        tot["rows"] += rows
        tot["positions"] += n
        tot["pad"] += b.num_pad
        tot["supervised"] += b.num_supervised
        tot["truncated"] += b.num_truncated
        tot["empty_rows"] += b.empty_rows
        tot["empty_batches"] += int(b.num_supervised == 0)
        if last:
            self._finish()
        return LoaderBatch(
            inputs, targets, position_ids, cu, b.doc_lens, b.num_supervised, b.num_pad, b.num_truncated, b.empty_rows,
            len(b.tags), self.epoch, last,
        )

    def _note_skipped(self, skipped):
        for tag, msg in skipped:
            if len(self.errors) < 10:
                warnings.warn(f"skipping bad conversation: {msg}", stacklevel=3)
            self.errors.append((self._source_index(tag), msg))
            self._consumed += 1
            self._totals["skipped"] += 1

    # --- progress and statistics ---
    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional), counting only yielded conversations."""
        return self._consumed / self.per_epoch

    @property
    def progress(self) -> float:
        """Fraction of all num_epochs consumed (0 when num_epochs is None)."""
        return 0.0 if self.num_epochs is None else self._consumed / (self.num_epochs * self.per_epoch)

    def stats(self) -> dict:
        tot = self._totals
        consumed = max(self._consumed, 1)
        return dict(
            epoch=self.epoch,
            conversations=self._consumed,
            batches=tot["batches"],
            supervised_tokens=tot["supervised"],
            positions=tot["positions"],
            padding=tot["pad"],
            padding_pct=100.0 * tot["pad"] / max(tot["positions"], 1),
            truncated_pct=100.0 * tot["truncated"] / consumed,
            truncated=tot["truncated"],
            empty_rows=tot["empty_rows"],
            empty_batches=tot["empty_batches"],
            skipped=tot["skipped"],
        )

    # --- checkpointing ---
    def state_dict(self) -> dict:
        """The resume point after the last yielded batch (plain ints and lists: JSON-safe)."""
        return dict(
            version=1, cursor=self._cursor, held=list(self._held), consumed=self._consumed, totals=dict(self._totals),
            errors=[[i, msg] for i, msg in self.errors], settings=self._settings(),
        )

    def _settings(self):
        return dict(
            batch_size=self.batch_size, seq_len=self.seq_len, mode=self.mode, buffer_size=self.buffer_size, rank=self.rank,
            world_size=self.world_size, source_len=len(self.source), max_tokens=self.max_tokens,
        )

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        if state["settings"] != self._settings():
            diff = {k: (v, self._settings().get(k)) for k, v in state["settings"].items() if self._settings().get(k) != v}
            raise ValueError(f"loader state was saved with other settings (saved, now): {diff}")
        _check_positions(state)
        total = self._total_tags()
        if total is not None and state["cursor"] > total:
            raise ValueError(f"loader state is at stream position {state['cursor']}, past the end of "
                             f"num_epochs={self.num_epochs} ({total} positions): it was saved with more epochs")
        self.close()
        self._cursor, self._held, self._consumed = state["cursor"], list(state["held"]), state["consumed"]
        self._totals = dict(state["totals"])
        # the skipped conversations so far stay listed (a state saved before errors were kept has none)
        self.errors = [(int(i), str(msg)) for i, msg in state.get("errors", [])]
        self._done = False

    def _finish(self) -> None:
        """The stream has ended: wait for the producer to exit now. A daemon thread still freeing
        its ring of tensors when the interpreter finalizes is killed inside torch's deallocator,
        which aborts the process ("terminate called without an active exception")."""
        self._done = True
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Stops the background thread (a later next() starts it again from the saved point).
        `timeout`: give up waiting for it after that many seconds (at interpreter exit)."""
        # Local copies: the exit hook may close a loader while a thread of the program closes it
        # too (the one cross-thread call a loader must survive).
        thread, stop, q = self._thread, self._stop, self._queue
        if thread is threading.current_thread():
            # The producer released the last reference to a loader nobody else holds, as it
            # ended: this is __del__ on the producer itself, which must not wait for itself.
            stop.set()
        elif thread is not None:
            stop.set()
            deadline = None if timeout is None else time.monotonic() + timeout
            while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
                try:  # unblock a producer waiting on a full queue
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            if self._thread is thread:
                self._thread = None
        _RUNNING.discard(self)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _demo():
    """python -m sftfast.dataloader: packs synthetic conversations and prints the stats."""
    import argparse

    from sftfast.bench.data import build_tokenizer, synthetic_conversations

    parser = argparse.ArgumentParser(description=_demo.__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mode", default="bestfit", choices=["bestfit", "padded"])
    args = parser.parse_args()
    tok = build_tokenizer()
    convs = synthetic_conversations(args.n, seed=0)
    loader = SFTLoader(convs, tok, batch_size=args.batch_size, seq_len=args.seq_len, mode=args.mode)
    t0 = time.perf_counter()
    tokens = sum(int(np.prod(b.inputs.shape)) for b in loader)
    dt = time.perf_counter() - t0
    print(dict(loader.stats(), tokens_per_s=tokens / dt))


if __name__ == "__main__":
    _demo()
