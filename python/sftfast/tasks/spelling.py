"""SimpleSpelling and SpellingBee: synthetic spelling tasks from the bundled English word list.

    from sftfast.tasks.spelling import SimpleSpelling, SpellingBee
    SimpleSpelling(size=300)[0]  -> "Spell the word: apple" / "apple:a,p,p,l,e"
    SpellingBee(size=300)[0]     -> "How many r are in strawberry?" / spelled out, counted,
                                     checked with 'strawberry'.count('r'), "#### 3"

Example i is drawn from random.Random(i) (train) or random.Random(TEST_SEED_OFFSET + i)
(test), so the same index is the same conversation on every machine and rank, and the
splits never share a seed. The word list (assets/words.txt, made by
scripts/make_wordlist.py) ships with the package: nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
import random

from sftfast.tasks.base import Task, TaskError, assistant_text, extract_final_answer, numbers_equal, read_text_lines

WORDS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "words.txt")
TEST_SEED_OFFSET = 10_000_000
LETTERS = "abcdefghijklmnopqrstuvwxyz"

SPELL_TEMPLATES = [
    "Spell the word: {word}",
    "Spell {word}",
    "How do you spell {word}?",
    "Spell out the word {word} letter by letter.",
    "spell {word}",
    "Can you spell '{word}' for me?",
]
COUNT_TEMPLATES = [
    "How many {letter} are in {word}?",
    "How many {letter}s are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of '{letter}' in '{word}'.",
    "how many {letter} in {word}",
    "In the word \"{word}\", how many times does \"{letter}\" occur?",
    "What is the count of the letter {letter} in {word}?",
    "Tell me how many {letter}'s there are in {word}.",
]


@functools.lru_cache(maxsize=4)
def load_words(path: str = WORDS_FILE) -> tuple[str, ...]:
    """The word list, one lower-case word per line; a bad line is reported by number."""
    words = []
    for lineno, line in enumerate(read_text_lines(path), start=1):
        word = line.strip()
        if not word:
            continue
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise TaskError(f"{path}:{lineno}: {word!r} is not a lower-case ASCII word")
        words.append(word)
    if not words:
        raise TaskError(f"{path}: the word list is empty")
    return tuple(words)


class _Synthetic(Task):
    def __init__(self, size: int, split: str = "train", words_file: str = WORDS_FILE, **kwargs):
        if split not in ("train", "test"):
            raise TaskError(f"{self.name}: split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise TaskError(f"{self.name}: size must be an int >= 0, got {size!r}")
        self.size = size
        self.split = split
        self.words = load_words(words_file)
        super().__init__(**kwargs)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


class SimpleSpelling(_Synthetic):
    """Spell a word as `word:l,e,t,t,e,r,s`: teaches the model what its tokens are made of."""

    name = "SimpleSpelling"
    eval_type = "generative"

    def __init__(self, size: int, split: str = "train", words_file: str = WORDS_FILE, **kwargs):
        super().__init__(size, split, words_file, **kwargs)
        # Its own word order (as nanochat's SimpleSpelling): with SpellingBee's, index i would
        # pick the same word in both tasks (same seed per index), halving the words seen.
        words = list(self.words)
        random.Random(42).shuffle(words)
        self.words = tuple(words)

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        prompt = rng.choice(SPELL_TEMPLATES).format(word=word)
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ]
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["messages"][-1]["content"]


class SpellingBee(_Synthetic):
    """Count a letter in a word: spell it, count by hand, check with the calculator, `#### N`."""

    name = "SpellingBee"
    eval_type = "generative"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # Mostly letters of the word (counts >= 1), sometimes any letter (count may be 0).
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(COUNT_TEMPLATES)
        if rng.random() < 0.3:
            # the question's case varies, never the word's or the letter's: the answer spells
            # them as they are
            template = template.upper() if rng.random() < 0.3 else template.lower()
            template = template.replace("{LETTER}", "{letter}").replace("{WORD}", "{word}")
        prompt = template.format(letter=letter, word=word)
        lines = [f"We are asked how many times the letter '{letter}' appears in the word '{word}'.",
                 "", "First, spell the word out:", f"{word}:{','.join(word)}", "",
                 f"Now count the '{letter}'s one position at a time:"]
        running = 0
        for i, ch in enumerate(word, start=1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} -> yes, {running} so far")
            else:
                lines.append(f"{i}:{ch}")
        lines += ["", f"That makes {count}. Let me double check with Python:", "", ""]
        parts = [
            {"type": "text", "text": "\n".join(lines)},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = extract_final_answer(assistant_text(conversation["messages"][-1]["content"]))
        return numbers_equal(extract_final_answer(response), reference)
