"""sftfast: supervised fine-tuning for chat LLMs, fast.

A Rust data plane (tokenizer, rendering, packing), a fused Triton loss and a lean
PyTorch DDP trainer. See README.md.
"""

from sftfast._core import Batch, ConversationError, Packer, RenderedChunk
from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "NANOCHAT_SPLIT_PATTERN", "Packer", "Batch", "RenderedChunk", "ConversationError"]
__version__ = "0.1.0"
