"""Shared fixtures of the tasks/engine/eval tests: a byte-level tokenizer and a tiny random GPT.

The rendering helper uses the tokenizer's own `render_for_completion` (the Rust renderer of
the data branch) when the tokenizer has it, else the SPEC 2 rules written out here, so these
tests run before and after that branch is merged.
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


def render_for_completion(tok, conversation) -> list[int]:
    if hasattr(tok, "render_for_completion"):
        return list(tok.render_for_completion(conversation))
    sid = tok.special_token_id
    messages = list(conversation["messages"])
    if messages and messages[0]["role"] == "system":
        messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
    messages = messages[:-1]  # drop the assistant answer
    ids = [tok.bos_id]
    for m in messages:
        if m["role"] == "user":
            ids += [sid("<|user_start|>"), *tok.encode(m["content"]), sid("<|user_end|>")]
        else:
            ids.append(sid("<|assistant_start|>"))
            content = m["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for p in parts:
                if p["type"] == "text":
                    ids += tok.encode(p["text"])
                elif p["type"] == "python":
                    ids += [sid("<|python_start|>"), *tok.encode(p["text"]), sid("<|python_end|>")]
                else:
                    ids += [sid("<|output_start|>"), *tok.encode(p["text"]), sid("<|output_end|>")]
            ids.append(sid("<|assistant_end|>"))
    ids.append(sid("<|assistant_start|>"))
    return ids
