"""Memory-mapped shards of rendered conversations, as written by `python -m sftfast.prep`.

    from sftfast.shards import ShardDataset
    data = ShardDataset("shards/seed")          # validated, then memory-mapped (no copies)
    ids, mask = data[0]                          # np.uint32 / np.uint8 views, same length
    for i in data.rank_indices(rank, world_size, seed=42, epoch=0): ...
    loader = SFTLoader(data, None, batch_size=4, seq_len=2048, ...)   # pads with data.bos_id

Layout of a shard directory (see rust/src/shards.rs): `ids.u32` (little-endian uint32 token
ids, all conversations concatenated), `mask.u8` (one 0/1 byte per token), `offsets.u64`
(n+1 little-endian uint64: conversation i is tokens [off[i], off[i+1])), `manifest.json`.
Every rank on a machine maps the same files, so the OS page cache holds one copy.

Order: a shard keeps its inputs' order (a `--mixture` is already shuffled with its seed, as
nanochat's TaskMixture is). `order(seed, epoch)` gives a deterministic permutation when the
inputs need shuffling; `rank_indices` then deals rank r of W positions r, r+W, r+2W, ...
(SPEC 4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sftfast import _core

IDS_FILE, MASK_FILE, OFFSETS_FILE, MANIFEST_FILE, REPORT_FILE = _core.SHARD_FILES


def _map(path: Path, dtype: str) -> np.ndarray:
    # np.memmap refuses empty files; an empty shard is still a valid shard.
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    # A plain read-only ndarray over the map (the memmap stays alive as its base): slices are
    # views, and nothing downstream mistakes them for writable memmaps.
    return np.asarray(np.memmap(path, dtype=dtype, mode="r"))


def is_shard(path) -> bool:
    """True when `path` holds an sftfast shard manifest (whole or not, see ShardDataset)."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return False
    try:
        with open(manifest, encoding="utf-8") as f:
            return json.load(f).get("format") == "sftfast-shard"
    except (OSError, ValueError, AttributeError):
        return False


class ShardDataset:
    """A read-only shard: `len`, `[i] -> (ids, mask)`, deterministic orders for ranks."""

    def __init__(self, path):
        self.path = Path(path)
        # The Rust reader checks sizes, offsets and manifest counts once, and serves the training
        # loader whole chunks (rendered_chunk); NumPy maps the same files so items are zero-copy
        # views usable from Python and torch.
        self._reader = _core.ShardReader(str(self.path))
        with open(self.path / MANIFEST_FILE, encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.ids = _map(self.path / IDS_FILE, "<u4")
        self.mask = _map(self.path / MASK_FILE, "u1")
        self.offsets = _map(self.path / OFFSETS_FILE, "<u8")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    # Pickled as its path: DataLoader workers (spawn) and torch.multiprocessing re-map the
    # files instead of copying the arrays through a pipe.
    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"shard index must be an int, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"conversation index {i} out of range (shard {self.path} has {n})")
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[s:e], self.mask[s:e]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def rendered_chunk(self, indices, names=None, on_error: str = "fail") -> _core.RenderedChunk:
        """Conversations `indices` as one RenderedChunk, copied in Rust with the GIL released:
        what the training loader asks a pre-rendered source for, instead of `[i]` per item.
        Errors name `names` (default: the indices)."""
        return self._reader.rendered_chunk(indices, names, on_error)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def max_tokens(self) -> int:
        return int(self.manifest["max_tokens"])

    @property
    def bos_id(self) -> int:
        """`<|bos|>` of the tokenizer the shard was rendered with: the padding id packers need
        (sftfast.dataloader.SFTLoader(shard, None, ...) reads it)."""
        bos = (self.manifest.get("tokenizer") or {}).get("bos_id")
        if bos is None:
            raise _core.ShardError(f"{self.path}: the manifest does not record the tokenizer's <|bos|> id")
        return int(bos)

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return (self.manifest.get("tokenizer") or {}).get("fingerprint")

    def lengths(self) -> np.ndarray:
        """Tokens per conversation, (N,) int64."""
        return np.diff(self.offsets.astype(np.int64))

    def order(self, seed: int | None = None, epoch: int = 0) -> np.ndarray:
        """Conversation indices for an epoch: shard order when seed is None, else a
        permutation that depends only on (seed, epoch), identical on every rank."""
        n = len(self)
        if seed is None:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([seed, epoch]).permutation(n)

    def rank_indices(self, rank: int, world_size: int, seed: int | None = None, epoch: int = 0) -> np.ndarray:
        """Rank r of W takes positions r, r+W, r+2W, ... of `order(seed, epoch)`."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        return self.order(seed, epoch)[rank::world_size]

    def check_tokenizer(self, tokenizer) -> None:
        """Raises ShardError when the shard was rendered with a different tokenizer."""
        from sftfast.prep import tokenizer_fingerprint

        have = tokenizer_fingerprint(tokenizer)
        want = self.tokenizer_fingerprint
        if want != have:
            raise _core.ShardError(
                f"{self.path}: rendered with tokenizer {want}, but the given tokenizer is {have}; "
                "re-run python -m sftfast.prep with this tokenizer"
            )
        # The fingerprint covers the ranks and specials, not these copies the loader uses (bos_id
        # pads every batch): a manifest edited by hand must not change them silently.
        recorded = self.manifest.get("tokenizer") or {}
        for key, value in (("n_vocab", tokenizer.n_vocab), ("bos_id", tokenizer.bos_id)):
            if key in recorded and recorded[key] != value:
                raise _core.ShardError(
                    f"{self.path}: the manifest records tokenizer {key} {recorded[key]!r}, the tokenizer "
                    f"with the same fingerprint has {value}: the manifest was changed"
                )

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.path)!r}, conversations={len(self)}, tokens={self.num_tokens})"
