"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT.

    from sftfast.tasks.smoltalk import SmolTalk
    train = SmolTalk(split="train", stop=10_000)
    val = SmolTalk(split="test")

Schema (hub): messages list[{role, content}] with an optional leading system message;
other columns are ignored. No automatic evaluation: it is the validation-loss set.
"""

from __future__ import annotations

from sftfast.tasks.base import Task, TaskError, load_split, require_columns, row_label, validate_messages

HUB_NAME = "HuggingFaceTB/smol-smoltalk"
SPLITS = ("train", "test")


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split: str, source: str | None = None, data_dir: str | None = None, **kwargs):
        if split not in SPLITS:
            raise TaskError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        self.name = "SmolTalk"
        self.split = split
        self.ds = load_split(HUB_NAME, None, split, source, data_dir)
        require_columns(self.ds, ["messages"], f"SmolTalk {split}")
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        messages = self.ds[index]["messages"]
        return {"messages": validate_messages(messages, f"SmolTalk {self.split} {row_label(self.ds, index)}")}
