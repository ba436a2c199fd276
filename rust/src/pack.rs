//! Packing rendered conversations into batches: padded and best-fit (SPEC 4).
//!
//! A [`Packer`] is a stream: [`Packer::feed`] appends rendered conversations (each with a
//! caller `tag`, e.g. its index in the source), [`Packer::plan`] decides the next batch,
//! [`Packer::commit`] writes it into caller-provided flat buffers (NumPy arrays, page-locked
//! torch tensors' `.numpy()` views) and returns its [`BatchInfo`].
//!
//! - `BestFit` (nanochat's BOS-aligned best-fit): rows of capacity `seq_len + 1`; before each
//!   pick the buffer is refilled (from the fed conversations, in order) to `buffer_size`; the
//!   longest conversation that fits the space left in the row is taken (ties: the one that
//!   entered the buffer first); when none fits, the rest of the row is `bos` padding. Nothing
//!   is cropped or dropped, except that a conversation longer than a row is truncated to the
//!   row when fed (and counted in `BatchInfo::num_truncated` of the batch that takes it).
//! - `Padded` (the seed's `collate_and_yield`): `batch_size` conversations in feed order, one
//!   per row, padded with `bos` to the longest; `T = max_len - 1`. Conversations longer than
//!   `seq_len + 1` are truncated to it (and counted).
//!
//! Row `r` holds tokens `row[0..T+1]`; `inputs = row[:-1]`, `targets = row[1:]`, and target `-1`
//! wherever the mask of `row[1:]` is 0 and at every padding position. `position_ids` restart
//! at 0 at each conversation (and at the padding tail); `doc_lens[r]` are the lengths of those
//! segments over the T input positions (they sum to T; the padding tail, if any, is the last
//! segment and `row_docs[r]` counts only the conversations).
//!
//! Streaming vs flush: with `flush = false`, `plan` returns `None` if the batch would need a
//! conversation that has not been fed yet (so a loader can feed more and retry, and the result
//! never depends on how the input was chunked). With `flush = true` it packs what is left:
//! the last batch may have fewer rows.
//!
//! Performance notes:
//! - Planning runs on (length, seq) pairs only (<= buffer_size of them), so an aborted plan
//!   costs nothing but a short scan; tokens are copied once, straight into the output buffers.
//! - The best-fit scan is linear over the buffer (100 entries by default): a sorted structure
//!   would have to preserve entry order for ties, and at this size the scan is a few hundred ns.

use crate::error::{Error, Result};
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    BestFit,
    Padded,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "bestfit" => Ok(Mode::BestFit),
            "padded" => Ok(Mode::Padded),
            _ => Err(Error::Other(format!(
                "unknown packing mode {s:?} (expected \"bestfit\" or \"padded\")"
            ))),
        }
    }
}

struct Item {
    ids: Vec<u32>,
    mask: Vec<u8>,
    tag: u64,
    seq: u64,
    truncated: bool,
}

/// The decisions for one batch, before any token is copied.
#[derive(Debug, Clone)]
pub struct Plan {
    /// For each row, the `seq` numbers of its conversations in order.
    rows: Vec<Vec<u64>>,
    /// Fed conversations moved into the buffer (best-fit) or taken (padded).
    taken_from_pending: usize,
    pub num_rows: usize,
    pub t: usize,
}

/// What a committed batch holds (its arrays are in the caller's buffers).
#[derive(Debug, Clone, Default)]
pub struct BatchInfo {
    pub num_rows: usize,
    pub t: usize,
    /// Per row, segment lengths over the T input positions (conversations, then padding tail).
    pub doc_lens: Vec<Vec<u32>>,
    /// Per row, the number of conversations (the padding tail is not counted).
    pub row_docs: Vec<u32>,
    /// Targets != -1.
    pub num_supervised: usize,
    /// Input positions that are padding.
    pub num_pad: usize,
    /// Conversations in this batch that were truncated to the row, and the tokens cut.
    pub num_truncated: usize,
    pub truncated_tokens: usize,
    /// Rows with no supervised target.
    pub empty_rows: usize,
    /// Tags of the conversations in this batch, in the order they were placed.
    pub tags: Vec<u64>,
}

