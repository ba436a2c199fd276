//! BPE training from text: incremental pair counts, parallel over documents.
//!
//! The algorithm nanochat's rustbpe uses (and the one in the original GPT-2 BPE):
//! 1. pre-split every document with the pattern and count each distinct piece (parallel
//!    over documents with rayon, one hash map per worker, merged at the end);
//! 2. every distinct piece becomes a "word": its byte ids, weighted by its count;
//! 3. count adjacent pairs over all words (parallel), remembering which words hold each pair;
//! 4. repeatedly take the most frequent pair from a lazy max-heap (an entry whose count went
//!    stale is re-pushed with its current count), give it the next id, rewrite only the words
//!    that hold it, and apply the resulting +/- pair-count deltas.
//!
//! Ties are broken deterministically: equal counts go to the smaller pair (left id, then right
//! id), so the same corpus always yields the same vocabulary regardless of thread count.
//! A merge whose bytes already exist as a token (e.g. `a`+`bc` after `ab`+`c`) is not given a
//! second rank (ranks must map one-to-one to bytes); the pair is retired instead.
//!
//! Performance notes: words are deduplicated pieces, so the merge loop touches each distinct
//! piece once per merge it takes part in, not each occurrence; position lists may hold a word
//! twice and are deduplicated when used, which is cheaper than keeping hash sets per pair.

use crate::bpe::Rank;
use crate::error::{Error, Result};
use crate::pretokenize::Pretokenizer;
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BinaryHeap;

type Pair = (Rank, Rank);

/// Accumulates piece counts over batches of documents, then trains.
pub struct Trainer {
    pretokenizer: Pretokenizer,
    counts: FxHashMap<Vec<u8>, u64>,
    n_documents: u64,
    n_bytes: u64,
}

/// The outcome of training: ranks (bytes -> rank, 0..255 are the single bytes) and facts
/// about the corpus.
pub struct Trained {
    pub ranks: FxHashMap<Vec<u8>, Rank>,
    pub n_documents: u64,
    pub n_bytes: u64,
    pub n_unique_pieces: usize,
    /// Merges the corpus could not support (it ran out of pairs before `vocab_size`).
    pub n_missing: usize,
}

impl Trainer {
    pub fn new(pattern: &str) -> Result<Self> {
        Ok(Self {
            pretokenizer: Pretokenizer::new(pattern)?,
            counts: FxHashMap::default(),
            n_documents: 0,
            n_bytes: 0,
        })
    }

    /// Counts the pieces of a batch of documents (in parallel, on the current rayon pool).
    pub fn add_documents<S: AsRef<str> + Sync>(&mut self, texts: &[S]) {
        let pretok = &self.pretokenizer;
        let local = texts
            .par_iter()
            .fold(FxHashMap::<&str, u64>::default, |mut m, t| {
                pretok.for_each_piece(t.as_ref(), |p| *m.entry(p).or_insert(0) += 1);
                m
            })
            .reduce(FxHashMap::default, |mut a, mut b| {
                if a.len() < b.len() {
                    std::mem::swap(&mut a, &mut b);
                }
                for (k, v) in b {
                    *a.entry(k).or_insert(0) += v;
                }
                a
            });
        for (piece, n) in local {
            match self.counts.get_mut(piece.as_bytes()) {
                Some(c) => *c += n,
                None => {
                    self.counts.insert(piece.as_bytes().to_vec(), n);
                }
            }
        }
        self.n_documents += texts.len() as u64;
        self.n_bytes += texts.iter().map(|t| t.as_ref().len() as u64).sum::<u64>();
    }

    /// Learns `n_ranks - 256` merges (`n_ranks` counts the 256 byte tokens, not specials).
    pub fn train(self, n_ranks: usize) -> Result<Trained> {
        if n_ranks < 256 {
            return Err(Error::Vocab(format!(
                "vocab_size leaves {n_ranks} ordinary tokens; at least 256 (the single bytes) are needed"
            )));
        }
        if n_ranks > Rank::MAX as usize / 2 {
            return Err(Error::Vocab(format!(
                "vocabulary of {n_ranks} tokens is too large"
            )));
        }
        let Trainer {
            counts,
            n_documents,
            n_bytes,
            ..
        } = self;
        let n_unique_pieces = counts.len();
        // Sorted so the result does not depend on hash-map order.
        let mut pieces: Vec<(Vec<u8>, u64)> = counts.into_iter().collect();
        pieces.par_sort_unstable();
        let weights: Vec<i64> = pieces.iter().map(|(_, c)| *c as i64).collect();
        let mut words: Vec<Vec<Rank>> = pieces
            .into_iter()
            .map(|(p, _)| p.into_iter().map(Rank::from).collect())
            .collect();
        let ranks = merge_loop(&mut words, &weights, n_ranks);
        let n_missing = n_ranks - ranks.len();
        Ok(Trained {
            ranks,
            n_documents,
            n_bytes,
            n_unique_pieces,
            n_missing,
        })
    }
}

#[derive(PartialEq, Eq)]
struct Job {
    count: i64,
    pair: Pair,
}

