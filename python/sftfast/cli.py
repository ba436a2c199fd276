"""What the command-line tools share: argument types that refuse a bad value when it is read."""

from __future__ import annotations

import argparse
import math


def at_least(minimum, kind=int):
    """argparse type: a finite `kind` (int or float) of at least `minimum`.

    A count of 0 divided by zero deep inside a run, and a negative temperature was only
    refused at every reply of a chat session: argparse now says which flag and why, exit 2.
    """
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"  # argparse names the type in some messages
    return parse