/// Flat, row-major output buffers with room for at least `num_rows * t` elements.
pub struct BatchOut<'a> {
    pub inputs: &'a mut [i32],
    pub targets: &'a mut [i64],
    pub position_ids: &'a mut [i32],
}

/// A batch in owned vectors: (info, inputs, targets, position_ids), each `num_rows * t` long.
pub type OwnedBatch = (BatchInfo, Vec<i32>, Vec<i64>, Vec<i32>);

pub struct Packer {
    mode: Mode,
    batch_size: usize,
    seq_len: usize,
    bos: u32,
    buffer_size: usize,
    pending: VecDeque<Item>,
    buffer: Vec<Item>,
    next_seq: u64,
    truncated_cut: Vec<(u64, usize)>,
    // reused row scratch (best-fit)
    row_ids: Vec<u32>,
    row_mask: Vec<u8>,
}

/// The largest token id a batch can hold: inputs are int32 (nanochat's dtype).
pub const MAX_ID: u32 = i32::MAX as u32;

/// Why a rendered conversation cannot be packed, if it cannot: ids and mask of different
/// lengths, no tokens at all, a mask value other than 0/1, or an id beyond `MAX_ID` (it would
/// wrap to a negative int32 input while its int64 target kept the true value). Readers of
/// Python input check the mask as they read it; a shard's bytes arrive unchecked.
pub fn check_rendered(ids: &[u32], mask: &[u8]) -> std::result::Result<(), String> {
    if ids.len() != mask.len() {
        return Err(format!(
            "ids has {} tokens but mask has {}",
            ids.len(),
            mask.len()
        ));
    }
    if ids.is_empty() {
        return Err("empty (no tokens, not even <|bos|>)".into());
    }
    // one vectorised max each; the index only on the error path
    if mask.iter().copied().max().unwrap_or(0) > 1 {
        let k = mask.iter().position(|&m| m > 1).unwrap_or(0);
        return Err(format!("mask[{k}] = {} (must be 0 or 1)", mask[k]));
    }
    if ids.iter().copied().max().unwrap_or(0) > MAX_ID {
        let k = ids.iter().position(|&x| x > MAX_ID).unwrap_or(0);
        return Err(format!(
            "ids[{k}] = {} does not fit the int32 inputs (at most {MAX_ID})",
            ids[k]
        ));
    }
    Ok(())
}

