"""Shared fixtures of the tasks/engine/eval tests: a byte-level tokenizer and a tiny random GPT.

Prompts are rendered by the tokenizer's own (Rust) `render_for_completion`.
"""

import torch

from sftfast import Tokenizer
from sftfast.model import GPT, GPTConfig


def byte_tokenizer() -> Tokenizer:
    # 256 single-byte tokens and no merges: a valid BPE vocabulary, tiny and instant to build.
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer.from_ranks(ranks, r"\S+|\s+")


def tiny_model(vocab_size: int, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=n_embd))
    model.init_weights(seed=seed)
    # nanochat zero-inits lm_head and output projections; give them random weights so the
    # model's outputs depend on its input (a zero lm_head makes every logit equal).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()
