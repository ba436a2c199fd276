//! Conversation rendering: special tokens, the assistant-only loss mask (SPEC 2).
