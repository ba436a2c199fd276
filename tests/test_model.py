"""Tests of sftfast.model: packed-row attention isolation, KV-cache equivalence, GQA, loss masking."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sftfast.model import GPT, GPTConfig, doc_causal_mask, doc_positions


def tiny(n_kv_head=2, softcap=15.0, vocab=97, seq=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, softcap=softcap))
    model.init_weights(seed=0)
    # init zeroes lm_head and output projections: perturb them so every path carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


class KVCache:
    """Minimal cache with nanochat's interface (the Engine's real one lives in sftfast.engine)."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.pos = 0
        self.n_layer = n_layer

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        if layer_idx == self.n_layer - 1:
            self.pos += k.size(2)
        return self.k[layer_idx], self.v[layer_idx]


def test_packed_row_equals_separate_conversations():
    model = tiny()
    a = torch.randint(0, 97, (1, 7))
    b = torch.randint(0, 97, (1, 11))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 11])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        la, lb = model(a), model(b)
        cross = model(packed)
    torch.testing.assert_close(out[:, :7], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], lb, atol=1e-5, rtol=1e-5)
    # without the mask the second conversation sees the first: outputs differ
    assert not torch.allclose(cross[:, 7:], lb, atol=1e-4)


def test_doc_mask_shape_and_content():
    m = doc_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    assert m.shape == (1, 1, 5, 5)
    assert m[0, 0, 3].tolist() == [False, False, True, True, False]
    assert m[0, 0, 1].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_kv_cache_matches_full_forward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.n_layer)
        chunks = [model(ids[:, :5], kv_cache=cache), model(ids[:, 5:9], kv_cache=cache)]  # prefill + chunk (Tq < Tk)
        for t in range(9, 12):
            chunks.append(model(ids[:, t : t + 1], kv_cache=cache))  # single tokens
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_loss_matches_full_logits_and_ignores_masked():
    model = tiny()
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[:, :5] = -1
    loss = model(ids, targets)
    logits = model(ids)
    ref = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    summed = model(ids, targets, loss_reduction="sum")
    torch.testing.assert_close(summed, ref * (targets != -1).sum(), atol=1e-4, rtol=1e-5)


def test_all_masked_batch_gives_zero_loss_and_finite_grads():
    model = tiny()
    ids = torch.randint(0, 97, (2, 8))
    targets = torch.full((2, 8), -1)
    loss = model(ids, targets, doc_ids=torch.zeros_like(ids))
    loss.backward()
    assert loss.item() == 0.0
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_softcap_bounds_logits():
    model = tiny(softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        logits = model(torch.randint(0, 97, (1, 6)))
    assert logits.abs().max() <= 2.0


def test_rotary_tables_are_nanochats_bf16_rounded_values():
    # nanochat pretrains with bf16 cos/sin tables; a checkpoint it wrote is only the same function
    # here with the same rounding (exact fp32 tables moved logits by 1e-2 in a 2-layer model)
    model = tiny()
    head_dim = 32 // 4
    t = torch.arange(model.cos.size(1), dtype=torch.float32)
    inv_freq = 10000.0 ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(t, inv_freq)
    assert model.cos.dtype == torch.float32
    assert torch.equal(model.cos[0, :, 0], angles.cos().bfloat16().float())
    assert torch.equal(model.sin[0, :, 0], angles.sin().bfloat16().float())


def test_doc_positions_restart_with_each_conversation():
    # the loader's position_ids: a packed conversation gets the positions it has alone (and at
    # generation), which the bf16-rounded rotary tables need for exact isolation
    labels = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 7, 7]])
    assert doc_positions(labels).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(GPTConfig(n_head=4, n_kv_head=3, n_embd=32, vocab_size=10, n_layer=1, sequence_len=8))
    model = tiny(seq=4)
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 41, dtype=torch.long))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_packing_isolation_property(lengths):
    """Any split of a row into conversations: each one's logits equal its standalone forward."""
    model = tiny()
    g = torch.Generator().manual_seed(sum(lengths))
    docs = [torch.randint(0, 97, (1, n), generator=g) for n in lengths]
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        out = model(torch.cat(docs, dim=1), doc_ids=doc_ids)
        start = 0
        for d in docs:
            torch.testing.assert_close(out[:, start : start + d.size(1)], model(d), atol=1e-5, rtol=1e-5)
            start += d.size(1)


