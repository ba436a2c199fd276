"""The tokenizer: GPT-4-style byte-level BPE in Rust, ids identical to tiktoken.

    from sftfast import Tokenizer
    tok = Tokenizer.from_tiktoken_file("cl100k_base.tiktoken", CL100K_PATTERN)
    ids = tok.encode("hello world")
"""

from __future__ import annotations

import base64

from sftfast import _core

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

NANOCHAT_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class Tokenizer:
    def __init__(self, core: _core.CoreTokenizer):
        self._core = core

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str, special_tokens=SPECIAL_TOKENS) -> "Tokenizer":
        base = max(ranks.values()) + 1 if ranks else 0
        specials = [(name, base + i) for i, name in enumerate(special_tokens)]
        return cls(_core.CoreTokenizer.from_ranks(ranks, pattern, specials))

    @classmethod
    def from_tiktoken_file(cls, path, pattern: str, special_tokens=SPECIAL_TOKENS) -> "Tokenizer":
        ranks = {}
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        return cls.from_ranks(ranks, pattern, special_tokens)

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def bos_id(self) -> int:
        return self._core.special_token_id("<|bos|>")

    def special_token_id(self, name: str) -> int:
        return self._core.special_token_id(name)

    def encode(self, text: str) -> list[int]:
        return self._core.encode(text)

    def decode_bytes(self, ids) -> bytes:
        return self._core.decode_bytes(list(ids))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- chat rendering (Rust: rust/src/chat.rs) ---
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) per SPEC 2; raises ConversationError naming the message and reason."""
        return self._core.render_conversation(conversation, max_tokens)

    def render_batch(self, conversations, max_tokens: int = 2048, num_threads=None, on_error: str = "fail", indices=None):
        """render_conversation over many, in parallel with the GIL released. on_error="skip"
        returns (rendered, [(index, message), ...]); indices name the conversations in errors."""
        return self._core.render_batch(conversations, max_tokens, num_threads, on_error, indices)

    def render_for_completion(self, conversation: dict, max_tokens: int = 2048) -> list[int]:
        """Prompt ids: the conversation minus its final assistant message, then <|assistant_start|>."""
        return self._core.render_for_completion(conversation, max_tokens)
    # --- end chat rendering ---
