//! Preprocessed, memory-mapped shards of rendered conversations (issue 4).
