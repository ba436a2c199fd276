"""Generation speed: tokens/s of the Engine with and without the KV cache, on a random-init model.

    python -m sftfast.bench generate --json
    python -m sftfast.bench generate --device cuda --depth 12 --width 768 --batch 8 --new-tokens 256 --json

Both paths run the same greedy generation from the same prompt (so they produce the
same tokens, which the benchmark checks and reports); the no-cache path recomputes the
whole sequence for every new token, the cache path feeds one token per step after one
prefill. Generation length is --new-tokens per sample (a random model rarely emits a
stop token; if a row does stop early, the token counts say so). Vocabulary: 256 byte tokens plus
the 9 chat specials unless --vocab-size is larger (ids above 264 are then plain
unused tokens), which keeps the tokenizer out of the measurement.
"""

from __future__ import annotations

import time

import torch

from sftfast.cli import at_least


def add_arguments(parser):
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=at_least(1), default=4, help="transformer layers")
    parser.add_argument("--width", type=at_least(1), default=256, help="model dimension (n_embd)")
    parser.add_argument("--heads", type=at_least(1), default=4)
    parser.add_argument("--kv-heads", type=at_least(1), default=4)
    parser.add_argument("--vocab-size", type=at_least(1), default=8192)
    parser.add_argument("--prompt-tokens", type=at_least(1), default=64)
    parser.add_argument("--new-tokens", type=at_least(1), default=64)
    parser.add_argument("--batch", type=at_least(1), default=4, help="samples generated together")
    parser.add_argument("--repeats", type=at_least(1), default=2, help="timed runs per path (best is reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's)")


class _BenchTokenizer:
    """Byte-level ids 0..255 and the chat specials after them: all the Engine asks of a tokenizer."""

    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self, n_vocab: int):
        self.ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self.bos_id = self.ids["<|bos|>"]
        self.n_vocab = n_vocab  # the model's: the Engine samples over it (ids past 264 are plain tokens)

    def special_token_id(self, name):
        return self.ids[name]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> dict:
    from sftfast.engine import Engine
    from sftfast.model import GPT, GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    vocab = max(args.vocab_size, 256 + len(_BenchTokenizer.SPECIALS))
    tok = _BenchTokenizer(vocab)
    seq_len = args.prompt_tokens + args.new_tokens
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=args.depth, n_head=args.heads,
                       n_kv_head=args.kv_heads, n_embd=args.width)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.init_weights(seed=0)
    with torch.no_grad():  # nanochat zero-inits lm_head; a random one makes outputs depend on inputs
        model.lm_head.weight.normal_(0, 0.02)
    model.eval()
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    engine = Engine(model, tok)
    # A prompt of ordinary byte tokens, never a stop token; forbid early stops by generating
    # greedily from a model whose argmax is (overwhelmingly likely) not assistant_end.
    gen = torch.Generator().manual_seed(1)
    prompt = [tok.bos_id] + torch.randint(0, 256, (args.prompt_tokens - 1,), generator=gen).tolist()

    def timed(use_cache: bool):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            out, _ = engine.generate_batch(prompt, num_samples=args.batch, max_tokens=args.new_tokens,
                                           temperature=0.0, use_kv_cache=use_cache)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        generated = sum(len(r) - len(prompt) for r in out)
        return best, generated, out

    engine.generate_batch(prompt, num_samples=args.batch, max_tokens=4, temperature=0.0)  # warm-up
    t_cache, n_cache, out_cache = timed(True)
    t_plain, n_plain, out_plain = timed(False)
    return {
        "config": {"depth": args.depth, "width": args.width, "heads": args.heads, "kv_heads": args.kv_heads,
                   "vocab": vocab, "params": model.num_params(), "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "batch": args.batch, "device": device, "dtype": args.dtype,
                   "threads": torch.get_num_threads()},
        "kv_cache": {"seconds": round(t_cache, 4), "tokens": n_cache, "tokens_per_s": round(n_cache / t_cache, 1)},
        "no_cache": {"seconds": round(t_plain, 4), "tokens": n_plain, "tokens_per_s": round(n_plain / t_plain, 1)},
        "speedup": round((n_cache / t_cache) / (n_plain / t_plain), 2),
        "same_tokens": out_cache == out_plain,
    }
