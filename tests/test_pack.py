"""Packers: the Rust Packer == the pure-Python reference (nanochat's best-fit, the seed's padded
collate) on random length distributions, plus the invariants: nothing dropped, nothing cropped
(except rows-too-long, counted), -1 at padding and unsupervised targets, doc boundaries."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftfast import Packer
from sftfast import reference as ref

BOS = 7


def make_rendered(lengths, seed=0):
    """Conversations shaped like rendered ones: bos first (mask 0), then random ids and a
    random 0/1 mask (a few all-zero, for empty-supervision rows)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = [BOS] + rng.integers(10, 50_000, size=n - 1).tolist()
        p = rng.choice([0.0, 0.5, 0.9])
        mask = [0] + (rng.random(n - 1) < p).astype(int).tolist()
        out.append((ids, mask))
    return out


def assert_same(rust_batches, ref_batches):
    assert len(rust_batches) == len(ref_batches)
    for b, r in zip(rust_batches, ref_batches):
        assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int64 and b.position_ids.dtype == np.int32
        np.testing.assert_array_equal(b.inputs, r.inputs)
        np.testing.assert_array_equal(b.targets, r.targets)
        np.testing.assert_array_equal(b.position_ids, r.position_ids)
        assert b.doc_lens == r.doc_lens
        assert b.tags == r.tags
        assert b.num_supervised == r.num_supervised
        assert b.empty_rows == r.empty_rows
        assert b.num_truncated == r.num_truncated


lengths_st = st.lists(st.integers(1, 80), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, batch_size=st.integers(1, 5), seq_len=st.integers(1, 64), buffer_size=st.integers(1, 12))
def test_bestfit_equals_reference(lengths, batch_size, seq_len, buffer_size):
    rendered = make_rendered(lengths, seed=len(lengths))
    got = Packer("bestfit", batch_size, seq_len, BOS, buffer_size).pack(rendered)
    want = ref.pack_bestfit(rendered, batch_size, seq_len, BOS, buffer_size)
    assert_same(got, want)
    # never drop: every conversation appears exactly once; rows have the fixed width
    assert sorted(t for b in got for t in b.tags) == list(range(len(lengths)))
    assert all(b.inputs.shape[1] == seq_len for b in got)
    assert sum(b.num_truncated for b in got) == sum(n > seq_len + 1 for n in lengths)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, batch_size=st.integers(1, 5), seq_len=st.integers(1, 64))
def test_padded_equals_reference(lengths, batch_size, seq_len):
    rendered = make_rendered(lengths, seed=len(lengths) + 1)
    got = Packer("padded", batch_size, seq_len, BOS).pack(rendered)
    assert_same(got, ref.pack_padded(rendered, batch_size, seq_len, BOS))


def test_bestfit_against_nanochat_loop_on_realistic_lengths():
    # a long, realistic stream: lognormal lengths around 300 tokens, some longer than the row
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(5.5, 0.8, size=3000), 8, 3000).astype(int).tolist()
    rendered = make_rendered(lengths, seed=2)
    got = Packer("bestfit", 4, 1024, BOS).pack(rendered)
    want = ref.pack_bestfit(rendered, 4, 1024, BOS)
    assert_same(got, want)
    pad = sum(b.num_pad for b in got) / sum(b.inputs.size for b in got)
    assert pad < 0.05, pad  # best-fit packs tightly on this distribution


def test_targets_and_boundaries_by_hand():
    # capacity 8: lengths 5, 4, 3, 2 -> row 0 = [5, 3], row 1 = [4, 2] + 2 padding
    rendered = [(list(range(100 * k, 100 * k + n)), [0] + [1] * (n - 1)) for k, n in enumerate([5, 4, 3, 2], start=1)]
    (b,) = Packer("bestfit", 2, 7, BOS).pack(rendered)
    np.testing.assert_array_equal(b.inputs[0], [100, 101, 102, 103, 104, 300, 301])
    np.testing.assert_array_equal(b.targets[0], [101, 102, 103, 104, -1, 301, 302])
    np.testing.assert_array_equal(b.inputs[1], [200, 201, 202, 203, 400, 401, BOS])
    np.testing.assert_array_equal(b.targets[1], [201, 202, 203, -1, 401, -1, -1])
    np.testing.assert_array_equal(b.position_ids[1], [0, 1, 2, 3, 0, 1, 0])
    assert b.doc_lens == [[5, 2], [4, 2, 1]] and b.row_docs == [2, 2]
    np.testing.assert_array_equal(b.cu_seqlens, [0, 5, 7, 11, 13, 14])
    assert b.num_pad == 1 and b.num_supervised == 10 and b.empty_rows == 0


