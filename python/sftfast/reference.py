"""Pure-Python reference of rendering and packing: the oracle the Rust data plane is tested against.

Written for clarity, not speed, with nanochat's semantics (scripts/chat_sft.py,
nanochat/tokenizer.py) on top of a `tiktoken.Encoding`:

    from sftfast.reference import render_conversation, pack_bestfit, pack_padded
    enc = chat_encoding(ranks, pattern)     # a tiktoken.Encoding with the chat special tokens
    ids, mask = render_conversation(enc, conversation, max_tokens=2048)
    batches = pack_bestfit(rendered, batch_size=4, seq_len=2048, bos_id=enc._special_tokens["<|bos|>"])

Where the SPEC adds to nanochat, this file does what the SPEC says: validation errors name the
conversation and message (nanochat asserts), conversations longer than a row are truncated to
it when they enter the packer and counted, a finite stream ends with a flushed, possibly shorter
batch, padded rows put `bos` (not the last token) after `ids[:-1]` as the seed's collate does,
and every batch carries position ids / segment lengths for document-masked attention.

`python -m sftfast.reference` renders the seed's example and prints ids and mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from sftfast._core import ConversationError
from sftfast.tokenizer import SPECIAL_TOKENS

SPECIALS = SPECIAL_TOKENS  # the oracle renders with the same special tokens, in SPEC order

# The seed document's example (SPEC 2): a calculator call, its output, then the answer.
SEED_EXAMPLE = {
    "messages": [
        {"role": "user", "content": "What is 12/60?"},
        {
            "role": "assistant",
            "content": [
                {"type": "python", "text": "12/60"},
                {"type": "python_output", "text": "0.2"},
                {"type": "text", "text": "The answer is 0.2"},
            ],
        },
    ]
}


def chat_encoding(ranks: dict, pattern: str, name: str = "sftfast-reference"):
    """tiktoken's Encoding of `ranks` split by `pattern`, with the chat special tokens after the
    ranks in SPEC order: the same vocabulary `sftfast.Tokenizer.from_ranks(ranks, pattern)` builds."""
    import tiktoken

    specials = {name: len(ranks) + i for i, name in enumerate(SPECIALS)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def _err(location, message, reason):
    return ConversationError(f"{location}: message {message}: {reason}")


def validate(conversation, location="conversation"):
    """Returns the message list after checking what nanochat asserts (and a bit more).

    Dicts may be any Mapping and lists (of messages, of parts) a list or tuple, as in Rust."""
    if not isinstance(conversation, Mapping):
        raise _err(location, "-", f'a conversation must be a dict with "messages", got {type(conversation).__name__}')
    if "messages" not in conversation:
        raise _err(location, "-", 'missing field "messages"')
    messages = conversation["messages"]
    if not isinstance(messages, (list, tuple)):
        raise _err(location, "-", f'"messages" must be a list, got {type(messages).__name__}')
    if len(messages) == 0:
        raise _err(location, "-", "conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise _err(location, i, f"a message must be a dict, got {type(m).__name__}")
        if "role" not in m:
            raise _err(location, i, 'missing field "role"')
        if m["role"] not in ("system", "user", "assistant"):
            raise _err(location, i, f"unknown role {m['role']!r}")
        if "content" not in m:
            raise _err(location, i, 'missing field "content"')
        content = m["content"]
        if m["role"] == "assistant" and isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise _err(location, i, f"part {j} must be a dict, got {type(part).__name__}")
                if "type" not in part:
                    raise _err(location, i, f'part {j}: missing field "type"')
                if part["type"] not in ("text", "python", "python_output"):
                    raise _err(location, i, f"part {j}: unknown part type {part['type']!r}")
                if "text" not in part:
                    raise _err(location, i, f'part {j}: missing field "text"')
                if not isinstance(part["text"], str):
                    raise _err(location, i, f'part {j}: "text" must be a string')
        elif not isinstance(content, str):
            raise _err(location, i, f"{m['role']} content must be a string, got {type(content).__name__}")
    offset = 1 if messages[0]["role"] == "system" else 0
    if offset and len(messages) < 2:
        raise _err(location, 0, "system message is not followed by a user message (conversation ends)")
    if offset and messages[1]["role"] != "user":
        raise _err(location, 1, f"system message must be followed by a user message, got {messages[1]['role']}")
    for i in range(offset, len(messages)):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise _err(location, i, f"expected role {expected}, got {messages[i]['role']}")
    return messages


def render_conversation(enc, conversation, max_tokens=2048, location="conversation"):
    """nanochat's render_conversation: (ids, mask), mask 1 on what the assistant must learn."""
    messages = validate(conversation, location)
    sp = {name: enc.encode_single_token(name) for name in SPECIALS}
    ids, mask = [], []

    def add(token_ids, m):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids.extend(token_ids)
        mask.extend([m] * len(token_ids))

    if messages[0]["role"] == "system":
        # merged into the first user message, encoded as one string (as nanochat does)
        first = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
        messages = [first] + list(messages[2:])
    add(sp["<|bos|>"], 0)
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            add(sp["<|user_start|>"], 0)
            add(enc.encode_ordinary(content), 0)
            add(sp["<|user_end|>"], 0)
        else:
            add(sp["<|assistant_start|>"], 0)
            if isinstance(content, str):
                add(enc.encode_ordinary(content), 1)
            else:
                for part in content:
                    value = enc.encode_ordinary(part["text"])
                    if part["type"] == "text":
                        add(value, 1)
                    elif part["type"] == "python":
                        add(sp["<|python_start|>"], 1)
                        add(value, 1)
                        add(sp["<|python_end|>"], 1)
                    else:  # python_output: produced by the tool, not learned
                        add(sp["<|output_start|>"], 0)
                        add(value, 0)
                        add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(enc, conversation, max_tokens=2048, location="conversation"):
    messages = validate(conversation, location)
    if messages[-1]["role"] != "assistant":
        raise _err(location, len(messages) - 1, "render_for_completion needs a conversation that ends with an assistant message")
    ids, _ = render_conversation(enc, dict(conversation, messages=list(messages[:-1])), max_tokens, location)
    return ids + [enc.encode_single_token("<|assistant_start|>")]


