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

from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN, Tokenizer, bundled_text_path


def _iter_lines(paths: list[str]):
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            yield from f


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftfast.train_tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a vocabulary on text files (default: the bundled text)")
    p.add_argument("files", nargs="*", help="UTF-8 text files, one document per line")
    p.add_argument("--vocab-size", type=int, default=4096, help="total tokens, special tokens included")
    p.add_argument("--pattern", default=NANOCHAT_SPLIT_PATTERN, help="split regex (default: nanochat's)")
    p.add_argument("--out", required=True, help="where to save the tokenizer")
    p = sub.add_parser("encode", help="print the ids of a text")
    p.add_argument("text")
    p.add_argument("--tokenizer", required=True, help="a file written by `train` / Tokenizer.save")
    args = parser.parse_args(argv)
    if args.command == "train":
        files = args.files or [str(bundled_text_path())]
        tok = Tokenizer.train(_iter_lines(files), args.vocab_size, pattern=args.pattern)
        tok.save(args.out)
        print(f"trained {tok.n_vocab} tokens on {tok.training_stats}; saved to {args.out}")
    else:
        print(Tokenizer.load(args.tokenizer).encode(args.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
