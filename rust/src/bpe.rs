//! Byte-level BPE, identical to tiktoken: pre-split with the pattern, then inside each
//! piece repeatedly merge the adjacent pair whose concatenation has the lowest rank
//! (leftmost on ties), until no adjacent pair is in the vocabulary.
//!
//! Performance notes (what was tried, what was measured; shared 2-core x86_64 under load, so
//! figures are rough; BPE only, pre-split excluded, cl100k ranks, 0.2 MB of English prose):
//! - Whole-piece lookup first: most pieces of prose are single tokens (93% here), so one
//!   probe replaces the merge loop entirely (tiktoken does this too).
//! - Short pieces use tiktoken's loop (linear scans for the minimum over a small array);
//!   the scratch array is reused across pieces instead of allocated per piece.
//! - Lookups go through `TokenTable` (inline 8-byte prefixes, one cache line per probe).
//!   With `FxHashMap<Vec<u8>, Rank>` (a pointer chase to each key per probe) the pass took
//!   ~40 ms; with the table ~18 ms; reading short prefixes with overlapping loads instead
//!   of a copy into a buffer (which compiled to a `memcpy` call) brought it to ~2-4 ms.
//! - tiktoken's loop is O(n^2) on one long piece (100K of one letter, `^` x 1M). Pieces
//!   longer than `LONG_MERGE_MIN_LEN` use a linked list over the parts plus a blocked
//!   minimum of (rank, start) keys: O(n log n), same merges in the same order (lowest rank
//!   first, leftmost start on ties), so the same ids. Tried first: a binary heap with lazy
//!   invalidation (1.3 s for 1 MB of `a`, mostly cache misses in sift-down), then a segment
//!   tree over all positions (0.27 s, 28 B/byte); the blocked minimum runs the same 0.27 s
//!   in 12 B/byte. 100 KB -> 1 MB of `a`: 24.5 ms -> 270 ms.
//! - The decoder stores all token bytes in one buffer with (offset, len) spans: one
//!   allocation instead of 100K small ones. Resident memory after loading cl100k: +9 MB
//!   (tiktoken: +40 MB, its Python `Encoding` also keeps a dict of the ranks).
//! - Not done: a per-thread cache of frequent pieces. The whole-piece probe already
//!   catches frequent pieces in one probe; a cache would add a second probe to misses.

use crate::error::{Error, Result};
use crate::pretokenize::Pretokenizer;
use rustc_hash::FxHashMap;
use std::sync::OnceLock;

pub type Rank = u32;

/// The nine chat special tokens, appended after the ranks in this order (SPEC 2).
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

/// Pieces at least this long are merged with `merge_long`; shorter ones with tiktoken's loop.
/// The loop scans all parts per merge, so its cost grows as len^2. Measured on runs of the
/// prose's letters (cl100k ranks, ms per 150 KB, short / long): len 64: 22-27 / 36-40;
/// len 128: 28-29 / 27-34; len 256: 37-40 / 28-31; len 1024: 93-100 / 29-52.
const LONG_MERGE_MIN_LEN: usize = 128;

/// How far past the ordinary ids a special token's id may lie (ids index dense tables).
const MAX_SPECIAL_GAP: usize = 1 << 20;

pub struct CoreBPE {
    /// bytes -> rank, the lookup of the hot loop (see `TokenTable`).
    table: TokenTable,
    /// bytes -> rank as a hash map, built only if a caller asks for it (`encoder()`).
    encoder: OnceLock<FxHashMap<Vec<u8>, Rank>>,
    /// id -> (offset, len) into `token_data`, for ordinary tokens (len 0: a hole or a special).
    spans: Vec<(u32, u32)>,
    token_data: Vec<u8>,
    /// special token name -> id, in insertion order.
    specials: Vec<(String, Rank)>,
    pretokenizer: Pretokenizer,
    n_vocab: usize,
}

