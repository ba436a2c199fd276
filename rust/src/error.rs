//! One error type for the core; `py::errors` maps each variant to its own Python exception.

use thiserror::Error as ThisError;

#[derive(Debug, ThisError)]
pub enum Error {
    /// A split pattern that does not compile.
    #[error("invalid split pattern: {0}")]
    Pattern(String),
    /// A malformed vocabulary / rank file: where and why.
    #[error("{path}:{line}: {reason}")]
    RankFile {
        path: String,
        line: usize,
        reason: String,
    },
    /// Vocabulary inconsistencies (duplicate ranks, special ids colliding, ...).
    #[error("invalid vocabulary: {0}")]
    Vocab(String),
    #[error("unknown special token {0:?}")]
    UnknownSpecial(String),
    /// A token id outside the vocabulary, with its position in the input.
    #[error("token id {id} at index {index} is out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange {
        id: u32,
        index: usize,
        n_vocab: usize,
    },
    /// A malformed conversation: which one (index or file:line), which message, why.
    #[error("{location}: message {message}: {reason}")]
    Conversation {
        location: String,
        message: String,
        reason: String,
    },
    /// A preprocessing input record that cannot be parsed or rendered: where and why.
    #[error("{location}: {reason}")]
    Record { location: String, reason: String },
    /// A shard directory that is missing files or inconsistent, or a bad shard index.
    #[error("{0}")]
    Shard(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;
