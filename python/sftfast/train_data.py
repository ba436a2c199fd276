"""The trainer's data: where training conversations come from and how they become batches.

    loader = make_loader(dataset, tokenizer, batch_size, seq_len, rank, world_size)   # Rust SFTLoader
    batch = loader.next()          # Batch(inputs, targets, doc_ids, progress)

- `read_training_data(path)`: a shard directory from `python -m sftfast.prep` (memory-mapped,
  already rendered) or a JSONL file, shuffled with seed 42.
- `RustLoader`: sftfast.dataloader.SFTLoader (Rust rendering and packing on a background thread,
  pinned buffers on CUDA) behind the trainer's small interface.
- `PyPackedLoader`: nanochat's data path in plain Python (tiktoken, sftfast.reference rendering,
  best-fit packing), the baseline `python -m sftfast.bench train` measures; `--loader python`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


# -----------------------------------------------------------------------------
# The Python data path: tiktoken encoding, sftfast.reference rendering and best-fit packing in
# plain Python (nanochat's data path). `python -m sftfast.bench train` measures it against the
# Rust loader (sftfast.dataloader.SFTLoader, the default), and `--loader python` selects it.

def read_jsonl_conversations(path) -> list:
    """One conversation per line: {"messages": [...]} or a bare list of messages, read and
    checked as sftfast.tasks.CustomJSON does (a bad line raises naming file:line)."""
    from sftfast.tasks.customjson import CustomJSON

    return list(CustomJSON(str(path)))


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, -1 = ignore
    doc_ids: torch.Tensor  # (B, T) int32, one label per conversation in the row (padding: its own label)
    progress: float  # epochs consumed by this rank after this batch


class PyPackedLoader:
    """Rank r of W takes conversations r, r+W, ... of `dataset`; rows of seq_len+1 tokens.

    bestfit: from a buffer of `buffer_size` rendered conversations take the largest that fits the
    row's remaining space; when none fits, pad the rest (pad id = bos, targets -1). A conversation
    longer than the row is truncated to it when it enters the buffer, as nanochat and
    sftfast.reference.pack_bestfit do (counted in `n_truncated` when it is used). padded: one conversation per
    row, padded to the longest of the batch (the seed's collate_and_yield).
    state_dict() holds the cursor and the indices in the buffer, so a resumed loader yields the
    same batches as one that never stopped. With `num_epochs` the stream ends after that many
    passes over the shard, every conversation used once per pass (the final batch may have fewer
    rows), and next() then returns None; with None it never ends (nanochat's generator).
    """

    def __init__(self, dataset, tokenizer, batch_size, seq_len, rank=0, world_size=1, packing="bestfit", buffer_size=100,
                 num_epochs=None):
        if packing not in ("bestfit", "padded"):
            raise ValueError(f"unknown packing {packing!r}")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world = rank, world_size
        self.packing, self.buffer_size = packing, buffer_size
        self.shard_len = len(range(rank, len(dataset), world_size))
        if self.shard_len == 0:
            raise ValueError(f"dataset of {len(dataset)} conversations leaves rank {rank} of {world_size} nothing")
        self.bos = tokenizer.special_token_id("<|bos|>")
        from sftfast import reference

        self._render, self._enc = reference.render_conversation, tokenizer.to_tiktoken()
        self.cursor, self.consumed, self.n_truncated = 0, 0, 0  # cursor: position within this rank's shard
        self.totals = dict(batches=0, positions=0, pad=0, supervised=0, empty_rows=0, empty_batches=0)
        self.end = None if num_epochs is None else num_epochs * self.shard_len  # the cursor's end, if any
        self.buffer: list[tuple[int, list[int], list[int], bool]] = []  # (shard position, ids, mask, truncated)

    def _fetch(self):
        index = self.rank + (self.cursor % self.shard_len) * self.world
        ids, mask = self._render(self._enc, self.dataset[index], max_tokens=self.T + 2, location=f"conversation {index}")
        row = self.T + 1
        self.buffer.append((self.cursor, ids[:row], mask[:row], len(ids) > row))
        self.cursor += 1

    def _take(self, k):
        _, ids, mask, truncated = self.buffer.pop(k)
        self.consumed += 1
        self.n_truncated += truncated
        return ids, mask

    def _fill(self, size):
        while len(self.buffer) < size and (self.end is None or self.cursor < self.end):
            self._fetch()

    def next(self) -> Batch | None:
        rows = []
        if self.packing == "padded":
            self._fill(self.B)
            rows = [self._take(0) for _ in range(min(self.B, len(self.buffer)))]
            if not rows:
                return None
            width = max(len(r[0]) for r in rows)
        else:
            width = self.T + 1
            for _ in range(self.B):
                row_ids, row_mask, row_docs, space, n_docs = [], [], [], width, 0
                while True:
                    self._fill(self.buffer_size)
                    fits = [(len(b[1]), -k) for k, b in enumerate(self.buffer) if len(b[1]) <= space]
                    if not fits:  # on an empty row only once the stream has ended (everything fits a row)
                        break
                    ids, mask = self._take(-max(fits)[1])  # largest that fits; the oldest among equals
                    row_docs.extend([n_docs] * len(ids))
                    n_docs += 1
                    row_ids.extend(ids)
                    row_mask.extend(mask)
                    space -= len(ids)
                    if space == 0:
                        break
                if not row_ids:  # the stream has ended
                    break
                rows.append((row_ids, row_mask, row_docs))
            if not rows:
                return None
        inputs = np.full((len(rows), width), self.bos, dtype=np.int64)
        targets_mask = np.zeros((len(rows), width), dtype=bool)
        doc_ids = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            ids, mask = row[0][:width], row[1][:width]
            n = len(ids)
            inputs[i, :n] = ids
            targets_mask[i, :n] = np.asarray(mask, dtype=bool)
            docs = row[2] if len(row) > 2 else [0] * n
            doc_ids[i, :n] = docs[:n]
            doc_ids[i, n:] = (docs[n - 1] + 1) if n else 0  # padding: a conversation of its own
        targets = np.where(targets_mask[:, 1:], inputs[:, 1:], -1)
        supervised = (targets != -1).sum(axis=1)
        tot = self.totals
        tot["batches"] += 1
        tot["positions"] += targets.size
        tot["pad"] += sum(width - 1 - min(len(row[0]), width - 1) for row in rows)
        tot["supervised"] += int(supervised.sum())
        tot["empty_rows"] += int((supervised == 0).sum())
        tot["empty_batches"] += int(supervised.sum() == 0)
        return Batch(
            torch.from_numpy(inputs[:, :-1].copy()), torch.from_numpy(targets),
            torch.from_numpy(doc_ids[:, :-1].copy()), self.consumed / self.shard_len,
        )

    def stats(self) -> dict:
        """The same counts as SFTLoader.stats() (this loader skips nothing: it raises)."""
        tot, consumed = self.totals, max(self.consumed, 1)
        return dict(epoch=self.consumed / self.shard_len, conversations=self.consumed, batches=tot["batches"],
                    supervised_tokens=tot["supervised"], positions=tot["positions"], padding=tot["pad"],
                    padding_pct=100.0 * tot["pad"] / max(tot["positions"], 1),
                    truncated_pct=100.0 * self.n_truncated / consumed, truncated=self.n_truncated,
                    empty_rows=tot["empty_rows"], empty_batches=tot["empty_batches"], skipped=0)

    def state_dict(self) -> dict:
        return dict(cursor=self.cursor, consumed=self.consumed, n_truncated=self.n_truncated,
                    buffer=[b[0] for b in self.buffer], totals=dict(self.totals))

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self.n_truncated = int(state["consumed"]), int(state["n_truncated"])
        self.totals.update(state.get("totals", {}))
        self.buffer = []
        for pos in state["buffer"]:  # re-render the buffered conversations
            self.cursor = int(pos)
            self._fetch()
        self.cursor = int(state["cursor"])


class Shuffled:
    """A fixed permutation of a dataset (seed 42, as nanochat's TaskMixture): a file or shard
    built from several sources in order must not be trained source after source under a
    decaying learning rate. Same order on every rank; the loader then deals rank r of W
    positions r, r+W, ... of it."""

    def __init__(self, dataset, seed: int = 42):
        self.dataset = dataset
        self.order = np.random.default_rng(seed).permutation(len(dataset))
        self.prerendered = getattr(dataset, "prerendered", False)
        if self.prerendered:
            self.bos_id = dataset.bos_id  # the padding id of a pre-rendered source

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        return self.dataset[int(self.order[i])]


class ShuffledShard(Shuffled):
    """Shuffled over a shard: also serves the loader whole chunks (ShardDataset.rendered_chunk),
    with errors named by the shuffled position, as `[i]` would be."""

    def rendered_chunk(self, indices, names=None, on_error: str = "fail"):
        order = self.order[np.asarray(indices, dtype=np.int64)].tolist()
        return self.dataset.rendered_chunk(order, list(indices) if names is None else names, on_error)


def read_training_data(path, tokenizer, shuffle: bool = True):
    """A shard directory written by `python -m sftfast.prep` (checked against the tokenizer,
    items already rendered), or a JSONL file of conversations; shuffled with seed 42."""
    from sftfast.shards import MANIFEST_FILE, ShardDataset, is_shard

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    # A directory with a manifest is meant as a shard: a damaged manifest is reported as such
    # (ShardDataset says what is wrong) rather than the path being read as a JSONL file.
    if is_shard(path) or (Path(path) / MANIFEST_FILE).is_file():
        data = ShardDataset(path)
        data.check_tokenizer(tokenizer)
        data.prerendered = True
    elif Path(path).is_dir():
        raise ValueError(f"{path} is a directory without {MANIFEST_FILE}: not a shard written by "
                         "python -m sftfast.prep (give that, or a JSONL file)")
    else:
        data = read_jsonl_conversations(path)
    if not shuffle:
        return data
    return ShuffledShard(data) if isinstance(data, ShardDataset) else Shuffled(data)


def data_fingerprint(dataset, samples: int = 64) -> dict:
    """{"n": len, "samples": [[index, digest], ...]}: short SHA-256s of `samples` evenly spaced
    items. A checkpoint keeps it so that --resume can tell whether the data changed underneath
    (a new hub revision, an edited JSONL, a rebuilt shard): the loader state is a position, and
    a position in different data does not give the batches the run would have seen. A sample
    catches a new revision, a reordering or a changed count, not every edited line of a big file."""
    import hashlib
    import json

    n = len(dataset)
    indices = sorted({i * n // samples for i in range(samples)}) if n else []
    out = []
    for i in indices:
        item = dataset[i]
        if isinstance(item, tuple) and all(isinstance(a, np.ndarray) for a in item):  # a shard's (ids, mask)
            blob = b"".join(np.ascontiguousarray(a).tobytes() + str(a.dtype).encode() for a in item)
        else:  # a conversation: its JSON with sorted keys
            blob = json.dumps(item, sort_keys=True, ensure_ascii=False, default=repr).encode("utf-8")
        out.append([i, hashlib.sha256(blob).hexdigest()[:16]])
    return {"n": n, "samples": out}


def fingerprint_difference(saved: dict, now: dict) -> str | None:
    """None when two data fingerprints agree, else what differs, in words."""
    if saved.get("n") != now["n"]:
        return f"{now['n']} training conversations, the checkpoint's run had {saved.get('n')}"
    saved_samples = saved.get("samples")
    if not isinstance(saved_samples, list) or [s[0] for s in saved_samples] != [s[0] for s in now["samples"]]:
        return None  # sampled otherwise (another version): nothing to compare
    changed = [i for (i, a), (_, b) in zip(saved_samples, now["samples"]) if a != b]
    if changed:
        shown = ", ".join(map(str, changed[:5])) + (" ..." if len(changed) > 5 else "")
        one = len(changed) == 1
        return f"training conversation{'' if one else 's'} {shown} differ{'s' if one else ''} from the checkpoint's run"
    return None


def make_loader(dataset, tokenizer, batch_size, seq_len, rank, world_size, packing="bestfit", impl="rust", device="cpu",
                num_workers=0, num_epochs=None):
    """The Rust loader (sftfast.dataloader.SFTLoader) or, with impl="python", the Python one.
    A preprocessed shard is already rendered: the loader packs its (ids, mask) pairs directly.
    num_workers: processes that read and render for the Rust loader (0: a helper thread).
    num_epochs: passes over the data, after which next() returns None (None: endless)."""
    if getattr(dataset, "prerendered", False):
        if impl != "rust":
            raise ValueError("--loader python renders conversations; a preprocessed shard needs --loader rust")
        tokenizer = None
    if impl == "python":
        if num_workers:
            raise ValueError("--loader-workers needs --loader rust (the Python loader has no workers)")
        return PyPackedLoader(dataset, tokenizer, batch_size, seq_len, rank, world_size, packing, num_epochs=num_epochs)
    if impl != "rust":
        raise ValueError(f"unknown loader {impl!r}")
    return RustLoader(dataset, tokenizer, batch_size, seq_len, rank, world_size, packing, device, num_workers, num_epochs)


class RustLoader:
    """SFTLoader (Rust rendering + packing on a background thread, pinned buffers on CUDA) behind
    the trainer's interface: next() -> Batch (None once num_epochs are consumed), consumed,
    shard_len, state_dict/load_state_dict."""

    def __init__(self, dataset, tokenizer, batch_size, seq_len, rank, world_size, packing, device, num_workers=0,
                 num_epochs=None):
        from sftfast.dataloader import SFTLoader

        self.loader = SFTLoader(dataset, tokenizer, batch_size=batch_size, seq_len=seq_len, mode=packing, rank=rank,
                                world_size=world_size, num_epochs=num_epochs, device=device, num_workers=num_workers)
        self.shard_len = self.loader.per_epoch

    @property
    def consumed(self) -> int:
        return self.loader._consumed

    @property
    def n_truncated(self) -> int:
        return self.loader.stats()["truncated"]

    def next(self) -> Batch | None:
        b = next(self.loader, None)
        if b is None:
            return None
        # position ids restart at 0 at each conversation (and at a row's padding tail): one label each
        doc_ids = (b.position_ids == 0).cumsum(dim=1, dtype=torch.int32)
        return Batch(b.inputs.long(), b.targets, doc_ids, b.epoch)

    def stats(self) -> dict:
        return self.loader.stats()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
