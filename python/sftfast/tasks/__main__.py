"""Inspect and check task mixtures from the command line.

    python -m sftfast.tasks show demo -n 3                 # three conversations of the demo mixture, as JSON
    python -m sftfast.tasks check seed --data-dir /data    # every malformed row of every task, then a summary
    python -m sftfast.tasks check "GSM8K:split=test,SmolTalk:split=test" --split train

`check` walks every example of every distinct task in the mixture and prints one line per
malformed row (dataset, split, index and reason); it exits 1 when any row is bad, so a
data problem is found before a training run rather than in the middle of one.
"""

from __future__ import annotations

import argparse
import json
import sys

from sftfast.tasks import TaskError, build_mixture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftfast.tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["show", "check"])
    parser.add_argument("mixture", help="a named mixture (seed, demo), a JSON config, or a spec string")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--data-dir", default=None, help="local mirrors of hub datasets (default $SFTFAST_DATA_DIR)")
    parser.add_argument("-n", "--num", type=int, default=5, help="conversations to show")
    args = parser.parse_args(argv)
    try:
        mixture = build_mixture(args.mixture, split=args.split, data_dir=args.data_dir)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "show":
        print(f"# {mixture!r}", file=sys.stderr)
        for i in range(min(args.num, len(mixture))):
            print(json.dumps(mixture[i], ensure_ascii=False))
        return 0
    bad = 0
    seen = set()
    for task in mixture.tasks:
        if id(task) in seen:  # a task listed twice (oversampled) is checked once
            continue
        seen.add(id(task))
        task_bad = 0
        for error in task.errors():
            print(error)
            task_bad += 1
        print(f"# {task.name}: {len(task)} examples, {task_bad} malformed", file=sys.stderr)
        bad += task_bad
    print(f"# {len(mixture)} conversations in the mixture, {bad} malformed rows", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
