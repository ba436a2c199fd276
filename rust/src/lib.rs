//! sftfast's data plane, in plain Rust (no Python here unless the `python` feature is on).
//!
//! Modules by concern:
//! - `pretokenize`: the regex pre-split (hand-written fast paths for known patterns, fancy-regex otherwise)
//! - `bpe`: byte-level BPE encode/decode, identical to tiktoken
//! - `train`: BPE training from text (incremental pair counts)
//! - `chat`: conversation rendering with special tokens and the assistant-only loss mask
//! - `pack`: padded and best-fit packing into batch buffers
//! - `shards`: memory-mapped preprocessed shards
//! - `py`: the thin PyO3 layer (feature `python`)

pub mod bpe;
pub mod chat;
pub mod error;
pub mod pack;
pub mod pretokenize;
pub mod shards;
pub mod train;

#[cfg(feature = "python")]
mod py;

pub use bpe::CoreBPE;
pub use error::Error;
