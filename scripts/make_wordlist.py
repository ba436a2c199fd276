"""Regenerate python/sftfast/assets/words.txt, the offline English word list of the spelling tasks.

    pip install english-words==2.0.2   # dev-time only; sftfast itself does not depend on it
    python scripts/make_wordlist.py

The list is the words of Webster's Second International (web2, public domain) that
also appear in GCIDE, lower-case ASCII letters only, 3-14 letters long: the
intersection drops most of web2's obsolete and botanical rarities, so the spelling
tasks ask about words a reader has seen. The result is plain text, one word per line,
sorted, so a diff of the asset is reviewable and loading it needs no pickle.
"""

import argparse
import os

from english_words import get_english_words_set

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "python", "sftfast", "assets", "words.txt")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--min-len", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=14)
    args = parser.parse_args()
    web2 = get_english_words_set(["web2"], alpha=True, lower=True)
    gcide = get_english_words_set(["gcide"], alpha=True, lower=True)
    words = sorted(
        w for w in web2 & gcide if w.isascii() and w.isalpha() and args.min_len <= len(w) <= args.max_len
    )
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write("\n".join(words) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(words)} words to {args.out}")


if __name__ == "__main__":
    main()
