"""Train a BPE vocabulary, or encode with one, from the command line.

    python -m sftfast.train_tokenizer train --vocab-size 4096 --out tok.sftfast [FILE ...]
    python -m sftfast.train_tokenizer encode --tokenizer tok.sftfast "some text"

`train` reads UTF-8 text files (one document per line; default: the bundled English text
in sftfast/assets), trains in Rust (see `Tokenizer.train`) and saves the plain-text format
described in sftfast/tokenizer.py. Kept apart from tokenizer.py so that `python -m` does not
run a module the package has already imported.
"""

import argparse
import sys

from sftfast._core import SftfastError
from sftfast.textfiles import raw_lines
from sftfast.tokenizer import SPLIT_PATTERNS, Tokenizer, bundled_text_path


class LineReader:
    """The lines of UTF-8 text files, with "\n" endings whatever the file's line breaks were
    (sftfast.textfiles), so a Windows corpus trains the same vocabulary. A line that is not
    valid UTF-8 is skipped and counted with its file:line: no bytes are silently replaced."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.skipped: list[str] = []

    def __iter__(self):
        for path in self.paths:
            for lineno, body, ending in raw_lines(path):
                try:
                    yield body.decode("utf-8") + ending
                except UnicodeDecodeError as e:
                    self.skipped.append(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftfast.train_tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a vocabulary on text files (default: the bundled text)")
    p.add_argument("files", nargs="*", help="UTF-8 text files, one document per line")
    p.add_argument("--vocab-size", type=positive_int, default=2048,
                   help="total tokens, special tokens included (the bundled text has merges for about 3,100)")
    p.add_argument("--pattern", default="nanochat",
                   help=f"split regex, or one of {', '.join(SPLIT_PATTERNS)} (default: nanochat's)")
    p.add_argument("--out", required=True, help="where to save the tokenizer")
    p = sub.add_parser("encode", help="print the ids of a text")
    p.add_argument("text")
    p.add_argument("--tokenizer", required=True, help="a file written by `train` / Tokenizer.save")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            lines = LineReader(args.files or [str(bundled_text_path())])
            tok = Tokenizer.train(lines, args.vocab_size, pattern=args.pattern)
            for where in lines.skipped[:10]:
                print(f"skipped {where}", file=sys.stderr)
            if lines.skipped:
                print(f"skipped {len(lines.skipped)} line(s) that are not valid UTF-8", file=sys.stderr)
            stats = tok.training_stats or {}
            if stats.get("n_bytes", 0) > 0 and stats.get("n_unique_pieces") == 0:
                raise ValueError(f"the split pattern {args.pattern!r} matched no text in the corpus: nothing to learn from")
            tok.save(args.out)
            print(f"trained {tok.n_vocab} tokens on {tok.training_stats}; saved to {args.out}")
        else:
            print(Tokenizer.load(args.tokenizer).encode(args.text))
    except (SftfastError, OSError, ValueError) as e:
        # user-facing failures (a missing file, a vocabulary too small, a bad pattern): one line
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
