"""Engine: the KV cache gives the same logits and tokens as recomputing, sampling obeys
temperature/top-k/seed, generation stops at <|assistant_end|>/<|bos|>, and tool calls
force the calculator's output into the stream."""

import json
import types

import pytest
import torch

from _tasks_support import byte_tokenizer, one_thread, tiny_model, tok  # noqa: F401  (fixtures)
from sftfast.engine import Engine, KVCache, sample_next_token


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.n_vocab)


def test_kvcache_insert_grow_prefill():
    cache = KVCache(batch_size=1, num_heads=2, seq_len=4, head_dim=3, num_layers=2)
    k = torch.randn(1, 2, 3, 3)
    v = torch.randn(1, 2, 3, 3)
    k0, _ = cache.insert_kv(0, k, v)
    assert cache.get_pos() == 0  # advances only after the last layer
    k1, v1 = cache.insert_kv(1, k, v)
    assert cache.get_pos() == 3 and torch.equal(k1, k) and torch.equal(v1, v)
    k2 = torch.randn(1, 2, 5, 3)  # past the initial capacity: grows, keeps the old entries
    full_k, _ = cache.insert_kv(0, k2, k2)
    assert full_k.shape == (1, 2, 8, 3) and torch.equal(full_k[:, :, :3], k) and torch.equal(full_k[:, :, 3:], k2)
    cache.insert_kv(1, k2, k2)
    assert cache.get_pos() == 8

    big = KVCache(batch_size=4, num_heads=2, seq_len=16, head_dim=3, num_layers=2)
    big.prefill(cache)
    assert big.get_pos() == 8
    for b in range(4):
        assert torch.equal(big.kv[0, 0, b, :, :8], cache.kv[0, 0, 0, :, :8])
    with pytest.raises(ValueError):
        big.insert_kv(0, k, v)  # batch 1 into a batch-4 cache
    cache.reset()
    assert cache.get_pos() == 0


def test_cached_logits_match_full_forward(model, tok):
    torch.manual_seed(0)
    idx = torch.randint(0, tok.n_vocab, (2, 17))
    with torch.inference_mode():
        full = model(idx)  # (B, T, V)
        c = model.config
        cache = KVCache(2, c.n_kv_head, 4, c.n_embd // c.n_head, c.n_layer)
        chunks = [model(idx[:, :10], kv_cache=cache), model(idx[:, 10:13], kv_cache=cache)]
        chunks += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(13, 17)]
    stepped = torch.cat(chunks, dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 20), (0.7, None)])
def test_kv_cache_and_recompute_generate_the_same(model, tok, temperature, top_k):
    engine = Engine(model, tok)
    prompt = [tok.bos_id, *tok.encode("Hello there")]
    kwargs = dict(num_samples=3, max_tokens=24, temperature=temperature, top_k=top_k, seed=7)
    cached, cached_masks = engine.generate_batch(prompt, use_kv_cache=True, **kwargs)
    plain, plain_masks = engine.generate_batch(prompt, use_kv_cache=False, **kwargs)
    assert cached == plain and cached_masks == plain_masks
    assert all(r[: len(prompt)] == prompt for r in cached)
    if temperature == 0.0:
        assert cached[0] == cached[1] == cached[2]  # greedy rows agree
    # same seed, same samples; another seed, (almost surely) other samples
    again, _ = engine.generate_batch(prompt, **kwargs)
    assert again == cached


def test_sample_next_token():
    rng = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]
    assert sample_next_token(logits, rng, temperature=1.0, top_k=1).tolist() == [[1], [0]]
    seen = {tuple(sample_next_token(logits, rng, temperature=2.0, top_k=2)[:, 0].tolist()) for _ in range(200)}
    assert {s[0] for s in seen} == {1, 3}  # only the two best of row 0, and both of them
    with pytest.raises(ValueError):
        sample_next_token(logits, rng, temperature=-1.0)
    with pytest.raises(ValueError):
        sample_next_token(logits, rng, temperature=float("nan"))
    # a temperature so small that logits / temperature overflows: greedy, not NaN probabilities
    for t in (1e-45, 1e-30):
        assert sample_next_token(logits, rng, temperature=t).tolist() == [[1], [0]]


class ScriptedModel(torch.nn.Module):
    """A bigram 'model' whose next token is a fixed function of the last one; honours the cache protocol."""

    def __init__(self, vocab_size: int, next_token: dict[int, int], default: int):
        super().__init__()
        self.config = types.SimpleNamespace(n_kv_head=1, n_head=1, n_embd=2, n_layer=1)
        table = torch.full((vocab_size,), default, dtype=torch.long)
        for a, b in next_token.items():
            table[a] = b
        self.register_buffer("table", table)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache is not None:
            z = torch.zeros(B, 1, T, 2)
            kv_cache.insert_kv(0, z, z)
        nxt = self.table[idx]  # (B, T)
        return torch.nn.functional.one_hot(nxt, self.vocab_size).float() * 10.0


