//! The regex pre-split: text -> pieces, each BPE-encoded on its own.
//!
//! General path: fancy-regex, exactly what tiktoken runs. Fast paths for the known
//! patterns (nanochat, cl100k, o200k) are hand-written scanners that produce the same
//! pieces as the regex for every input (tested against it, exhaustively for the
//! character classes, on tricky strings, on random strings and on pathological ones).
//!
//! How the scanners stay exact:
//! - Character classes come from the same place fancy-regex gets them: `regex-syntax`'s
//!   Unicode tables (`\p{L}`, `\p{N}`, `\p{Lu}`..., and `\s` = White_Space), turned once
//!   per process into one class byte per code point (see `Classes`).
//! - Each alternative is replayed with the regex's leftmost-first backtracking order
//!   worked out by hand (see the comments at each alternative): e.g. `\s+(?!\S)` before a
//!   non-space gives back exactly one char; `\s*[\r\n]` (and o200k's `\s*[\r\n]+`) ends
//!   right after the last `\r`/`\n` of the whitespace run; o200k's `X?U*W+` either runs
//!   into a lowercase-class char after the upper-class run or ends after the last char
//!   that is in both classes (Lm, Lo, M).
//! - `(?i)` contractions: Rust regex uses simple case folding, so besides ASCII case
//!   `s` also matches U+017F LATIN SMALL LETTER LONG S; none of d, m, t, l, v, e, r have
//!   other fold partners (the KELVIN SIGN folds to `k`, not used here). Checked over every
//!   code point in the tests.
//! - Every scanner is total (every char is a letter, a number, whitespace or in
//!   `[^\s\p{L}\p{N}]`, and each pattern has an alternative for each), so the pieces
//!   always concatenate to the text, as they do with the regex.
//! - Linear time: each alternative scans a run at most a constant number of times and
//!   what a failed or shortened attempt scanned is consumed by the next one or two
//!   pieces (no quadratic rescans on runs of letters, spaces, CR/LF, digits or symbols).
//!
//! General (regex) path and its failures: fancy-regex gives up with an error when a
//! search exceeds its backtrack limit (1M pops) or its VM stack (1M entries: a 1M-char
//! whitespace run is enough with these patterns); tiktoken then panics, and the old code
//! here silently dropped the rest of the text. Now the rest of the text, from the end of
//! the last match, is searched again with a regex whose backtrack limit is 100x larger,
//! and if that gives up too, the rest becomes one piece: no byte is lost and the split
//! always terminates (the pieces then differ from what tiktoken would give, which is an
//! error). Text between matches of a pattern that does not cover every char is skipped,
//! as tiktoken skips it (the known patterns cover every char). Empty matches carry no
//! bytes and are not reported.
//!
//! Performance notes (`cargo run --profile fast --example pretok_bench [FILES] [--mb N]`:
//! MB/s of text split, fancy-regex `find_iter` vs the scanner, best of 3, same process;
//! measured on the shared 2-core x86_64 dev box under a load average of ~9, so absolute
//! figures are low and noisy, ratios are the useful part):
//! - Default input (this crate's sources + README, 8 MB): regex 3.6-4.9 MB/s, fast
//!   80-137 MB/s: nanochat ~20x, cl100k ~31-35x, o200k ~9-13x.
//! - 31 languages (vim's `tutor.*.utf-8`, 4.7 MB): regex 4.7-8.3 MB/s, fast 83-137 MB/s:
//!   nanochat ~20x, cl100k ~19x, o200k ~10-12x. The bench also checks that both ways give
//!   the same pieces on these inputs.
//! - Load-independent: `valgrind --tool=cachegrind --branch-sim=yes` on the fast-only run
//!   (SPEC.md, all three patterns): ~24 instructions and ~0.3 branch mispredicts per byte.
//! - The profile of the regex path is all fancy-regex VM + regex-automata searches per
//!   piece (pieces average ~4 bytes, so per-search overhead dominates). The scanner's
//!   cost is the per-piece branch mispredict at the end of each run.
//! - Tried and kept: SWAR for ASCII letter runs (8 bytes per step, then the full table
//!   from the first byte that is not a-z/A-Z): fast-only nanochat on SPEC.md 149 MB/s
//!   (1 run) before, 174-274 MB/s (5 runs) after. One split loop per pattern (constants folded): no difference
//!   measurable under this load, kept because it is no more code.
//! - Class lookup: ASCII through a 128-entry table; other code points through a
//!   two-level table (code point >> 7 -> one of 230 distinct 128-byte blocks): 17 KB of
//!   index + 29 KB of blocks, built once per process from regex-syntax's tables in 1-10
//!   ms (the bench's `first_new_ms`) on the first known-pattern `Pretokenizer::new`.
//! - Not done: `unsafe` unchecked indexing (bounds checks are not where the time goes);
//!   SIMD for whitespace/symbol runs (those runs are short in real text).

use crate::error::{Error, Result};
use fancy_regex::{Regex, RegexBuilder, RegexInput};
use regex_syntax::hir::{Class, HirKind};
use std::collections::HashMap;
use std::sync::OnceLock;

/// nanochat's split pattern (GPT-4's, with `\p{N}{1,2}` instead of `{1,3}`).
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// tiktoken's cl100k_base pattern.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
/// tiktoken's o200k_base pattern.
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

