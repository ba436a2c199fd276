"""GSM8K: grade-school math word problems, answered with calculator calls, generative.

    from sftfast.tasks.gsm8k import GSM8K
    task = GSM8K(subset="main", split="train")      # hub openai/gsm8k
    task[0]["messages"][1]["content"] -> [text, python "48/2", python_output "24", text, ..., text "#### 72"]

The dataset writes calculator use inline as `<<expr=result>>`; each such span becomes a
`python` part (expr) followed by a `python_output` part (result), so the model learns to
call the tool and the tool's output is never a training target. `evaluate` compares the
final `#### N` numerically.

Spans are parsed exactly as nanochat does: a span is `<<` + one or more characters other
than `>` + `>>`; it splits at its last `=`, and a span without `=` is all expression with
an empty output. Text that is not such a span (a stray `<<`, `<<>>`) stays text. Only a
row without a question, without an answer string or without a final `#### N` is an error.

Schema (hub): question str, answer str. Configs: main, socratic. Splits: train, test.
"""

from __future__ import annotations

import re

from sftfast.tasks.base import (Task, TaskError, assistant_text, extract_final_answer, load_split,
                                numbers_equal, require_columns, row_label)

HUB_NAME = "openai/gsm8k"
SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
# nanochat's pattern: the same spans, so the same parts, on every row of the dataset.
_CALL = re.compile(r"(<<[^>]+>>)")


def parse_answer(answer: str) -> list[dict]:
    """Split a GSM8K answer into text / python / python_output parts (nanochat's spans).

    One difference from nanochat: it also turns a *text* piece that starts with `<<` and ends
    with `>>` into a call (e.g. the `<<>>` in `<<1+1=2>><<>><<2+2=4>>`, an empty call); here
    only the pattern's spans are calls and such a piece stays text."""
    parts = []
    # split with one capturing group: even positions are text, odd positions are the spans
    for k, piece in enumerate(_CALL.split(answer)):
        if k % 2 == 1:
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:  # split's empty ends and gaps: an empty text part renders to nothing anyway
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str, subset: str = "main", source: str | None = None, data_dir: str | None = None, **kwargs):
        if subset not in SUBSETS:
            raise TaskError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise TaskError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        self.name = "GSM8K"
        self.split = split
        self.ds = load_split(HUB_NAME, subset, split, source, data_dir)
        require_columns(self.ds, ["question", "answer"], f"GSM8K {split}")
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        where = f"GSM8K {self.split} {row_label(self.ds, index)}"
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not question.strip():
            raise TaskError(f"{where}: question must be a non-empty string")
        if not isinstance(answer, str):
            raise TaskError(f"{where}: answer must be a string")
        if extract_final_answer(answer) is None:
            raise TaskError(f"{where}: answer has no final '#### N' line")
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": parse_answer(answer)},
            ]
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = extract_final_answer(assistant_text(conversation["messages"][-1]["content"]))
        return numbers_equal(extract_final_answer(response), reference)
