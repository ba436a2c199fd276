"""Tokenizer tests: sftfast's ids against tiktoken's, built from the same ranks, pattern and
special tokens; plus loading, saving, training, errors and threading.

    PYTHONPATH=python python -m pytest -q tests/test_tokenizer.py
"""

import multiprocessing as mp
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cl100k_ranks
from sftfast import NANOCHAT_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, _core
from sftfast.tokenizer import CL100K_SPLIT_PATTERN, O200K_SPLIT_PATTERN, bundled_text_path

ASSETS = Path(bundled_text_path()).parent
# A user pattern with none of the known shapes: words, single non-space chars, whitespace.
USER_PATTERN = r"\w+|[^\w\s]|\s+"
PATTERNS = {"nanochat": NANOCHAT_SPLIT_PATTERN, "cl100k": CL100K_SPLIT_PATTERN, "o200k": O200K_SPLIT_PATTERN, "user": USER_PATTERN}


def _specials(n_ranks):
    return {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}


@pytest.fixture(scope="module", params=list(PATTERNS))
def pair(request, cl100k_file):
    """(sftfast Tokenizer, tiktoken Encoding) from cl100k's ranks and one pattern."""
    pattern = PATTERNS[request.param]
    tok = Tokenizer.from_tiktoken_file(cl100k_file, pattern)
    ranks = cl100k_ranks()
    enc = tiktoken.Encoding(name=f"t-{request.param}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=_specials(len(ranks)))
    return tok, enc


@pytest.fixture(scope="module")
def cl100k_tok(cl100k_file):
    return Tokenizer.from_tiktoken_file(cl100k_file, CL100K_SPLIT_PATTERN)


# Fragments that exercise every branch of the patterns: contractions, letters after
# punctuation, digit runs, CRLF, trailing whitespace, marks, CJK, emoji, surrogates.
FRAGMENTS = [
    "'s", "'LL", "'ve", "'re", "'d", "don't", "Hello", " world", "ÉCOLE", "naïve", "straße", "ǅemal",
    "123", "4567890", " 42", "3.14", "\r\n", "\n\n\n", "\r", "   ", "\t", " \n ", "\u00a0", "\u3000",
    "!!!", " ?!", "...", "—", "…", "//", "#include", "<|bos|>", "<|endoftext|>", "中文字符", "日本語の文",
    "한국어", "Привет", "مرحبا", "नमस्ते", "ไทย", "🙂", "👩‍💻", "e\u0301", "\u0300", "a\u20ddb", "x" * 40,
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200)
# Lone surrogates are rare in `any_text`; mix them in on purpose.
surrogate_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)), max_size=20
).map("".join)
hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tiktoken_ids(enc, text):
    return enc.encode_ordinary(text)


@hyp
@given(text=st.one_of(any_text, fragment_text, surrogate_text))
def test_identical_to_tiktoken_on_arbitrary_text(pair, text):
    tok, enc = pair
    assert tok.encode(text) == _tiktoken_ids(enc, text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\ud800",  # a lone surrogate: tiktoken encodes U+FFFD instead
        "a\udfffb \ud83d",
        "The quick brown fox jumps over the lazy dog. It's 12:45pm, isn't it?\r\n",
        "def f(x):\n    return x ** 2  # square\n\n\n",
        "我们今天去北京。東京は雨です。서울은 맑아요.",
        "Σὲ γνωρίζω ἀπὸ τὴν κόψη — Ελλάδα! Ünïcödé façade; «quoted» “curly” ‘single’",
        "<|bos|><|user_start|>hi<|user_end|>",
    ],
)
def test_identical_to_tiktoken_on_fixed_cases(pair, text):
    tok, enc = pair
    assert tok.encode(text) == _tiktoken_ids(enc, text)