impl CoreBPE {
    /// Builds from mergeable ranks, a split pattern, and special tokens with their ids.
    ///
    /// Every single byte must have a rank (byte-level BPE must be able to encode any text),
    /// ranks must be distinct, tokens non-empty, and special ids must not collide with ranks
    /// or with each other.
    pub fn new(
        encoder: FxHashMap<Vec<u8>, Rank>,
        pattern: &str,
        specials: Vec<(String, Rank)>,
    ) -> Result<Self> {
        let pretokenizer = Pretokenizer::new(pattern)?;
        Self::with_pretokenizer(encoder, pretokenizer, specials)
    }

    pub fn with_pretokenizer(
        encoder: FxHashMap<Vec<u8>, Rank>,
        pretokenizer: Pretokenizer,
        specials: Vec<(String, Rank)>,
    ) -> Result<Self> {
        let max_rank = encoder.values().copied().max();
        let n_ranks = max_rank.map_or(0, |r| r as usize + 1);
        // Ids index dense tables, so a stray huge rank would allocate gigabytes: allow holes,
        // but not more holes than tokens.
        if n_ranks > 2 * encoder.len() + 1024 {
            return Err(Error::Vocab(format!(
                "max rank {} is far beyond the {} tokens given (ranks should be 0..n)",
                n_ranks - 1,
                encoder.len()
            )));
        }
        let mut n_vocab = n_ranks;
        let mut spans: Vec<(u32, u32)> = vec![(0, 0); n_ranks];
        let total: usize = encoder.keys().map(|k| k.len()).sum();
        if total > u32::MAX as usize {
            return Err(Error::Vocab("token bytes exceed 4 GiB".into()));
        }
        let mut token_data = Vec::with_capacity(total);
        // Fill in rank order so the buffer's layout does not depend on hash order.
        let mut by_rank: Vec<(&[u8], Rank)> =
            encoder.iter().map(|(k, &v)| (k.as_slice(), v)).collect();
        by_rank.sort_unstable_by_key(|&(_, r)| r);
        for w in by_rank.windows(2) {
            if w[0].1 == w[1].1 {
                return Err(Error::Vocab(format!(
                    "rank {} is given to two different tokens ({:?} and {:?})",
                    w[0].1,
                    String::from_utf8_lossy(w[0].0),
                    String::from_utf8_lossy(w[1].0)
                )));
            }
        }
        for &(bytes, rank) in &by_rank {
            if bytes.is_empty() {
                return Err(Error::Vocab(format!(
                    "rank {rank} is given to the empty token"
                )));
            }
            spans[rank as usize] = (token_data.len() as u32, bytes.len() as u32);
            token_data.extend_from_slice(bytes);
        }
        drop(by_rank);
        for b in 0..=255u8 {
            if !encoder.contains_key(&[b][..]) {
                return Err(Error::Vocab(format!(
                    "byte 0x{b:02x} has no rank: a byte-level vocabulary needs all 256 single bytes"
                )));
            }
        }
        for (i, (name, id)) in specials.iter().enumerate() {
            if (*id as usize) < spans.len() && spans[*id as usize].1 != 0 {
                return Err(Error::Vocab(format!(
                    "special token {name:?} id {id} collides with an ordinary token"
                )));
            }
            if let Some((other, _)) = specials[..i].iter().find(|(_, oid)| oid == id) {
                return Err(Error::Vocab(format!(
                    "special tokens {other:?} and {name:?} share id {id}"
                )));
            }
            if specials[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Vocab(format!(
                    "special token {name:?} is listed twice"
                )));
            }
            if *id as usize > n_ranks + specials.len() + MAX_SPECIAL_GAP {
                return Err(Error::Vocab(format!(
                    "special token {name:?} id {id} is far beyond the {n_ranks} ordinary tokens"
                )));
            }
            n_vocab = n_vocab.max(*id as usize + 1);
        }
        let table = TokenTable::new(&spans, &token_data);
        Ok(Self {
            table,
            encoder: OnceLock::new(),
            spans,
            token_data,
            specials,
            pretokenizer,
            n_vocab,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Number of ordinary (mergeable) ranks: max rank + 1.
    pub fn n_ranks(&self) -> usize {
        self.spans.len()
    }

    pub fn pattern(&self) -> &str {
        self.pretokenizer.pattern()
    }

    /// bytes -> rank as a hash map (built on first call; the encoder itself does not use it).
    pub fn encoder(&self) -> &FxHashMap<Vec<u8>, Rank> {
        self.encoder.get_or_init(|| {
            self.ranks_in_order()
                .map(|(b, r)| (b.to_vec(), r))
                .collect()
        })
    }

    /// The rank of `bytes`, if it is an ordinary token.
    #[inline]
    pub fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        self.table.get(bytes, &self.token_data, &self.spans)
    }

    pub fn specials(&self) -> &[(String, Rank)] {
        &self.specials
    }

    pub fn special_token_id(&self, name: &str) -> Option<Rank> {
        self.specials
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }

    /// The bytes of ordinary token `id` (None for specials and holes).
    #[inline]
    pub fn token(&self, id: Rank) -> Option<&[u8]> {
        let &(off, len) = self.spans.get(id as usize)?;
        if len == 0 {
            return None;
        }
        Some(&self.token_data[off as usize..(off + len) as usize])
    }

    /// (bytes, rank) for every ordinary token, in rank order.
    pub fn ranks_in_order(&self) -> impl Iterator<Item = (&[u8], Rank)> + '_ {
        (0..self.spans.len() as Rank).filter_map(move |r| self.token(r).map(|b| (b, r)))
    }