def _packed_model_and_batch(device="cpu"):
    """A GQA model and two packed 256-token rows that mix long, short and one-token conversations
    across FlexAttention's 128-blocks, a third of the targets ignored."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, softcap=15.0))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 97, (2, 256))
    targets = torch.randint(0, 97, (2, 256))
    targets[:, ::3] = -1
    doc_ids = torch.tensor([[0] * 100 + [1] * 156, [0] * 30 + [1] + [2] * 29 + [3] * 196])
    return model.to(device), idx.to(device), targets.to(device), doc_ids.to(device)


def test_flex_attention_path_matches_sdpa_mask_on_cpu(monkeypatch):
    """The GPU's packed-row attention (one BlockMask per forward, FlexAttention in every layer,
    GQA) run on CPU, where FlexAttention compiles too (forward only: it has no CPU backward):
    logits and loss equal the dense SDPA-mask path's."""
    import sftfast.model as model_module

    model, idx, targets, doc_ids = _packed_model_and_batch()
    outputs = {}
    for flex in (False, True):
        monkeypatch.setattr(model_module, "use_flex_attention", lambda device: flex)
        with torch.no_grad():
            outputs[flex] = model(idx, doc_ids=doc_ids), model(idx, targets, doc_ids=doc_ids)
    for got, want in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward runs on CUDA")
def test_flex_attention_path_gradients_on_cuda(monkeypatch):
    """On CUDA the model uses FlexAttention for packed rows: its loss and every gradient equal the
    dense SDPA-mask path's (fp32, so the tolerance is the kernels' accumulation order)."""
    import sftfast.model as model_module

    model, idx, targets, doc_ids = _packed_model_and_batch("cuda")
    results = {}
    for flex in (False, True):
        monkeypatch.setattr(model_module, "use_flex_attention", lambda device: flex)
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets, doc_ids=doc_ids)
        loss.backward()
        results[flex] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss, grads), (ref_loss, ref_grads) = results[True], results[False]
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path runs on CUDA")
def test_flex_attention_matches_sdpa_mask_on_cuda():
    from sftfast.model import _flex

    torch.manual_seed(0)
    q = torch.randn(2, 4, 256, 32, device="cuda")
    k = torch.randn(2, 2, 256, 32, device="cuda")
    v = torch.randn(2, 2, 256, 32, device="cuda")
    doc = torch.tensor([[0] * 100 + [1] * 156, [0] * 30 + [1] * 30 + [2] * 196], device="cuda")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_causal_mask(doc), enable_gqa=True)
    torch.testing.assert_close(_flex(q, k, v, doc), ref, atol=2e-3, rtol=2e-3)


# --- the architecture, against an independent forward -------------------------------------------

def _reference_logits(model, idx):
    """An independent nanochat-style forward: rotary (x1 cos + x2 sin, -x1 sin + x2 cos), QK norm,
    GQA with kv head h // (n_head / n_kv_head), embedding norm, relu^2, softcap."""
    c = model.config
    hd = c.n_embd // c.n_head
    T = idx.size(1)
    inv = 1.0 / (c.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = f.cos().bfloat16().float()[None, :, None], f.sin().bfloat16().float()[None, :, None]

    def rot(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    rms = lambda x: F.rms_norm(x, (x.size(-1),))  # noqa: E731
    x = rms(model.transformer.wte(idx))
    for blk in model.transformer.h:
        a, h = blk.attn, rms(x)
        q = rms(rot(a.c_q(h).view(1, T, c.n_head, hd)))
        k = rms(rot(a.c_k(h).view(1, T, c.n_kv_head, hd)))
        v = a.c_v(h).view(1, T, c.n_kv_head, hd)
        r = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + a.c_proj(y.transpose(1, 2).reshape(1, T, -1))
        x = x + blk.mlp.c_proj(F.relu(blk.mlp.c_fc(rms(x))).square())
    logits = model.lm_head(rms(x)).float()
    return c.softcap * torch.tanh(logits / c.softcap)


def test_model_matches_an_independent_reference():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    idx = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), _reference_logits(model, idx), rtol=1e-4, atol=1e-4)


def test_init_weights_zeroes_the_output_projections():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=16))
    model.init_weights(seed=0)
    assert not model.lm_head.weight.any()
    assert all(not b.attn.c_proj.weight.any() and not b.mlp.c_proj.weight.any() for b in model.transformer.h)
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert float(model(idx, idx)) == pytest.approx(math.log(64), rel=1e-6)


def test_rotary_limit_is_inclusive():
    model = GPT(GPTConfig(sequence_len=2, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=8))
    model.init_weights(seed=0)
    model(torch.zeros(1, model.rotary_seq_len, dtype=torch.long))  # exactly the table: fine
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, model.rotary_seq_len + 1, dtype=torch.long))
