"""ARC (AI2 Reasoning Challenge): grade-school science, multiple choice, categorical.

    from sftfast.tasks.arc import ARC
    task = ARC("ARC-Easy", split="train")          # hub allenai/ai2_arc, or a local mirror
    task[0] -> {"messages": [user MC prompt, assistant "B"], "letters": ["A", "B", "C", "D"]}

Schema (hub): id str, question str, choices {text: list[str], label: list[str]}, answerKey str.
"""

from __future__ import annotations

from sftfast.tasks.base import Task, TaskError, load_split, render_mc, require_columns, row_label

HUB_NAME = "allenai/ai2_arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, source: str | None = None, data_dir: str | None = None, **kwargs):
        if subset not in SUBSETS:
            raise TaskError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise TaskError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.name = subset
        self.split = split
        self.ds = load_split(HUB_NAME, subset, split, source, data_dir)
        require_columns(self.ds, ["question", "choices", "answerKey"], f"{subset} {split}")
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        where = f"{self.name} {self.split} {row_label(self.ds, index)}"
        question, choices, answer = row["question"], row["choices"], row["answerKey"]
        if not isinstance(question, str) or not question.strip():
            raise TaskError(f"{where}: question must be a non-empty string")
        if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not isinstance(choices.get("label"), list):
            raise TaskError(f"{where}: choices must be {{text: list[str], label: list[str]}}")
        texts, letters = choices["text"], choices["label"]
        if len(texts) != len(letters) or len(texts) < 2:
            raise TaskError(f"{where}: {len(texts)} choice texts for {len(letters)} labels (need >= 2, equal)")
        if not all(isinstance(x, str) for x in texts + letters) or len(set(letters)) != len(letters):
            raise TaskError(f"{where}: choice texts and labels must be strings, labels distinct")
        if answer not in letters:
            raise TaskError(f"{where}: answerKey {answer!r} is not one of the labels {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, letters, texts)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]
