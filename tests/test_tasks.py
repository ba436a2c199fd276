"""Tasks and mixtures: the real loaders run on small local files in each hub dataset's schema,
render exactly as SPEC 7 says, report malformed rows with dataset/split/index, slice, shuffle
with seed 42 and oversample by repetition."""

import json
import os
import random
import re

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _tasks_support import GSM8K_BAD_ROW, GSM8K_ROWS, write_gsm8k_mirror, write_parquet
from sftfast.calculator import calculate
from sftfast.tasks import (ARC, GSM8K, IDENTITY_FILE, MMLU, Arithmetic, CustomJSON, SimpleSpelling, SmolTalk,
                           SpellingBee, Task, TaskError, TaskMixture, build_mixture, get_task, parse_spec)
from sftfast.tasks.base import extract_final_answer, numbers_equal
from sftfast.tasks.gsm8k import parse_answer
from sftfast.tasks.spelling import load_words

ARC_ROWS = [
    {"id": "q1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout", "eel"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "q2", "question": "What melts ice?", "choices": {"text": ["heat", "cold", "dark"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    {"id": "q3", "question": "Sky color?", "choices": {"text": ["blue", "green", "red", "black"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
]
MMLU_ROWS = [
    {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Capital of France?", "subject": "geo", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 0},
]
SMOLTALK_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "source": "x"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}], "source": "y"},
]


_write_parquet = write_parquet


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A local mirror of the four hub datasets, laid out as the hub repositories are."""
    root = tmp_path_factory.mktemp("hub")
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "test"):
            _write_parquet(root / "allenai/ai2_arc" / subset / f"{split}-00000-of-00001.parquet", ARC_ROWS)
    for split in ("auxiliary_train", "test"):
        _write_parquet(root / "cais/mmlu/all" / f"{split}-00000-of-00001.parquet", MMLU_ROWS)
    write_gsm8k_mirror(root, GSM8K_ROWS)
    # SmolTalk as JSONL (datasets' json builder), to exercise the non-parquet path
    smol = root / "HuggingFaceTB/smol-smoltalk/data"
    smol.mkdir(parents=True)
    for split in ("train", "test"):
        with open(smol / f"{split}.jsonl", "w") as f:
            for row in SMOLTALK_ROWS * 3:
                f.write(json.dumps(row) + "\n")
    return str(root)


def at_row(task, row):
    """The example of row `row` of the task's split file: hub tasks shuffle with seed 42, as
    nanochat's do (datasets' permutation depends only on the length and the seed)."""
    order = datasets.Dataset.from_dict({"i": list(range(task.num_examples()))}).shuffle(seed=42)["i"]
    return task[order.index(row)]


def test_arc_renders_exactly(data_dir):
    task = ARC("ARC-Easy", "train", data_dir=data_dir)
    assert len(task) == 3 and task.eval_type == "categorical"
    conv = at_row(task, 0)
    assert conv["messages"][0] == {
        "role": "user",
        "content": "Multiple Choice question: Which is a mammal?\n- shark=A\n- whale=B\n- trout=C\n- eel=D\n"
                   "\nRespond only with the letter of the correct answer.",
    }
    assert conv["messages"][1] == {"role": "assistant", "content": "B"}
    assert conv["letters"] == ["A", "B", "C", "D"]
    assert at_row(task, 1)["letters"] == ["1", "2", "3"] and at_row(task, 1)["messages"][1]["content"] == "1"
    assert task.evaluate(conv, "B") and not task.evaluate(conv, "A")


def test_mmlu(data_dir):
    task = MMLU("test", data_dir=data_dir)
    conv = at_row(task, 1)
    assert conv["messages"][0]["content"].startswith("Multiple Choice question: Capital of France?\n- Paris=A\n")
    assert conv["messages"][1]["content"] == "A" and conv["subject"] == "geo"
    assert task.evaluate(at_row(task, 0), "B")


def test_gsm8k_tool_parts_and_numeric_answer(data_dir):
    task = GSM8K("train", data_dir=data_dir)
    parts = at_row(task, 0)["messages"][1]["content"]
    assert parts[:4] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
    ]
    assert parts[-1] == {"type": "text", "text": "72 clips.\n#### 72"}
    # every calculator span of the data is something our calculator reproduces
    for p, out in zip(parts, parts[1:]):
        if p["type"] == "python":
            assert numbers_equal(calculate(p["text"]), out["text"])
    assert task.evaluate(at_row(task, 0), "... so the answer is\n#### 72.0")
    assert task.evaluate(at_row(task, 1), "#### 2400") and task.evaluate(at_row(task, 1), "#### $2,400")
    assert not task.evaluate(at_row(task, 0), "#### 71") and not task.evaluate(at_row(task, 0), "72")


@pytest.mark.parametrize(
    "answer, parts",
    [
        # nanochat keeps a span without "=": all expression, empty output
        ("<<1+1>> #### 2", [("python", "1+1"), ("python_output", ""), ("text", " #### 2")]),
        # "<" inside a span is part of the expression (nanochat's pattern excludes only ">")
        ("so <<3<5=1>>1 #### 1", [("text", "so "), ("python", "3<5"), ("python_output", "1"), ("text", "1 #### 1")]),
        # the last "=" splits
        ("<<a=b=2>>2\n#### 2", [("python", "a=b"), ("python_output", "2"), ("text", "2\n#### 2")]),
        # not spans: stay text, nothing dropped
        ("x <<>> y >> z << w\n#### 3", [("text", "x <<>> y >> z << w\n#### 3")]),
        ("a <<2>1=1>> b #### 1", [("text", "a <<2>1=1>> b #### 1")]),
    ],
)
def test_gsm8k_spans_parse_like_nanochat(answer, parts):
    assert [(p["type"], p["text"]) for p in parse_answer(answer)] == parts


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="<>=+1 a#\n", max_size=40))
def test_gsm8k_parsing_never_fails_and_keeps_every_character(answer):
    parts = parse_answer(answer)
    kinds = [p["type"] for p in parts]
    assert all(kinds[i + 1] == "python_output" for i, k in enumerate(kinds) if k == "python")
    # Rebuilt with each span as "<<" + expr + output + ">>", the answer is back but for the
    # "=" signs (a span's last "=" is the split, and `<<e>>` / `<<e=>>` both give e and "").
    rebuilt = "".join("<<" + p["text"] if p["type"] == "python" else p["text"] + ">>" if p["type"] == "python_output"
                      else p["text"] for p in parts)
    assert rebuilt.replace("=", "") == answer.replace("=", "")


def test_gsm8k_rows_with_odd_spans_load(tmp_path):
    rows = GSM8K_ROWS + [{"question": "q", "answer": "<<7>>7 and <<2<3=True>>True\n#### 7"}]
    task = GSM8K("train", data_dir=write_gsm8k_mirror(tmp_path, rows))
    assert list(task.errors()) == []
    assert at_row(task, 2)["messages"][1]["content"][:2] == [{"type": "python", "text": "7"}, {"type": "python_output", "text": ""}]
    assert task.evaluate(at_row(task, 2), "#### 7")


def test_smoltalk_jsonl(data_dir):
    train = SmolTalk("train", data_dir=data_dir)
    assert len(train) == 6
    assert at_row(train, 0)["messages"][0]["role"] == "system" and "source" not in at_row(train, 0)
    assert len(get_task("SmolTalk", data_dir=data_dir)) == 6  # eval role: the test split


def test_local_source_path(data_dir):
    path = os.path.join(data_dir, "openai/gsm8k/main/test-00000-of-00001.parquet")
    assert len(GSM8K("test", source=path)) == 2
    with pytest.raises(TaskError, match="does not exist"):
        GSM8K("test", source=os.path.join(data_dir, "nope"))


@pytest.mark.parametrize(
    "maker, rows, bad_index, match",
    [
        (lambda d: ARC("ARC-Easy", "train", data_dir=d), ARC_ROWS[:1] + [dict(ARC_ROWS[0], answerKey="E")], 1, "answerKey 'E'"),
        (lambda d: ARC("ARC-Easy", "train", data_dir=d), [dict(ARC_ROWS[0], choices={"text": ["a"], "label": ["A", "B"]})], 0, "choice texts"),
        (lambda d: MMLU("test", data_dir=d), MMLU_ROWS + [dict(MMLU_ROWS[0], answer=7)], 2, "answer must be an int 0-3"),
        (lambda d: MMLU("test", data_dir=d), [dict(MMLU_ROWS[0], choices=["a", "b"])], 0, "list of 4 strings"),
        (lambda d: GSM8K("train", data_dir=d), GSM8K_ROWS + [{"question": "q", "answer": "no final line"}], 2, "no final"),
        (lambda d: GSM8K("train", data_dir=d), GSM8K_ROWS + [GSM8K_BAD_ROW], 2, "no final"),
        (lambda d: GSM8K("train", data_dir=d), [{"question": "", "answer": "#### 2"}] + GSM8K_ROWS, 0, "question must be"),
        (lambda d: GSM8K("train", data_dir=d), GSM8K_ROWS + [{"question": "q", "answer": None}], 2, "answer must be a string"),
    ],
)
def test_malformed_rows_name_dataset_split_index(tmp_path, maker, rows, bad_index, match):
    hub = {"ARC": "allenai/ai2_arc/ARC-Easy/train-0.parquet", "MMLU": "cais/mmlu/all/test-0.parquet",
           "GSM8K": "openai/gsm8k/main/train-0.parquet"}
    probe = maker.__code__.co_names
    key = next(k for k in hub if k in probe)
    _write_parquet(tmp_path / hub[key], rows)
    task = maker(str(tmp_path))
    errors = list(task.errors())
    assert len(errors) == 1
    message = str(errors[0])
    assert f"row {bad_index} (shuffled index " in message and match in message
    split = {"ARC": "train", "MMLU": "test", "GSM8K": "train"}[key]
    assert f" {split} " in message


def test_smoltalk_bad_roles(tmp_path):
    smol = tmp_path / "HuggingFaceTB/smol-smoltalk/data"
    smol.mkdir(parents=True)
    rows = SMOLTALK_ROWS + [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "source": "z"}]
    with open(smol / "train.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    task = SmolTalk("train", data_dir=str(tmp_path))
    with pytest.raises(TaskError, match=r"SmolTalk train row 2 \(shuffled index \d+\): message 0 has role 'assistant'"):
        at_row(task, 2)


def test_missing_local_split(tmp_path):
    (tmp_path / "openai/gsm8k/main").mkdir(parents=True)
    with pytest.raises(TaskError, match="no parquet"):
        GSM8K("test", data_dir=str(tmp_path))


def test_customjson_formats_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": [
            {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}], "tag": 1}) + "\n")
    task = CustomJSON(str(good))
    assert len(task) == 2 and task[1]["tag"] == 1 and task.name == "good.jsonl"
    for text, match in [
        ('{"messages": []}', "good2.jsonl:2: messages must be a non-empty list"),
        ("not json", "good2.jsonl:2: invalid JSON"),
        ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}]', "good2.jsonl:2: message 1 part 0"),
        ('[{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]', "good2.jsonl:2: message 0 content"),
        ('{"msgs": 1}', "good2.jsonl:2: expected an array"),
    ]:
        bad = tmp_path / "good2.jsonl"
        bad.write_text(good.read_text().split("\n")[0] + "\n" + text + "\n")
        with pytest.raises(TaskError, match=match.replace("[", r"\[")):
            CustomJSON(str(bad))


def test_customjson_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]) for i in range(2)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[0]["messages"][0] == {"role": "user", "content": "q0"}
    # only a leading mark is one: a BOM later in the file is still an error, named by line
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xef\xbb\xbf" + lines[0].encode() + b"\n")
    with pytest.raises(TaskError, match="bom.jsonl:3: invalid JSON"):
        CustomJSON(str(path))


def test_undecodable_lines_are_task_errors_naming_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"q"', b'"caf\xe9"') + b"\n")
    with pytest.raises(TaskError, match="latin1.jsonl:2: not valid UTF-8"):
        CustomJSON(str(path))
    # any line break Python's text mode knows (old Mac files end lines with a lone CR)
    path.write_bytes(good + b"\r" + good + b"\r\n" + good)
    assert len(CustomJSON(str(path))) == 3
    mac = tmp_path / "mac_words.txt"
    mac.write_bytes(b"apple\rpear\r\nplum")
    assert load_words(str(mac)) == ("apple", "pear", "plum")
    words = tmp_path / "words.txt"
    words.write_bytes(b"apple\nna\xefve\n")
    with pytest.raises(TaskError, match="words.txt:2: not valid UTF-8"):
        load_words(str(words))


def test_task_spec_keys_are_checked():
    with pytest.raises(TaskError, match="unknown key 'sise'; allowed: size, start, step, stop, words_file"):
        get_task("SimpleSpelling", size=3, sise=4)
    with pytest.raises(TaskError, match="'path' is fixed by the task's name"):
        get_task("identity", path="x.jsonl")
    with pytest.raises(TaskError, match="'subset' is fixed by the task's name"):
        build_mixture("ARC-Easy:subset=ARC-Challenge")
    assert len(get_task("SimpleSpelling", size=3, stop=2)) == 2
    assert get_task("identity", name="mine").name == "mine"  # name= is the task's, not get_task's


def test_extra_message_keys(tmp_path):
    from sftfast.tasks.base import validate_messages

    user = {"role": "user", "content": "hi"}
    # "name" carries nothing the model is trained on: ignored, as the renderer ignores it
    out = validate_messages([dict(user, name="alice"), {"role": "assistant", "content": "yo", "name": "bot"}], "w")
    assert out == [user, {"role": "assistant", "content": "yo"}]
    # None-valued keys are what parquet gives messages that lack a key other messages have
    assert validate_messages([dict(user, tool_calls=None), {"role": "assistant", "content": "yo"}], "w") == out[:1] + [out[1]]
    # anything else would be dropped by rendering: refused, with where and which key
    for messages, match in [
        ([user, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], r"w: message 1 has field\(s\) \['tool_calls'\]"),
        ([user, {"role": "assistant", "content": "a", "reasoning_content": "think"}], "reasoning_content"),
        ([user, {"role": "assistant", "content": "a", "weight": 0}], "weight"),
        ([user, {"role": "assistant", "content": [{"type": "text", "text": "a", "extra": "b"}]}], r"message 1 part 0 has field\(s\) \['extra'\]"),
    ]:
        with pytest.raises(TaskError, match=match):
            validate_messages(messages, "w")
    # through a task: CustomJSON names file:line
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps([user, {"role": "assistant", "content": "a", "thinking": "t"}]) + "\n")
    with pytest.raises(TaskError, match="x.jsonl:1: message 1 has field"):
        CustomJSON(str(path))


def test_identity_asset():
    task = CustomJSON(IDENTITY_FILE)  # loading validates every conversation
    assert task.name == "identity" and 900 <= len(task) <= 1100  # SPEC 7: ~1K conversations
    convs = [c["messages"] for c in task]
    assert len({json.dumps(c) for c in convs}) == len(convs)  # no duplicates
    texts = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert sum("sftfast-chat" in t for t in texts) >= 300
    # varied: many distinct questions, and multi-turn conversations
    assert len({m["content"] for c in convs for m in c if m["role"] == "user"}) >= 500
    assert sum(sum(m["role"] == "user" for m in c) >= 2 for c in convs) >= 0.5 * len(convs)
    # consistent: never claims another name or maker
    others = "ChatGPT|Claude|Gemini|Llama|Copilot|Mistral|Siri|Alexa|Grok|DeepSeek|nanochat"
    claim = re.compile(rf"\b(?:I(?:'m| am)|[Mm]y name is|call me) (?:{others})\b|\bI was (?:made|trained|built|created) by (?!sftfast)")
    assert [t for t in texts if claim.search(t) and not re.search(r"\b(?:not|n't|No)\b", t)] == []


def test_identity_asset_is_what_the_generator_writes(tmp_path):
    """scripts/make_identity.py regenerates the bundled file byte for byte (deterministic)."""
    import runpy
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_identity.py")
    out = tmp_path / "identity.jsonl"
    argv = sys.argv
    sys.argv = [script, "--out", str(out)]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    with open(IDENTITY_FILE, "rb") as f:
        assert out.read_bytes() == f.read()


def test_word_list_offline():
    words = load_words()
    assert len(words) > 50_000 and "apple" in words and "strawberry" in words
    assert all(w.isalpha() and w.islower() for w in words[:1000])


def test_spelling_tasks_deterministic_and_correct():
    simple = SimpleSpelling(size=50)
    assert simple[3] == SimpleSpelling(size=50)[3]
    assert simple[3] != SimpleSpelling(size=50, split="test")[3]
    answer = simple[7]["messages"][1]["content"]
    word, spelled = answer.split(":")
    assert spelled.split(",") == list(word) and simple.evaluate(simple[7], answer)
    bee = SpellingBee(size=200)
    for i in range(0, 200, 7):
        conv = bee[i]
        parts = conv["messages"][1]["content"]
        python = next(p for p in parts if p["type"] == "python")["text"]
        output = next(p for p in parts if p["type"] == "python_output")["text"]
        assert calculate(python) == output  # the calculator reproduces the training output
        assert bee.evaluate(conv, f"...\n#### {output}") and not bee.evaluate(conv, f"#### {int(output) + 1}")


def test_spelling_tasks_use_different_words_and_keep_the_words_case():
    """Both tasks seed index i alike; on one word order they spelled the same word at every
    index (300 of 300 in the seed mixture). An upper-cased question upper-cased the word too,
    while the answer spells it in lower case."""
    simple, bee = SimpleSpelling(size=300), SpellingBee(size=300)

    def word(conv):
        answer = conv["messages"][1]["content"]
        if isinstance(answer, str):  # SimpleSpelling: "word:w,o,r,d"
            return answer.split(":")[0]
        return re.search(r"in the word '([a-z]+)'", answer[0]["text"]).group(1)

    same = sum(word(simple[i]) == word(bee[i]) for i in range(300))
    assert same <= 3, same
    for i in range(300):
        conv = bee[i]
        w = word(conv)
        assert w in conv["messages"][0]["content"], (i, conv["messages"][0]["content"], w)


def test_arithmetic_task():
    task = Arithmetic(size=100)
    for i in range(0, 100, 9):
        parts = task[i]["messages"][1]["content"]
        expr = parts[1]["text"]
        assert parts[2]["text"] == calculate(expr) == str(eval(expr))  # noqa: S307 - generated digits and one operator
        assert extract_final_answer(parts[-1]["text"]) == parts[2]["text"]


def test_numbers_equal_whole_numbers_exactly():
    """A relative tolerance of 1e-9 graded 1000000001 equal to 1000000000 (and any two
    20-digit integers equal)."""
    for a, b in [("72", "72.0"), ("-3", "-3.00"), ("2400", "2400."), ("0.1", "0.100000000000000"),
                 ("0.333333333333333", "0.3333333333333333"), ("12345678901234567890", "12345678901234567890.0")]:
        assert numbers_equal(a, b) and numbers_equal(b, a), (a, b)
    for a, b in [("1000000001", "1000000000"), ("5000000003", "5000000000.0"), ("71", "72"), ("0.5", "0.6"),
                 ("12345678901234567891", "12345678901234567890"), ("7", None), ("x", "7"), ("", "0")]:
        assert not numbers_equal(a, b) and not numbers_equal(b, a), (a, b)
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 1,000,000,000"}]}
    assert not Arithmetic(size=1).evaluate(conv, "#### 1000000001")
    assert Arithmetic(size=1).evaluate(conv, "#### $1000000000.00")


class _Range(Task):
    name = "range"

    def __init__(self, n, **kw):
        self.n = n
        super().__init__(**kw)

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [], "i": i}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(0, 45), st.one_of(st.none(), st.integers(0, 50)), st.integers(1, 7))
def test_slicing_matches_python_range(n, start, stop, step):
    task = _Range(n, start=start, stop=stop, step=step)
    expected = list(range(n))[start:stop:step]
    assert len(task) == len(expected)
    assert [c["i"] for c in task] == expected
    if expected:
        assert task[-1]["i"] == expected[-1]
    with pytest.raises(IndexError):
        task[len(expected)]


def test_bad_slice_arguments():
    for kw in ({"start": -1}, {"step": 0}, {"stop": -2}, {"start": "1"}):
        with pytest.raises(TaskError):
            _Range(5, **kw)


def test_mixture_shuffle_and_oversampling():
    a, b = _Range(5), _Range(3)
    mix = TaskMixture([a, b, b])
    assert len(mix) == 11
    pairs = [(t, i) for t, task in enumerate([a, b, b]) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    assert mix.index_map == pairs
    seen = [(id(mix.tasks[t]), i) for t, i in mix.index_map]
    assert sum(1 for s in seen if s[0] == id(b)) == 6  # b listed twice: every example twice
    assert [c["i"] for c in mix] == [[a, b, b][t][i]["i"] for t, i in pairs]
    assert TaskMixture([a, b, b]).index_map == mix.index_map  # same order every time
    with pytest.raises(TaskError):
        TaskMixture([])


def test_seed_mixture_from_local_mirror(data_dir):
    train = build_mixture("seed", data_dir=data_dir)
    counts = train.counts()
    assert counts["ARC-Easy"] == 3 and counts["ARC-Challenge"] == 3 and counts["GSM8K"] == 2
    assert counts["SmolTalk"] == 6 and counts["SimpleSpelling"] == 300 and counts["SpellingBee"] == 300
    assert counts["identity"] == len(CustomJSON(IDENTITY_FILE))
    val = build_mixture("seed", split="val", data_dir=data_dir)
    assert val.counts() == {"SmolTalk": 6}
    # nanochat's chat_sft reads SmolTalk test in its own order (no second shuffle)
    smoltalk_test = get_task("SmolTalk", split="test", data_dir=data_dir)
    assert list(val) == list(smoltalk_test) and len(val) > 1
    for conv in list(train)[:50]:
        assert conv["messages"][-1]["role"] == "assistant"


def test_mixture_spec_selecting_nothing_is_refused(capsys):
    """A slice that selects nothing contributed 0 conversations silently; a stop past the end
    was capped silently (nanochat asserts the first and warns about the second)."""
    with pytest.raises(TaskError, match=r"'SpellingBee:size=300:start=200:stop=100' selects no examples "
                                        r"\(start=200, stop=100, step=1 of 300\)"):
        build_mixture("SpellingBee:size=300:start=200:stop=100,SimpleSpelling:size=10")
    with pytest.raises(TaskError, match="selects no examples"):
        build_mixture("SimpleSpelling:size=5:start=5")
    mix = build_mixture("SimpleSpelling:size=50:stop=10000")
    assert len(mix) == 50
    assert "stop=10000 is past the 50 examples; using 50" in capsys.readouterr().err


def test_demo_mixture_is_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    train = build_mixture("demo")
    val = build_mixture("demo", split="val")
    assert set(train.counts()) == {"SimpleSpelling", "SpellingBee", "Arithmetic", "identity"}
    assert len(val) > 0 and all(conv["messages"][1]["role"] == "assistant" for conv in val)
    # held-out: validation prompts are not training prompts
    train_prompts = {c["messages"][0]["content"] for c in train if c["messages"][0]["role"] == "user"}
    val_prompts = [c["messages"][0]["content"] for c in val]
    assert sum(p in train_prompts for p in val_prompts) < len(val_prompts) // 4


def test_user_mixtures(tmp_path, data_dir):
    mix = build_mixture("GSM8K:stop=1*3, identity:stop=4, SimpleSpelling:size=5:start=2", data_dir=data_dir)
    assert mix.counts() == {"GSM8K": 3, "identity": 4, "SimpleSpelling": 3}
    config = tmp_path / "mix.json"
    config.write_text(json.dumps({"train": [{"task": "ARC-Challenge", "split": "train", "repeat": 2}, "SpellingBee:size=10"],
                                  "val": ["SmolTalk:split=test:stop=2"]}))
    assert build_mixture(str(config), data_dir=data_dir).counts() == {"ARC-Challenge": 6, "SpellingBee": 10}
    assert len(build_mixture(str(config), split="val", data_dir=data_dir)) == 2
    assert parse_spec("SmolTalk:split=train:stop=10_000*2") == ("SmolTalk", {"split": "train", "stop": 10000}, 2)
    for bad, match in [("Nope", "unknown task"), ("GSM8K:stop", "not key=value"), ("GSM8K:stop=x", "not an int"),
                       ("identity*0", "repeat"), ("SpellingBee", "needs size")]:
        with pytest.raises(TaskError, match=match):
            build_mixture(bad, data_dir=data_dir)
    with pytest.raises(TaskError, match="no validation part"):
        build_mixture("identity", split="val")


def test_every_task_renders(data_dir):
    """Each task's conversations go through the real (Rust) renderer."""
    from _tasks_support import byte_tokenizer

    tok = byte_tokenizer()
    for conv in list(build_mixture("seed", data_dir=data_dir))[::13]:
        ids, mask = tok.render_conversation(conv, 4096)
        assert len(ids) == len(mask) and sum(mask) > 0


def test_check_cli_lists_every_bad_row(tmp_path, capsys):
    from sftfast.tasks.__main__ import main

    rows = [GSM8K_ROWS[0], {"question": "q", "answer": "no marker"}, GSM8K_ROWS[1], {"question": "", "answer": "#### 1"}]
    _write_parquet(tmp_path / "openai/gsm8k/main/train-0.parquet", rows)
    assert main(["check", "GSM8K*2,identity:stop=3", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2  # checked once although listed twice
    assert sorted(line.split(" (shuffled")[0] for line in lines) == ["GSM8K train row 1", "GSM8K train row 3"]
    assert any("answer has no final" in line for line in lines) and any(": question" in line for line in lines)
    assert "2 malformed rows" in out.err
    assert main(["show", "identity:stop=2", "-n", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
