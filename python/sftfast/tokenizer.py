"""The tokenizer: GPT-4-style byte-level BPE in Rust, ids identical to tiktoken.

    from sftfast import Tokenizer
    from sftfast.tokenizer import CL100K_SPLIT_PATTERN
    tok = Tokenizer.from_tiktoken_file("cl100k_base.tiktoken", CL100K_SPLIT_PATTERN)
    ids = tok.encode("hello world")              # ordinary encoding: "<|bos|>" is just text
    tok.encode_batch(texts, num_threads=8)       # parallel, GIL released
    tok = Tokenizer.train(texts, vocab_size=8192)  # BPE training in Rust
    tok.save("tok.sftfast"); tok = Tokenizer.load("tok.sftfast")
    enc = tok.to_tiktoken()                      # a tiktoken.Encoding with the same ids

Command line: `python -m sftfast.train_tokenizer` (see that module).

Special tokens come after the mergeable ranks, in SPECIAL_TOKENS order (SPEC 2):
id = number of ranks + index.

File format of `save`/`load` (plain UTF-8 text, no pickle):

    line 1:  {"format": "sftfast-tokenizer", "version": 1, "pattern": "<split regex>",
              "special_tokens": [["<|bos|>", 65527], ...]}          (one JSON object)
    line 2+: <base64 of the token bytes> <rank>                     (one token per line,
                                                                     in rank order)

Lines 2+ are exactly a tiktoken rank file, so `tail -n +2 tok.sftfast` can be read by
`tiktoken.load.load_tiktoken_bpe`. A malformed file raises RankFileError naming the line.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from sftfast import _core

# The chat special tokens, appended after the ranks in this order (SPEC 2); defined in rust/src/bpe.rs.
SPECIAL_TOKENS: list[str] = list(_core.SPECIAL_TOKENS)

# The split patterns live in Rust (rust/src/pretokenize.rs); these are the same strings.
NANOCHAT_SPLIT_PATTERN: str = _core.NANOCHAT_PATTERN
CL100K_SPLIT_PATTERN: str = _core.CL100K_PATTERN
O200K_SPLIT_PATTERN: str = _core.O200K_PATTERN
# Names that may be given instead of a regex, here and on command lines.
SPLIT_PATTERNS = {"nanochat": NANOCHAT_SPLIT_PATTERN, "cl100k": CL100K_SPLIT_PATTERN, "o200k": O200K_SPLIT_PATTERN}


def split_pattern(pattern: str) -> str:
    """A pattern name (nanochat, cl100k, o200k) as its regex; any other string is the regex
    itself. (Taken literally, "cl100k" is a regex that matches only that word: a tokenizer
    built with it silently drops all other text.)"""
    return SPLIT_PATTERNS.get(pattern, pattern)

# A forked child (DataLoader workers, multiprocessing) inherits the rayon pools' memory but
# none of their threads; drop the pools there so the first parallel call builds new ones.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_core._reset_thread_pools)


def _fix_surrogates(text: str) -> str:
    # What tiktoken does with lone surrogates (not encodable as UTF-8): round-trip through
    # UTF-16 so each becomes U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _special_pairs(special_tokens, n_ranks: int) -> list[tuple[str, int]]:
    # A mapping name -> id is used as given (e.g. from a tiktoken Encoding); a sequence of
    # names gets the ids after the ranks, in order.
    if isinstance(special_tokens, Mapping):
        return [(str(name), int(i)) for name, i in special_tokens.items()]
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a sequence of names or a mapping name -> id, not a str")
    return [(name, n_ranks + i) for i, name in enumerate(special_tokens)]


class _PickledEncoding:
    """Stands in for tiktoken.core.Encoding while unpickling: records the state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    # The only global a nanochat tokenizer.pkl may name is tiktoken.core.Encoding; any other
    # (os.system, builtins.eval, ...) is refused before it can be called.
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in (("tiktoken.core", "Encoding"), ("tiktoken", "Encoding")):
            return _PickledEncoding
        raise pickle.UnpicklingError(
            f"{self.path}: refusing to load global {module}.{name}: a nanochat tokenizer.pkl "
            "may only contain a tiktoken.core.Encoding"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self.path}: persistent ids are not allowed")


@contextlib.contextmanager
def _errors_name(path):
    """Errors from reading a tokenizer file name the file: the Rust parsers name it for rank
    lines, not for a bad pattern or vocabulary; a truncated pickle says only "truncated"."""
    try:
        yield
    except _core.SftfastError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e
    except (EOFError, UnicodeDecodeError, MemoryError, pickle.UnpicklingError) as e:
        if str(path) in str(e):
            raise
        raise pickle.UnpicklingError(f"{path}: not a readable tokenizer pickle: {type(e).__name__}: {e}") from e


