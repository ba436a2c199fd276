"""Task, TaskMixture, and dataset loading shared by every task.

A Task is a sequence of conversations ({"messages": [...], ...extra fields}) with
start/stop/step slicing over the underlying examples, an `eval_type`
("categorical" or "generative") and `evaluate(conversation, response)`. A
TaskMixture interleaves several tasks in one fixed-seed (42) shuffle of
(task, index) pairs; listing a task twice oversamples it.

Datasets load through Hugging Face `datasets` (see `load_split`): a hub name on a
machine that reaches the hub, or local parquet / JSON / JSONL files offline. For
offline use point `--data-dir` (or the SFTFAST_DATA_DIR environment variable) at a
directory that mirrors the hub repositories, e.g.

    $SFTFAST_DATA_DIR/allenai/ai2_arc/ARC-Easy/train-00000-of-00001.parquet
    $SFTFAST_DATA_DIR/openai/gsm8k/main/test-00000-of-00001.parquet
    $SFTFAST_DATA_DIR/HuggingFaceTB/smol-smoltalk/data/train-00000-of-00001.parquet

which is exactly what `huggingface-cli download --repo-type dataset NAME
--local-dir $SFTFAST_DATA_DIR/NAME` leaves behind. A task's `source` may also be a
local directory or file directly.
"""

from __future__ import annotations

import math
import operator
import os
import random
import re
from decimal import Decimal, InvalidOperation

from sftfast.textfiles import raw_lines

DATA_DIR_ENV = "SFTFAST_DATA_DIR"
MIXTURE_SEED = 42
_DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}


class TaskError(ValueError):
    """A malformed example or a dataset that cannot be loaded; the message says where and why."""


class Task:
    """A sliceable view [start:stop:step] over a dataset's examples, each a conversation dict."""

    name = "task"
    eval_type = "generative"  # or "categorical"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        for what, value in (("start", start), ("step", step)):
            if not isinstance(value, int) or value < (0 if what == "start" else 1):
                raise TaskError(f"{self.name}: {what} must be an int >= {0 if what == 'start' else 1}, got {value!r}")
        if stop is not None and (not isinstance(stop, int) or stop < 0):
            raise TaskError(f"{self.name}: stop must be None or an int >= 0, got {stop!r}")
        self.start, self.stop, self.step = start, stop, step

    # --- what a subclass provides ---
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, response: str) -> bool:
        raise NotImplementedError(f"{self.name} has no automatic evaluation")

    @property
    def can_evaluate(self) -> bool:
        """Whether this task scores answers (training-only data such as SmolTalk does not)."""
        return type(self).evaluate is not Task.evaluate

    # --- sequence protocol over the slice ---
    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        try:
            index = operator.index(index)  # ints and NumPy integers; not floats or slices
        except TypeError:
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}") from None
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} examples")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def errors(self):
        """Yield a TaskError for every malformed example of the slice (for a full-dataset check)."""
        for i in range(len(self)):
            try:
                self[i]
            except TaskError as e:
                yield e

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, start={self.start}, stop={self.stop}, step={self.step}, len={len(self)})"