    /// Ordinary encoding: special-token text is just text.
    pub fn encode_ordinary(&self, text: &str) -> Vec<Rank> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_ordinary_into(text, &mut out);
        out
    }

    /// Appends the ids of `text` to `out` (lets callers render without reallocating).
    pub fn encode_ordinary_into(&self, text: &str, out: &mut Vec<Rank>) {
        let mut scratch = Vec::new();
        self.pretokenizer.for_each_piece(text, |piece| {
            self.encode_piece(piece.as_bytes(), &mut scratch, out);
        });
    }

    /// BPE of one pre-split piece, appended to `out`. `scratch` is reused between calls.
    #[inline]
    pub fn encode_piece(&self, piece: &[u8], scratch: &mut Vec<(u32, Rank)>, out: &mut Vec<Rank>) {
        if let Some(rank) = self.rank(piece) {
            out.push(rank);
        } else if piece.len() < LONG_MERGE_MIN_LEN {
            merge_short(piece, |b| self.rank(b), scratch, out);
        } else {
            merge_long(piece, |b| self.rank(b), out);
        }
    }

    /// Bytes of the given ids; an id outside the vocabulary is an error naming its index.
    pub fn decode_bytes(&self, ids: &[Rank]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        self.decode_bytes_into(ids, &mut out)?;
        Ok(out)
    }

    pub fn decode_bytes_into(&self, ids: &[Rank], out: &mut Vec<u8>) -> Result<()> {
        for (index, &id) in ids.iter().enumerate() {
            match self.token(id) {
                Some(bytes) => out.extend_from_slice(bytes),
                None => match self.specials.iter().find(|&&(_, sid)| sid == id) {
                    Some((name, _)) => out.extend_from_slice(name.as_bytes()),
                    None => {
                        return Err(Error::TokenOutOfRange {
                            id,
                            index,
                            n_vocab: self.n_vocab,
                        })
                    }
                },
            }
        }
        Ok(())
    }

    /// Byte length of each id's token; 0 for special tokens (used for bits per byte).
    pub fn token_byte_lengths(&self) -> Vec<u32> {
        let mut lens = vec![0u32; self.n_vocab];
        for (id, &(_, len)) in self.spans.iter().enumerate() {
            lens[id] = len;
        }
        lens
    }

    /// Approximate heap bytes held by the vocabulary (for the memory benchmark).
    pub fn heap_bytes(&self) -> usize {
        self.table.slots.capacity() * std::mem::size_of::<Slot>()
            + self.spans.capacity() * 8
            + self.token_data.capacity()
    }
}

