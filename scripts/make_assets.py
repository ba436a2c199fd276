"""Builds the bundled benchmark/training texts in python/sftfast/assets/ (all ours to ship).

    python scripts/make_assets.py [EXTRA_DOC.md ...]

english.txt: the hand-written prose in scripts/english_seed.txt, then prose paragraphs of
the project's own docs (README, docs/, and any extra docs given, e.g. ../shared/SPEC.md),
then text generated from both by a seeded word-level Markov chain (order 2) up to ~200 KB.
code.txt: the project's own Rust and Python sources, up to ~120 KB.
The output is deterministic for the same inputs.
"""

import random
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "python" / "sftfast" / "assets"
ENGLISH_BYTES = 200_000
CODE_BYTES = 120_000


def prose_paragraphs(text: str) -> list[str]:
    # Keep paragraphs that read as prose: no tables, code blocks, headings or lists.
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        if not lines or any(l.lstrip().startswith(("|", "#", "```", "-", "*", ">")) or l.startswith("    ") for l in lines):
            continue
        para = " ".join(l.strip() for l in lines)
        if len(para) > 80 and sum(c.isalpha() or c in " ,.;:'\"()?!-" for c in para) / len(para) > 0.9:
            paras.append(para)
    return paras


def main() -> None:
    seed = (ROOT / "scripts" / "english_seed.txt").read_text()
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *map(Path, sys.argv[1:])]
    paras = prose_paragraphs(seed) + [p for d in docs for p in prose_paragraphs(d.read_text())]
    words = [w for p in paras for w in p.split() + ["\n"]]
    chain = defaultdict(list)
    for a, b, c in zip(words, words[1:], words[2:]):
        chain[(a, b)].append(c)
    starts = [(a, b) for (a, b) in chain if a[:1].isupper() and a != "\n"]
    rng = random.Random(1234)
    out = ["\n\n".join(paras)]
    size = len(out[0])
    while size < ENGLISH_BYTES:
        state, para = rng.choice(starts), []
        para.extend(state)
        while len(para) < 400:
            nxt = chain.get(state)
            if not nxt:
                break
            w = rng.choice(nxt)
            if w == "\n":
                if len(para) > 40:
                    break
                state = rng.choice(starts)
                para.extend(state)
                continue
            para.append(w)
            state = (state[1], w)
        text = " ".join(para)
        out.append(text)
        size += len(text) + 2
    (OUT / "english.txt").write_text("\n\n".join(out)[:ENGLISH_BYTES].rsplit(" ", 1)[0] + "\n")

    sources = sorted((ROOT / "rust" / "src").rglob("*.rs")) + sorted((ROOT / "python" / "sftfast").rglob("*.py"))
    code, size = [], 0
    for path in sources:
        text = path.read_text()
        code.append(text)
        size += len(text)
        if size > CODE_BYTES:
            break
    (OUT / "code.txt").write_text("".join(code)[:CODE_BYTES])
    print("wrote", OUT / "english.txt", OUT / "code.txt")


if __name__ == "__main__":
    main()
