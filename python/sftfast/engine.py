"""Generation: a KV cache, batched sampling (temperature, top-k), and the calculator tool.

    from sftfast.engine import Engine
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion(conversation)        # ends with <|assistant_start|>
    results, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=256, temperature=0.8, top_k=50)
    for token_column, mask_column in engine.generate(prompt, ...): ...   # streaming, one column per step

The model follows nanochat's convention (see sftfast.model): `model(idx, kv_cache=cache)`
returns (B, T, V) logits, and in every attention layer `k, v = cache.insert_kv(layer, k, v)`
with (B, H_kv, T, D) tensors, the rotary offset being `cache.get_pos()`.

The prompt is run once with batch 1, then its cache is copied into a cache of
`num_samples` rows (`KVCache.prefill`) so every sample shares the prefix work. Each
step feeds one token per row. A row stops at <|assistant_end|> or <|bos|>, or after
`max_tokens`; the batch stops when every row has.

Tool use: when a row emits <|python_start|> the engine collects its tokens up to
<|python_end|>, decodes them, evaluates them with sftfast.calculator (which parses, never
evals), and forces <|output_start|> result <|output_end|> into that row: the forced
tokens are fed to the model instead of samples and marked 0 in the mask column. A
refused expression forces nothing (the model's own training never shows an error
output).

`use_kv_cache=False` recomputes the whole sequence every step: the same tokens (the
greedy outputs are identical), used by the generation benchmark to show what the
cache is worth.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import torch

from sftfast.calculator import use_calculator
from sftfast.tokenizer import load_tokenizer  # noqa: F401  (train, chat and eval find it here)


class KVCache:
    """Keys and values of every layer, (L, 2, B, H_kv, T, D), grown on demand; position advances after the last layer."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int):
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.capacity = seq_len
        self.kv = None  # allocated on the first insert, with the model's dtype and device
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def _allocate(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = (self.num_layers, 2, self.batch_size, self.num_heads, capacity, self.head_dim)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T_new, D) after the cached ones; return the full (B, H_kv, T, D) views."""
        if k.shape != v.shape or k.dim() != 4 or k.size(0) != self.batch_size or k.size(1) != self.num_heads:
            raise ValueError(f"insert_kv: expected k, v of shape ({self.batch_size}, {self.num_heads}, T, "
                             f"{self.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        t0, t1 = self.pos, self.pos + k.size(2)
        if self.kv is None:
            self.kv = self._allocate(k, max(self.capacity, t1))
        elif t1 > self.kv.size(4):
            # Grow geometrically (rounded to 1024) so long generations copy O(log T) times.
            new = self._allocate(k, (max(t1, 2 * self.kv.size(4)) + 1023) // 1024 * 1024)
            new[:, :, :, :, : self.pos] = self.kv[:, :, :, :, : self.pos]
            self.kv = new
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.num_layers - 1:
            self.pos = t1
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]

    def prefill(self, other: "KVCache") -> None:
        """Copy another cache's contents (batch 1 or this batch size) into this empty one."""
        if self.kv is not None and self.pos != 0:
            raise ValueError("prefill: this cache is not empty")
        if other.kv is None:
            raise ValueError("prefill: the source cache is empty")
        if (other.num_layers, other.num_heads, other.head_dim) != (self.num_layers, self.num_heads, self.head_dim):
            raise ValueError("prefill: caches of different shapes")
        if other.batch_size not in (1, self.batch_size):
            raise ValueError(f"prefill: cannot expand batch {other.batch_size} to {self.batch_size}")
        self.kv = self._allocate(other.kv, max(self.capacity, other.pos))
        self.kv[:, :, :, :, : other.pos] = other.kv[:, :, :, :, : other.pos]  # broadcasts batch 1
        self.pos = other.pos