class Tokenizer:
    """Byte-level BPE with ordinary encoding, batch encoding, decoding and training."""

    def __init__(self, core: _core.CoreTokenizer):
        self._core = core
        self.training_stats: dict | None = None

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str, special_tokens=SPECIAL_TOKENS) -> "Tokenizer":
        n_ranks = max(ranks.values()) + 1 if ranks else 0
        return cls(_core.CoreTokenizer.from_ranks(ranks, split_pattern(pattern), _special_pairs(special_tokens, n_ranks)))

    @classmethod
    def from_tiktoken_file(cls, path, pattern: str, special_tokens=SPECIAL_TOKENS) -> "Tokenizer":
        """A tiktoken rank file (`<base64 token> <rank>` per line), parsed in Rust."""
        pattern = split_pattern(pattern)
        if isinstance(special_tokens, Mapping):
            core = _core.CoreTokenizer.from_tiktoken_file(os.fspath(path), pattern, [])
            return cls(_core.CoreTokenizer.from_ranks(core.ranks(), pattern, _special_pairs(special_tokens, 0)))
        with _errors_name(path):
            return cls(_core.CoreTokenizer.from_tiktoken_file(os.fspath(path), pattern, list(special_tokens)))

    @classmethod
    def from_nanochat(cls, tokenizer_dir) -> "Tokenizer":
        """nanochat's `tokenizer.pkl` (a pickled tiktoken.Encoding), read without running pickle code.

        `tokenizer_dir` is the directory holding tokenizer.pkl, or the file itself.
        """
        path = Path(tokenizer_dir)
        if path.is_dir():
            path = path / "tokenizer.pkl"
        with open(path, "rb") as f, _errors_name(path):
            obj = _RestrictedUnpickler(f, str(path)).load()
        if not isinstance(obj, _PickledEncoding) or not hasattr(obj, "state"):
            raise pickle.UnpicklingError(f"{path}: expected a pickled tiktoken Encoding, got {type(obj).__name__}")
        state = obj.state
        if isinstance(state, str):
            # tiktoken pickles its registered encodings (cl100k_base, ...) by name only.
            import tiktoken

            enc = tiktoken.get_encoding(state)
            state = {"pat_str": enc._pat_str, "mergeable_ranks": enc._mergeable_ranks, "special_tokens": enc._special_tokens}
        if not isinstance(state, dict):
            raise _core.VocabError(f"{path}: the Encoding's state is a {type(state).__name__}, expected a dict")
        pat_str, ranks, specials = state.get("pat_str"), state.get("mergeable_ranks"), state.get("special_tokens")
        if not isinstance(pat_str, str):
            raise _core.VocabError(f"{path}: pat_str must be a str")
        if not isinstance(ranks, dict) or not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items()):
            raise _core.VocabError(f"{path}: mergeable_ranks must be a dict bytes -> int")
        if not isinstance(specials, dict) or not all(isinstance(k, str) and type(v) is int for k, v in specials.items()):
            raise _core.VocabError(f"{path}: special_tokens must be a dict str -> int")
        with _errors_name(path):
            return cls.from_ranks(ranks, pat_str, specials)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = NANOCHAT_SPLIT_PATTERN,
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
        num_threads: int | None = None,
    ) -> "Tokenizer":
        """Trains BPE on `texts` (any iterable of str, consumed once) to `vocab_size` tokens,
        special tokens included. Facts about the corpus land in `tok.training_stats`."""
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of str, not a single str")
        core, stats = _core.CoreTokenizer.train(texts, int(vocab_size), split_pattern(pattern), list(special_tokens), num_threads)
        tok = cls(core)
        tok.training_stats = stats
        if stats["n_missing_merges"]:
            # Not an error (rustbpe stops the same way), but the caller asked for more.
            warnings.warn(
                f"the corpus ran out of pairs to merge: the vocabulary has {tok.n_vocab} tokens, "
                f"not the {vocab_size} asked for",
                stacklevel=2,
            )
        return tok

    @classmethod
    def load(cls, path) -> "Tokenizer":
        with _errors_name(path):
            return cls(_core.CoreTokenizer.load(os.fspath(path)))

    def save(self, path) -> None:
        """Writes the plain-text format described in the module docstring (atomically)."""
        self._core.save(os.fspath(path))

    def to_tiktoken(self, name: str = "sftfast"):
        """A tiktoken.Encoding with the same ranks, pattern and special tokens."""
        import tiktoken

        return tiktoken.Encoding(
            name=name,
            pat_str=self._core.pattern,
            mergeable_ranks=self._core.ranks(),
            special_tokens=dict(self._core.specials()),
        )

    def __reduce__(self):
        # Pickled as its plain file format (so it can cross to spawned worker processes).
        return (_from_bytes, (self._core.to_bytes(),))

    # --- properties ---------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def pattern(self) -> str:
        return self._core.pattern

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._core.specials())

    @property
    def bos_id(self) -> int:
        return self._core.special_token_id("<|bos|>")

    def special_token_id(self, name: str) -> int:
        """Id of a special token; UnknownSpecialTokenError if there is none by that name."""
        return self._core.special_token_id(name)

    def token_bytes(self) -> np.ndarray:
        """(n_vocab,) int32: byte length of each token, 0 for special tokens (for bits per byte)."""
        return self._core.token_byte_lengths()

    # --- encode / decode ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ordinary encoding: special-token text is encoded as the text it is."""
        try:
            return self._core.encode(text)
        except UnicodeEncodeError:
            return self._core.encode(_fix_surrogates(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encodes every text in parallel on `num_threads` threads (None: all CPUs), GIL released."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of str; use encode for one str")
        texts = list(texts)
        try:
            return self._core.encode_batch(texts, num_threads)
        except (UnicodeEncodeError, TypeError):
            # Slow path, only on bad input: name the first non-str, repair lone surrogates.
            fixed = []
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str") from None
                try:
                    t.encode("utf-8")
                    fixed.append(t)
                except UnicodeEncodeError:
                    fixed.append(_fix_surrogates(t))
            return self._core.encode_batch(fixed, num_threads)

    def decode_bytes(self, ids) -> bytes:
        """Bytes of `ids` (list, NumPy array or tensor); TokenOutOfRangeError names a bad index."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._core.decode_bytes(ids if isinstance(ids, list) else list(ids))

    def decode(self, ids) -> str:
        """Text of `ids`; invalid UTF-8 (a token cut mid-character) becomes U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, specials={len(self._core.specials())})"

    # --- rendering (issue 3) --------------------------------------------------------------
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) per SPEC 2; raises ConversationError naming the message and reason."""
        return self._core.render_conversation(conversation, max_tokens)

    def render_batch(self, conversations, max_tokens: int = 2048, num_threads=None, on_error: str = "fail", indices=None):
        """render_conversation over many, in parallel with the GIL released. on_error="skip"
        returns (rendered, [(index, message), ...]); indices name the conversations in errors."""
        return self._core.render_batch(conversations, max_tokens, num_threads, on_error, indices)

    def render_chunk(self, conversations, max_tokens: int = 2048, num_threads=None, on_error: str = "fail", indices=None):
        """render_batch without Python lists: a RenderedChunk held in Rust, for Packer.feed_rendered
        (the loader renders the next chunk this way while packing the current one). With
        on_error="skip", chunk.errors holds (position, message) of the bad ones."""
        return self._core.render_chunk(conversations, max_tokens, num_threads, on_error, indices)

    def render_for_completion(self, conversation: dict, max_tokens: int = 2048) -> list[int]:
        """Prompt ids: the conversation minus its final assistant message, then <|assistant_start|>."""
        return self._core.render_for_completion(conversation, max_tokens)


def _from_bytes(data: bytes) -> Tokenizer:
    return Tokenizer(_core.CoreTokenizer.from_bytes(data))


def bundled_text_path() -> Path:
    """The bundled English text (written for this project) used for training and benchmarks."""
    return Path(__file__).parent / "assets" / "english.txt"


def load_tokenizer(path, pattern: str | None = None) -> Tokenizer:
    """Any tokenizer a user may point at: a saved sftfast file (`Tokenizer.load`), nanochat's
    `tokenizer.pkl` (read without running pickle code), a `.tiktoken` rank file (split with
    `pattern`: nanochat, cl100k, o200k or a regex; nanochat's by default), or a directory holding
    `tokenizer.sftfast`, `tokenizer.pkl` or `tokenizer.tiktoken` (first found)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.sftfast", "tokenizer.pkl", "tokenizer.tiktoken"):
            if (path / name).is_file():
                return load_tokenizer(path / name, pattern)
        raise FileNotFoundError(f"tokenizer directory {path} holds no tokenizer.sftfast, tokenizer.pkl or tokenizer.tiktoken")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".pkl":
        return Tokenizer.from_nanochat(path)
    if path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken_file(path, pattern or "nanochat")
    return Tokenizer.load(path)
