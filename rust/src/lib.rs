//! sftfast's data plane, in plain Rust (no Python here unless the `python` feature is on).
//!
//! Modules by concern:
//! - `pretokenize`: the regex pre-split (hand-written fast paths for known patterns, fancy-regex otherwise)
//! - `bpe`: byte-level BPE encode/decode, identical to tiktoken
//! - `train`: BPE training from text (incremental pair counts)
//! - `vocab_io`: tiktoken rank files and sftfast's tokenizer file
//! - `parallel`: rayon pools by size, safe across fork
//! - `chat`: conversation rendering with special tokens and the assistant-only loss mask
//! - `pack`: padded and best-fit packing into batch buffers
//! - `shards`: memory-mapped preprocessed shards
//! - `py`: the thin PyO3 layer (feature `python`)

pub mod bpe;
pub mod chat;
pub mod error;
pub mod pack;
pub mod parallel;
pub mod pretokenize;
pub mod shards;
pub mod train;
pub mod vocab_io;

#[cfg(feature = "python")]
mod py;

pub use bpe::CoreBPE;
pub use error::Error;