impl Packer {
    pub fn new(
        mode: Mode,
        batch_size: usize,
        seq_len: usize,
        bos: u32,
        buffer_size: usize,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::Other("batch_size must be at least 1".into()));
        }
        if seq_len == 0 {
            return Err(Error::Other("seq_len must be at least 1".into()));
        }
        if mode == Mode::BestFit && buffer_size == 0 {
            return Err(Error::Other("buffer_size must be at least 1".into()));
        }
        if bos > MAX_ID {
            return Err(Error::Other(format!(
                "bos_id {bos} does not fit the int32 inputs (at most {MAX_ID})"
            )));
        }
        Ok(Self {
            mode,
            batch_size,
            seq_len,
            bos,
            buffer_size,
            pending: VecDeque::new(),
            buffer: Vec::new(),
            next_seq: 0,
            truncated_cut: Vec::new(),
            row_ids: Vec::new(),
            row_mask: Vec::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    pub fn row_capacity(&self) -> usize {
        self.seq_len + 1
    }

    /// Appends one rendered conversation. `ids` and `mask` must have the same length (>= 1).
    pub fn feed(&mut self, mut ids: Vec<u32>, mut mask: Vec<u8>, tag: u64) -> Result<()> {
        check_rendered(&ids, &mask)
            .map_err(|why| Error::Other(format!("conversation tag {tag}: {why}")))?;
        let cap = self.row_capacity();
        let truncated = ids.len() > cap;
        if truncated {
            self.truncated_cut.push((self.next_seq, ids.len() - cap));
            ids.truncate(cap);
            mask.truncate(cap);
        }
        self.pending.push_back(Item {
            ids,
            mask,
            tag,
            seq: self.next_seq,
            truncated,
        });
        self.next_seq += 1;
        Ok(())
    }

    /// Conversations held (buffer first, then not yet buffered), by tag, in the order a fresh
    /// packer must be fed to continue exactly where this one is.
    pub fn held_tags(&self) -> Vec<u64> {
        self.buffer
            .iter()
            .chain(self.pending.iter())
            .map(|it| it.tag)
            .collect()
    }

    pub fn num_held(&self) -> usize {
        self.buffer.len() + self.pending.len()
    }

    /// Drops everything held (e.g. before restoring a saved state).
    pub fn clear(&mut self) {
        self.buffer.clear();
        self.pending.clear();
        self.truncated_cut.clear();
    }

    /// Decides the next batch. `None`: not enough input yet (`flush = false`) or nothing left.
    pub fn plan(&self, flush: bool) -> Option<Plan> {
        match self.mode {
            Mode::BestFit => self.plan_bestfit(flush),
            Mode::Padded => self.plan_padded(flush),
        }
    }

    fn plan_padded(&self, flush: bool) -> Option<Plan> {
        let n = self.batch_size.min(self.pending.len());
        if n == 0 || (n < self.batch_size && !flush) {
            return None;
        }
        let max_len = self
            .pending
            .iter()
            .take(n)
            .map(|it| it.ids.len())
            .max()
            .unwrap_or(1);
        Some(Plan {
            rows: self.pending.iter().take(n).map(|it| vec![it.seq]).collect(),
            taken_from_pending: n,
            num_rows: n,
            t: max_len - 1,
        })
    }

    fn plan_bestfit(&self, flush: bool) -> Option<Plan> {
        let cap = self.row_capacity();
        let mut buf: Vec<(usize, u64)> = self
            .buffer
            .iter()
            .map(|it| (it.ids.len(), it.seq))
            .collect();
        let mut next = 0usize;
        let mut rows = Vec::with_capacity(self.batch_size);
        for _ in 0..self.batch_size {
            let mut used = 0usize;
            let mut row = Vec::new();
            while used < cap {
                while buf.len() < self.buffer_size {
                    match self.pending.get(next) {
                        Some(it) => {
                            buf.push((it.ids.len(), it.seq));
                            next += 1;
                        }
                        None if flush => break,
                        None => return None,
                    }
                }
                let remaining = cap - used;
                let mut best: Option<usize> = None;
                let mut best_len = 0usize;
                for (i, &(len, _)) in buf.iter().enumerate() {
                    if len <= remaining && len > best_len {
                        best = Some(i);
                        best_len = len;
                    }
                }
                match best {
                    Some(i) => {
                        let (len, seq) = buf.remove(i);
                        used += len;
                        row.push(seq);
                    }
                    None => break,
                }
            }
            if row.is_empty() {
                break; // flush with nothing left
            }
            rows.push(row);
        }
        if rows.is_empty() {
            return None;
        }
        Some(Plan {
            num_rows: rows.len(),
            rows,
            taken_from_pending: next,
            t: self.seq_len,
        })
    }

    /// Executes `plan` (from the latest `plan` call, no feed in between that it depends on),
    /// writing `num_rows * t` elements into each output buffer.
    pub fn commit(&mut self, plan: &Plan, out: BatchOut<'_>) -> Result<BatchInfo> {
        let n = plan.num_rows * plan.t;
        if out.inputs.len() < n || out.targets.len() < n || out.position_ids.len() < n {
            return Err(Error::Other(format!(
                "output buffers too small: need {n} elements ({} rows x {}), got inputs {}, targets {}, position_ids {}",
                plan.num_rows,
                plan.t,
                out.inputs.len(),
                out.targets.len(),
                out.position_ids.len()
            )));
        }
        if plan.taken_from_pending > self.pending.len() {
            return Err(Error::Other(
                "stale plan: the packer changed since it was made".into(),
            ));
        }
        let mut info = BatchInfo {
            num_rows: plan.num_rows,
            t: plan.t,
            ..Default::default()
        };
        let t = plan.t;
        let cap = t + 1;
        match self.mode {
            Mode::Padded => {
                for r in 0..plan.num_rows {
                    let item = self.pending.pop_front().expect("checked above");
                    self.count_truncation(&item, &mut info);
                    let row_ids = &item.ids;
                    let row_mask = &item.mask;
                    // The seed's collate: inputs[:n-1] = ids[:-1], the rest padding.
                    let n_in = row_ids.len() - 1;
                    write_row(
                        self.bos,
                        row_ids,
                        row_mask,
                        &[n_in],
                        n_in,
                        cap,
                        &mut out.inputs[r * t..(r + 1) * t],
                        &mut out.targets[r * t..(r + 1) * t],
                        &mut out.position_ids[r * t..(r + 1) * t],
                        &mut info,
                    );
                    info.tags.push(item.tag);
                }
            }
            Mode::BestFit => {
                for _ in 0..plan.taken_from_pending {
                    let it = self.pending.pop_front().expect("checked above");
                    self.buffer.push(it);
                }
                let mut row_ids = std::mem::take(&mut self.row_ids);
                let mut row_mask = std::mem::take(&mut self.row_mask);
                let mut lens = Vec::new();
                for (r, seqs) in plan.rows.iter().enumerate() {
                    row_ids.clear();
                    row_mask.clear();
                    lens.clear();
                    for &seq in seqs {
                        let pos = match self.buffer.iter().position(|it| it.seq == seq) {
                            Some(p) => p,
                            None => {
                                return Err(Error::Other(
                                    "stale plan: conversation no longer buffered".into(),
                                ))
                            }
                        };
                        let item = self.buffer.remove(pos);
                        self.count_truncation(&item, &mut info);
                        row_ids.extend_from_slice(&item.ids);
                        row_mask.extend_from_slice(&item.mask);
                        lens.push(item.ids.len());
                        info.tags.push(item.tag);
                    }
                    // nanochat: inputs = row[:-1], so a padded row's last real token is an input.
                    let n_in = row_ids.len().min(t);
                    write_row(
                        self.bos,
                        &row_ids,
                        &row_mask,
                        &lens,
                        n_in,
                        cap,
                        &mut out.inputs[r * t..(r + 1) * t],
                        &mut out.targets[r * t..(r + 1) * t],
                        &mut out.position_ids[r * t..(r + 1) * t],
                        &mut info,
                    );
                }
                self.row_ids = row_ids;
                self.row_mask = row_mask;
            }
        }
        Ok(info)
    }

    fn count_truncation(&mut self, item: &Item, info: &mut BatchInfo) {
        if item.truncated {
            info.num_truncated += 1;
            if let Some(p) = self.truncated_cut.iter().position(|&(s, _)| s == item.seq) {
                info.truncated_tokens += self.truncated_cut.swap_remove(p).1;
            }
        }
    }

    /// Commits `plan` into freshly allocated (rows * t) vectors: inputs, targets, position ids.
    pub fn commit_owned(&mut self, plan: &Plan) -> Result<OwnedBatch> {
        let n = plan.num_rows * plan.t;
        let (mut a, mut b, mut c) = (vec![0i32; n], vec![0i64; n], vec![0i32; n]);
        let info = self.commit(
            plan,
            BatchOut {
                inputs: &mut a,
                targets: &mut b,
                position_ids: &mut c,
            },
        )?;
        Ok((info, a, b, c))
    }

    /// Plans and commits into freshly allocated vectors (tests, pure-Rust users).
    pub fn next_batch(&mut self, flush: bool) -> Result<Option<OwnedBatch>> {
        match self.plan(flush) {
            Some(plan) => self.commit_owned(&plan).map(Some),
            None => Ok(None),
        }
    }
}

/// One row: `ids`/`mask` are the concatenated conversations (segment lengths `lens` over the
/// inputs), padded with `bos` to `cap` tokens; the first `real_inputs` inputs are `ids`, the
/// rest `bos`; writes its `cap - 1` inputs, targets, position ids.
#[allow(clippy::too_many_arguments)]
fn write_row(
    bos: u32,
    ids: &[u32],
    mask: &[u8],
    lens: &[usize],
    real_inputs: usize,
    cap: usize,
    inputs: &mut [i32],
    targets: &mut [i64],
    pos: &mut [i32],
    info: &mut BatchInfo,
) {
    let t = cap - 1;
    let content = ids.len().min(cap);
    // Branch-free zipped loops: they vectorise (the per-index version with an `if` did not).
    for (x, &id) in inputs[..real_inputs].iter_mut().zip(&ids[..real_inputs]) {
        *x = id as i32;
    }
    inputs[real_inputs..].fill(bos as i32);
    // targets[p] = row[p + 1] where supervised, else -1; positions p + 1 >= content are padding.
    let real_targets = content.saturating_sub(1);
    let (next_ids, next_mask) = (&ids[1..=real_targets], &mask[1..=real_targets]);
    for ((x, &id), &m) in targets[..real_targets]
        .iter_mut()
        .zip(next_ids)
        .zip(next_mask)
    {
        *x = if m != 0 { id as i64 } else { -1 };
    }
    let supervised = next_mask.iter().filter(|&&m| m != 0).count();
    targets[real_targets..].fill(-1);
    // segments over the T input positions
    let mut segs = Vec::with_capacity(lens.len() + 1);
    let mut start = 0usize;
    let mut docs = 0u32;
    for &len in lens {
        let end = (start + len).min(t);
        if end > start {
            for (k, x) in pos[start..end].iter_mut().enumerate() {
                *x = k as i32;
            }
            segs.push((end - start) as u32);
            docs += 1;
        }
        start += len;
        if start >= t {
            break;
        }
    }
    if real_inputs < t {
        for (k, x) in pos[real_inputs..].iter_mut().enumerate() {
            *x = k as i32;
        }
        segs.push((t - real_inputs) as u32);
    }
    info.num_pad += t - real_inputs;
    info.num_supervised += supervised;
    if supervised == 0 {
        info.empty_rows += 1;
    }
    info.doc_lens.push(segs);
    info.row_docs.push(docs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_beyond_int32_are_refused() {
        assert!(Packer::new(Mode::BestFit, 1, 4, MAX_ID + 1, 4).is_err());
        let mut p = Packer::new(Mode::BestFit, 1, 4, 0, 4).unwrap();
        let err = p
            .feed(vec![1, MAX_ID + 1], vec![0, 1], 7)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tag 7: ids[1] = 2147483648 does not fit"),
            "{err}"
        );
        p.feed(vec![1, MAX_ID], vec![0, 1], 8).unwrap();
    }

    /// A conversation of `len` tokens: bos, then ids tag*1000+i, mask 1 on odd positions.
    fn conv(len: usize, tag: u64) -> (Vec<u32>, Vec<u8>) {
        let mut ids = vec![0u32];
        let mut mask = vec![0u8];
        for i in 1..len {
            ids.push(tag as u32 * 1000 + i as u32);
            mask.push((i % 2) as u8);
        }
        (ids, mask)
    }

    /// Every batch of a packer: (info, inputs, targets, position ids).
    type Drained = Vec<(BatchInfo, Vec<i32>, Vec<i64>, Vec<i32>)>;

    fn drain(p: &mut Packer) -> Drained {
        let mut out = Vec::new();
        while let Some(b) = p.next_batch(true).unwrap() {
            out.push(b);
        }
        out
    }

    #[test]
    fn bestfit_picks_longest_that_fits_and_pads() {
        // capacity 8: lengths 5, 4, 3, 2 -> row0 = 5 + 3 (8), row1 = 4 + 2 + pad 2
        let mut p = Packer::new(Mode::BestFit, 2, 7, 0, 100).unwrap();
        for (tag, len) in [5usize, 4, 3, 2].iter().enumerate() {
            let (i, m) = conv(*len, tag as u64 + 1);
            p.feed(i, m, tag as u64).unwrap();
        }
        let batches = drain(&mut p);
        assert_eq!(batches.len(), 1);
        let (info, inputs, targets, pos) = &batches[0];
        assert_eq!(info.tags, vec![0, 2, 1, 3]);
        assert_eq!(info.doc_lens, vec![vec![5, 2], vec![4, 2, 1]]);
        assert_eq!(info.row_docs, vec![2, 2]);
        assert_eq!(info.num_pad, 1);
        assert_eq!(&inputs[..7], &[0, 1001, 1002, 1003, 1004, 0, 3001]);
        assert_eq!(&targets[..7], &[1001, -1, 1003, -1, -1, 3001, -1]);
        assert_eq!(&pos[..7], &[0, 1, 2, 3, 4, 0, 1]);
        assert_eq!(&inputs[7..], &[0, 2001, 2002, 2003, 0, 4001, 0]);
        assert_eq!(&targets[7..], &[2001, -1, 2003, -1, 4001, -1, -1]);
        assert_eq!(&pos[7..], &[0, 1, 2, 3, 0, 1, 0]);
        assert_eq!(
            info.num_supervised,
            targets.iter().filter(|&&x| x != -1).count()
        );
    }

    #[test]
    fn ties_take_the_earliest_and_streaming_equals_flush() {
        let lens = [3usize, 3, 6, 2, 3, 7, 1, 4, 4, 5, 2, 2, 8, 3];
        let run = |chunk: usize| {
            let mut p = Packer::new(Mode::BestFit, 2, 7, 0, 4).unwrap();
            let mut out = Vec::new();
            for (k, c) in lens.chunks(chunk).enumerate() {
                for (j, &len) in c.iter().enumerate() {
                    let tag = (k * chunk + j) as u64;
                    let (i, m) = conv(len, tag + 1);
                    p.feed(i, m, tag).unwrap();
                }
                while let Some(b) = p.next_batch(false).unwrap() {
                    out.push(b.0.tags);
                }
            }
            while let Some(b) = p.next_batch(true).unwrap() {
                out.push(b.0.tags);
            }
            out
        };
        let all = run(lens.len());
        for chunk in 1..lens.len() {
            assert_eq!(run(chunk), all, "chunk {chunk}");
        }
        let flat: Vec<u64> = all.concat();
        let mut sorted = flat.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..lens.len() as u64).collect::<Vec<_>>(),
            "every conversation exactly once"
        );
        // first row: buffer [3,3,6,2] -> 6 (tag 2); refill 3 -> [3,3,2,3], remaining 2 -> 2 (tag 3)
        assert_eq!(&all[0][..2], &[2, 3]);
    }

    #[test]
    fn long_conversation_truncated_and_counted() {
        let mut p = Packer::new(Mode::BestFit, 1, 4, 0, 10).unwrap();
        let (i, m) = conv(9, 1);
        p.feed(i, m, 7).unwrap();
        let b = drain(&mut p);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0.num_truncated, 1);
        assert_eq!(b[0].0.truncated_tokens, 4);
        assert_eq!(b[0].1, vec![0, 1001, 1002, 1003]);
        assert_eq!(b[0].2, vec![1001, -1, 1003, -1]);
    }

    #[test]
    fn padded_is_the_seed_collate() {
        let mut p = Packer::new(Mode::Padded, 2, 100, 9, 100).unwrap();
        let (i, m) = conv(4, 1);
        p.feed(i, m, 0).unwrap();
        let (i, m) = conv(2, 2);
        p.feed(i, m, 1).unwrap();
        let (i, m) = conv(3, 3);
        p.feed(i, m, 2).unwrap();
        assert!(p.next_batch(false).unwrap().is_some());
        assert!(
            p.next_batch(false).unwrap().is_none(),
            "one conversation is not a batch of 2 yet"
        );
        let (info, inputs, targets, pos) = p.next_batch(true).unwrap().unwrap();
        assert_eq!((info.num_rows, info.t), (1, 2));
        assert_eq!(inputs, vec![0, 3001]);
        assert_eq!(targets, vec![3001, -1]);
        assert_eq!(pos, vec![0, 1]);
        assert!(p.next_batch(true).unwrap().is_none());
    }

    #[test]
    fn padded_rows_and_empty_rows_counted() {
        let mut p = Packer::new(Mode::Padded, 2, 100, 9, 100).unwrap();
        p.feed(vec![0, 5, 6, 7], vec![0, 1, 1, 1], 0).unwrap();
        p.feed(vec![0, 5], vec![0, 0], 1).unwrap();
        let (info, inputs, targets, pos) = p.next_batch(false).unwrap().unwrap();
        assert_eq!(inputs, vec![0, 5, 6, 0, 9, 9]);
        assert_eq!(targets, vec![5, 6, 7, -1, -1, -1]);
        assert_eq!(pos, vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(info.doc_lens, vec![vec![3], vec![1, 2]]);
        assert_eq!(info.row_docs, vec![1, 1]);
        assert_eq!(info.empty_rows, 1);
        assert_eq!(info.num_pad, 2);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut p = Packer::new(Mode::BestFit, 2, 8, 0, 10).unwrap();
        assert!(p.feed(vec![1, 2], vec![0], 0).is_err());
        assert!(p.feed(vec![], vec![], 0).is_err());
        assert!(Packer::new(Mode::BestFit, 0, 8, 0, 10).is_err());
        assert!(Mode::parse("greedy").is_err());
    }

    /// Tokens cut by truncation add up over every cut conversation of a batch.
    #[test]
    fn truncated_tokens_add_up_over_a_batch() {
        for mode in [Mode::BestFit, Mode::Padded] {
            // capacity 5: cut by 3 and by 6 tokens, both in the one batch of 2 rows
            let mut p = Packer::new(mode, 2, 4, 0, 10).unwrap();
            let (i, m) = conv(8, 1);
            p.feed(i, m, 0).unwrap();
            let (i, m) = conv(11, 2);
            p.feed(i, m, 1).unwrap();
            let b = drain(&mut p);
            assert_eq!(b.len(), 1, "{mode:?}");
            assert_eq!(
                (b[0].0.num_truncated, b[0].0.truncated_tokens),
                (2, 9),
                "{mode:?}"
            );
        }
    }

    /// Python readers check masks themselves; `Packer::feed` is the Rust API's only guard.
    #[test]
    fn feed_refuses_mask_values_other_than_0_and_1() {
        let mut p = Packer::new(Mode::BestFit, 1, 8, 0, 4).unwrap();
        let err = p
            .feed(vec![0, 5, 6], vec![0, 1, 2], 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conversation tag 3: mask[2] = 2 (must be 0 or 1)"),
            "{err}"
        );
        assert_eq!(p.num_held(), 0);
    }

    /// A buffer of 0 would make best-fit yield nothing, silently; seq_len 0 rows of width 0.
    #[test]
    fn zero_sizes_are_refused() {
        let err = |r: Result<Packer>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err(Packer::new(Mode::BestFit, 1, 8, 0, 0)).contains("buffer_size must be at least 1")
        );
        assert!(err(Packer::new(Mode::BestFit, 1, 0, 0, 4)).contains("seq_len must be at least 1"));
        assert!(err(Packer::new(Mode::Padded, 1, 0, 0, 4)).contains("seq_len must be at least 1"));
        assert!(
            err(Packer::new(Mode::Padded, 0, 8, 0, 4)).contains("batch_size must be at least 1")
        );
        // padded mode has no buffer: 0 is fine there
        assert!(Packer::new(Mode::Padded, 1, 8, 0, 0).is_ok());
    }

    /// Committing a plan twice is an error (without the stale-plan check it would panic).
    #[test]
    fn committing_a_plan_twice_is_an_error_not_a_panic() {
        for mode in [Mode::BestFit, Mode::Padded] {
            let mut p = Packer::new(mode, 2, 7, 0, 4).unwrap();
            for t in 0..2u64 {
                let (i, m) = conv(3, t + 1);
                p.feed(i, m, t).unwrap();
            }
            let plan = p.plan(true).unwrap();
            p.commit_owned(&plan).unwrap();
            let err = p.commit_owned(&plan).unwrap_err().to_string();
            assert!(err.contains("stale plan"), "{mode:?}: {err}");
        }
    }
}