impl Ord for Job {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Max-heap: higher count first, then the smaller pair.
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Replaces every non-overlapping (a, b) in `word` (left to right) by `new`, calling
/// `delta(pair, +1/-1)` for each pair occurrence created or destroyed.
fn merge_word(word: &mut Vec<Rank>, (a, b): Pair, new: Rank, mut delta: impl FnMut(Pair, i64)) {
    let n = word.len();
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        if i + 1 < n && word[i] == a && word[i + 1] == b {
            if let Some(&x) = out.last() {
                delta((x, a), -1);
                delta((x, new), 1);
            }
            delta((a, b), -1);
            if i + 2 < n {
                let y = word[i + 2];
                delta((b, y), -1);
                delta((new, y), 1);
            }
            out.push(new);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    *word = out;
}

fn merge_loop(
    words: &mut [Vec<Rank>],
    weights: &[i64],
    n_ranks: usize,
) -> FxHashMap<Vec<u8>, Rank> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut ranks: FxHashMap<Vec<u8>, Rank> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as Rank))
        .collect();

    // Initial pair counts and positions, in parallel over words.
    let (mut pair_counts, mut where_) = words
        .par_iter()
        .enumerate()
        .fold(
            || {
                (
                    FxHashMap::<Pair, i64>::default(),
                    FxHashMap::<Pair, Vec<u32>>::default(),
                )
            },
            |(mut counts, mut pos), (wi, w)| {
                for p in w.windows(2) {
                    let pair = (p[0], p[1]);
                    *counts.entry(pair).or_insert(0) += weights[wi];
                    let list = pos.entry(pair).or_default();
                    if list.last() != Some(&(wi as u32)) {
                        list.push(wi as u32);
                    }
                }
                (counts, pos)
            },
        )
        .reduce(
            || (FxHashMap::default(), FxHashMap::default()),
            |(mut ca, mut pa), (cb, pb)| {
                for (k, v) in cb {
                    *ca.entry(k).or_insert(0) += v;
                }
                for (k, mut v) in pb {
                    pa.entry(k).or_insert_with(Vec::new).append(&mut v);
                }
                (ca, pa)
            },
        );

    let mut heap: BinaryHeap<Job> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| Job { count, pair })
        .collect();
    let mut retired: FxHashSet<Pair> = FxHashSet::default();
    let mut changed: FxHashMap<Pair, i64> = FxHashMap::default();

    while tokens.len() < n_ranks {
        let Some(job) = heap.pop() else { break };
        let current = pair_counts.get(&job.pair).copied().unwrap_or(0);
        if current <= 0 || retired.contains(&job.pair) {
            continue;
        }
        if current != job.count {
            heap.push(Job {
                count: current,
                pair: job.pair,
            });
            continue;
        }
        let (a, b) = job.pair;
        let mut bytes = tokens[a as usize].clone();
        bytes.extend_from_slice(&tokens[b as usize]);
        if ranks.contains_key(&bytes) {
            retired.insert(job.pair);
            continue;
        }
        let new = tokens.len() as Rank;
        ranks.insert(bytes.clone(), new);
        tokens.push(bytes);

        let mut positions = where_.remove(&job.pair).unwrap_or_default();
        positions.sort_unstable();
        positions.dedup();
        changed.clear();
        for &wi in &positions {
            let w = wi as usize;
            let weight = weights[w];
            merge_word(&mut words[w], job.pair, new, |pair, d| {
                *pair_counts.entry(pair).or_insert(0) += d * weight;
                *changed.entry(pair).or_insert(0) += d;
                if d > 0 {
                    let list = where_.entry(pair).or_default();
                    if list.last() != Some(&wi) {
                        list.push(wi);
                    }
                }
            });
        }
        pair_counts.remove(&job.pair);
        for (&pair, &d) in &changed {
            if d > 0 {
                if let Some(&count) = pair_counts.get(&pair) {
                    if count > 0 {
                        heap.push(Job { count, pair });
                    }
                }
            }
        }
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpe::CoreBPE;
    use crate::pretokenize::NANOCHAT_PATTERN;

    #[test]
    fn merge_word_deltas_balance() {
        let mut w = vec![1, 1, 1, 1, 2];
        let mut d: FxHashMap<Pair, i64> = FxHashMap::default();
        merge_word(&mut w, (1, 1), 9, |p, x| *d.entry(p).or_insert(0) += x);
        assert_eq!(w, vec![9, 9, 2]);
        assert_eq!(d[&(1, 1)], -3);
        assert_eq!(d[&(9, 9)], 1);
        assert_eq!(d[&(9, 1)], 0);
        assert_eq!(d[&(1, 2)], -1);
        assert_eq!(d[&(9, 2)], 1);
    }

    #[test]
    fn learns_frequent_pairs_first() {
        let mut t = Trainer::new(NANOCHAT_PATTERN).unwrap();
        let docs: Vec<String> = (0..50)
            .map(|i| format!("hello hello world {i} low lower lowest"))
            .collect();
        t.add_documents(&docs);
        let trained = t.train(256 + 20).unwrap();
        assert_eq!(trained.ranks.len(), 276);
        assert_eq!(trained.n_documents, 50);
        // The most frequent pair overall comes first.
        let first = trained
            .ranks
            .iter()
            .find(|(_, &r)| r == 256)
            .unwrap()
            .0
            .clone();
        assert!(
            first == b"lo" || first == b"ow" || first == b"he" || first == b"el" || first == b"ll",
            "{first:?}"
        );
        let bpe = CoreBPE::new(trained.ranks, NANOCHAT_PATTERN, vec![]).unwrap();
        let ids = bpe.encode_ordinary("hello world");
        assert!(ids.len() <= 4, "{ids:?}");
        assert_eq!(bpe.decode_bytes(&ids).unwrap(), b"hello world");
    }

    #[test]
    fn deterministic_and_stops_when_corpus_is_exhausted() {
        let run = || {
            let mut t = Trainer::new(NANOCHAT_PATTERN).unwrap();
            t.add_documents(&["abab cdcd abab", "xyz"]);
            t.train(1000).unwrap()
        };
        let (a, b) = (run(), run());
        assert_eq!(a.ranks, b.ranks);
        assert!(a.n_missing > 0);
        assert!(Trainer::new(NANOCHAT_PATTERN).unwrap().train(100).is_err());
    }
}