/// An open-addressing hash table bytes -> rank, laid out for the encoder's hot loop.
///
/// Each slot holds the token's first 8 bytes (little-endian, zero-padded), its length and its
/// rank: 16 bytes inline, no pointer. A probe compares length and prefix in the slot, so a
/// token of at most 8 bytes (most of them) is found with one cache line and no comparison
/// against the token bytes; a longer one is then compared against the shared byte buffer.
/// A `FxHashMap<Vec<u8>, Rank>` costs a pointer chase per probe to each key's own allocation.
struct TokenTable {
    slots: Vec<Slot>,
    shift: u32,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Slot {
    prefix: u64,
    rank: Rank,
    /// Token length; 0 marks an empty slot (tokens are never empty).
    len: u32,
}

const HASH_K: u64 = 0x9E37_79B9_7F4A_7C15;

/// First (up to) 8 bytes as a little-endian integer, zero-padded. Short slices are read with
/// overlapping loads instead of a copy into a buffer (which compiled to a `memcpy` call and
/// cost ~15% of the encoder's time on prose).
#[inline(always)]
fn prefix8(b: &[u8]) -> u64 {
    let n = b.len();
    if n >= 8 {
        u64::from_le_bytes(b[..8].try_into().unwrap())
    } else if n >= 4 {
        let lo = u32::from_le_bytes(b[..4].try_into().unwrap()) as u64;
        let hi = u32::from_le_bytes(b[n - 4..n].try_into().unwrap()) as u64;
        // The two loads overlap on bytes n-4..4; they agree there, so OR is exact.
        lo | hi << (8 * (n - 4))
    } else if n > 0 {
        (b[0] as u64) | (b[n / 2] as u64) << (8 * (n / 2)) | (b[n - 1] as u64) << (8 * (n - 1))
    } else {
        0
    }
}

#[inline(always)]
fn hash_bytes(bytes: &[u8], prefix: u64) -> u64 {
    let mut h =
        (prefix ^ (bytes.len() as u64).wrapping_mul(0xFF51_AFD7_ED55_8CCD)).wrapping_mul(HASH_K);
    if bytes.len() > 8 {
        for chunk in bytes[8..].chunks(8) {
            h = (h.rotate_left(23) ^ prefix8(chunk)).wrapping_mul(HASH_K);
        }
    }
    // Fold the high bits down: the index takes the top bits, but mix them once more so
    // prefixes that differ only in their last bytes spread too.
    h ^ (h >> 29)
}

impl TokenTable {
    fn new(spans: &[(u32, u32)], data: &[u8]) -> Self {
        let n = spans.iter().filter(|s| s.1 != 0).count().max(1);
        // Load factor <= 1/2 keeps probe sequences short.
        let bits = (2 * n).next_power_of_two().trailing_zeros().max(4);
        let mut slots = vec![Slot::default(); 1 << bits];
        let shift = 64 - bits;
        let mask = slots.len() - 1;
        for (rank, &(off, len)) in spans.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let bytes = &data[off as usize..(off + len) as usize];
            let prefix = prefix8(bytes);
            let mut i = (hash_bytes(bytes, prefix) >> shift) as usize;
            while slots[i].len != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = Slot {
                prefix,
                rank: rank as Rank,
                len,
            };
        }
        Self { slots, shift }
    }

    #[inline(always)]
    fn get(&self, bytes: &[u8], data: &[u8], spans: &[(u32, u32)]) -> Option<Rank> {
        let prefix = prefix8(bytes);
        let mask = self.slots.len() - 1;
        let mut i = (hash_bytes(bytes, prefix) >> self.shift) as usize;
        loop {
            // `i` is always masked into range, so the bounds check never fails.
            let slot = self.slots[i];
            if slot.len == 0 {
                return None;
            }
            if slot.len as usize == bytes.len() && slot.prefix == prefix {
                if bytes.len() <= 8 {
                    return Some(slot.rank);
                }
                let (off, len) = spans[slot.rank as usize];
                if data[off as usize + 8..(off + len) as usize] == bytes[8..] {
                    return Some(slot.rank);
                }
            }
            i = (i + 1) & mask;
        }
    }
}