def _script(tok, text_after: str, expr: str):
    sid = tok.special_token_id
    chain = [sid("<|assistant_start|>"), sid("<|python_start|>"), *tok.encode(expr), sid("<|python_end|>")]
    nxt = {a: b for a, b in zip(chain, chain[1:])}
    tail = [sid("<|output_end|>"), *tok.encode(text_after), sid("<|assistant_end|>")]
    nxt.update({a: b for a, b in zip(tail, tail[1:])})
    # after <|python_end|> the model would say "Z", but the engine forces the tool output first
    nxt[sid("<|python_end|>")] = tok.encode("Z")[0]
    return nxt


def test_tool_call_forces_calculator_output(tok):
    sid = tok.special_token_id
    model = ScriptedModel(tok.n_vocab, _script(tok, "ok", "2+3"), default=tok.bos_id)
    engine = Engine(model, tok)
    prompt = [tok.bos_id, sid("<|user_start|>"), *tok.encode("sum?"), sid("<|user_end|>"), sid("<|assistant_start|>")]
    for use_cache in (True, False):
        results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0, use_kv_cache=use_cache)
        out, mask = results[0][len(prompt):], masks[0][len(prompt):]
        expected = [sid("<|python_start|>"), *tok.encode("2+3"), sid("<|python_end|>"),
                    sid("<|output_start|>"), *tok.encode("5"), sid("<|output_end|>"), *tok.encode("ok")]
        assert out == expected
        forced = [0] * (2 + len(tok.encode("5")))
        assert mask == [1] * (2 + len(tok.encode("2+3"))) + forced + [1] * len(tok.encode("ok"))
        assert results[1] == results[0]


def test_refused_expression_forces_nothing(tok):
    sid = tok.special_token_id
    model = ScriptedModel(tok.n_vocab, _script(tok, "", "__import__('os')"), default=sid("<|assistant_end|>"))
    engine = Engine(model, tok)
    prompt = [tok.bos_id, sid("<|assistant_start|>")]
    results, masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    out = results[0][len(prompt):]
    assert sid("<|output_start|>") not in out
    assert out[-1] == tok.encode("Z")[0] and all(m == 1 for m in masks[0][len(prompt):])


def test_stops_at_bos_and_max_tokens(tok):
    sid = tok.special_token_id
    a = tok.encode("a")[0]
    model = ScriptedModel(tok.n_vocab, {sid("<|assistant_start|>"): a, a: tok.bos_id}, default=a)
    engine = Engine(model, tok)
    results, _ = engine.generate_batch([tok.bos_id, sid("<|assistant_start|>")], max_tokens=50, temperature=0.0)
    assert results[0][2:] == [a]  # stopped at <|bos|>, which is not returned
    loop = ScriptedModel(tok.n_vocab, {}, default=a)
    steps = list(Engine(loop, tok).generate([tok.bos_id], num_samples=2, max_tokens=5, temperature=0.0))
    assert len(steps) == 5 and all(col == [a, a] for col, _ in steps)


def test_bad_arguments(model, tok):
    engine = Engine(model, tok)
    with pytest.raises(ValueError):
        list(engine.generate([], max_tokens=3))
    with pytest.raises(ValueError):
        list(engine.generate([1, 2], num_samples=0, max_tokens=3))
    # prompt ids outside the vocabulary (the embedding would fail; a device assert on CUDA)
    for prompt in ([1, tok.n_vocab], [-1], [True, 2]):
        with pytest.raises(ValueError, match="prompt"):
            list(engine.generate(prompt, max_tokens=3))
    for kwargs in (dict(max_tokens=3.5), dict(top_k=2.5), dict(num_samples=2.0)):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            list(engine.generate([1, 2], **kwargs))
    with pytest.raises(ValueError, match="temperature"):
        list(engine.generate([1, 2], max_tokens=0, temperature=float("nan")))