class TaskMixture:
    """Every example of every task, in one shuffle fixed by seed 42; a task listed twice is seen
    twice. shuffle=False keeps the tasks' own order, one after the other."""

    def __init__(self, tasks: list[Task], seed: int = MIXTURE_SEED, shuffle: bool = True):
        if not tasks:
            raise TaskError("a mixture needs at least one task")
        self.tasks = list(tasks)
        # (task index, example index) pairs, shuffled once. Python's Random is the same on
        # every platform, so every rank of a run (and every rerun) sees one order.
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        if shuffle:
            random.Random(seed).shuffle(self.index_map)

    def __len__(self) -> int:
        return len(self.index_map)

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range for {len(self)} conversations")
        task, i = self.index_map[index]
        return self.tasks[task][i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for task in self.tasks:
            out[task.name] = out.get(task.name, 0) + len(task)
        return out

    def __repr__(self) -> str:
        return f"TaskMixture({len(self)} conversations: {self.counts()})"


# --- loading ---


def _data_files(root: str, config: str | None, split: str) -> list[str]:
    """Files of `split` under a local mirror of a hub dataset (root/config/split-*.parquet and friends)."""
    if os.path.isfile(root):
        return [root]
    candidates = [os.path.join(root, config)] if config else []
    candidates += [os.path.join(root, "data"), root]
    for directory in candidates:
        if not os.path.isdir(directory):
            continue
        files = []
        for fname in sorted(os.listdir(directory)):
            stem, ext = os.path.splitext(fname)
            if ext in _DATA_SUFFIXES and re.match(rf"{re.escape(split)}(\b|[-_.])", stem):
                files.append(os.path.join(directory, fname))
        if files:
            return files
    return []


def local_root(hub_name: str, source: str | None = None, data_dir: str | None = None) -> str | None:
    """The local directory (or file) standing in for `hub_name`, or None to use the hub."""
    if source is not None:
        if not os.path.exists(source):
            raise TaskError(f"{hub_name}: local source {source!r} does not exist")
        return source
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        root = os.path.join(data_dir, hub_name)
        if os.path.exists(root):
            return root
    return None


# nanochat shuffles every hub dataset it loads with this seed (`.shuffle(seed=42)` in its ARC,
# MMLU, GSM8K and SmolTalk tasks), so index i, a `stop=10_000` prefix and the first 1024
# evaluation problems are its rows too. Hub files are ordered (MMLU by subject: unshuffled, its
# first 1024 test problems cover 8 of 57 subjects).
SHUFFLE_SEED = 42


def load_split(hub_name: str, config: str | None, split: str, source: str | None = None, data_dir: str | None = None):
    """A `datasets.Dataset` for one split, shuffled with SHUFFLE_SEED as nanochat's are: from
    local files when a mirror exists, else from the hub."""
    return _load_split(hub_name, config, split, source, data_dir).shuffle(seed=SHUFFLE_SEED)


def row_label(ds, index: int) -> str:
    """Where shuffled example `index` of a `load_split` dataset is in the split's own files,
    for error messages: "row 812 (shuffled index 5)"."""
    try:  # datasets' shuffle mapping: an Arrow table of row numbers, None when not permuted
        indices = ds._indices  # (a private attribute)
        row = index if indices is None else int(indices.column(0)[index].as_py())
    except Exception:
        return f"shuffled index {index}"
    return f"row {row} (shuffled index {index})"


def _load_split(hub_name: str, config: str | None, split: str, source: str | None, data_dir: str | None):
    import datasets  # heavy import, only when a real dataset is wanted

    root = local_root(hub_name, source, data_dir)
    where = f"{hub_name}" + (f" ({config})" if config else "") + f" split {split!r}"
    if root is not None:
        files = _data_files(root, config, split)
        if not files:
            raise TaskError(f"{where}: no parquet/json/jsonl/arrow/csv file for the split under {root}")
        kinds = {_DATA_SUFFIXES[os.path.splitext(f)[1]] for f in files}
        if len(kinds) != 1:
            raise TaskError(f"{where}: mixed file types under {root}: {files}")
        try:
            return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
        except Exception as e:  # datasets raises many types; say which files failed
            raise TaskError(f"{where}: cannot load {files}: {e}") from e
    try:
        return datasets.load_dataset(hub_name, config, split=split)
    except Exception as e:
        raise TaskError(
            f"{where}: cannot load from the hub ({e}); offline, set --data-dir or ${DATA_DIR_ENV} "
            f"to a directory holding {hub_name}/{config or 'data'}/{split}-*.parquet"
        ) from e


def require_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise TaskError(f"{where}: missing column(s) {missing}; found {ds.column_names}")


# Message / part keys besides role+content (type+text for parts) that carry no training
# content. The renderer (rust/src/chat.rs and py/data.rs) reads only role and content
# (type and text in a part) and ignores every other key; these are dropped here just as
# quietly because losing them changes nothing the model sees. Any other key with a value
# (tool_calls, reasoning_content, weight, ...) is an error: rendering would drop it without a
# word. A key whose value is None counts as absent: parquet/Arrow gives every message of a
# column the union of all messages' keys, filled with None.
IGNORED_MESSAGE_KEYS = frozenset({"name"})
IGNORED_PART_KEYS = frozenset()


def read_text_lines(path: str):
    """The lines of a UTF-8 text file (sftfast.textfiles: any line break, a leading byte-order
    mark dropped). A line that is not UTF-8 is a TaskError naming path:line, not a bare
    UnicodeDecodeError from somewhere in the file."""
    for lineno, body, ending in raw_lines(path):
        try:
            yield body.decode("utf-8") + ending
        except UnicodeDecodeError as e:
            raise TaskError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None


def _unexpected_keys(obj: dict, known: set, ignored: frozenset) -> list[str]:
    return sorted(str(k) for k, v in obj.items() if k not in known and k not in ignored and v is not None)


def validate_messages(messages, where: str, allow_system: bool = True) -> list[dict]:
    """Check roles alternate user/assistant (optional leading system) and contents are strings
    (or, for the assistant, lists of text/python/python_output parts). Returns the messages as
    {"role", "content"} dicts; see IGNORED_MESSAGE_KEYS for what happens to other keys."""
    if not isinstance(messages, list) or not messages:
        raise TaskError(f"{where}: messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TaskError(f"{where}: message {i} must be an object with 'role' and 'content'")
        extra = _unexpected_keys(m, {"role", "content"}, IGNORED_MESSAGE_KEYS)
        if extra:
            raise TaskError(f"{where}: message {i} has field(s) {extra} that are not rendered (only 'role' and "
                            f"'content' are; {sorted(IGNORED_MESSAGE_KEYS)} are ignored): refusing to drop them")
        out.append({"role": m["role"], "content": m["content"]})
    body = out[1:] if allow_system and out[0]["role"] == "system" else out
    offset = len(out) - len(body)
    if len(body) < 2:
        raise TaskError(f"{where}: needs at least one user and one assistant message")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise TaskError(f"{where}: message {i + offset} has role {m['role']!r}, expected {expected!r}")
    for i, m in enumerate(out):
        if m["role"] == "assistant" and isinstance(m["content"], list):
            for j, part in enumerate(m["content"]):
                if not (isinstance(part, dict) and part.get("type") in ("text", "python", "python_output")
                        and isinstance(part.get("text"), str)):
                    raise TaskError(f"{where}: message {i} part {j} must be {{'type': text|python|python_output, 'text': str}}")
                extra = _unexpected_keys(part, {"type", "text"}, IGNORED_PART_KEYS)
                if extra:
                    raise TaskError(f"{where}: message {i} part {j} has field(s) {extra} that are not rendered "
                                    "(only 'type' and 'text' are): refusing to drop them")
        elif not isinstance(m["content"], str):
            raise TaskError(f"{where}: message {i} content must be a string")
    return out


# --- answers ---

_FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*\.?[0-9]*|-?\.[0-9]+)")


def extract_final_answer(text: str) -> str | None:
    """The number after the last `#### ` marker, commas and $ removed, or None."""
    matches = _FINAL_ANSWER.findall(text or "")
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same number: whole numbers exactly ("72.0" is 72, and
    1000000001 is not 1000000000), others within 1e-9 (the calculator keeps 15 significant
    digits, a written answer may keep fewer)."""
    if a is None or b is None:
        return False
    try:
        x, y = Decimal(a.strip()), Decimal(b.strip())
    except (InvalidOperation, AttributeError):
        return False
    if not (x.is_finite() and y.is_finite()):
        return False
    if x == x.to_integral_value() and y == y.to_integral_value():
        return x == y
    return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-9)


def assistant_text(message_content) -> str:
    """The concatenated text of an assistant message (a string, or the `text` parts of a list)."""
    if isinstance(message_content, str):
        return message_content
    return "".join(p["text"] for p in message_content if p.get("type") == "text")


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """SPEC 7's multiple-choice prompt; the answer is the bare letter."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)
