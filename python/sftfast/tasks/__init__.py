"""Tasks (datasets as conversations) and the named SFT mixtures.

    from sftfast.tasks import build_mixture, get_task
    train = build_mixture("seed")                    # SPEC 7's default ~23K-conversation mixture
    val = build_mixture("seed", split="val")         # SmolTalk test
    demo = build_mixture("demo")                     # bundled only: spelling, arithmetic, identity
    mine = build_mixture("GSM8K:stop=500,identity*2,SpellingBee:size=100")
    mine = build_mixture("my_mixture.json")          # {"train": [...], "val": [...]}
    arc = get_task("ARC-Easy", split="test")

A task spec is `NAME[:key=value[:key=value...]][*REPEAT]`; keys are the task's
constructor arguments (split, subset, start, stop, step, size, path, source) and
REPEAT lists the task that many times (oversampling). Names (case-insensitive):

    ARC-Easy ARC-Challenge MMLU GSM8K SmolTalk CustomJSON identity
    SimpleSpelling SpellingBee Arithmetic

A JSON config holds {"train": [spec, ...], "val": [spec, ...]} where each spec is such a
string or an object {"task": NAME, "repeat": N, ...arguments}.

`data_dir` (or $SFTFAST_DATA_DIR) points the hub datasets at local mirrors, see base.py.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

from sftfast.tasks.arc import ARC
from sftfast.tasks.arithmetic import Arithmetic
from sftfast.tasks.base import Task, TaskError, TaskMixture, extract_final_answer, render_mc
from sftfast.tasks.customjson import IDENTITY_FILE, CustomJSON
from sftfast.tasks.gsm8k import GSM8K
from sftfast.tasks.mmlu import MMLU
from sftfast.tasks.smoltalk import SmolTalk
from sftfast.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC", "Arithmetic", "CustomJSON", "GSM8K", "IDENTITY_FILE", "MMLU", "SimpleSpelling", "SmolTalk",
    "SpellingBee", "Task", "TaskError", "TaskMixture", "build_mixture", "extract_final_answer",
    "get_task", "parse_spec", "render_mc", "MIXTURES",
]

_INT_KEYS = {"start", "stop", "step", "size", "max_value", "repeat"}
_HUB_KEYS = {"source", "data_dir"}

# Each factory takes (split-or-None, data_dir, kwargs). split=None means the task's own
# default for its role: "train" data for mixtures, the held-out split for evaluation.
_DEFAULT_SPLITS = {  # name -> (train split, eval split)
    "arc-easy": ("train", "test"),
    "arc-challenge": ("train", "test"),
    "mmlu": ("auxiliary_train", "test"),
    "gsm8k": ("train", "test"),
    "smoltalk": ("train", "test"),
    "simplespelling": ("train", "test"),
    "spellingbee": ("train", "test"),
    "arithmetic": ("train", "test"),
}
_SIZES_FOR_EVAL = {"simplespelling": 256, "spellingbee": 256, "arithmetic": 256}
# name -> (class, constructor arguments the name itself fixes); the split comes from get_task's own argument
_TASK_CLASSES = {
    "arc-easy": (ARC, ("subset",)), "arc-challenge": (ARC, ("subset",)), "mmlu": (MMLU, ()), "gsm8k": (GSM8K, ()),
    "smoltalk": (SmolTalk, ()), "simplespelling": (SimpleSpelling, ()), "spellingbee": (SpellingBee, ()),
    "arithmetic": (Arithmetic, ()), "identity": (CustomJSON, ("path",)), "customjson": (CustomJSON, ()),
}


def _check_keys(name: str, cls, kwargs: dict, fixed: tuple[str, ...]) -> None:
    """A spec key the task does not take, or one its name already fixes (ARC-Easy's subset,
    identity's path), is a TaskError naming it and what is allowed, not a TypeError."""
    allowed = set()
    for init in (cls.__init__, Task.__init__):
        allowed |= {p.name for p in inspect.signature(init).parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    allowed -= set(fixed)
    for key in kwargs:
        if key in fixed:
            raise TaskError(f"task spec {name!r}: {key!r} is fixed by the task's name and cannot be set")
        if key not in allowed:
            raise TaskError(f"task spec {name!r}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


def get_task(name: str, /, split: str | None = None, data_dir: str | None = None, role: str = "eval", **kwargs) -> Task:
    """One task by name; `role` ("train" or "eval") picks the default split."""
    key = name.lower().replace("_", "-")
    key = {"simple-spelling": "simplespelling", "spelling-bee": "spellingbee", "custom-json": "customjson"}.get(key, key)
    default_split = _DEFAULT_SPLITS.get(key, (None, None))[0 if role == "train" else 1]
    split = split or default_split
    cls, fixed = _TASK_CLASSES.get(key, (None, ()))
    if cls is not None:
        _check_keys(name, cls, kwargs, fixed + ("split",))
    hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KEYS}
    hub.setdefault("data_dir", data_dir)
    if key in ("arc-easy", "arc-challenge"):
        return ARC("ARC-Easy" if key == "arc-easy" else "ARC-Challenge", split, **hub, **kwargs)
    if key == "mmlu":
        return MMLU(split, **hub, **kwargs)
    if key == "gsm8k":
        return GSM8K(split, **hub, **kwargs)
    if key == "smoltalk":
        return SmolTalk(split, **hub, **kwargs)
    if key in ("simplespelling", "spellingbee", "arithmetic"):
        cls = {"simplespelling": SimpleSpelling, "spellingbee": SpellingBee, "arithmetic": Arithmetic}[key]
        if "size" not in kwargs:
            if role != "eval":
                raise TaskError(f"{name}: a synthetic task in a mixture needs size=N")
            kwargs["size"] = _SIZES_FOR_EVAL[key]
        return cls(split=split, **kwargs)
    if key == "identity":
        return CustomJSON(IDENTITY_FILE, **kwargs)
    if key == "customjson":
        if "path" not in kwargs:
            raise TaskError("CustomJSON needs path=FILE.jsonl")
        return CustomJSON(**kwargs)
    raise TaskError(f"unknown task {name!r}; known: ARC-Easy, ARC-Challenge, MMLU, GSM8K, SmolTalk, "
                    "CustomJSON, identity, SimpleSpelling, SpellingBee, Arithmetic")


def parse_spec(spec) -> tuple[str, dict, int]:
    """`NAME:key=value:...*REPEAT` (or a JSON object) -> (name, kwargs, repeat)."""
    if isinstance(spec, dict):
        kwargs = dict(spec)
        if "task" not in kwargs:
            raise TaskError(f"mixture entry {spec!r} has no 'task'")
        name = kwargs.pop("task")
        repeat = kwargs.pop("repeat", 1)
    elif isinstance(spec, str):
        text = spec.strip()
        repeat = 1
        if "*" in text:
            text, _, rep = text.rpartition("*")
            try:
                repeat = int(rep)
            except ValueError:
                raise TaskError(f"task spec {spec!r}: repeat {rep!r} is not an int") from None
        name, *pairs = text.split(":")
        kwargs = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise TaskError(f"task spec {spec!r}: {pair!r} is not key=value")
            kwargs[key.strip()] = value.strip()
    else:
        raise TaskError(f"task spec must be a string or an object, got {type(spec).__name__}")
    for key in list(kwargs):
        if key in _INT_KEYS and not isinstance(kwargs[key], int):
            try:
                kwargs[key] = int(str(kwargs[key]).replace("_", ""))
            except ValueError:
                raise TaskError(f"task spec {spec!r}: {key}={kwargs[key]!r} is not an int") from None
    if not isinstance(repeat, int) or repeat < 1:
        raise TaskError(f"task spec {spec!r}: repeat must be an int >= 1")
    return name.strip(), kwargs, repeat


def _tasks_from_specs(specs, role: str, data_dir: str | None) -> list[Task]:
    tasks = []
    for spec in specs:
        name, kwargs, repeat = parse_spec(spec)
        task = get_task(name, data_dir=data_dir, role=role, **kwargs)
        available = task.num_examples()
        if len(task) == 0:
            raise TaskError(f"task spec {spec!r} selects no examples (start={task.start}, stop={task.stop}, "
                            f"step={task.step} of {available})")
        if task.stop is not None and task.stop > available:
            print(f"warning: task spec {spec!r}: stop={task.stop} is past the {available} examples; "
                  f"using {len(task)}", file=sys.stderr)
        tasks.extend([task] * repeat)  # the same object twice: oversampled, not reloaded
    return tasks


# Named mixtures: role -> list of specs. "seed" is SPEC 7's default (nanochat's chat_sft);
# "demo" needs nothing but the package itself (used by `make run`).
MIXTURES = {
    "seed": {
        "train": ["ARC-Easy:split=train", "ARC-Challenge:split=train", "GSM8K:subset=main:split=train",
                  "SmolTalk:split=train:stop=10000", "identity", "SimpleSpelling:size=300",
                  "SpellingBee:size=300"],
        "val": ["SmolTalk:split=test"],
    },
    "demo": {
        # 320 distinct identity conversations: the size "identity*2" had with the old 160-line file
        "train": ["SimpleSpelling:size=400", "SpellingBee:size=400", "Arithmetic:size=600", "identity:stop=320"],
        "val": ["SimpleSpelling:size=64:split=test", "SpellingBee:size=64:split=test",
                "Arithmetic:size=64:split=test"],
    },
}


def build_mixture(name: str, split: str = "train", data_dir: str | None = None) -> TaskMixture:
    """A named mixture ("seed", "demo"), a JSON config file, or a comma-separated spec string.

    split is "train" or "val"; a spec string has no validation part (use a JSON file).
    """
    if split not in ("train", "val"):
        raise TaskError(f"mixture split must be 'train' or 'val', got {split!r}")
    role = "train" if split == "train" else "eval"
    if name in MIXTURES:
        config = MIXTURES[name]
    elif name.endswith(".json") or os.path.isfile(name):
        try:
            with open(name, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TaskError(f"mixture config {name}: {e}") from None
        if not isinstance(config, dict) or not isinstance(config.get("train"), list):
            raise TaskError(f"mixture config {name}: expected {{\"train\": [...], \"val\": [...]}}")
    else:
        if split == "val":
            raise TaskError(f"mixture {name!r} is a spec string: it has no validation part (use a JSON config)")
        config = {"train": [s for s in name.split(",") if s.strip()]}
    specs = config.get(split)
    if not specs:
        raise TaskError(f"mixture {name!r} has no {split!r} tasks")
    tasks = _tasks_from_specs(specs, role, data_dir)
    # A validation set of one task is read in that task's order, as nanochat's chat_sft reads
    # SmolTalk test: the first eval_steps batches are then the same conversations as there.
    # Several tasks are shuffled together, so that a partial evaluation sees each of them.
    return TaskMixture(tasks, shuffle=split == "train" or len(tasks) > 1)