@dataclass
class RefBatch:
    inputs: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int64, -1 = ignore
    position_ids: np.ndarray  # (B, T) int32
    doc_lens: list = field(default_factory=list)  # per row: segment lengths over T (padding tail last)
    tags: list = field(default_factory=list)  # conversation indices, placement order
    num_truncated: int = 0

    @property
    def num_supervised(self):
        return int((self.targets != -1).sum())

    @property
    def empty_rows(self):
        return int(((self.targets != -1).sum(axis=1) == 0).sum())


def _finish_rows(rows, bos_id, t):
    """rows: list of (tokens, mask, content_len, n_inputs, seg_lens); inputs = tokens[:-1]
    (tokens padded with bos), targets = tokens[1:] masked, -1 from content_len - 1 on."""
    B = len(rows)
    inputs = np.full((B, t), bos_id, dtype=np.int32)
    targets = np.full((B, t), -1, dtype=np.int64)
    pos = np.zeros((B, t), dtype=np.int32)
    doc_lens = []
    for r, (tokens, mask, content, n_in, segs) in enumerate(rows):
        inputs[r, :n_in] = tokens[:n_in]
        for p in range(content - 1):
            if mask[p + 1]:
                targets[r, p] = tokens[p + 1]
        row_segs, start = [], 0
        for length in segs:
            end = min(start + length, t)
            if end > start:
                pos[r, start:end] = np.arange(end - start)
                row_segs.append(end - start)
            start += length
            if start >= t:
                break
        if n_in < t:
            pos[r, n_in:] = np.arange(t - n_in)
            row_segs.append(t - n_in)
        doc_lens.append(row_segs)
    return inputs, targets, pos, doc_lens


def pack_bestfit(rendered, batch_size, seq_len, bos_id, buffer_size=100):
    """nanochat's sft_data_generator_bos_bestfit over a finite list (tags = list indices)."""
    cap = seq_len + 1
    stream = []
    truncated = set()
    for i, (ids, mask) in enumerate(rendered):
        if len(ids) > cap:
            truncated.add(i)
        stream.append((list(ids[:cap]), list(mask[:cap]), i))
    cursor = 0
    buffer = []
    batches = []
    while True:
        rows = []
        tags = []
        for _ in range(batch_size):
            row, mrow, segs = [], [], []
            while len(row) < cap:
                while len(buffer) < buffer_size and cursor < len(stream):
                    buffer.append(stream[cursor])
                    cursor += 1
                remaining = cap - len(row)
                best_i, best_len = -1, 0
                for i, (ids, _, _) in enumerate(buffer):
                    if best_len < len(ids) <= remaining:
                        best_i, best_len = i, len(ids)
                if best_i < 0:
                    break
                ids, mask, tag = buffer.pop(best_i)
                row += ids
                mrow += mask
                segs.append(len(ids))
                tags.append(tag)
            if not row:
                break
            content = len(row)
            rows.append((row + [bos_id] * (cap - content), mrow + [0] * (cap - content), content, min(content, seq_len), segs))
        if not rows:
            return batches
        inputs, targets, pos, doc_lens = _finish_rows(rows, bos_id, seq_len)
        batches.append(RefBatch(inputs, targets, pos, doc_lens, tags, sum(t in truncated for t in tags)))


def pack_padded(rendered, batch_size, seq_len, bos_id):
    """The seed's collate_and_yield: batch_size conversations, padded to the longest."""
    cap = seq_len + 1
    batches = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        items = [(list(ids[:cap]), list(mask[:cap])) for ids, mask in chunk]
        t = max(len(ids) for ids, _ in items) - 1
        rows = [(ids + [bos_id] * (t + 1 - len(ids)), mask, len(ids), len(ids) - 1, [len(ids) - 1]) for ids, mask in items]
        inputs, targets, pos, doc_lens = _finish_rows(rows, bos_id, t)
        tags = list(range(start, start + len(chunk)))
        batches.append(RefBatch(inputs, targets, pos, doc_lens, tags, sum(len(ids) > cap for ids, _ in chunk)))
    return batches


if __name__ == "__main__":
    import importlib.util
    import os

    from tiktoken.load import load_tiktoken_bpe

    from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN

    spec = importlib.util.find_spec("tiktoken_ext")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "cl100k_base.tiktoken")
    enc = chat_encoding(load_tiktoken_bpe(path), NANOCHAT_SPLIT_PATTERN)
    ids, mask = render_conversation(enc, SEED_EXAMPLE)
    for i, m in zip(ids, mask):
        print(f"{m} {i:>7} {enc.decode([i])!r}")
