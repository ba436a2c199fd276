"""MMLU: 57 subjects of multiple-choice knowledge questions, categorical.

    from sftfast.tasks.mmlu import MMLU
    task = MMLU(split="test")                        # hub cais/mmlu, config "all"
    task[0] -> {"messages": [...], "letters": ["A", "B", "C", "D"], "subject": "..."}

Schema (hub): question str, subject str, choices list[str] (4), answer int 0-3.
Splits: auxiliary_train, dev, validation, test.
"""

from __future__ import annotations

from sftfast.tasks.base import Task, TaskError, load_split, render_mc, require_columns, row_label

HUB_NAME = "cais/mmlu"
SPLITS = ("auxiliary_train", "dev", "validation", "test")
LETTERS = ("A", "B", "C", "D")


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, split: str, subset: str = "all", source: str | None = None, data_dir: str | None = None, **kwargs):
        if split not in SPLITS:
            raise TaskError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        self.name = "MMLU"
        self.split = split
        self.ds = load_split(HUB_NAME, subset, split, source, data_dir)
        require_columns(self.ds, ["question", "choices", "answer"], f"MMLU {split}")
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        where = f"MMLU {self.split} {row_label(self.ds, index)}"
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if not isinstance(question, str) or not question.strip():
            raise TaskError(f"{where}: question must be a non-empty string")
        if not isinstance(choices, list) or len(choices) != len(LETTERS) or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: choices must be a list of {len(LETTERS)} strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
            raise TaskError(f"{where}: answer must be an int 0-{len(LETTERS) - 1}, got {answer!r}")
        letters = list(LETTERS)
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": letters[answer]},
            ],
            "letters": letters,
            "subject": row.get("subject", ""),
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]
