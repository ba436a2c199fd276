"""CustomJSON: conversations from a JSONL file, one per line; the identity conversations by default.

    from sftfast.tasks.customjson import CustomJSON, IDENTITY_FILE
    task = CustomJSON(IDENTITY_FILE)

Each line is an array of messages, or an object with a `messages` array (other fields
are kept on the conversation). The file is UTF-8, with or without a leading byte-order
mark. Blank lines are skipped; every other line is checked when the file is loaded and a
bad one is reported as `file:line: reason`. A message holds `role` and `content`; `name` is
ignored (as the renderer ignores it) and any other key is an error (see
base.IGNORED_MESSAGE_KEYS): nothing a line says is dropped silently.
"""

from __future__ import annotations

import json
import os
import sys

from sftfast.tasks.base import Task, TaskError, read_text_lines, validate_messages

IDENTITY_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "identity.jsonl")


def _not_json(name: str):
    # Python's json reads NaN and Infinity, which JSON (and prep's Rust parser) does not
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _float_range_int(text: str) -> int:
    # prep's parser holds numbers beyond 64 bits as floats: past the float range it refuses them
    value = int(text)
    if abs(value) > sys.float_info.max:
        raise ValueError(f"number {text[:20]}... is out of range")
    return value


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, path: str = IDENTITY_FILE, name: str | None = None, **kwargs):
        if not os.path.isfile(path):
            raise TaskError(f"CustomJSON: {path} is not a file")
        self.path = path
        self.name = name or ("identity" if os.path.abspath(path) == IDENTITY_FILE else os.path.basename(path))
        self.conversations = []
        for lineno, line in enumerate(read_text_lines(path), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line, parse_constant=_not_json, parse_float=_finite_float, parse_int=_float_range_int)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
            except (ValueError, RecursionError) as e:  # NaN/Infinity, 1e400, 5000-digit ints, deep nesting
                raise TaskError(f"{where}: invalid JSON: {type(e).__name__}: {e}") from None
            if isinstance(record, list):
                record = {"messages": record}
            elif not isinstance(record, dict) or "messages" not in record:
                raise TaskError(f"{where}: expected an array of messages or an object with 'messages'")
            record = dict(record)
            record["messages"] = validate_messages(record["messages"], where)
            self.conversations.append(record)
        if not self.conversations:
            raise TaskError(f"CustomJSON: {path} holds no conversations")
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
