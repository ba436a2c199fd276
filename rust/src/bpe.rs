//! Byte-level BPE, identical to tiktoken: pre-split with the pattern, then inside each
//! piece repeatedly merge the adjacent pair whose concatenation has the lowest rank
//! (leftmost on ties), until no adjacent pair is in the vocabulary.

use crate::error::{Error, Result};
use crate::pretokenize::Pretokenizer;
use rustc_hash::FxHashMap;

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

pub struct CoreBPE {
    encoder: FxHashMap<Vec<u8>, Rank>,
    /// id -> bytes, for ordinary tokens (None where the id space has a hole).
    decoder: Vec<Option<Vec<u8>>>,
    /// special token name -> id, in insertion order.
    specials: Vec<(String, Rank)>,
    pretokenizer: Pretokenizer,
    n_vocab: usize,
}

impl CoreBPE {
    /// Builds from mergeable ranks, a split pattern, and special tokens with their ids.
    pub fn new(
        encoder: FxHashMap<Vec<u8>, Rank>,
        pattern: &str,
        specials: Vec<(String, Rank)>,
    ) -> Result<Self> {
        let pretokenizer = Pretokenizer::new(pattern)?;
        let max_rank = encoder.values().copied().max();
        let mut n_vocab = max_rank.map_or(0, |r| r as usize + 1);
        let mut decoder: Vec<Option<Vec<u8>>> = vec![None; n_vocab];
        for (bytes, &rank) in &encoder {
            let slot = &mut decoder[rank as usize];
            if slot.is_some() {
                return Err(Error::Vocab(format!("rank {rank} is given to two different tokens")));
            }
            *slot = Some(bytes.clone());
        }
        for (name, id) in &specials {
            if (*id as usize) < decoder.len() && decoder[*id as usize].is_some() {
                return Err(Error::Vocab(format!("special token {name:?} id {id} collides with an ordinary token")));
            }
            n_vocab = n_vocab.max(*id as usize + 1);
        }
        Ok(Self { encoder, decoder, specials, pretokenizer, n_vocab })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn pattern(&self) -> &str {
        self.pretokenizer.pattern()
    }

    pub fn encoder(&self) -> &FxHashMap<Vec<u8>, Rank> {
        &self.encoder
    }

    pub fn specials(&self) -> &[(String, Rank)] {
        &self.specials
    }

    pub fn special_token_id(&self, name: &str) -> Option<Rank> {
        self.specials.iter().find(|(n, _)| n == name).map(|&(_, id)| id)
    }

    /// Ordinary encoding: special-token text is just text.
    pub fn encode_ordinary(&self, text: &str) -> Vec<Rank> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_ordinary_into(text, &mut out);
        out
    }

    /// Appends the ids of `text` to `out` (lets callers render without reallocating).
    pub fn encode_ordinary_into(&self, text: &str, out: &mut Vec<Rank>) {
        self.pretokenizer.for_each_piece(text, |piece| {
            let bytes = piece.as_bytes();
            match self.encoder.get(bytes) {
                Some(&rank) => out.push(rank),
                None => byte_pair_encode(bytes, &self.encoder, out),
            }
        });
    }

    /// Bytes of the given ids; an id outside the vocabulary is an error naming its index.
    pub fn decode_bytes(&self, ids: &[Rank]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (index, &id) in ids.iter().enumerate() {
            match self.decoder.get(id as usize).and_then(|b| b.as_deref()) {
                Some(bytes) => out.extend_from_slice(bytes),
                None => match self.specials.iter().find(|&&(_, sid)| sid == id) {
                    Some((name, _)) => out.extend_from_slice(name.as_bytes()),
                    None => return Err(Error::TokenOutOfRange { id, index, n_vocab: self.n_vocab }),
                },
            }
        }
        Ok(out)
    }

    /// Byte length of each id's token; 0 for special tokens (used for bits per byte).
    pub fn token_byte_lengths(&self) -> Vec<u32> {
        let mut lens = vec![0u32; self.n_vocab];
        for (id, bytes) in self.decoder.iter().enumerate() {
            if let Some(b) = bytes {
                lens[id] = b.len() as u32;
            }
        }
        lens
    }
}

/// tiktoken's merge loop on one piece: O(n * merges), fine for short pieces.
fn byte_pair_encode(piece: &[u8], ranks: &FxHashMap<Vec<u8>, Rank>, out: &mut Vec<Rank>) {
    if piece.len() == 1 {
        out.push(ranks[piece]);
        return;
    }
    // parts[i] = (start offset, rank of the pair starting at part i)
    let rank_of = |parts: &[(usize, Rank)], i: usize| -> Rank {
        if i + 3 < parts.len() {
            *ranks.get(&piece[parts[i].0..parts[i + 3].0]).unwrap_or(&Rank::MAX)
        } else {
            Rank::MAX
        }
    };
    let mut parts: Vec<(usize, Rank)> = (0..=piece.len()).map(|i| (i, Rank::MAX)).collect();
    for i in 0..parts.len().saturating_sub(2) {
        parts[i].1 = *ranks.get(&piece[parts[i].0..parts[i + 2].0]).unwrap_or(&Rank::MAX);
    }
    loop {
        if parts.len() == 1 {
            break;
        }
        let (mut min_rank, mut min_i) = (Rank::MAX, usize::MAX);
        for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
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
            parts[i - 1].1 = rank_of(&parts, i - 1);
        }
        parts[i].1 = rank_of(&parts, i);
        parts.remove(i + 1);
    }
    for w in parts.windows(2) {
        out.push(ranks[&piece[w[0].0..w[1].0]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::NANOCHAT_PATTERN;

    fn byte_vocab() -> FxHashMap<Vec<u8>, Rank> {
        (0u32..256).map(|b| (vec![b as u8], b)).collect()
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
    fn decode_out_of_range_names_index() {
        let bpe = CoreBPE::new(byte_vocab(), NANOCHAT_PATTERN, vec![("<|bos|>".into(), 256)]).unwrap();
        let err = bpe.decode_bytes(&[1, 256, 999]).unwrap_err();
        assert!(err.to_string().contains("index 2"), "{err}");
        assert_eq!(bpe.decode_bytes(&[256]).unwrap(), b"<|bos|>".to_vec());
    }
}