/// fancy-regex's default backtrack limit, and the larger one a failed search is retried with.
const BACKTRACK_LIMIT: usize = 1_000_000;
const FALLBACK_BACKTRACK_LIMIT: usize = 100 * BACKTRACK_LIMIT;

// ---------------------------------------------------------------------------------------
// Character classes: one byte of bits per code point.

const LU: u8 = 1 << 0; // \p{Lu} | \p{Lt}: only in o200k's "upper" class
const LL: u8 = 1 << 1; // \p{Ll}: only in o200k's "lower" class
const LO: u8 = 1 << 2; // \p{Lm} | \p{Lo}: in both
const MK: u8 = 1 << 3; // \p{M}: in both (and not a letter)
const NU: u8 = 1 << 4; // \p{N}
const WS: u8 = 1 << 5; // \s (Unicode White_Space)
const NL: u8 = 1 << 6; // \r or \n
const LETTER: u8 = LU | LL | LO; // \p{L}
const UPPER: u8 = LU | LO | MK; // [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
const LOWER: u8 = LL | LO | MK; // [\p{Ll}\p{Lm}\p{Lo}\p{M}]

/// `[^\s\p{L}\p{N}]`: symbols, punctuation, marks, controls...
#[inline(always)]
fn is_symbol(k: u8) -> bool {
    k & (WS | LETTER | NU) == 0
}

/// `[^\r\n\p{L}\p{N}]`: the optional one-char prefix of a word.
#[inline(always)]
fn is_prefix(k: u8) -> bool {
    k & (NL | LETTER | NU) == 0
}

const BLOCK_BITS: u32 = 7;
const BLOCK: usize = 1 << BLOCK_BITS;

/// Class bytes for every code point: `ascii` for the hot case, then a two-level table.
struct Classes {
    ascii: [u8; 128],
    /// code point >> BLOCK_BITS -> index of its block in `blocks`.
    index: Box<[u16]>,
    /// Deduplicated blocks of BLOCK class bytes.
    blocks: Box<[u8]>,
}

/// The ranges of a one-class regex, as regex-syntax (and hence fancy-regex) defines it.
fn class_ranges(class: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(class)
        .unwrap_or_else(|e| panic!("built-in class {class:?} does not parse: {e}"));
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("built-in class {class:?} is not a Unicode class: {other:?}"),
    }
}

impl Classes {
    fn build() -> Self {
        let mut flat = vec![0u8; 0x11_0000];
        let classes = [
            (r"\p{Lu}", LU),
            (r"\p{Lt}", LU),
            (r"\p{Ll}", LL),
            (r"\p{Lm}", LO),
            (r"\p{Lo}", LO),
            (r"\p{M}", MK),
            (r"\p{N}", NU),
            (r"\s", WS),
            (r"[\r\n]", NL),
        ];
        for (class, bit) in classes {
            for (lo, hi) in class_ranges(class) {
                for k in &mut flat[lo as usize..=hi as usize] {
                    *k |= bit;
                }
            }
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(&flat[..128]);
        let mut seen: HashMap<&[u8], u16> = HashMap::new();
        let mut blocks = Vec::new();
        let index = flat
            .chunks_exact(BLOCK)
            .map(|chunk| {
                *seen.entry(chunk).or_insert_with(|| {
                    blocks.extend_from_slice(chunk);
                    u16::try_from(blocks.len() / BLOCK - 1)
                        .expect("fewer than 65536 distinct blocks")
                })
            })
            .collect();
        Self {
            ascii,
            index,
            blocks: blocks.into_boxed_slice(),
        }
    }

    fn get() -> &'static Self {
        static CLASSES: OnceLock<Classes> = OnceLock::new();
        CLASSES.get_or_init(Self::build)
    }

    #[inline(always)]
    fn of(&self, cp: u32) -> u8 {
        let block = self.index[(cp >> BLOCK_BITS) as usize] as usize;
        self.blocks[block * BLOCK + (cp as usize & (BLOCK - 1))]
    }
}

// ---------------------------------------------------------------------------------------
// The scanners.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    Nanochat,
    Cl100k,
    O200k,
}

/// A whitespace run `[start, end)`, with where its last char starts and where the char
/// after its last `\r`/`\n` starts.
struct WsRun {
    end: usize,
    last_start: usize,
    after_last_newline: Option<usize>,
}

/// One scan over one text: its bytes and the class table.
struct Scanner<'a> {
    b: &'a [u8],
    classes: &'static Classes,
}

