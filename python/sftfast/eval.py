"""Evaluate a checkpoint on chat tasks: per-task accuracy and ChatCORE.

    python -m sftfast.eval --source sft -a ARC-Easy,MMLU,GSM8K [--max-problems N]
    torchrun --standalone --nproc_per_node=8 -m sftfast.eval --source sft      # problems split across ranks
    python -m sftfast.eval --base-dir runs/demo -a SpellingBee,Arithmetic --json

Tasks: ARC-Easy, ARC-Challenge, MMLU (categorical: best allowed letter), GSM8K,
SpellingBee, SimpleSpelling, Arithmetic (generative: sampled with tool calls). Hub
datasets load from the hub or from local mirrors (--data-dir / $SFTFAST_DATA_DIR, see
sftfast/tasks/base.py). Rank 0 prints one line per task, then ChatCORE over the tasks
that have a chance baseline; --json prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
import torch.distributed as dist

from sftfast.checkpoint import resolve
from sftfast.cli import at_least
from sftfast.engine import Engine, add_checkpoint_arguments, load_for_inference
from sftfast.evaluate import BASELINES, chatcore, evaluate_task
from sftfast.tasks import get_task

DEFAULT_TASKS = "ARC-Easy,ARC-Challenge,MMLU,GSM8K"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sftfast.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("-a", "--task-name", default=DEFAULT_TASKS, help=f"tasks separated by , or | (default {DEFAULT_TASKS})")
    p.add_argument("-x", "--max-problems", type=at_least(1), default=None, help="evaluate at most this many problems per task")
    p.add_argument("-b", "--batch-size", type=at_least(1), default=8, help="batch size of categorical evaluation (default: 8)")
    p.add_argument("-n", "--num-samples", type=at_least(1), default=1, help="samples per generative problem, pass@n (default: 1)")
    p.add_argument("-m", "--max-new-tokens", type=at_least(1), default=512, help="most tokens per generative answer (default: 512)")
    p.add_argument("-t", "--temperature", type=at_least(0.0, float), default=0.0, help="sampling temperature, 0 = greedy (default: 0)")
    p.add_argument("-k", "--top-k", type=at_least(0), default=50, help="top-k of sampling (default: 50)")
    p.add_argument("--data-dir", default=None, help="local mirrors of hub datasets (default $SFTFAST_DATA_DIR)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (1 is fastest on a busy small CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype on CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object with every result")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_problems is not None and args.max_problems < 1:
        print("error: --max-problems must be >= 1", file=sys.stderr)
        return 2
    names = [n.strip() for n in re.split(r"[,|]", args.task_name) if n.strip()]  # nanochat separates with |
    if not names:
        print(f"error: --task-name names no task (e.g. {DEFAULT_TASKS})", file=sys.stderr)
        return 2
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = args.device
    if distributed:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    try:
        # the checkpoint is found first (cheap, no hub), then every task (and its data) before
        # the model is loaded and before the first is evaluated: a typo in the last name must
        # not cost the results of the ones before it
        resolve(args.base_dir, args.source, args.model_tag, args.step)
        tasks = {name: get_task(name, data_dir=args.data_dir, role="eval") for name in names}
        unscored = [name for name, task in tasks.items() if not task.can_evaluate]
        if unscored:
            raise ValueError(f"{', '.join(unscored)}: no automatic evaluation (training data only); "
                             f"evaluable tasks include {DEFAULT_TASKS}, SpellingBee, SimpleSpelling")
        model, tokenizer, meta = load_for_inference(args.base_dir, args.source, args.model_tag, args.step,
                                                    device=device, tokenizer_path=args.tokenizer)
        engine = Engine(model, tokenizer)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") and args.dtype == "bfloat16"
                    else torch.autocast("cpu", enabled=False))
        results = {}
        for name, task in tasks.items():
            with autocast:
                out = evaluate_task(model, tokenizer, task, batch_size=args.batch_size, max_problems=args.max_problems,
                                    num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, engine=engine)
            results[name] = out
            if rank == 0 and not args.json:
                print(f"{name:<14} {out['eval_type']:<11} accuracy {out['accuracy']:.4f} "
                      f"({out['correct']}/{out['total']}) in {out['seconds']:.1f}s", flush=True)
        # the task's own name ("ARC-Easy"), not the spelling typed ("arc_easy"), finds its baseline
        scored = {r["task"]: r["accuracy"] for r in results.values() if r["task"] in BASELINES}
        score = chatcore(scored) if scored else None
        if rank == 0:
            if args.json:
                print(json.dumps({"checkpoint": meta.get("checkpoint_dir"), "step": meta.get("step"),
                                  "results": results, "chatcore": score}, indent=2))
            elif score is not None:
                print(f"ChatCORE over {', '.join(scored)}: {score:.4f}")
        if distributed:
            # Both ranks finish before either tears gloo down: a rank that closes its sockets
            # while the other is still printing can make the other's gloo thread abort.
            dist.barrier()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # User-facing failures (TaskError, CheckpointError, a missing tokenizer or dataset):
        # one clear line and a non-zero status, not a traceback per rank.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
