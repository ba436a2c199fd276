"""Arithmetic: small arithmetic questions answered with one calculator call (the demo's tool-use task).

    from sftfast.tasks.arithmetic import Arithmetic
    Arithmetic(size=500)[0] -> "What is 37 * 12?" / [text, python "37*12", python_output "444", text "#### 444"]

Seeded by index like the spelling tasks (train and test draw from disjoint seeds). The
tool output is computed by sftfast.calculator itself, so training data and the engine's
forced output always agree on formatting.
"""

from __future__ import annotations

import random

from sftfast.calculator import calculate
from sftfast.tasks.base import Task, TaskError, assistant_text, extract_final_answer, numbers_equal

TEST_SEED_OFFSET = 10_000_000
OPS = [("+", "plus"), ("-", "minus"), ("*", "times")]
TEMPLATES = [
    "What is {a} {sym} {b}?",
    "What is {a} {word} {b}?",
    "Compute {a} {sym} {b}.",
    "Calculate {a} {sym} {b}",
    "{a} {sym} {b} = ?",
    "what's {a} {word} {b}",
    "Please work out {a} {sym} {b}.",
]


class Arithmetic(Task):
    name = "Arithmetic"
    eval_type = "generative"

    def __init__(self, size: int, split: str = "train", max_value: int = 999, **kwargs):
        if split not in ("train", "test"):
            raise TaskError(f"Arithmetic: split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise TaskError(f"Arithmetic: size must be an int >= 0, got {size!r}")
        if not isinstance(max_value, int) or max_value < 2:
            raise TaskError(f"Arithmetic: max_value must be an int >= 2, got {max_value!r}")
        self.size, self.split, self.max_value = size, split, max_value
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        sym, word = rng.choice(OPS)
        a, b = rng.randint(2, self.max_value), rng.randint(2, self.max_value)
        if sym == "*" and rng.random() < 0.7:
            b = rng.randint(2, 99)  # keep most products short
        expr = f"{a}{sym}{b}"
        result = calculate(expr)
        prompt = rng.choice(TEMPLATES).format(a=a, b=b, sym=sym, word=word)
        parts = [
            {"type": "text", "text": "Let me use the calculator.\n\n"},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": result},
            {"type": "text", "text": f"\n\n{a} {sym} {b} = {result}\n\n#### {result}"},
        ]
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = extract_final_answer(assistant_text(conversation["messages"][-1]["content"]))
        return numbers_equal(extract_final_answer(response), reference)