def test_streaming_is_chunking_invariant_and_resumable():
    rendered = make_rendered(np.random.default_rng(3).integers(1, 60, size=400).tolist())
    whole = [b.tags for b in Packer("bestfit", 3, 50, BOS, 10).pack(rendered)]
    p = Packer("bestfit", 3, 50, BOS, 10)
    got = []
    for start in range(0, len(rendered), 17):
        p.feed(rendered[start : start + 17], tags=list(range(start, start + 17))[: len(rendered[start : start + 17])])
        while (b := p.next_batch()) is not None:
            got.append(b.tags)
        if start == 17 * 10:
            # resume: a fresh packer fed the held conversations in held order continues identically
            held = p.held_tags()
            q = Packer("bestfit", 3, 50, BOS, 10)
            q.feed([rendered[t] for t in held], tags=held)
            p = q
    while (b := p.next_batch(flush=True)) is not None:
        got.append(b.tags)
    assert got == whole


def test_caller_buffers_are_filled_in_place():
    rendered = make_rendered([30, 20, 10, 40, 5, 64])
    p = Packer("padded", 2, 63, BOS)
    p.feed(rendered)
    bufs = (np.full(2 * 63, -5, np.int32), np.full(2 * 63, -5, np.int64), np.full((2, 63), -5, np.int32))
    b = p.next_batch(out=bufs)
    assert b.inputs.shape == (2, 29)
    assert np.shares_memory(b.inputs, bufs[0]) and np.shares_memory(b.targets, bufs[1])
    np.testing.assert_array_equal(bufs[0][: 2 * 29].reshape(2, 29), ref.pack_padded(rendered[:2], 2, 63, BOS)[0].inputs)
    with pytest.raises(ValueError, match="too small"):
        p.next_batch(out=(np.zeros(3, np.int32), np.zeros(3, np.int64), np.zeros(3, np.int32)))
    with pytest.raises(ValueError, match="int64"):
        p.next_batch(out=(bufs[0], bufs[0], bufs[2]))
    # an array numpy will not lend for writing is an error, not a Rust panic
    read_only = np.zeros(2 * 63, np.int32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[0\] \(inputs\) must be a writable array"):
        p.next_batch(out=(read_only, bufs[1], bufs[2]))
    with pytest.raises(ValueError, match=r"out\[2\] \(position_ids\) must be a writable array distinct"):
        p.next_batch(out=(bufs[0], bufs[1], bufs[0]))  # the same int32 buffer twice
    assert p.next_batch(out=bufs) is not None  # the packer is unharmed


def test_ids_beyond_int32_are_refused():
    """inputs are int32: an id of 2**31 or more (a corrupt shard) would wrap to a negative input
    while its int64 target kept the true value."""
    p = Packer("bestfit", 1, 4, BOS)
    with pytest.raises(ValueError, match=r"tag 0: ids\[1\] = 3000000000 does not fit the int32 inputs"):
        p.feed([([BOS, 3_000_000_000, 5], [0, 1, 1])])
    with pytest.raises(ValueError, match="bos_id 4294967295 does not fit"):
        Packer("bestfit", 1, 4, 2**32 - 1)
    p.feed([(np.array([BOS, 2**31 - 1], np.uint32), [0, 1])])  # the largest id that fits
    assert p.next_batch(flush=True).targets[0, 0] == 2**31 - 1


def test_numpy_inputs_and_bad_input():
    p = Packer("bestfit", 1, 16, BOS)
    p.feed([(np.array([BOS, 5, 6], np.uint32), np.array([0, 1, 1], np.uint8))])
    p.feed([(np.array([BOS, 5], np.int64), np.array([False, True]))])
    assert p.num_held == 2
    with pytest.raises(ValueError, match="ids has 2 tokens but mask has 1"):
        p.feed([([BOS, 1], [0])])
    with pytest.raises(ValueError, match=r"mask\[1\] = 2"):
        p.feed([([BOS, 1], [0, 2])])
    with pytest.raises(ValueError, match="empty"):
        p.feed([([], [])])
    with pytest.raises(ValueError, match="unknown packing mode"):
        Packer("greedy", 1, 16, BOS)
    with pytest.raises(ValueError, match="batch_size"):
        Packer("bestfit", 0, 16, BOS)


def test_empty_supervision_rows_counted():
    rendered = [([BOS, 1, 2, 3], [0, 0, 0, 0]), ([BOS, 1, 2, 3], [0, 1, 1, 1])]
    (b,) = Packer("padded", 2, 10, BOS).pack(rendered)
    assert b.empty_rows == 1 and b.num_supervised == 3
    assert (b.targets[0] == -1).all()


# --- input kinds and bad items (the Python -> Rust input path) ---

ID_KINDS = {
    "list": lambda ids: list(ids),
    "tuple": lambda ids: tuple(ids),
    "int32": lambda ids: np.asarray(ids, np.int32),
    "uint32": lambda ids: np.asarray(ids, np.uint32),
    "int64": lambda ids: np.asarray(ids, np.int64),
    "uint64": lambda ids: np.asarray(ids, np.uint64),
    "strided int32": lambda ids: np.repeat(np.asarray(ids, np.int32), 2)[::2],
    "big-endian int32": lambda ids: np.asarray(ids, ">i4"),
    "list of numpy ints": lambda ids: [np.int64(x) for x in ids],
    "list of int subclass": lambda ids: [type("Tok", (int,), {})(x) for x in ids],
}
MASK_KINDS = {
    "list": lambda m: list(m),
    "list of bools": lambda m: [bool(x) for x in m],
    "uint8": lambda m: np.asarray(m, np.uint8),
    "bool": lambda m: np.asarray(m, bool),
    "int32": lambda m: np.asarray(m, np.int32),
    "int64": lambda m: np.asarray(m, np.int64),
    "strided uint8": lambda m: np.repeat(np.asarray(m, np.uint8), 2)[::2],
    "strided bool": lambda m: np.repeat(np.asarray(m, bool), 3)[::3],
}


@pytest.mark.parametrize("id_kind", list(ID_KINDS))
@pytest.mark.parametrize("mask_kind", list(MASK_KINDS))
def test_every_input_kind_packs_like_lists(id_kind, mask_kind):
    rendered = make_rendered(np.random.default_rng(4).integers(1, 60, size=40).tolist(), seed=5)
    # ids on both sides of the in-place int read's 2^30 limit, and the largest int32 input
    rendered[3][0][1:4] = [2**30 - 1, 2**30, 2**31 - 1]
    want = Packer("bestfit", 2, 40, BOS, 8).pack(rendered)
    assert_same(want, ref.pack_bestfit(rendered, 2, 40, BOS, 8))
    converted = [(ID_KINDS[id_kind](i), MASK_KINDS[mask_kind](m)) for i, m in rendered]
    assert_same(Packer("bestfit", 2, 40, BOS, 8).pack(converted), want)


def test_pack_streams_long_inputs_with_the_same_batches():
    # pack feeds in chunks of a few hundred conversations: the batches (and tags) must be
    # those of feeding everything first, across chunk boundaries
    lengths = np.random.default_rng(6).integers(1, 120, size=1500).tolist()
    rendered = make_rendered(lengths, seed=7)
    got = Packer("bestfit", 3, 100, BOS, 20).pack(rendered)
    assert_same(got, ref.pack_bestfit(rendered, 3, 100, BOS, 20))
    p = Packer("bestfit", 3, 100, BOS, 20)
    p.feed(rendered)
    whole = []
    while (b := p.next_batch(flush=True)) is not None:
        whole.append(b)
    assert_same(got, whole)
    assert_same(Packer("padded", 5, 100, BOS).pack(rendered), ref.pack_padded(rendered, 5, 100, BOS))


BAD_IDS = [
    (-1, r"ids\[2\] = -1 is not a non-negative 32-bit int"),
    (2**32, r"ids\[2\] = 4294967296 is not"),
    (2**70, r"ids\[2\] = 1180591620717411303424 is not"),
    (1.5, r"ids\[2\] = 1.5 is not"),
    ("7", r"ids\[2\] = 7 is not"),
    (None, r"ids\[2\] = None is not"),
]


@pytest.mark.parametrize("item,msg", BAD_IDS)
def test_bad_id_item_names_conversation_and_position(item, msg):
    # conversation 700 lies past pack's first chunk: the index is the absolute one
    rendered = make_rendered([5] * 800)
    rendered[700][0][2] = item
    with pytest.raises(ValueError, match=r"conversation tag 700: " + msg):
        Packer("bestfit", 2, 16, BOS).pack(rendered)


@pytest.mark.parametrize(
    "ids,msg",
    [
        (np.array([BOS, 1, -3], np.int32), r"conversation tag 1: ids\[2\] = -3 is not"),
        (np.array([BOS, 2**33, 1], np.int64), r"conversation tag 1: ids\[1\] = 8589934592 is not"),
        (np.array([BOS, 1, -1], np.int8), r"conversation tag 1: ids\[2\] = -1 is not"),
        (np.array([BOS, 1.0, 2.0]), r"conversation tag 1: ids must be a list of non-negative ints or a 1-D integer array"),
        (np.array([[BOS, 1, 2]], np.int32), r"conversation tag 1: ids must be a list"),
        ("abc", r"conversation tag 1: ids must be a list"),
    ],
)
def test_bad_id_arrays(ids, msg):
    rendered = [([BOS, 1, 2], [0, 1, 1]), (ids, [0, 1, 1])]
    with pytest.raises(ValueError, match=msg):
        Packer("padded", 2, 16, BOS).pack(rendered)


@pytest.mark.parametrize(
    "mask,msg",
    [
        ([0, 1, 2], r"mask\[2\] = 2 \(must be 0 or 1\)"),
        ([0, -1, 1], r"mask\[1\] = -1 \(must be 0 or 1\)"),
        ([0, 1, "1"], r"mask\[2\] = 1 \(must be 0 or 1\)"),
        ([0, 1, 0.0], r"mask\[2\] = 0.0 \(must be 0 or 1\)"),
        (np.array([0, 3, 1], np.uint8), r"mask\[1\] = 3 \(must be 0 or 1\)"),
        (np.array([0, 1, 5], np.int64), r"mask\[2\] = 5 \(must be 0 or 1\)"),
        (np.array([0, 1, -1], np.int32), r"mask\[2\] = -1 is not a non-negative 32-bit int"),
    ],
)
def test_bad_mask_items(mask, msg):
    rendered = [([BOS, 1, 2], [0, 1, 1])] * 3 + [([BOS, 1, 2], mask)]
    with pytest.raises(ValueError, match=r"conversation tag 3: " + msg):
        Packer("bestfit", 2, 16, BOS).pack(rendered)
    # tags given to feed name the conversation instead of its position
    with pytest.raises(ValueError, match=r"conversation tag 42: " + msg):
        Packer("bestfit", 2, 16, BOS).feed([([BOS, 1, 2], mask)], tags=[42])


def test_list_changed_while_read_is_an_error_not_a_crash():
    ids = [BOS, 1, 2, 3]

    class Shrinks:
        def __index__(self):
            ids.clear()
            return 1

    ids[1] = Shrinks()
    with pytest.raises(ValueError, match=r"conversation tag 0: ids list changed while it was read"):
        Packer("bestfit", 1, 16, BOS).feed([(ids, [0, 1, 1, 1])])
    mask = [0, 1, 1, 1]

    class ShrinksMask:
        def __index__(self):
            mask.clear()
            return 1

    mask[1] = ShrinksMask()
    with pytest.raises(ValueError, match=r"conversation tag 0: mask list changed while it was read"):
        Packer("bestfit", 1, 16, BOS).feed([([BOS, 1, 2, 3], mask)])


@pytest.mark.parametrize("mode", ["bestfit", "padded"])
def test_truncated_tokens_add_up_within_a_batch(mode):
    # two conversations cut in one batch (capacity 5: cut by 3 and by 6)
    rendered = [([7] + [11] * 7, [0] + [1] * 7), ([7] + [12] * 10, [0] + [1] * 10)]
    (b,) = Packer(mode, 2, 4, 7, 10).pack(rendered)
    assert (b.num_truncated, b.truncated_tokens) == (2, 9)


@pytest.mark.parametrize("args,msg", [
    (("bestfit", 1, 8, 7, 0), "buffer_size must be at least 1"),  # else no batch, silently
    (("bestfit", 1, 0, 7, 4), "seq_len must be at least 1"),
    (("padded", 1, 0, 7), "seq_len must be at least 1"),
])
def test_zero_sizes_are_refused(args, msg):
    with pytest.raises(ValueError, match=msg):
        Packer(*args)