/// tiktoken's merge loop on one piece: O(len * merges), fastest for short pieces.
/// `parts[i] = (start offset, rank of the pair parts[i] + parts[i+1])`; the last entry is the
/// end sentinel.
#[inline]
fn merge_short(
    piece: &[u8],
    rank: impl Fn(&[u8]) -> Option<Rank>,
    parts: &mut Vec<(u32, Rank)>,
    out: &mut Vec<Rank>,
) {
    debug_assert!(piece.len() >= 2);
    let rank_of = |b: &[u8]| rank(b).unwrap_or(Rank::MAX);
    parts.clear();
    parts.extend((0..=piece.len() as u32).map(|i| (i, Rank::MAX)));
    for i in 0..piece.len() - 1 {
        parts[i].1 = rank_of(&piece[i..i + 2]);
    }
    // Rank of the pair starting at part i once parts i+1 has been merged away.
    let pair_rank = |parts: &[(u32, Rank)], i: usize| -> Rank {
        if i + 3 < parts.len() {
            rank_of(&piece[parts[i].0 as usize..parts[i + 3].0 as usize])
        } else {
            Rank::MAX
        }
    };
    while parts.len() > 2 {
        let (mut min_rank, mut min_i) = (Rank::MAX, 0usize);
        for (i, &(_, r)) in parts[..parts.len() - 2].iter().enumerate() {
            if r < min_rank {
                min_rank = r;
                min_i = i;
            }
        }
        if min_rank == Rank::MAX {
            break;
        }
        let i = min_i;
        if i > 0 {
            parts[i - 1].1 = pair_rank(parts, i - 1);
        }
        parts[i].1 = pair_rank(parts, i);
        parts.remove(i + 1);
    }
    for w in parts.windows(2) {
        // Every final part is a token: single bytes always are (checked in `new`), merged
        // parts only form when their bytes have a rank.
        out.push(rank_of(&piece[w[0].0 as usize..w[1].0 as usize]));
    }
}

/// Leftmost minimum of (rank, position) keys under point updates: a bottom-up segment tree
/// over u64 keys `rank << 32 | position`, so the plain integer minimum is the lowest rank and,
/// among equal ranks, the leftmost position. The root is the answer.
struct MinTree {
    size: usize,
    t: Vec<u64>,
}

#[inline(always)]
fn key(r: Rank, i: usize) -> u64 {
    (r as u64) << 32 | i as u64
}

impl MinTree {
    fn new(leaves: impl ExactSizeIterator<Item = u64>) -> Self {
        let size = leaves.len().next_power_of_two();
        let mut t = vec![u64::MAX; 2 * size];
        for (i, k) in leaves.enumerate() {
            t[size + i] = k;
        }
        for p in (1..size).rev() {
            t[p] = t[2 * p].min(t[2 * p + 1]);
        }
        Self { size, t }
    }

    #[inline]
    fn min(&self) -> u64 {
        self.t[1]
    }

    #[inline]
    fn leaf(&self, i: usize) -> u64 {
        self.t[self.size + i]
    }

    #[inline]
    fn set(&mut self, i: usize, k: u64) {
        let mut p = self.size + i;
        self.t[p] = k;
        p >>= 1;
        while p >= 1 {
            let v = self.t[2 * p].min(self.t[2 * p + 1]);
            if self.t[p] == v {
                break; // nothing above changes either
            }
            self.t[p] = v;
            p >>= 1;
        }
    }
}

/// Pair ranks by position, grouped in blocks of `BLOCK`; a small `MinTree` holds each block's
/// leftmost minimum. An update rescans only its own block (a few cache lines, usually hot:
/// merges of a long run move left to right) and touches the tree only if the block's minimum
/// changed. Memory is 4 bytes per position plus 16 per block, instead of 16 per position for a
/// tree over all positions (which ran out of cache at 1 MB pieces: 20x the time for 10x input).
const BLOCK: usize = 64;

struct BlockMin {
    ranks: Vec<Rank>,
    top: MinTree,
}

impl BlockMin {
    fn new(ranks: Vec<Rank>) -> Self {
        let top = MinTree::new((0..ranks.len().div_ceil(BLOCK)).map(|b| Self::scan(&ranks, b)));
        Self { ranks, top }
    }