def test_padded_model_vocabulary_is_never_sampled(tok):
    """A model with more embedding rows than the tokenizer has tokens: an id past n_vocab meant
    nothing to decode (inside a python block it ended the whole batch with an error)."""
    padded = tiny_model(tok.n_vocab + 64)
    with torch.no_grad():
        padded.lm_head.weight[tok.n_vocab:] += 100.0 * padded.lm_head.weight[:1].sign()  # make them win
    engine = Engine(padded, tok)
    assert engine.last_logits(torch.tensor([[tok.bos_id]])).shape == (1, tok.n_vocab)
    results, _ = engine.generate_batch([tok.bos_id], num_samples=3, max_tokens=20, temperature=1.0)
    assert all(0 <= t < tok.n_vocab for row in results for t in row)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cached_equals_recomputed(tok):
    model = tiny_model(tok.n_vocab).cuda()
    engine = Engine(model, tok)
    prompt = [tok.bos_id, *tok.encode("GPU check")]
    kwargs = dict(num_samples=4, max_tokens=32, temperature=0.0)
    assert engine.generate_batch(prompt, use_kv_cache=True, **kwargs) == engine.generate_batch(prompt, use_kv_cache=False, **kwargs)


def test_generation_stops_at_the_model_context(model, tok):
    engine = Engine(model, tok)
    limit = model.rotary_seq_len
    prompt = [tok.bos_id] + tok.encode("x") * (limit - 3)
    steps = list(engine.generate(prompt, max_tokens=50, temperature=0.0))
    assert len(steps) <= 3  # 3 positions left: 3 tokens (the last one is never fed back)
    with pytest.raises(ValueError, match="fills the model"):
        list(engine.generate([tok.bos_id] * limit, max_tokens=5))


def test_last_logits_equal_full_forward(model, tok):
    engine = Engine(model, tok)
    idx = torch.randint(0, tok.n_vocab, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(engine.last_logits(idx), model(idx)[:, -1, :], rtol=1e-5, atol=1e-5)


def test_kvcache_grows_past_double_in_one_insert():
    cache = KVCache(batch_size=1, num_heads=1, seq_len=2000, head_dim=2, num_layers=1)
    cache.insert_kv(0, torch.zeros(1, 1, 2000, 2), torch.zeros(1, 1, 2000, 2))
    k = torch.randn(1, 1, 3000, 2)  # more than doubles the cache: its new size must still hold it
    full_k, _ = cache.insert_kv(0, k, k)
    assert full_k.shape == (1, 1, 5000, 2) and torch.equal(full_k[:, :, 2000:], k)
    assert cache.kv.size(4) % 1024 == 0


def test_generate_without_max_tokens_does_not_preallocate_the_whole_context(model, tok, monkeypatch):
    """max_tokens=None only bounds generation by the model's positions (10x its training
    length): the cache starts small and grows, rather than holding that whole range up front."""
    from sftfast import engine as engine_module

    sizes = []

    class Recording(engine_module.KVCache):
        def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
            sizes.append(seq_len)
            super().__init__(batch_size, num_heads, seq_len, head_dim, num_layers)

    monkeypatch.setattr(engine_module, "KVCache", Recording)
    prompt = [tok.bos_id] + tok.encode("hello")
    steps = list(zip(range(4), Engine(model, tok).generate(prompt, temperature=0.0)))
    assert len(steps) == 4 and max(sizes) <= len(prompt) + 256 < model.rotary_seq_len


def test_generation_benchmark_runs(capsys):
    """`python -m sftfast.bench generate` (its stand-in tokenizer must satisfy the Engine)."""
    from sftfast.bench.__main__ import main

    assert main(["generate", "--json", "--depth", "1", "--width", "32", "--heads", "2", "--kv-heads", "2",
                 "--vocab-size", "300", "--prompt-tokens", "4", "--new-tokens", "4", "--batch", "2", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "error" not in json.dumps(out)


def test_top_k_one_is_greedy_every_time():
    rng = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.9]])
    assert all(sample_next_token(logits, rng, 1.0, top_k=1).item() == 1 for _ in range(200))


def test_top_k_larger_than_vocab():
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(torch.zeros(1, 4), rng, 1.0, top_k=50).shape == (1, 1)


def test_seed_changes_samples_and_repeats_them():
    tok = byte_tokenizer()
    eng = Engine(tiny_model(tok.n_vocab), tok)
    run = lambda s: eng.generate_batch([tok.bos_id], num_samples=2, max_tokens=12, temperature=1.5, seed=s)[0]  # noqa: E731
    assert run(1) == run(1) and run(1) != run(2)


def test_streaming_generate_stops_a_row_at_bos():
    tok = byte_tokenizer()
    a = tok.encode("a")[0]
    model = ScriptedModel(tok.n_vocab, {a: tok.bos_id}, default=a)
    steps = list(Engine(model, tok).generate([tok.bos_id], max_tokens=10, temperature=0.0))
    assert [c[0] for c, _ in steps] == [a, tok.bos_id]
