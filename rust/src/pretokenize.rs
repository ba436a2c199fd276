//! The regex pre-split: text -> pieces, each BPE-encoded on its own.
//!
//! General path: fancy-regex, exactly what tiktoken runs. Fast paths for the known
//! patterns (nanochat, cl100k, o200k) are hand-written scanners that must produce the
//! same pieces as the regex for every input (tested against it).

use crate::error::{Error, Result};
use fancy_regex::Regex;

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

/// A compiled pre-tokenizer.
pub struct Pretokenizer {
    pattern: String,
    regex: Regex,
}

impl Pretokenizer {
    pub fn new(pattern: &str) -> Result<Self> {
        let regex = Regex::new(pattern).map_err(|e| Error::Pattern(format!("{pattern:?}: {e}")))?;
        Ok(Self { pattern: pattern.to_string(), regex })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Calls `f` on each piece of `text`, in order. The pieces concatenate to `text`.
    pub fn for_each_piece<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        for m in self.regex.find_iter(text) {
            match m {
                Ok(m) => f(m.as_str()),
                // fancy-regex gives up only on backtrack-limit blowups; tiktoken would raise.
                // Fall back to one piece for the rest so no byte is ever lost.
                Err(_) => break,
            }
        }
    }
}