impl<'a> Scanner<'a> {
    /// Class and UTF-8 length of the char starting at `i` (`i < len`, on a boundary).
    #[inline(always)]
    fn at(&self, i: usize) -> (u8, usize) {
        let b = self.b;
        let b0 = b[i];
        if b0 < 0x80 {
            return (self.classes.ascii[b0 as usize], 1);
        }
        // `b` is a &str's bytes, so the continuation bytes are there and valid.
        let (cp, len) = if b0 < 0xE0 {
            (((b0 as u32 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (
                ((b0 as u32 & 0x0F) << 12)
                    | ((b[i + 1] as u32 & 0x3F) << 6)
                    | (b[i + 2] as u32 & 0x3F),
                3,
            )
        } else {
            (
                ((b0 as u32 & 0x07) << 18)
                    | ((b[i + 1] as u32 & 0x3F) << 12)
                    | ((b[i + 2] as u32 & 0x3F) << 6)
                    | (b[i + 3] as u32 & 0x3F),
                4,
            )
        };
        (self.classes.of(cp), len)
    }

    /// Class of the char at `i`, or 0 (no class) at the end of the text.
    #[inline(always)]
    fn class_at(&self, i: usize) -> u8 {
        if i < self.b.len() {
            self.at(i).0
        } else {
            0
        }
    }

    /// The end of the longest run of chars from `i` whose class satisfies `keep`.
    #[inline(always)]
    fn skip(&self, mut i: usize, keep: impl Fn(u8) -> bool) -> usize {
        let b = self.b;
        while i < b.len() {
            let b0 = b[i];
            if b0 < 0x80 {
                if !keep(self.classes.ascii[b0 as usize]) {
                    break;
                }
                i += 1;
            } else {
                let (k, len) = self.at(i);
                if !keep(k) {
                    break;
                }
                i += len;
            }
        }
        i
    }

    /// `skip` for a class that holds every ASCII byte in `lo..=hi` after OR-ing it with
    /// `fold` (0x20 folds A-Z onto a-z and maps no other byte into a-z): 8 bytes at a time
    /// while they are all in the range, then `skip` from the first byte that is not (which
    /// still checks it, and everything after it, with the full table).
    #[inline(always)]
    fn skip_ascii_fast(
        &self,
        mut i: usize,
        keep: impl Fn(u8) -> bool,
        lo: u8,
        hi: u8,
        fold: u8,
    ) -> usize {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let b = self.b;
        while let Some(chunk) = b.get(i..i + 8) {
            let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            // Per byte, with the top bit cleared first so the additions never carry into
            // the next byte: top bit set in `ge` iff byte >= lo, in `gt` iff byte > hi.
            let low7 = (x | (ONES * fold as u64)) & !HIGH;
            let ge = low7 + ONES * (0x80 - lo) as u64;
            let gt = low7 + ONES * (0x7F - hi) as u64;
            let inside = !x & ge & !gt & HIGH;
            if inside != HIGH {
                i += ((!inside & HIGH).trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        self.skip(i, keep)
    }

    /// End of `\p{N}{1,max}` whose first digit ends at `i`.
    #[inline]
    fn digit_run(&self, mut i: usize, max: usize) -> usize {
        for _ in 1..max {
            if i < self.b.len() {
                let (k, len) = self.at(i);
                if k & NU != 0 {
                    i += len;
                    continue;
                }
            }
            break;
        }
        i
    }

    /// Where ` ?[^\s\p{L}\p{N}]+` starts its symbol run at `pos` (class `k0`): after an
    /// optional space when a symbol follows it; None when no symbol run starts here.
    #[inline]
    fn symbol_start(&self, pos: usize, k0: u8) -> Option<usize> {
        if self.b[pos] == b' ' && is_symbol(self.class_at(pos + 1)) {
            Some(pos + 1)
        } else if is_symbol(k0) {
            Some(pos)
        } else {
            None
        }
    }

    /// The end of the longest run of bytes from `i` in `set` (ASCII only).
    #[inline(always)]
    fn skip_bytes(&self, mut i: usize, set: &[u8]) -> usize {
        while i < self.b.len() && set.contains(&self.b[i]) {
            i += 1;
        }
        i
    }

    /// The whitespace run starting at `i` (which is whitespace).
    #[inline(always)]
    fn ws_run(&self, mut i: usize) -> WsRun {
        let mut last_start = i;
        let mut after_last_newline = None;
        while i < self.b.len() {
            let (k, len) = self.at(i);
            if k & WS == 0 {
                break;
            }
            last_start = i;
            i += len;
            if k & NL != 0 {
                after_last_newline = Some(i);
            }
        }
        WsRun {
            end: i,
            last_start,
            after_last_newline,
        }
    }

    /// Length of `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i` (the same set as
    /// `'(?i:[sdmt]|ll|ve|re)`), 0 if none. `c | 0x20` lowercases an ASCII letter and maps
    /// no other byte onto one of these letters.
    #[inline(always)]
    fn contraction(&self, i: usize) -> usize {
        match self.b.get(i..).unwrap_or_default() {
            [b'\'', c, ..] if matches!(c | 0x20, b's' | b'd' | b'm' | b't') => 2,
            // U+017F LATIN SMALL LETTER LONG S case-folds to `s`.
            [b'\'', 0xC5, 0xBF, ..] => 3,
            [b'\'', c1, c2, ..]
                if matches!(
                    (c1 | 0x20, c2 | 0x20),
                    (b'l', b'l') | (b'v', b'e') | (b'r', b'e')
                ) =>
            {
                3
            }
            _ => 0,
        }
    }

    /// nanochat and cl100k: the end of the piece starting at `pos`.
    #[inline(always)]
    fn gpt4_piece(&self, pos: usize, max_digits: usize, cl100k: bool) -> usize {
        let b = self.b;
        let (k0, len0) = self.at(pos);
        // '(?i:[sdmt]|ll|ve|re)
        if b[pos] == b'\'' {
            let n = self.contraction(pos);
            if n > 0 {
                return pos + n;
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+ : the possessive `?+` never gives its char back, and
        // giving it back could not help (it is not a letter), so: a letter run, or one
        // prefix char then a letter run.
        if k0 & LETTER != 0 || (is_prefix(k0) && self.class_at(pos + len0) & LETTER != 0) {
            return self.skip_ascii_fast(pos + len0, |k| k & LETTER != 0, b'a', b'z', 0x20);
        }
        // \p{N}{1,2} / \p{N}{1,3}+
        if k0 & NU != 0 {
            return self.digit_run(pos + len0, max_digits);
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*`: with the space if a symbol follows it; else the
        // space (whitespace) cannot start a symbol run.
        if let Some(start) = self.symbol_start(pos, k0) {
            let end = self.skip(start, is_symbol);
            return self.skip_bytes(end, b"\r\n");
        }
        // Only whitespace is left: every char is a letter, a number, whitespace or a symbol.
        debug_assert!(k0 & WS != 0);
        let run = self.ws_run(pos);
        // cl100k's `\s++$`: a whitespace run reaching the end of the text (no multiline).
        if cl100k && run.end == b.len() {
            return run.end;
        }
        // `\s*[\r\n]`: greedy, then back off to the last \r or \n of the run.
        if let Some(end) = run.after_last_newline {
            return end;
        }
        // `\s+(?!\S)`: the whole run at the end of the text, else give back its last char
        // (which then sees whitespace ahead); fails on a single char before a non-space.
        if run.end == b.len() {
            return run.end;
        }
        if run.last_start > pos {
            return run.last_start;
        }
        // `\s+` / `\s`: that single char.
        run.end
    }

    /// o200k's `U*W+` at `q` (U, W: the upper and lower classes): the greedy U run, then a
    /// W run if a W char follows it; otherwise backtracking hands W+ the last char of the
    /// U run that is also in W (Lm, Lo, M), and the match ends right after it.
    #[inline(always)]
    fn upper_star_lower_plus(&self, q: usize) -> Option<usize> {
        let mut i = q;
        let mut after_both = None;
        // Class of the char that ends the U run (0 at the end of the text).
        let mut next = 0;
        while i < self.b.len() {
            let (k, len) = self.at(i);
            if k & UPPER == 0 {
                next = k;
                break;
            }
            i += len;
            if k & LOWER != 0 {
                after_both = Some(i);
            }
        }
        if next & LOWER != 0 {
            return Some(self.skip_ascii_fast(i, |k| k & LOWER != 0, b'a', b'z', 0));
        }
        after_both
    }

    /// o200k: the end of the piece starting at `pos`.
    #[inline(always)]
    fn o200k_piece(&self, pos: usize) -> usize {
        let b = self.b;
        let (k0, len0) = self.at(pos);
        let prefix = is_prefix(k0);
        // X?U*W+C? then X?U+W*C? (X = [^\r\n\p{L}\p{N}], C = the optional contraction).
        // X? is greedy: first with the prefix char, then (a mark is both X and U/W)
        // without it. C? is optional, so it never decides whether an alternative matches.
        let word = if let Some(e) = prefix
            .then(|| self.upper_star_lower_plus(pos + len0))
            .flatten()
        {
            Some(e)
        } else if let Some(e) = self.upper_star_lower_plus(pos) {
            Some(e)
        } else if prefix && self.class_at(pos + len0) & UPPER != 0 {
            let e = self.skip(pos + len0, |k| k & UPPER != 0);
            Some(self.skip(e, |k| k & LOWER != 0))
        } else if k0 & UPPER != 0 {
            let e = self.skip(pos + len0, |k| k & UPPER != 0);
            Some(self.skip(e, |k| k & LOWER != 0))
        } else {
            None
        };
        if let Some(end) = word {
            return end + self.contraction(end);
        }
        // \p{N}{1,3}
        if k0 & NU != 0 {
            return self.digit_run(pos + len0, 3);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
        if let Some(start) = self.symbol_start(pos, k0) {
            let end = self.skip(start, is_symbol);
            return self.skip_bytes(end, b"\r\n/");
        }
        debug_assert!(k0 & WS != 0);
        let run = self.ws_run(pos);
        // `\s*[\r\n]+`: greedy, then back off to the last \r or \n; `[\r\n]+` then cannot
        // extend (the next char is not \r or \n).
        if let Some(end) = run.after_last_newline {
            return end;
        }
        // `\s+(?!\S)` then `\s+`, as for cl100k.
        if run.end == b.len() {
            return run.end;
        }
        if run.last_start > pos {
            return run.last_start;
        }
        run.end
    }
}

// ---------------------------------------------------------------------------------------

enum Engine {
    Fast(Known),
    Regex(Box<General>),
}

/// The general path's regexes.
struct General {
    regex: Regex,
    /// Built on the first search that fails with `regex` (None if it does not build).
    fallback: OnceLock<Option<Regex>>,
    fallback_limit: usize,
}

/// A compiled pre-tokenizer.
pub struct Pretokenizer {
    pattern: String,
    engine: Engine,
}

impl Pretokenizer {
    pub fn new(pattern: &str) -> Result<Self> {
        Self::with_backtrack_limits(pattern, BACKTRACK_LIMIT, FALLBACK_BACKTRACK_LIMIT)
    }

    /// Limits of the general path: first try, then retry (tests make them tiny).
    fn with_backtrack_limits(pattern: &str, limit: usize, fallback_limit: usize) -> Result<Self> {
        let known = match pattern {
            NANOCHAT_PATTERN => Some(Known::Nanochat),
            CL100K_PATTERN => Some(Known::Cl100k),
            O200K_PATTERN => Some(Known::O200k),
            _ => None,
        };
        let engine = match known {
            Some(known) => {
                Classes::get();
                Engine::Fast(known)
            }
            None => Engine::Regex(Box::new(General {
                regex: build_regex(pattern, limit)?,
                fallback: OnceLock::new(),
                fallback_limit,
            })),
        };
        Ok(Self {
            pattern: pattern.to_string(),
            engine,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// True when the pattern is one of the known ones, split by a hand-written scanner.
    pub fn is_fast(&self) -> bool {
        matches!(self.engine, Engine::Fast(_))
    }

    /// Calls `f` on each piece of `text`, in order. For the known patterns the pieces
    /// concatenate to `text`; for others, text the pattern does not match is skipped, as
    /// in tiktoken (see the module docs for backtrack-limit failures).
    pub fn for_each_piece<'t>(&self, text: &'t str, f: impl FnMut(&'t str)) {
        match &self.engine {
            // One loop per pattern, so the pattern's constants fold into its scanner.
            Engine::Fast(Known::Nanochat) => split(text, f, |s, pos| s.gpt4_piece(pos, 2, false)),
            Engine::Fast(Known::Cl100k) => split(text, f, |s, pos| s.gpt4_piece(pos, 3, true)),
            Engine::Fast(Known::O200k) => split(text, f, |s, pos| s.o200k_piece(pos)),
            Engine::Regex(g) => regex_pieces(
                &g.regex,
                || {
                    g.fallback
                        .get_or_init(|| build_regex(&self.pattern, g.fallback_limit).ok())
                },
                text,
                f,
            ),
        }
    }
}

/// The fast path: `piece(scanner, pos)` is the end of the piece that starts at `pos`.
#[inline(always)]
fn split<'t>(
    text: &'t str,
    mut f: impl FnMut(&'t str),
    piece: impl Fn(&Scanner<'t>, usize) -> usize,
) {
    let scanner = Scanner {
        b: text.as_bytes(),
        classes: Classes::get(),
    };
    let mut pos = 0;
    while pos < text.len() {
        let end = piece(&scanner, pos);
        f(&text[pos..end]);
        pos = end;
    }
}

fn build_regex(pattern: &str, backtrack_limit: usize) -> Result<Regex> {
    RegexBuilder::new(pattern)
        .backtrack_limit(backtrack_limit)
        .build()
        .map_err(|e| Error::Pattern(format!("{pattern:?}: {e}")))
}

/// The general path: fancy-regex's `find_iter`. After a search fails (backtrack limit
/// or VM stack), the rest of the text is searched with `fallback` (a larger limit) from
/// the end of the last match; if that fails too, the rest of the text is one piece.
fn regex_pieces<'t, 'r>(
    regex: &'r Regex,
    fallback: impl FnOnce() -> &'r Option<Regex>,
    text: &'t str,
    mut f: impl FnMut(&'t str),
) {
    // Pieces from `from` on; Err(at) if a search failed, `at` being the end of the last match.
    let mut run = |re: &Regex, mut from: usize| -> std::result::Result<(), usize> {
        for m in re.find_iter_input(RegexInput::new(text).from_pos(from)) {
            let m = m.map_err(|_| from)?;
            // Empty matches carry no bytes (and a restarted search may find one again).
            if !m.as_str().is_empty() {
                f(m.as_str());
            }
            from = m.end();
        }
        Ok(())
    };
    let Err(from) = run(regex, 0) else { return };
    let from = match fallback() {
        Some(bigger) => match run(bigger, from) {
            Ok(()) => return,
            Err(from) => from,
        },
        None => from,
    };
    if from < text.len() {
        f(&text[from..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 3] = [NANOCHAT_PATTERN, CL100K_PATTERN, O200K_PATTERN];

    fn fast_pieces(pattern: &str, text: &str) -> Vec<String> {
        let p = Pretokenizer::new(pattern).unwrap();
        assert!(p.is_fast());
        let mut out = Vec::new();
        p.for_each_piece(text, |s| out.push(s.to_string()));
        out
    }

    /// The oracle: fancy-regex's find_iter, with a limit high enough for the long tests.
    fn regex_pieces_oracle(re: &Regex, text: &str) -> Vec<String> {
        re.find_iter(text)
            .map(|m| {
                let head: String = text.chars().take(100).collect();
                m.unwrap_or_else(|e| {
                    panic!("oracle failed on {head:?} ({} bytes): {e}", text.len())
                })
                .as_str()
                .to_string()
            })
            .collect()
    }

    fn oracle(pattern: &str) -> Regex {
        RegexBuilder::new(pattern)
            .backtrack_limit(1_000_000_000)
            .build()
            .unwrap()
    }

    fn check(pattern: &str, re: &Regex, text: &str) {
        let want = regex_pieces_oracle(re, text);
        let got = fast_pieces(pattern, text);
        if got != want {
            let name = match pattern {
                NANOCHAT_PATTERN => "nanochat",
                CL100K_PATTERN => "cl100k",
                _ => "o200k",
            };
            let short = |v: &Vec<String>| v.iter().take(40).cloned().collect::<Vec<_>>();
            let head: String = text.chars().take(200).collect();
            panic!(
                "{name} differs on {head:?} ({} bytes)\n fast:  {:?}\n regex: {:?}",
                text.len(),
                short(&got),
                short(&want)
            );
        }
        assert_eq!(got.concat(), text);
    }

    /// Every code point except surrogates, as a string.
    fn all_chars() -> impl Iterator<Item = char> {
        (0u32..=0x10FFFF).filter_map(char::from_u32)
    }

    #[test]
    fn class_table_matches_regex_classes_for_every_code_point() {
        let classes = Classes::get();
        type Has = fn(u8) -> bool;
        let cases: [(&str, Has); 10] = [
            (r"\p{L}", |k| k & LETTER != 0),
            (r"\p{N}", |k| k & NU != 0),
            (r"\s", |k| k & WS != 0),
            (r"[\r\n]", |k| k & NL != 0),
            (r"\p{M}", |k| k & MK != 0),
            (r"\p{Ll}", |k| k & LL != 0),
            (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", |k| k & UPPER != 0),
            (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", |k| k & LOWER != 0),
            (r"[^\s\p{L}\p{N}]", is_symbol),
            (r"[^\r\n\p{L}\p{N}]", is_prefix),
        ];
        for (class, has) in cases {
            let re = Regex::new(&format!(r"\A{class}\z")).unwrap();
            let mut buf = [0u8; 4];
            for c in all_chars() {
                let s = c.encode_utf8(&mut buf);
                let scanner = Scanner {
                    b: s.as_bytes(),
                    classes,
                };
                let (k, len) = scanner.at(0);
                assert_eq!(len, s.len());
                assert_eq!(
                    has(k),
                    re.is_match(s).unwrap(),
                    "class {class} on U+{:04X}",
                    c as u32
                );
            }
        }
    }

    #[test]
    fn contraction_letters_case_fold_like_the_regex() {
        // Which code points `(?i)x` matches, for each contraction letter.
        for letter in ['s', 'd', 'm', 't', 'l', 'v', 'e', 'r'] {
            let re = Regex::new(&format!(r"\A(?i:{letter})\z")).unwrap();
            let matched: Vec<char> = all_chars()
                .filter(|c| re.is_match(&c.to_string()).unwrap())
                .collect();
            let mut want = vec![letter.to_ascii_uppercase(), letter];
            if letter == 's' {
                want.push('\u{17F}');
            }
            assert_eq!(matched, want, "(?i){letter}");
        }
    }

    const TRICKY: &[&str] = &[
        "",
        "a",
        " ",
        "Hello world",
        "I'm here, you're there; it's HIS, they'LL, we've, I'd, she'S, 'T, 'Re 'vE 'lL",
        "don't DON'T Don'T 'sa 's 'S 'x 'll' ''s '' ' 'ſ 'ſa 'K",
        "HELLO'S WORLD'd CamelCase camelCase ABCdef abcDEF",
        "x²+y² = z², ٣٤٥ ١٢ Ⅻ ⅷ 12345 1234567 ①②③",
        "中文字符，日本語のテキスト。한국어 텍스트",
        "emoji 😀😃 👍🏽 🇫🇷 and ZWJ 👨‍👩‍👧",
        "\r\n\r\n  x",
        "\r\n\r\n  ",
        "line\rcarriage\r\rreturn\r",
        "trailing spaces   ",
        "\ttabs\t\tand\t ",
        "nbsp\u{A0}here \u{A0}x\u{A0}\u{A0}",
        "sep\u{2028}line\u{2029}para\u{85}nel",
        "combining e\u{301}\u{301} \u{301}x \u{301}\u{302} a\u{20DD}",
        "marks after space: \u{301}abc, after punct: -\u{301}, alone: \u{301}",
        "title ǅungla ǈ ǋ and modifier ʰʲ ˈstress and Lo אבג ا ب",
        "Kelvin \u{212A} Angstrom \u{212B} sharp ß ẞ long ſ",
        "  \n  \n\n   \t\n x",
        "a\n\nb \n c  \n  d",
        "   leading",
        "!!! ?? ... --- /// **bold** `code` <|bos|>",
        " !!!\n\n/\n ",
        "path/to/file.rs: 42/7\n/r/n",
        "x-y_z __init__ foo.bar(baz)",
        "\u{3000}ideographic space\u{3000}\u{3000}x",
        "\u{1680}ogham \u{2000}\u{200A}x \u{202F}y \u{205F}z",
        "\u{FEFF}bom \u{200B}zwsp \u{200D}zwj",
        "\u{0}\u{1}\u{1F}\u{7F} controls",
        "'\n'\r\n'  '",
        "123abc456 abc123 1a2b3c",
        "ÉCOLE école Ébène ÀÉÎÕÜ",
        "ʰA ʰa Aʰ aʰ ʰ\u{301}A Aʰ\u{301}B AB\u{301} \u{301}AB \u{301}A\u{301} A\u{301}B",
        "ABC'S abc's ABC'll ǅ's ǅ'S x'ſ",
        "\u{301}'s '\u{301}s -ǅa -ǅ -Aʰ",
        "\n\r\n\r",
        " \r",
        "a \r\n",
        "\u{A0}\n",
    ];

    #[test]
    fn tricky_strings_match_the_regex() {
        for pattern in KNOWN {
            let re = oracle(pattern);
            for text in TRICKY {
                check(pattern, &re, text);
            }
        }
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Characters at the boundaries of the classes and alternatives.
    const ALPHABET: &[char] = &[
        ' ', ' ', ' ', '\t', '\r', '\n', '\n', '\'', '\'', 's', 'S', 'ſ', 'l', 'L', 'v', 'e', 'E',
        'r', 'd', 'm', 't', 'T', 'a', 'Z', 'x', '0', '7', '9', '²', '٣', 'Ⅻ', '-', '/', '/', '!',
        '.', ',', '_', '\u{A0}', '\u{2028}', '\u{85}', '\u{3000}', '\u{B}', '\u{C}', '中', '😀',
        '\u{301}', '\u{903}', 'ǅ', 'ʰ', 'א', 'É', 'é', '\u{212A}', 'ẞ', 'ß', '\u{0}', '\u{200D}',
        '\u{FEFF}', '\u{2029}', '\u{1C}', '\u{20DD}', 'ǈ',
    ];

    #[test]
    fn random_strings_match_the_regex() {
        let res: Vec<Regex> = KNOWN.iter().map(|p| oracle(p)).collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut text = String::new();
        // PRETOK_FUZZ_CASES=1000000 for a deeper run than the default.
        let cases = std::env::var("PRETOK_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4000);
        for case in 0..cases {
            text.clear();
            // Every other case is made of runs (a char repeated 1-6 times), which is where
            // the backtracking inside whitespace and letter runs shows.
            let runs = case % 2 == 1;
            let len = rng.below(if runs { 12 } else { 24 });
            for _ in 0..len {
                // Mostly the boundary alphabet, sometimes any code point.
                let c = if rng.below(10) == 0 {
                    char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{FFFD}')
                } else {
                    ALPHABET[rng.below(ALPHABET.len())]
                };
                let times = if runs { 1 + rng.below(6) } else { 1 };
                for _ in 0..times {
                    text.push(c);
                }
            }
            for (pattern, re) in KNOWN.iter().zip(&res) {
                check(pattern, re, &text);
            }
            // Also runs: repeat a random slice to exercise long alternations.
            if case % 50 == 0 && !text.is_empty() {
                let long = text.repeat(30);
                for (pattern, re) in KNOWN.iter().zip(&res) {
                    check(pattern, re, &long);
                }
            }
        }
    }

    /// Letter runs of every length around the 8-byte steps of `skip_ascii_fast`, broken at
    /// every offset by the bytes next to the ASCII letter ranges and by non-ASCII chars.
    #[test]
    fn ascii_runs_of_every_length_and_break_match_the_regex() {
        let res: Vec<Regex> = KNOWN.iter().map(|p| oracle(p)).collect();
        let breakers = [
            '@', '[', '`', '{', '\u{7F}', '0', ' ', '\'', 'é', 'É', '中', 'ʰ', 'ǅ', '\u{301}',
            '\u{A0}', 'A', 'z',
        ];
        let letters = b"abcXYZqrsTUVwZaA";
        for prefix in ["", " ", "'", "-", "Ab", "\n"] {
            for len in 0..20 {
                for at in 0..=len {
                    for &brk in &breakers {
                        let mut text = String::from(prefix);
                        for i in 0..len {
                            if i == at {
                                text.push(brk);
                            }
                            text.push(letters[(i * 7 + len) % letters.len()] as char);
                        }
                        text.push_str("!x");
                        for (pattern, re) in KNOWN.iter().zip(&res) {
                            check(pattern, re, &text);
                        }
                    }
                }
            }
        }
    }

    /// Long runs that make a backtracking or naive scanner quadratic. Sizes stay where
    /// fancy-regex itself still answers (its VM stack holds 1M entries, and a 1M-char
    /// whitespace run overflows it), so each is compared with the oracle.
    #[test]
    fn pathological_inputs_are_exact() {
        let inputs: Vec<String> = vec![
            "a".repeat(100_000),
            "A".repeat(100_000),
            "^".repeat(300_000),
            " ".repeat(200_000),
            format!("{}x", " ".repeat(200_000)),
            format!("\n{}x", " ".repeat(200_000)),
            "\r\n".repeat(100_000),
            format!("{} x", "\r\n".repeat(100_000)),
            format!("word{}", "-".repeat(32_000)),
            "7".repeat(300_000),
            "'s".repeat(100_000),
            "\u{301}".repeat(100_000),
            "Aʰ".repeat(100_000),
            "ʰA".repeat(100_000),
            format!("{}a", "A".repeat(100_000)),
            format!(" {}", "\u{A0}".repeat(100_000)),
            "\t \n".repeat(100_000),
            "中".repeat(100_000),
        ];
        for pattern in KNOWN {
            let re = oracle(pattern);
            for text in &inputs {
                check(pattern, &re, text);
            }
        }
    }

    /// 1M-char runs, beyond what fancy-regex can answer: they must finish quickly, lose
    /// nothing, and split as the patterns say (each expectation follows from the pattern).
    #[test]
    fn million_char_runs_finish_and_split_as_the_pattern_says() {
        const M: usize = 1_000_000;
        let spaces = " ".repeat(M);
        for pattern in KNOWN {
            // Symbols: one ` ?[^\s\p{L}\p{N}]+` piece. Letters: one word.
            for text in [
                "^".repeat(M),
                "a".repeat(M),
                "\u{301}".repeat(M),
                "中".repeat(M),
            ] {
                assert_eq!(fast_pieces(pattern, &text), [text.as_str()]);
            }
            // Whitespace to the end of the text: one piece (`\s++$` or `\s+(?!\S)`).
            assert_eq!(fast_pieces(pattern, &spaces), [spaces.as_str()]);
            // Before a letter, `\s+(?!\S)` gives back one space, which prefixes the word.
            let text = format!("{spaces}x");
            assert_eq!(fast_pieces(pattern, &text), [&spaces[1..], " x"]);
            // CRLF runs: `\s*[\r\n]` (o200k: `\s*[\r\n]+`) takes all of it at once.
            let text = format!("{}x", "\r\n".repeat(M / 2));
            assert_eq!(fast_pieces(pattern, &text), [&text[..M], "x"]);
            // Digits: groups of 2 (nanochat) or 3.
            let digits = "7".repeat(M);
            let group = if pattern == NANOCHAT_PATTERN { 2 } else { 3 };
            let pieces = fast_pieces(pattern, &digits);
            assert_eq!(pieces.len(), M.div_ceil(group));
            assert!(pieces[..pieces.len() - 1].iter().all(|p| p.len() == group));
            assert_eq!(pieces.concat(), digits);
        }
    }

    #[test]
    fn other_patterns_use_the_regex() {
        // A known pattern with one char changed is not known.
        let almost = NANOCHAT_PATTERN.replace("{1,2}", "{1,4}");
        let p = Pretokenizer::new(&almost).unwrap();
        assert!(!p.is_fast());
        assert_eq!(p.pattern(), almost);
        let text = "abc 123456 def's  \n\n x";
        let mut got = Vec::new();
        p.for_each_piece(text, |s| got.push(s));
        let want: Vec<&str> = Regex::new(&almost)
            .unwrap()
            .find_iter(text)
            .map(|m| m.unwrap().as_str())
            .collect();
        assert_eq!(got, want);
        assert!(got.contains(&"1234"));

        // A pattern that does not cover everything skips what it does not match, like tiktoken.
        let p = Pretokenizer::new(r"\p{L}+|\p{N}+").unwrap();
        let mut got = Vec::new();
        p.for_each_piece("ab, 12 -- cd", |s| got.push(s));
        assert_eq!(got, ["ab", "12", "cd"]);

        // Empty matches carry no bytes and are not reported.
        let p = Pretokenizer::new(r"a*").unwrap();
        let mut got = Vec::new();
        p.for_each_piece("baab", |s| got.push(s));
        assert_eq!(got, ["aa"]);
    }

    #[test]
    fn pretokenizer_is_shared_across_threads() {
        // encode_batch splits on rayon threads with one shared Pretokenizer.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Pretokenizer>();
    }

    #[test]
    fn bad_pattern_is_a_pattern_error() {
        match Pretokenizer::new(r"(unclosed") {
            Err(Error::Pattern(msg)) => assert!(msg.contains("unclosed"), "{msg}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("compiled"),
        }
    }

    /// Forces the general path (the known patterns would take the fast one).
    fn as_general(pattern: &str) -> String {
        format!("(?:{pattern})")
    }

    #[test]
    fn backtrack_limit_retries_then_keeps_the_rest() {
        // `\s+(?=\S\S)` backtracks once per space of a run followed by a single non-space:
        // with a limit of 10 those searches fail.
        let pattern = r"\s+(?=\S\S)|\S+|\s";
        let text = format!(
            "hello {}world, {}a b\n\n  more   text",
            " ".repeat(30),
            "\t".repeat(30)
        );
        let want = regex_pieces_oracle(&oracle(pattern), &text);
        assert_eq!(want.concat(), text);

        let tiny = build_regex(pattern, 10).unwrap();
        assert!(
            tiny.find_iter(&text).any(|m| m.is_err()),
            "the test needs a search that hits the limit"
        );

        // The retry with the larger limit gives exactly the regex's pieces.
        let p = Pretokenizer::with_backtrack_limits(pattern, 10, FALLBACK_BACKTRACK_LIMIT).unwrap();
        assert!(!p.is_fast());
        let mut got = Vec::new();
        p.for_each_piece(&text, |s| got.push(s.to_string()));
        assert_eq!(got, want);

        // When the retry fails too, the rest of the text is one piece: nothing is lost.
        let p = Pretokenizer::with_backtrack_limits(pattern, 10, 10).unwrap();
        let mut got = Vec::new();
        p.for_each_piece(&text, |s| got.push(s.to_string()));
        assert_eq!(got.concat(), text);
        let (last, done) = got.split_last().unwrap();
        assert_eq!(done, &want[..done.len()]);
        assert!(last.starts_with(' ') && last.len() > 30, "{last:?}");
    }

    #[test]
    fn general_path_of_known_patterns_matches_the_fast_path() {
        for pattern in KNOWN {
            let p = Pretokenizer::new(&as_general(pattern)).unwrap();
            assert!(!p.is_fast());
            for text in TRICKY {
                let mut got = Vec::new();
                p.for_each_piece(text, |s| got.push(s.to_string()));
                assert_eq!(got, fast_pieces(pattern, text), "{pattern} on {text:?}");
            }
        }
    }
}