    /// Key of the leftmost minimum of block `b`.
    #[inline]
    fn scan(ranks: &[Rank], b: usize) -> u64 {
        let start = b * BLOCK;
        let block = &ranks[start..(start + BLOCK).min(ranks.len())];
        // Two simple passes vectorize; a fused leftmost-argmin loop does not.
        let m = *block.iter().min().unwrap();
        key(m, start + block.iter().position(|&x| x == m).unwrap())
    }

    #[inline]
    fn min(&self) -> (Rank, usize) {
        let k = self.top.min();
        ((k >> 32) as Rank, (k & 0xFFFF_FFFF) as usize)
    }

    #[inline]
    fn set(&mut self, i: usize, r: Rank) {
        self.ranks[i] = r;
        let b = i / BLOCK;
        let cur = self.top.leaf(b);
        let k = key(r, i);
        if k < cur {
            self.top.set(b, k);
        } else if (cur & 0xFFFF_FFFF) as usize == i {
            // The block's minimum grew: find the new one.
            let new = Self::scan(&self.ranks, b);
            if new != cur {
                self.top.set(b, new);
            }
        }
        // Otherwise a position that was not the block's minimum stays above it: no change.
    }
}

/// The same merges as `merge_short` in O(len log len): parts form a linked list indexed by
/// their start byte, and a `BlockMin` yields the lowest-rank, leftmost pair. Merges of one
/// long run proceed mostly left to right, so its updates stay in cache (a binary heap, tried
/// first, spent most of its time on cache misses in sift-down: 1.3 s for 1 MB of 'a').
fn merge_long(piece: &[u8], rank: impl Fn(&[u8]) -> Option<Rank>, out: &mut Vec<Rank>) {
    let n = piece.len();
    let rank_of = |b: &[u8]| rank(b).unwrap_or(Rank::MAX);
    const NONE: u32 = u32::MAX;
    // next[i]: start of the part after part i (n for the last part); prev[i]: start of the
    // part before it (NONE for the first). Only entries at live part starts are meaningful.
    let mut next: Vec<u32> = (1..=n as u32).collect();
    let mut prev: Vec<u32> = (0..n as u32)
        .map(|i| if i == 0 { NONE } else { i - 1 })
        .collect();
    let mut tree = BlockMin::new(
        (0..n)
            .map(|i| {
                if i + 1 < n {
                    rank_of(&piece[i..i + 2])
                } else {
                    Rank::MAX
                }
            })
            .collect(),
    );
    // Rank of the pair starting at part `i`: bytes from i to the end of the part after it.
    let pair_at = |next: &[u32], i: u32| -> Rank {
        let j = next[i as usize];
        if j as usize >= n {
            return Rank::MAX;
        }
        rank_of(&piece[i as usize..next[j as usize] as usize])
    };
    loop {
        let (r, i) = tree.min();
        if r == Rank::MAX {
            break;
        }
        let j = next[i] as usize;
        let k = next[j];
        next[i] = k;
        if (k as usize) < n {
            prev[k as usize] = i as u32;
        }
        tree.set(j, Rank::MAX);
        tree.set(i, pair_at(&next, i as u32));
        let p = prev[i];
        if p != NONE {
            tree.set(p as usize, pair_at(&next, p));
        }
    }
    let mut i = 0usize;
    while i < n {
        let j = next[i] as usize;
        out.push(rank_of(&piece[i..j]));
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::NANOCHAT_PATTERN;

    pub(crate) fn byte_vocab() -> FxHashMap<Vec<u8>, Rank> {
        (0u32..256).map(|b| (vec![b as u8], b)).collect()
    }

    /// A deterministic pseudo-random vocabulary over a small alphabet, so merges interact.
    fn random_vocab(seed: u64, n_merges: usize) -> FxHashMap<Vec<u8>, Rank> {
        let mut ranks = byte_vocab();
        let mut state = seed;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut tokens: Vec<Vec<u8>> = (b'a'..=b'd').map(|c| vec![c]).collect();
        while ranks.len() < 256 + n_merges {
            let a = &tokens[(rnd() % tokens.len() as u64) as usize];
            let b = &tokens[(rnd() % tokens.len() as u64) as usize];
            let t: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
            if t.len() <= 8 && !ranks.contains_key(&t) {
                let r = ranks.len() as Rank;
                ranks.insert(t.clone(), r);
                tokens.push(t);
            }
        }
        ranks
    }

    #[test]
    fn merges_lowest_rank_first() {
        let mut ranks = byte_vocab();
        ranks.insert(b"ab".to_vec(), 256);
        ranks.insert(b"bc".to_vec(), 257);
        ranks.insert(b"abc".to_vec(), 258);
        let bpe = CoreBPE::new(ranks, NANOCHAT_PATTERN, vec![]).unwrap();
        // "ab" (256) wins over "bc" (257), then "abc" (258).
        assert_eq!(bpe.encode_ordinary("abc"), vec![258]);
        assert_eq!(bpe.encode_ordinary("abd"), vec![256, b'd' as u32]);
        assert_eq!(bpe.decode_bytes(&[258, 32]).unwrap(), b"abc ".to_vec());
    }

    #[test]
    fn heap_merge_equals_loop() {
        for seed in 1..20u64 {
            let ranks = random_vocab(seed * 7919, 60);
            let mut state = seed;
            for len in [2usize, 3, 5, 17, 64, 65, 200, 1000, 5000] {
                let piece: Vec<u8> = (0..len)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        b'a' + ((state >> 33) % 4) as u8
                    })
                    .collect();
                let (mut a, mut b, mut scratch) = (vec![], vec![], vec![]);
                let get = |b: &[u8]| ranks.get(b).copied();
                merge_short(&piece, get, &mut scratch, &mut a);
                merge_long(&piece, get, &mut b);
                assert_eq!(a, b, "seed {seed} len {len}");
                let total: usize = a
                    .iter()
                    .map(|&r| ranks.iter().find(|(_, &v)| v == r).unwrap().0.len())
                    .sum();
                assert_eq!(total, len);
            }
        }
    }

    #[test]
    fn prefix8_matches_zero_padded_copy() {
        let data: Vec<u8> = (1..=20u8).map(|x| x.wrapping_mul(37)).collect();
        for n in 0..=12 {
            let mut buf = [0u8; 8];
            let k = n.min(8);
            buf[..k].copy_from_slice(&data[..k]);
            assert_eq!(prefix8(&data[..n]), u64::from_le_bytes(buf), "len {n}");
        }
    }

    #[test]
    fn token_table_finds_every_token_and_nothing_else() {
        let mut ranks = random_vocab(99, 500);
        // Tokens longer than the 8-byte inline prefix, sharing that prefix.
        for (i, t) in ["abcdefgh1", "abcdefgh12", "abcdefgh123456789", "abcdefgh"]
            .iter()
            .enumerate()
        {
            ranks.insert(t.as_bytes().to_vec(), 1000 + i as Rank);
        }
        let bpe = CoreBPE::new(ranks.clone(), NANOCHAT_PATTERN, vec![]).unwrap();
        for (bytes, &r) in &ranks {
            assert_eq!(bpe.rank(bytes), Some(r), "{bytes:?}");
        }
        for miss in [
            &b"abcdefgh2"[..],
            b"abcdefgh1234",
            b"",
            b"zzzzzzzzzzzzzzzzzzzz",
            b"abcdefg",
        ] {
            assert_eq!(bpe.rank(miss), ranks.get(miss).copied(), "{miss:?}");
        }
        assert_eq!(bpe.encoder(), &ranks);
    }

    #[test]
    fn long_piece_of_one_letter_is_fast() {
        let mut ranks = byte_vocab();
        ranks.insert(b"aa".to_vec(), 256);
        ranks.insert(b"aaaa".to_vec(), 257);
        let bpe = CoreBPE::new(ranks, NANOCHAT_PATTERN, vec![]).unwrap();
        let text = "a".repeat(1_000_001);
        let ids = bpe.encode_ordinary(&text);
        assert_eq!(ids.len(), 250_000 + 1);
        assert_eq!(ids[..3], [257, 257, 257]);
        assert_eq!(*ids.last().unwrap(), b'a' as u32);
    }

    #[test]
    fn decode_out_of_range_names_index() {
        let bpe = CoreBPE::new(
            byte_vocab(),
            NANOCHAT_PATTERN,
            vec![("<|bos|>".into(), 256)],
        )
        .unwrap();
        let err = bpe.decode_bytes(&[1, 256, 999]).unwrap_err();
        assert!(err.to_string().contains("index 2"), "{err}");
        assert_eq!(bpe.decode_bytes(&[256]).unwrap(), b"<|bos|>".to_vec());
        assert_eq!(bpe.token_byte_lengths()[256], 0);
        assert_eq!(bpe.token_byte_lengths()[7], 1);
    }

    #[test]
    fn rejects_bad_vocabularies() {
        let mut missing = byte_vocab();
        missing.remove(&vec![0x80u8]);
        let err = CoreBPE::new(missing, NANOCHAT_PATTERN, vec![])
            .err()
            .unwrap();
        assert!(err.to_string().contains("0x80"), "{err}");

        let mut dup = byte_vocab();
        dup.insert(b"ab".to_vec(), 5);
        assert!(matches!(
            CoreBPE::new(dup, NANOCHAT_PATTERN, vec![]),
            Err(Error::Vocab(_))
        ));

        let clash = vec![("<|bos|>".to_string(), 3)];
        assert!(matches!(
            CoreBPE::new(byte_vocab(), NANOCHAT_PATTERN, clash),
            Err(Error::Vocab(_))
        ));
        let mut sparse = byte_vocab();
        sparse.insert(b"ab".to_vec(), 4_000_000_000);
        assert!(matches!(
            CoreBPE::new(sparse, NANOCHAT_PATTERN, vec![]),
            Err(Error::Vocab(_))
        ));
        let far = vec![("<|a|>".to_string(), 3_000_000_000)];
        assert!(matches!(
            CoreBPE::new(byte_vocab(), NANOCHAT_PATTERN, far),
            Err(Error::Vocab(_))
        ));
        let twice = vec![("<|a|>".to_string(), 300), ("<|b|>".to_string(), 300)];
        assert!(matches!(
            CoreBPE::new(byte_vocab(), NANOCHAT_PATTERN, twice),
            Err(Error::Vocab(_))
        ));
        assert!(matches!(
            CoreBPE::new(byte_vocab(), "(", vec![]),
            Err(Error::Pattern(_))
        ));
    }

    /// tiktoken returns a piece's own rank when the piece is a token, even if no chain of
    /// merges reaches it. In cl100k every token is reachable, so the comparisons with tiktoken
    /// in Python cannot see this case.
    #[test]
    fn a_piece_that_is_a_token_is_that_token_even_if_merges_cannot_reach_it() {
        let mut ranks = byte_vocab();
        ranks.insert(b"abc".to_vec(), 256); // neither "ab" nor "bc" is a token
        let bpe = CoreBPE::new(ranks, NANOCHAT_PATTERN, vec![]).unwrap();
        assert_eq!(bpe.encode_ordinary("abc"), vec![256]);
        assert_eq!(
            bpe.encode_ordinary("abc abcd"),
            vec![256, 32, 97, 98, 99, 100]
        );
        let long = "abc".repeat(60); // one 180-byte piece: merge_long, no merges apply
        assert_eq!(bpe.encode_ordinary(&long).len(), 180);
    }

    /// A special token named twice, or given the last ordinary rank, is refused.
    #[test]
    fn special_listed_twice_or_on_the_last_rank_is_refused() {
        let msg = |specials: Vec<(String, Rank)>| {
            CoreBPE::new(byte_vocab(), NANOCHAT_PATTERN, specials)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let twice = vec![("<|a|>".to_string(), 300), ("<|a|>".to_string(), 301)];
        assert!(msg(twice).contains("\"<|a|>\" is listed twice"));
        let last = vec![("<|a|>".to_string(), 255)];
        assert!(msg(last).contains("id 255 collides with an ordinary token"));
        assert!(CoreBPE::new(byte_vocab(), NANOCHAT_PATTERN, vec![("<|a|>".into(), 256)]).is_ok());
    }
}