@torch.inference_mode()
def sample_next_token(logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0, top_k: int | None = None):
    """(B, V) logits -> (B, 1) ids: argmax when temperature is 0, else top-k then softmax sampling."""
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then gives -inf
    # for the others (greedy) instead of inf / inf = NaN probabilities.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(values, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return indices.gather(-1, choice)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


@dataclass
class _Row:
    tokens: list[int]
    forced: deque = field(default_factory=deque)  # tokens to feed instead of sampling (tool output)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        sid = tokenizer.special_token_id
        self.bos = tokenizer.bos_id
        self.assistant_end = sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")
        # A model may have more embedding rows than the tokenizer has tokens (a padded
        # vocabulary): ids past n_vocab are never sampled, they would mean nothing to decode.
        self.n_vocab = tokenizer.n_vocab

    def _model_shape(self):
        c = self.model.config
        return c.n_kv_head, c.n_embd // c.n_head, c.n_layer

    def _device(self):
        return next(self.model.parameters()).device

    def last_logits(self, ids: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """(B, T) ids -> (B, V) float logits of the last position only, V = the tokenizer's size.

        With sftfast.model's GPT this projects just the last hidden state (a 2K-token prompt
        with a 64K vocabulary would otherwise build a 0.5 GB (1, T, V) tensor to keep one row),
        then applies the same softcap as GPT.forward. Other models: their forward's last row."""
        m = self.model
        if hasattr(m, "hidden_states") and hasattr(m, "lm_head"):
            logits = m.lm_head(m.hidden_states(ids, kv_cache)[:, -1, :]).float()
            softcap = getattr(m.config, "softcap", 0) or None
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
        else:
            logits = m(ids, kv_cache=kv_cache)[:, -1, :]
        return logits[:, : self.n_vocab]

    def _tool_step(self, row: _Row, token: int) -> None:
        """Track a row's python block; on <|python_end|> queue the calculator's output as forced tokens."""
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            expr = self.tokenizer.decode(row.python_tokens)
            result = use_calculator(expr)
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42, use_kv_cache: bool = True):
        """Yield (token_column, mask_column) per step: one token per sample; mask 1 sampled, 0 forced."""
        if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError("generate: the prompt must be a non-empty list of token ids")
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < self.n_vocab), None)
        if bad is not None:  # the embedding would fail (a device-side assert on CUDA)
            raise ValueError(f"generate: prompt token {bad} is {tokens[bad]}, outside the vocabulary [0, {self.n_vocab})")
        for name, value in (("num_samples", num_samples), ("max_tokens", max_tokens), ("top_k", top_k)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"generate: {name} must be an int, got {type(value).__name__} {value!r}")
        if num_samples < 1:
            raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
        if not temperature >= 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        # Never run past the positions the model has rotary tables for (sftfast.model: 10x its
        # training length): stop there instead of failing mid-generation.
        limit = getattr(self.model, "rotary_seq_len", None)
        asked = max_tokens
        if limit is not None:
            if len(tokens) >= limit:
                raise ValueError(f"generate: the prompt ({len(tokens)} tokens) fills the model's {limit} positions")
            max_tokens = limit - len(tokens) if max_tokens is None else min(max_tokens, limit - len(tokens))
        device = self._device()
        rng = torch.Generator(device=device).manual_seed(seed)
        n_kv, head_dim, n_layer = self._model_shape()
        rows = [_Row(tokens=list(tokens)) for _ in range(num_samples)]

        # Prefill: the prompt once, batch 1.
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        cache = None
        if use_kv_cache:
            prefix_cache = KVCache(1, n_kv, len(tokens), head_dim, n_layer)
            logits = self.last_logits(prompt, prefix_cache)  # (1, V)
            # Room for the whole generation up front when the caller gave its length; otherwise
            # (max_tokens is then only the model's position limit, 10x its training length)
            # 256 positions, and the cache grows as needed.
            room = max_tokens if asked is not None and max_tokens is not None else 256
            cache = KVCache(num_samples, n_kv, len(tokens) + max(room, 1), head_dim, n_layer)
            cache.prefill(prefix_cache)
            del prefix_cache
        else:
            logits = self.last_logits(prompt)
        logits = logits.expand(num_samples, -1)

        history = prompt.expand(num_samples, -1) if not use_kv_cache else None  # (B, T) for the no-cache path
        generated = 0
        while not all(r.done for r in rows) and (max_tokens is None or generated < max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()  # (B,)
            column, mask = [], []
            for row, token in zip(rows, sampled):
                if row.done:
                    column.append(self.assistant_end)  # a filler the caller ignores
                    mask.append(0)
                    continue
                forced = bool(row.forced)
                if forced:
                    token = row.forced.popleft()
                column.append(token)
                mask.append(0 if forced else 1)
                row.tokens.append(token)
                if token in (self.assistant_end, self.bos):
                    row.done = True
                else:
                    self._tool_step(row, token)
            generated += 1
            yield column, mask
            if all(r.done for r in rows) or (max_tokens is not None and generated >= max_tokens):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]  # (B, 1)
            if use_kv_cache:
                logits = self.last_logits(ids, cache)
            else:
                # No cache: rerun the whole (B, T) sequence for one new position.
                history = torch.cat([history, ids], dim=1)
                logits = self.last_logits(history)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs):
        """Run `generate` to the end: (per-sample token lists including the prompt, per-sample masks).

        The final <|assistant_end|>/<|bos|> is not included in the returned tokens.
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask in self.generate(tokens, num_samples, **kwargs):
            for i, (token, m) in enumerate(zip(column, mask)):
                if done[i]:
                    continue
                if token in (self.assistant_end, self.bos):
                    done[i] = True
                    continue
                results[i].append(token)
                masks[i].append(m)
            if all(done):
                break
        return results, masks


def find_tokenizer(base_dir: str, meta: dict, explicit: str | None = None) -> str:
    """Where the checkpoint's tokenizer is: --tokenizer, else the path recorded in the checkpoint's
    meta ("tokenizer" or "tokenizer_path", absolute or relative to base_dir), else
    {base_dir}/tokenizer.sftfast, else {base_dir}/tokenizer/ (nanochat's place)."""
    if explicit:
        return explicit
    candidates = []
    for key in ("tokenizer", "tokenizer_path"):
        value = meta.get(key)
        if isinstance(value, str):
            candidates += [os.path.join(base_dir, value), value]
    candidates += [os.path.join(base_dir, "tokenizer.sftfast"), os.path.join(base_dir, "tokenizer")]
    for c in candidates:
        if os.path.exists(c):
            return c
    raise FileNotFoundError(f"no tokenizer found (tried {candidates}); pass --tokenizer PATH")


def add_checkpoint_arguments(p) -> None:
    """The flags by which an inference CLI (chat, eval) picks its checkpoint, as nanochat's do."""
    from sftfast.checkpoint import default_base_dir

    p.add_argument("--base-dir", default=default_base_dir(),
                   help="directory holding {base,mid,chatsft}_checkpoints/ (default: $SFTFAST_BASE_DIR, else "
                        "~/.cache/nanochat, as for sftfast.train; the demo's is runs/demo)")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft"], help="which checkpoints to load (default: sft)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: guessed, as nanochat does)")
    p.add_argument("-s", "--step", type=int, default=None, help="step (default: the last complete one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: recorded in the checkpoint, or BASE_DIR/tokenizer)")


def load_for_inference(base_dir: str, source: str = "sft", model_tag: str | None = None, step: int | None = None,
                       device: str = "cpu", tokenizer_path: str | None = None):
    """(model in eval mode, tokenizer, meta) of a checkpoint in nanochat's layout."""
    from sftfast.checkpoint import load_model

    model, meta = load_model(base_dir, source, model_tag, step, device=device)
    tokenizer = load_tokenizer(find_tokenizer(base_dir, meta, tokenizer_path))
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}")
    return model.eval(), tokenizer, meta
