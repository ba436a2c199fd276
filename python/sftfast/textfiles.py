"""Lines of text files read as bytes, so a line that is not UTF-8 can be named (file:line)
instead of failing somewhere in the file, with the line breaks Python's text mode knows:
"\n", "\r\n" and a lone "\r". A byte-order mark at the start of the file is dropped.

    for lineno, body, ending in raw_lines(path):   # body: bytes without the line break
        text = body.decode("utf-8") + ending       # ending: "\n", or "" for a last line without one
"""

from __future__ import annotations

from collections.abc import Iterator

UTF8_BOM = b"\xef\xbb\xbf"


def raw_lines(path) -> Iterator[tuple[int, bytes, str]]:
    """(line number from 1, the line's bytes without its break, "\n" or "" when the file ends
    without one), streaming: files of any size."""
    lineno = 0
    with open(path, "rb") as f:
        for raw in f:  # split at "\n"; "\r" is handled below
            if lineno == 0 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            ended = raw.endswith(b"\n")
            body = raw[:-1] if ended else raw
            if body.endswith(b"\r"):  # "\r\n", or a lone "\r" ending the file
                body, ended = body[:-1], True
            *inner, last = body.split(b"\r")  # lone "\r" breaks (old Mac files)
            for part in inner:
                lineno += 1
                yield lineno, part, "\n"
            lineno += 1
            yield lineno, last, "\n" if ended else ""
