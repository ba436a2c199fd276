"""The model: a nanochat-style GPT whose loss never materialises the (N, V) logits.

    from sftfast.model import GPT, GPTConfig
    model = GPT(GPTConfig(sequence_len=256, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, n_embd=256))
    model.init_weights()
    loss = model(inputs, targets, doc_ids=doc_ids)      # training: scalar (mean over targets != -1)
    logits = model(inputs)                               # inference: (B, T, V) float32, softcapped

Architecture (nanochat's): token embedding -> RMSNorm (no weights) -> n_layer blocks of
[x + attn(norm(x)), x + mlp(norm(x))] -> RMSNorm -> untied lm_head. Rotary embeddings, no
position embedding; QK norm; ReLU^2 MLP; no biases; grouped-query attention (n_kv_head <= n_head);
logits softcapped as c * tanh(logits / c).

Packed rows: `doc_ids` (B, T) labels each position with its conversation (a conversation is a
run of equal labels). When given, attention is block-diagonal causal: a token sees only earlier
tokens of its own conversation (SDPA with a boolean mask on CPU, FlexAttention on CUDA), and
rotary positions restart at 0 with each conversation, so every conversation in a packed row is
computed exactly as it would be alone, and as it is at generation. (Rotary embeddings are
relative in exact arithmetic, but nanochat's bf16-rounded tables, kept here, are not: in the
tests' 2-layer model a conversation starting mid-row had logits up to 3e-5 off.) `doc_ids=None` is plain causal
attention and row positions across the whole row (nanochat's behaviour, `--cross-doc-attention`).

KV cache (used by `sftfast.engine`, nanochat's convention): `forward(idx, kv_cache=cache)`. In each
layer `k, v = kv_cache.insert_kv(layer_idx, k, v)` with k, v of shape (B, n_kv_head, T_new,
head_dim); it returns the full cached (B, n_kv_head, T_total, head_dim) including the new ones.
The rotary offset of the new tokens is `kv_cache.get_pos()` (read before the layers run; the
cache advances its position itself when the last layer inserts). Queries are the last Tq of the
Tk keys, so the causal mask is aligned bottom-right.

The training loss is `sftfast.loss.fused_linear_cross_entropy` on the final hidden states.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sftfast.loss import fused_linear_cross_entropy


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    softcap: float = 15.0  # logit softcap c in c * tanh(logits / c); 0 disables it
    rope_base: float = 10000.0

    def validate(self) -> None:
        # user-supplied (from checkpoint meta or CLI): real errors, not asserts
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm without learnable weights
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, H, D); cos/sin (1, T, 1, D/2). Rotate the two halves of the head dim as pairs.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) conversation labels -> (B, 1, T, T) bool mask, True = may attend (same doc, not future)."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) conversation labels -> (B, T) positions counted from each conversation's first token."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones((B, T), dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


_flex_attention = None


def use_flex_attention(device: torch.device) -> bool:
    """Packed rows on CUDA use FlexAttention (fully masked blocks are skipped); elsewhere a dense
    SDPA mask: FlexAttention on CPU has no backward and compiles for seconds to gain nothing."""
    return device.type == "cuda"


def flex_block_mask(doc_ids: torch.Tensor):
    """FlexAttention BlockMask of the block-diagonal causal pattern (built once per forward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


def _flex(q, k, v, doc_ids=None, block_mask=None):
    """Block-diagonal causal attention with FlexAttention: fully masked blocks are skipped."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_attention = torch.compile(flex_attention, dynamic=False)
    if block_mask is None:
        block_mask = flex_block_mask(doc_ids)
    return _flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache=None, doc_ids=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # full (B, Hkv, Tk, D)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if isinstance(attn_mask, torch.Tensor):
            # precomputed block-diagonal causal mask (CPU path), shared by all layers
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif attn_mask is not None or doc_ids is not None:
            y = _flex(q, k, v, doc_ids, block_mask=attn_mask)  # the forward's BlockMask
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one new query sees the whole cache
        else:
            # a chunk of Tq queries after a cached prefix: causal aligned to the bottom-right
            prefix = Tk - Tq
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, Tq, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None, doc_ids=None, attn_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, doc_ids, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables are cheap: cover 10x the training length so generation can run past it
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary(self, seq_len: int, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        # nanochat keeps its tables in bf16, and its checkpoints were pretrained with those rounded
        # values (up to 2e-3 from the exact ones: logits moved by 1e-2 in a 2-layer model with
        # exact tables). Rounded the same way, kept in fp32: the same function in any dtype.
        cos, sin = freqs.cos().bfloat16().float(), freqs.sin().bfloat16().float()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """nanochat's init: N(0, 1) embedding, fan-scaled normal matrices, zero lm_head and output projections."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        cos, sin = self._rotary(self.rotary_seq_len, device=self.lm_head.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """FLOPs per token of a training step (forward + backward), PaLM appendix B."""
        c = self.config
        t = seq_len or c.sequence_len
        n = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * t

    def hidden_states(self, idx, kv_cache=None, doc_ids=None):
        """(B, T) ids -> (B, T, D) final normed hidden states."""
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            raise ValueError(f"sequence position {T0 + T} exceeds the rotary table ({self.cos.size(1)}); raise sequence_len")
        cos_sin = self.cos[:, T0 : T0 + T], self.sin[:, T0 : T0 + T]
        attn_mask = None
        if doc_ids is not None:
            if kv_cache is not None:
                raise ValueError("doc_ids (packed rows) and kv_cache (generation) cannot be combined")
            if doc_ids.shape != idx.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != idx shape {tuple(idx.shape)}")
            # built once, used by every layer: a BlockMask for FlexAttention, else a dense SDPA mask
            attn_mask = flex_block_mask(doc_ids) if use_flex_attention(idx.device) else doc_causal_mask(doc_ids)
            pos = doc_positions(doc_ids)
            cos_sin = self.cos[0, pos], self.sin[0, pos]  # (B, T, 1, D/2)
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, doc_ids, attn_mask)
        return norm(x)

    def head_loss(self, x, targets, reduction="mean"):
        """Masked cross-entropy of lm_head(x) against targets without the (N, V) logits (sftfast.loss)."""
        w = self.lm_head.weight
        if torch.is_autocast_enabled(x.device.type):
            # what autocast does for nn.Linear: run the head in the low-precision dtype (the fused
            # loss wants hidden and weight in one dtype); gradients flow back to the fp32 weight
            dt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dt), w.to(dt)
        elif x.dtype != w.dtype:
            x = x.to(w.dtype)
        D = x.size(-1)
        return fused_linear_cross_entropy(x.reshape(-1, D), w, targets.reshape(-1), ignore_index=-1,
                                          softcap=self.config.softcap or None, reduction=reduction)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", doc_ids=None):
        """targets given: scalar loss (`loss_reduction` "mean" over targets != -1, or "sum");
        else (B, T, V) float32 logits."""
        x = self.hidden_states(idx, kv_cache, doc_ids)
        softcap = self.config.softcap or None
        if targets is not None:
            return self.head_loss(x, targets, loss_reduction)
        logits = self.lm_head(x).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return logits