def test_identical_on_bundled_prose_and_code(pair):
    tok, enc = pair
    for name in ("english.txt", "code.txt"):
        text = (ASSETS / name).read_text()
        assert tok.encode(text) == _tiktoken_ids(enc, text), name
    texts = (ASSETS / "english.txt").read_text().split("\n\n")
    assert tok.encode_batch(texts, num_threads=2) == [_tiktoken_ids(enc, t) for t in texts]


long_runs = st.lists(
    st.one_of(
        # one long piece of mixed letters / symbols / digits: exercises the long-piece merge
        st.text(alphabet="abcdefghijklmnopqrstuvwxyzéü", min_size=128, max_size=2000),
        st.text(alphabet="^-=*#~!?.", min_size=128, max_size=2000),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "ab", " ", "\r\n", "-", "1", "中", "🙂", "\t "]), st.integers(60, 1500)),
        fragment_text,
    ),
    min_size=1,
    max_size=4,
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=long_runs)
def test_identical_to_tiktoken_on_long_pieces(pair, text):
    tok, enc = pair
    assert tok.encode(text) == _tiktoken_ids(enc, text)


PATHOLOGICAL = {
    "one_letter": lambda n: "a" * n,
    "caret": lambda n: "^" * n,
    "digits": lambda n: "1234567890" * (n // 10),
    "spaces": lambda n: " " * n,
    "spaces_then_word": lambda n: " " * n + "word",
    "crlf": lambda n: "\r\n" * (n // 2),
    "dashes_after_word": lambda n: "word" + "-" * n,
    "tabs_newlines": lambda n: "\t\n " * (n // 3),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_inputs_match_tiktoken(pair, name):
    # tiktoken's merge loop is quadratic in the piece length, so compare at a size it finishes
    # quickly; the large sizes are checked below for round trip (and, in the benchmark, time).
    tok, enc = pair
    text = PATHOLOGICAL[name](3000)
    assert tok.encode(text) == _tiktoken_ids(enc, text)


@pytest.mark.parametrize("name,n", [("one_letter", 100_000), ("caret", 1_000_000), ("digits", 200_000),
                                    ("spaces", 200_000), ("crlf", 200_000), ("dashes_after_word", 32_000)])
def test_pathological_inputs_at_scale_round_trip(cl100k_tok, name, n):
    text = PATHOLOGICAL[name](n)
    ids = cl100k_tok.encode(text)
    assert cl100k_tok.decode(ids) == text
    # Same ids as encoding the piece with the simple loop on a prefix, repeated: the merges of
    # one repeated character are periodic, so a long run is a repetition of a short run's ids.
    if name in ("one_letter", "caret"):
        unit = cl100k_tok.encode(text[:4096])
        assert ids[: len(unit) - 1] == unit[:-1]


def test_specials_come_after_ranks_in_spec_order(cl100k_tok):
    n_ranks = len(cl100k_ranks())
    assert cl100k_tok.n_vocab == n_ranks + len(SPECIAL_TOKENS)
    assert cl100k_tok.bos_id == n_ranks
    for i, name in enumerate(SPECIAL_TOKENS):
        assert cl100k_tok.special_token_id(name) == n_ranks + i
        assert cl100k_tok.decode([n_ranks + i]) == name
    # Ordinary encoding: a user typing a special token's text gets its bytes, not the id.
    assert cl100k_tok.bos_id not in cl100k_tok.encode("<|bos|>")


def test_token_bytes(cl100k_tok):
    lens = cl100k_tok.token_bytes()
    assert isinstance(lens, np.ndarray) and lens.shape == (cl100k_tok.n_vocab,)
    assert np.issubdtype(lens.dtype, np.integer)
    assert (lens[cl100k_tok.bos_id :] == 0).all()
    ids = np.random.default_rng(0).integers(0, len(cl100k_ranks()), 500)
    assert all(lens[i] == len(cl100k_tok.decode_bytes([int(i)])) for i in ids)


def test_to_tiktoken_and_from_ranks_round_trip(cl100k_tok):
    enc = cl100k_tok.to_tiktoken()
    assert enc.n_vocab == cl100k_tok.n_vocab
    text = (ASSETS / "english.txt").read_text()[:20000]
    assert enc.encode_ordinary(text) == cl100k_tok.encode(text)
    assert enc.encode("<|bos|>", allowed_special="all") == [cl100k_tok.bos_id]
    again = Tokenizer.from_ranks(enc._mergeable_ranks, enc._pat_str, enc._special_tokens)
    assert again.encode(text) == cl100k_tok.encode(text)
    assert again.special_tokens == cl100k_tok.special_tokens


def test_save_load_and_pickle(cl100k_tok, tmp_path):
    path = tmp_path / "tok.sftfast"
    cl100k_tok.save(path)
    back = Tokenizer.load(path)
    text = "Saving and loading keeps every id: 12345 \r\n ünïcode 中文"
    assert back.encode(text) == cl100k_tok.encode(text)
    assert back.special_tokens == cl100k_tok.special_tokens and back.pattern == cl100k_tok.pattern
    # Lines 2+ are a valid tiktoken rank file.
    lines = path.read_bytes().split(b"\n", 1)[1]
    (tmp_path / "ranks.tiktoken").write_bytes(lines)
    from tiktoken.load import load_tiktoken_bpe

    assert load_tiktoken_bpe(str(tmp_path / "ranks.tiktoken")) == cl100k_ranks()
    clone = pickle.loads(pickle.dumps(cl100k_tok))
    assert clone.encode(text) == cl100k_tok.encode(text)


def test_from_tiktoken_file_variants(tmp_path, cl100k_tok):
    # Tabs and CRLF line ends, as tiktoken's loader accepts; specials given as a mapping.
    lines = [f"{__import__('base64').b64encode(bytes([b])).decode()}\t{b}" for b in range(256)]
    (tmp_path / "bytes.tiktoken").write_text("\r\n".join(lines) + "\r\n")
    tok = Tokenizer.from_tiktoken_file(tmp_path / "bytes.tiktoken", NANOCHAT_SPLIT_PATTERN, {"<|bos|>": 300})
    assert tok.n_vocab == 301 and tok.bos_id == 300
    assert tok.encode("hi") == [ord("h"), ord("i")]


def test_malformed_files_name_the_line(tmp_path):
    good = [f"{__import__('base64').b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    cases = {
        "missing rank": (good[:3] + ["YWI="] + good[3:], 4),
        "bad base64": (good[:10] + ["@@@@ 300"], 11),
        "not an int": (good + ["YWI= twelve"], 257),
        "duplicate rank": (good + ["YWI= 5"], 257),
        "duplicate token": (good + [good[0].split()[0] + " 999"], 257),
    }
    for reason, (lines, line_no) in cases.items():
        path = tmp_path / "bad.tiktoken"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(_core.RankFileError, match=rf"bad\.tiktoken:{line_no}:"):
            Tokenizer.from_tiktoken_file(path, NANOCHAT_SPLIT_PATTERN)
    (tmp_path / "bad.sftfast").write_text('{"format": "nope"}\n')
    with pytest.raises(_core.RankFileError, match=r":1:"):
        Tokenizer.load(tmp_path / "bad.sftfast")
    with pytest.raises(OSError):
        Tokenizer.from_tiktoken_file(tmp_path / "missing.tiktoken", NANOCHAT_SPLIT_PATTERN)


def test_bad_input_raises_specific_errors(cl100k_tok):
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(_core.PatternError):
        Tokenizer.from_ranks(ranks, r"(unclosed")
    with pytest.raises(_core.UnknownSpecialTokenError, match="nope"):
        cl100k_tok.special_token_id("<|nope|>")
    with pytest.raises(_core.TokenOutOfRangeError, match=r"index 2"):
        cl100k_tok.decode([1, 2, cl100k_tok.n_vocab])
    with pytest.raises(_core.TokenOutOfRangeError, match=r"-1 at index 0"):
        cl100k_tok.decode([-1])
    with pytest.raises(_core.VocabError, match="0x41"):
        Tokenizer.from_ranks({k: v for k, v in ranks.items() if k != b"A"}, NANOCHAT_SPLIT_PATTERN)
    with pytest.raises(_core.VocabError):
        Tokenizer.from_ranks({**ranks, b"ab": 3}, NANOCHAT_SPLIT_PATTERN)
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        cl100k_tok.encode_batch(["ok", 3])
    with pytest.raises(_core.SftfastError):
        cl100k_tok.encode_batch(["ok"], num_threads=0)
    # Every specific error is still a ValueError for callers that catch that.
    assert issubclass(_core.TokenOutOfRangeError, ValueError)


def test_encode_batch_threads_and_surrogates(cl100k_tok):
    texts = [f"document {i}: " + "some words and numbers 12345 " * (i % 7) for i in range(200)]
    texts.append("bad \ud800 surrogate")
    expected = [cl100k_tok.encode(t) for t in texts]
    assert cl100k_tok.encode_batch(texts) == expected
    assert cl100k_tok.encode_batch(texts, num_threads=1) == expected
    assert cl100k_tok.encode_batch(texts, num_threads=3) == expected
    assert cl100k_tok.encode_batch([]) == []


def _child_encodes(tok, q):
    q.put(tok.encode_batch(["after fork", "still works"] * 50, num_threads=2)[:2])


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_encode_batch_after_fork(cl100k_tok):
    # The parent's rayon pool must not deadlock a forked child (os.register_at_fork hook).
    cl100k_tok.encode_batch(["warm the pool"] * 64, num_threads=2)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_encodes, args=(cl100k_tok, q))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("encode_batch hung in a forked child")
    assert p.exitcode == 0
    assert q.get(timeout=5) == [cl100k_tok.encode("after fork"), cl100k_tok.encode("still works")]


# --- nanochat's tokenizer.pkl -------------------------------------------------------------


def test_from_nanochat_reads_pickled_encoding(tmp_path, cl100k_tok):
    enc = cl100k_tok.to_tiktoken(name="rustbpe")
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    tok = Tokenizer.from_nanochat(tmp_path)
    text = "nanochat's tokenizer, loaded without running pickle code."
    assert tok.encode(text) == enc.encode_ordinary(text)
    assert tok.special_tokens == cl100k_tok.special_tokens
    assert Tokenizer.from_nanochat(tmp_path / "tokenizer.pkl").n_vocab == tok.n_vocab


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_from_nanochat_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        Tokenizer.from_nanochat(tmp_path)
    assert not marker.exists()
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump({"not": "an encoding"}, f)
    with pytest.raises(pickle.UnpicklingError, match="expected a pickled tiktoken Encoding"):
        Tokenizer.from_nanochat(tmp_path)


def test_errors_reading_a_tokenizer_file_name_the_file(tmp_path, cl100k_tok):
    """A bad pattern in a saved tokenizer, a bad vocabulary in a pickle and a truncated pickle
    said what was wrong but not in which file."""
    from sftfast.tokenizer import load_tokenizer

    small = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, r"\S+|\s+")
    small.save(tmp_path / "t.sftfast")
    header, rest = (tmp_path / "t.sftfast").read_text().split("\n", 1)
    (tmp_path / "t.sftfast").write_text(header.replace('"pattern":"\\\\S+|\\\\s+"', '"pattern":"(unclosed"') + "\n" + rest)
    with pytest.raises(_core.PatternError, match=f"^{tmp_path / 't.sftfast'}: invalid split pattern"):
        load_tokenizer(tmp_path / "t.sftfast")
    data = pickle.dumps(cl100k_tok.to_tiktoken())
    (tmp_path / "tokenizer.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(pickle.UnpicklingError, match=f"^{tmp_path / 'tokenizer.pkl'}: not a readable tokenizer pickle"):
        load_tokenizer(tmp_path / "tokenizer.pkl")
    bad = small.to_tiktoken()
    bad._mergeable_ranks = {b"a": 0, b"b": 0}  # what its pickle carries: two tokens, one rank
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(_core.SftfastError, match=f"^{tmp_path / 'tokenizer.pkl'}: "):
        load_tokenizer(tmp_path / "tokenizer.pkl")


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return [p for p in (ASSETS / "english.txt").read_text().split("\n\n") if p.strip()]


def test_train_encodes_identically_through_tiktoken(corpus):
    tok = Tokenizer.train(iter(corpus), vocab_size=1024)
    assert tok.n_vocab == 1024
    assert tok.bos_id == 1024 - len(SPECIAL_TOKENS)
    assert tok.training_stats["n_documents"] == len(corpus)
    enc = tok.to_tiktoken()
    sample = "\n\n".join(corpus[:50]) + " unseen wörds 中文 12345 \r\n"
    assert tok.encode(sample) == enc.encode_ordinary(sample)
    assert tok.decode(tok.encode(sample)) == sample
    # Compression: the trained vocabulary must beat raw bytes by a wide margin on its corpus.
    assert len(sample.encode()) / len(tok.encode(sample)) > 2.5


def test_train_is_deterministic_across_thread_counts(corpus):
    a = Tokenizer.train(corpus[:200], vocab_size=600, num_threads=1)
    b = Tokenizer.train(corpus[:200], vocab_size=600, num_threads=2)
    assert a._core.ranks() == b._core.ranks()


def test_train_bad_input(corpus):
    with pytest.raises(_core.VocabError, match="too small"):
        Tokenizer.train(corpus[:10], vocab_size=100)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        Tokenizer.train(["ok", b"bytes"], vocab_size=300)
    with pytest.raises(TypeError):
        Tokenizer.train("a single string", vocab_size=300)
    with pytest.raises(_core.PatternError):
        Tokenizer.train(corpus[:10], vocab_size=300, pattern="(")
    # Lone surrogates are repaired as in encoding, not rejected; a corpus too small for the
    # vocab size gives a smaller vocabulary, with a warning.
    with pytest.warns(UserWarning, match="ran out of pairs"):
        assert Tokenizer.train(["a\ud800b ab ab"], vocab_size=300).n_vocab < 300


def test_train_matches_rustbpe(corpus):
    # nanochat's trainer (PyPI rustbpe) on the same corpus, vocab size and pattern: the same
    # merges in the same order (both take the most frequent pair, ties to the smaller pair).
    rustbpe = pytest.importorskip("rustbpe")
    docs = corpus[:300]
    ours = Tokenizer.train(docs, vocab_size=700)
    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(docs), 700 - len(SPECIAL_TOKENS), pattern=NANOCHAT_SPLIT_PATTERN)
    assert {bytes(k): v for k, v in theirs.get_mergeable_ranks()} == ours._core.ranks()


def test_benchmark_quick_run(cl100k_file):
    # The benchmark checks ids against tiktoken before timing (it raises if they differ);
    # here only its shape is checked, never a time.
    import argparse

    from sftfast.bench import tokenizer as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--quick", "--repeat", "1", "--skip", "memory,pathological"]))
    assert set(result["encode_1thread"]) == {"nanochat/prose", "nanochat/code", "cl100k/prose", "cl100k/code"}
    assert all(row["sftfast_MBps"] > 0 and row["tiktoken_MBps"] > 0 for row in result["encode_1thread"].values())
    assert result["encode_batch"]["docs"] == 200


def test_train_tokenizer_cli(tmp_path, capsys):
    from sftfast.train_tokenizer import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
    out = tmp_path / "tok.sftfast"
    assert main(["train", str(corpus), "--vocab-size", "270", "--out", str(out)]) == 0
    tok = Tokenizer.load(out)
    assert tok.n_vocab == 270 and tok.training_stats is None
    assert main(["encode", "--tokenizer", str(out), "the cat"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tok.encode("the cat")))
    # the defaults (bundled text) give the vocabulary asked for: 4096 ran out of merges and warned
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["train", "--out", str(out)]) == 0
    assert Tokenizer.load(out).n_vocab == 2048
    # a pattern by name, as prep takes it (it was used as a literal regex: a tokenizer of nothing)
    assert main(["train", str(corpus), "--vocab-size", "270", "--pattern", "cl100k", "--out", str(out)]) == 0
    assert Tokenizer.load(out).decode(Tokenizer.load(out).encode("a cat b")) == "a cat b"
    # user errors: one line, exit 1; undecodable lines skipped and reported with file:line
    capsys.readouterr()
    assert main(["train", str(tmp_path / "missing.txt"), "--vocab-size", "270", "--out", str(out)]) == 1
    assert main(["train", str(corpus), "--vocab-size", "100", "--out", str(out)]) == 1
    assert main(["train", str(corpus), "--pattern", "(?!)", "--vocab-size", "270", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["error"] * 3 and "matched no text" in err[2]
    # line breaks as text mode reads them: a CRLF or lone-CR corpus trains what the LF one does
    trained = {}
    for name, sep in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        path = tmp_path / f"{name}.txt"
        path.write_bytes(sep.join(["the cat sat", "on the mat", "the dog"] * 10).encode() + sep.encode())
        assert main(["train", str(path), "--vocab-size", "275", "--out", str(tmp_path / f"{name}.tok")]) == 0
        trained[name] = Tokenizer.load(tmp_path / f"{name}.tok")
    assert trained["crlf"].encode("the cat\n") == trained["cr"].encode("the cat\n") == trained["lf"].encode("the cat\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"the cat\ncaf\xe9\nthe dog\n")
    assert main(["train", str(latin), "--vocab-size", "266", "--out", str(out)]) == 0
    assert f"skipped {latin}:2: not valid UTF-8" in capsys.readouterr().err


def test_a_tokenizer_with_rank_holes_saves_loads_and_pickles(tmp_path):
    import pickle

    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 257  # rank 256 unused: a hole
    tok = Tokenizer.from_ranks(ranks, r"\S+|\s+")
    tok.save(tmp_path / "t.sftfast")
    for again in (Tokenizer.load(tmp_path / "t.sftfast"), pickle.loads(pickle.dumps(tok))):
        assert again.encode("abab") == tok.encode("abab") == [257, 257]


def test_a_cut_tokenizer_file_is_refused(tmp_path):
    tok = Tokenizer.train(["the cat sat on the mat"] * 10, 270)
    path = tmp_path / "t.sftfast"
    tok.save(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]))
    with pytest.raises(ValueError, match="header says .* rank lines but the file holds .*cut short or edited"):
        Tokenizer.load(path)


def test_pattern_names_are_accepted_wherever_a_pattern_is(cl100k_file):
    """"cl100k" taken as a regex matches only that word: a tokenizer that drops all other text."""
    from sftfast.tokenizer import CL100K_SPLIT_PATTERN

    by_name = Tokenizer.from_tiktoken_file(cl100k_file, "cl100k")
    assert by_name.pattern == CL100K_SPLIT_PATTERN
    assert by_name.encode("hello world") == Tokenizer.from_tiktoken_file(cl100k_file, CL100K_SPLIT_PATTERN).encode("hello world")
    assert Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, "o200k").decode(
        Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, "o200k").encode("a b")) == "a b"


def test_a_piece_that_is_a_token_encodes_as_tiktoken_does():
    # tiktoken looks a whole piece up first; "abc" has a rank that no merge reaches
    ranks = {**{bytes([i]): i for i in range(256)}, b"abc": 256}
    tok = Tokenizer.from_ranks(ranks, NANOCHAT_SPLIT_PATTERN, special_tokens=[])
    enc = tiktoken.Encoding(name="gap-abc", pat_str=NANOCHAT_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in ["abc", "abc abcd", " abc", "xabc"]:
        assert tok.encode(text) == enc.encode_ordinary(text), text
    assert tok.encode("abc") == [256]
