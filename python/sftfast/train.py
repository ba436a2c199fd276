"""Supervised fine-tuning: the chat_sft stage (nanochat's scripts/chat_sft.py, rebuilt for speed).

    python -m sftfast.train --demo                                  # the embedded CPU demo (make run)
    python -m sftfast.train --base-dir ~/.cache/nanochat --source mid --model-tag d12
    torchrun --standalone --nproc_per_node=8 -m sftfast.train --source mid --log-jsonl sft.jsonl
    python -m sftfast.train ... --resume                            # continue the last chatsft checkpoint

Loads a base or mid checkpoint ({base_dir}/{base,mid}_checkpoints/{tag}/model_{step:06d}.pt),
trains it on a task mixture with the masked loss on assistant tokens only, evaluates validation
loss / bits per byte and categorical accuracy, and writes {base_dir}/chatsft_checkpoints/{tag}/.

Batch arithmetic (the seed's): each optimizer step sees target_examples_per_step rows across all
ranks: grad_accum_steps = target_examples_per_step // (device_batch_size * world_size);
(--target-tokens-per-step sizes the step in tokens instead: rows = tokens // max_seq_len);
num_iterations = -1 means (len(train) // target_examples_per_step) * num_epochs, and the data
decides: with packed rows the run reads every conversation num_epochs times and ends (the count is
then an estimate), with padded rows it takes that many steps (the seed's). A rank whose data ends
first takes part in the others' last steps with no micro-batch (zero gradients).

--loss-norm microbatch (nanochat): the mean over the step's micro-batches (all ranks) of each
one's mean loss. --loss-norm token: the sum of per-token losses over all micro-batches and
ranks of the step divided by the step's total number of supervised tokens (all-reduced before the
backward passes), so the gradient does not depend on how tokens fall into micro-batches.

DDP: gradients are all-reduced explicitly after the micro-batches (no wrapper, no no_sync
bookkeeping), AdamW then runs replicated and Muon shards its Newton-Schulz work over ranks
(sftfast.optim). gloo on CPU, NCCL on GPU. bf16 autocast on GPU; fp32 on CPU so that a resumed run
reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from sftfast import checkpoint as ckpt
from sftfast.cli import at_least
from sftfast.train_data import data_fingerprint, fingerprint_difference, make_loader, read_training_data
from sftfast.optim import SCHEDULES, build_optimizers, lr_multiplier


class TrainingDivergedError(RuntimeError):
    """A non-finite loss: the run stops before the optimizer step; nothing is saved."""


# The flags that decide what a run computes. --resume must repeat them: a resumed run is the
# same run continued (bitwise on CPU), so a changed learning rate, schedule, batch arithmetic or
# data is refused rather than half-applied (the optimizer state would bring back the old
# learning rates, the checkpoint the old step count). Everything else may change on resume:
# evaluation and logging cadence, --save-every, --loader-workers, --compile, the device.
RUN_DEFINING_FLAGS = (
    "mixture", "train_data", "max_seq_len", "packing", "loader", "cross_doc_attention", "device_batch_size",
    "target_examples_per_step", "target_tokens_per_step", "num_epochs", "num_iterations", "unembedding_lr",
    "embedding_lr", "matrix_lr", "weight_decay", "init_lr_frac", "schedule", "warmup_ratio", "warmdown_ratio",
    "final_lr_frac", "loss_norm", "seed",
)


def run_settings(args) -> dict:
    """The run-defining flags' values, as stored in every checkpoint's trainer state. Data files
    are compared by name, so a checkpoint can move to a machine where they live elsewhere."""
    settings = {k: getattr(args, k) for k in RUN_DEFINING_FLAGS}
    if settings["train_data"]:
        settings["train_data"] = os.path.basename(os.path.normpath(settings["train_data"]))
    return settings


def check_resume_settings(saved: dict | None, now: dict, where: str) -> None:
    """CheckpointError listing every run-defining flag that differs from the checkpoint's."""
    if saved is None:
        return  # a checkpoint from before settings were stored: nothing to compare
    diffs = [f"--{k.replace('_', '-')} {now.get(k)!r} (checkpoint: {saved.get(k)!r})"
             for k in RUN_DEFINING_FLAGS if now.get(k) != saved.get(k)]
    if diffs:
        raise ckpt.CheckpointError(
            f"--resume from {where} with settings that differ from the run that wrote it: {'; '.join(diffs)}. "
            "Repeat the original flags, or start a new run with --overwrite")


def finite_or_none(metrics: dict) -> dict:
    """JSON has no NaN or inf: such values are written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def grad_accum_steps(args, world_size: int) -> int:
    """Micro-batches per optimizer step: target_examples_per_step // (device_batch_size * world),
    the seed's arithmetic. With --target-tokens-per-step the step is sized in tokens instead
    (every packed row holds max_seq_len positions), and target_examples_per_step follows from it."""
    rows_per_micro = args.device_batch_size * world_size
    if args.target_tokens_per_step > 0:
        if args.target_tokens_per_step % args.max_seq_len != 0:
            raise ValueError(f"target_tokens_per_step={args.target_tokens_per_step} is not a multiple of "
                             f"max_seq_len={args.max_seq_len}")
        args.target_examples_per_step = args.target_tokens_per_step // args.max_seq_len
        what = f"target_tokens_per_step={args.target_tokens_per_step} ({args.target_examples_per_step} rows)"
    else:
        what = f"target_examples_per_step={args.target_examples_per_step}"
    if args.target_examples_per_step <= 0 or args.target_examples_per_step % rows_per_micro != 0:
        raise ValueError(f"{what} is not a positive multiple of device_batch_size * world_size = {rows_per_micro}")
    return args.target_examples_per_step // rows_per_micro


# -----------------------------------------------------------------------------
# distributed helpers

@dataclass
class DistInfo:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(device_arg: str) -> DistInfo:
    ddp = int(os.environ.get("RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_arg == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(ddp, rank, local_rank, world, device)


def all_reduce(t: torch.Tensor, info: DistInfo, op=None):
    if info.ddp:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def sync_gradients(model, info: DistInfo) -> None:
    """Sum every gradient over ranks (each rank's loss is already divided by the step's global
    token or micro-batch count). A rank with no micro-batch this step (its data ended before the
    others') adds zeros: every rank must reduce the same tensors."""
    if not info.ddp:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
    for h in handles:
        h.wait()


# -----------------------------------------------------------------------------
# evaluation

def token_bytes_tensor(tokenizer, device) -> torch.Tensor:
    """(V,) byte length of each token's text; 0 for special tokens (excluded from bits per byte)."""
    return torch.as_tensor(np.asarray(tokenizer.token_bytes()), dtype=torch.int64).to(device)


@torch.no_grad()
def evaluate_loss(model, loader, steps, token_bytes, info: DistInfo, autocast, doc_mask=True) -> dict:
    """Token-weighted validation loss and bits per byte over `steps` batches (or one epoch)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss nats, tokens, nats on byte tokens, bytes
    for _ in range(steps):
        b = loader.next()
        if b is None:  # one pass over a validation set smaller than `steps` batches
            break
        x, y = b.inputs.to(info.device), b.targets.to(info.device)
        d = b.doc_ids.to(info.device) if doc_mask else None
        with autocast:
            h = model.hidden_states(x, doc_ids=d)
        yf = y.reshape(-1)
        nbytes = torch.where(yf >= 0, token_bytes[yf.clamp(min=0)], 0)
        y_bytes = torch.where(nbytes > 0, yf, -1)  # bits per byte: special tokens (0 bytes) excluded
        with autocast:
            sums[0] += model.head_loss(h, yf, reduction="sum").double()
            sums[2] += model.head_loss(h, y_bytes, reduction="sum").double()
        sums[1] += (yf >= 0).sum()
        sums[3] += nbytes.sum()
        if b.progress >= 1.0:
            break
    all_reduce(sums, info)
    model.train()
    # no byte-carrying target at all (every one special): bits per byte is undefined, not 0
    bpb = (sums[2] / (math.log(2) * sums[3])).item() if sums[3] > 0 else float("nan")
    return dict(val_loss=(sums[0] / sums[1].clamp(min=1)).item(), val_bpb=bpb, val_tokens=int(sums[1].item()))


def categorical_accuracy(model, tokenizer, task, max_problems=1024, batch_size=8) -> float:
    """Restricted choice (the allowed letter with the highest logit), sftfast.evaluate's scorer;
    problems are split over ranks and the counts all-reduced there."""
    from sftfast.evaluate import run_categorical_eval

    model.eval()
    try:
        return run_categorical_eval(model, tokenizer, task, batch_size=batch_size, max_problems=max_problems)["accuracy"]
    finally:
        model.train()


# -----------------------------------------------------------------------------
# settings

# Dense bf16 peaks by device-name substring, the first match wins (so the PCIe / NVL variants,
# clocked lower than the SXM parts, come before their family): MFU on an H100 PCIe was 31% high.
GPU_PEAK_FLOPS = {"H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200 NVL": 836e12, "H200": 989e12,
                  "H800 PCIe": 756e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                  "4090": 165e12, "B200": 2250e12}


def gpu_peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source and output")
    g.add_argument("--demo", action="store_true", help="run the embedded CPU demo (tokenizer, base, SFT, eval, chat)")
    g.add_argument("--base-dir", default=None, help="holds {base,mid,chatsft}_checkpoints/; if not given: $SFTFAST_BASE_DIR, "
                                                 "else ~/.cache/nanochat (the demo: runs/demo)")
    g.add_argument("--demo-scale", type=float, default=1.0, help="scale the demo's data and steps (tests use < 1)")
    g.add_argument("--source", default="mid", choices=["base", "mid"], help="which checkpoints to fine-tune")
    g.add_argument("--model-tag", default=None, help="default: the deepest d<N> tag (nanochat's guess)")
    g.add_argument("--step", type=int, default=None, help="source step; default: the last one")
    g.add_argument("--tokenizer", default=None, help="tokenizer file; default: the checkpoint's (sftfast.engine.find_tokenizer)")
    g.add_argument("--resume", action="store_true", help="continue from the last chatsft checkpoint of the tag")
    g.add_argument("--save-every", type=int, default=-1, help="also checkpoint every N steps (-1: only at the end)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even if the output directory holds an earlier run's checkpoints (deletes them)")
    g = p.add_argument_group("data")
    g.add_argument("--mixture", default="seed",
                   help="training mixture: a name (seed: ARC-Easy, ARC-Challenge, GSM8K, SmolTalk 10K, identity, "
                        "SimpleSpelling, SpellingBee; demo) or a JSON config with train and val parts")
    g.add_argument("--data-dir", default=None,
                   help="local copies of the hub datasets (NAME/CONFIG/SPLIT-*); if not given: $SFTFAST_DATA_DIR, else the hub")
    g.add_argument("--train-data", "--data", dest="train_data", default=None,
                   help="train on this instead of --mixture: a shard directory from `python -m sftfast.prep` "
                        "(memory-mapped, shared by all ranks) or a JSONL file of conversations")
    g.add_argument("--val-data", default=None, help="validation shard directory or JSONL (with --train-data)")
    g.add_argument("--max-seq-len", type=at_least(1), default=2048, help="positions per row")
    g.add_argument("--packing", default="bestfit", choices=["bestfit", "padded"],
                   help="bestfit: several conversations per row (current nanochat), so a step of "
                        "--target-examples-per-step rows holds more conversations and the schedule follows the data "
                        "consumed; padded: the seed's collate, one conversation per row, padded to the longest")
    g.add_argument("--loader", default="rust", choices=["rust", "python"], help="data path: Rust SFTLoader or the Python reference")
    g.add_argument("--loader-workers", type=at_least(0), default=0,
                   help="processes per rank that read and render the training conversations (Rust loader; 0: a "
                        "helper thread). Worth it when the tasks' __getitem__ bounds the loader (docs/BENCHMARKS.md)")
    g.add_argument("--cross-doc-attention", action="store_true", help="let attention cross conversations in a packed row")
    g = p.add_argument_group("optimisation (seed defaults)")
    g.add_argument("--device-batch-size", type=at_least(1), default=4, help="rows per micro-batch on each rank")
    g.add_argument("--target-examples-per-step", type=at_least(1), default=32, help="rows per optimizer step, all ranks")
    g.add_argument("--target-tokens-per-step", type=int, default=-1,
                   help="a token budget per optimizer step instead (nanochat's total_batch_size): "
                        "rows = tokens // max_seq_len; -1: use --target-examples-per-step")
    g.add_argument("--num-epochs", type=at_least(1), default=1, help="passes over the training data")
    g.add_argument("--num-iterations", type=int, default=-1, help="-1: (len(train) // target_examples_per_step) * num_epochs")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="lm_head (AdamW)")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="token embedding (AdamW)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="transformer matrices (Muon)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--init-lr-frac", type=float, default=0.02, help="every group starts at lr * this (its initial_lr)")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES,
                   help="linear: lrm = 1 - step / num_iterations (the seed's); wsd: warmup, constant, warmdown (nanochat)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="wsd only: fraction of the run warming up")
    g.add_argument("--warmdown-ratio", type=float, default=0.5,
                   help="wsd only: fraction of the run decaying (0.5 as in nanochat's chat_sft)")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="wsd only: lrm at the end of the warmdown")
    g.add_argument("--loss-norm", default="microbatch", choices=["microbatch", "token"],
                   help="microbatch: mean per micro-batch / grad_accum (nanochat); token: sum / the step's supervised tokens")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (-1: only at the end)")
    g.add_argument("--eval-steps", type=at_least(1), default=100, help="validation batches per evaluation")
    g.add_argument("--eval-metrics-every", type=int, default=200, help="task accuracies every N steps (-1: only at the end)")
    g.add_argument("--eval-metrics-max-problems", type=at_least(1), default=1024, help="problems per task and evaluation")
    g.add_argument("--eval-tasks", default="MMLU,ARC-Easy", help="categorical tasks scored every eval_metrics_every steps and at the end, whatever the training data ('' = none)")
    g.add_argument("--log-jsonl", default=None, help="write one JSON object per step and per evaluation to this file (--resume appends)")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy': no wandb)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=42, help="torch and Python RNG seed")


# -----------------------------------------------------------------------------
# the training run

def _rng_state():
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                python=list(random.getstate()[1]), python_pos=random.getstate()[2])


def _set_rng_state(s):
    torch.set_rng_state(s["torch"].cpu())
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    random.setstate((3, tuple(int(v) for v in s["python"]), s["python_pos"]))


DATA_COUNTS = ("conversations", "batches", "positions", "padding", "truncated", "empty_rows", "empty_batches", "skipped")


def report_data(loader, dataset, info: DistInfo, log) -> None:
    """What the training batches held, over all ranks: padding, conversations cut to the row,
    rows and batches with no supervised token (the loss gives them 0, not NaN), skips; for a
    shard also the conversations prep cut at its max_tokens. One line and a "data" record."""
    from sftfast.shards import ShardDataset

    stats = loader.stats()
    counts = torch.tensor([stats[k] for k in DATA_COUNTS], dtype=torch.float64, device=info.device)
    all_reduce(counts, info)
    c = dict(zip(DATA_COUNTS, (int(v) for v in counts.tolist())))
    shard = getattr(dataset, "dataset", dataset)
    if isinstance(shard, ShardDataset):
        c["cut_at_prep"] = int(shard.manifest.get("num_truncated", 0))
    line = (f"data | {c['conversations']:,} conversations in {c['batches']:,} batches | padding "
            f"{100 * c['padding'] / max(c['positions'], 1):.1f}% | cut to the row {c['truncated']:,} | rows without a "
            f"supervised token {c['empty_rows']:,} (whole batches {c['empty_batches']:,}) | skipped {c['skipped']:,}")
    if "cut_at_prep" in c:
        line += f" | cut at prep's max_tokens={shard.max_tokens}: {c['cut_at_prep']:,} of the shard"
    log.print(line)
    log.record("data", c)


def warn_shard_cut_short(flag: str, data, row_tokens: int, log) -> None:
    """A shard prepared with a smaller --max-tokens than a training row holds: the conversations
    prep cut there train shorter than they would from the raw data. Said, with the count."""
    from sftfast.shards import ShardDataset

    shard = getattr(data, "dataset", data)  # ShuffledShard wraps it
    if not isinstance(shard, ShardDataset):
        return
    cut = int(shard.manifest.get("num_truncated", 0))
    if cut and shard.max_tokens < row_tokens:
        log.print(f"warning: {flag} {shard.path}: {cut} conversations were cut at max_tokens={shard.max_tokens} "
                  f"when it was prepared, and rows hold {row_tokens} tokens: they train shorter than from the raw "
                  f"data (python -m sftfast.prep --max-tokens {row_tokens} keeps them up to the row)")


class Logger:
    def __init__(self, args, info):
        self.master = info.rank == 0
        # opened now (a bad path fails before any work), emptied at the first record of a new
        # run: a resumed run continues its log, a new one starts it over (two runs' steps in one
        # file would read as one run), and a run refused at startup leaves the earlier log alone
        self.jsonl = open(args.log_jsonl, "a", encoding="utf-8") if (args.log_jsonl and self.master) else None
        self.start_over = not args.resume
        self.wandb = None
        if self.master and args.run != "dummy":
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--run needs wandb (pip install wandb); use --run dummy to disable") from e
            self.wandb = wandb.init(project="sftfast", name=args.run, config=vars(args))
        self.bar = None

    def progress_bar(self, total, initial):
        """A tqdm bar on an interactive terminal (rank 0); log lines then print above it."""
        if self.master and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def print(self, *a):
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(" ".join(str(x) for x in a))
        else:
            print(*a, flush=True)

    def record(self, kind, data):
        if not self.master:
            return
        if self.jsonl:
            if self.start_over:
                self.jsonl.truncate(0)
                self.start_over = False
            # strict JSON: an undefined metric (NaN bits per byte) is null, not a bare NaN
            self.jsonl.write(json.dumps(dict(type=kind, **finite_or_none(data))) + "\n")
            self.jsonl.flush()
        if self.wandb:
            self.wandb.log({f"{kind}/{k}" if k != "step" else k: v for k, v in data.items()})

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()


def run(args, train_ds=None, val_ds=None, metric_tasks=None, tokenizer=None) -> dict:
    """Train. Datasets default to sftfast.tasks (args.mixture); returns a summary dict (rank 0's view)."""
    opened = []  # loaders, closed however the run ends: their threads and worker processes stop
    try:
        return _run(args, train_ds, val_ds, metric_tasks, tokenizer, opened)
    finally:
        for loader in opened:
            if hasattr(loader, "close"):
                loader.close()


def _run(args, train_ds, val_ds, metric_tasks, tokenizer, opened: list) -> dict:
    if args.base_dir is None:
        args.base_dir = ckpt.default_base_dir()
    settings = run_settings(args)  # before anything derives values from the flags
    info = init_distributed(args.device)
    log = Logger(args, info)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = info.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    # --- model: the source checkpoint, or our own last chatsft checkpoint when resuming
    out_root = ckpt.checkpoints_dir(args.base_dir, "sft")
    trainer_state = None
    earlier, stale = [], []  # an earlier run's complete steps and checkpoint files (a fresh run)
    if args.resume:
        out_dir, tag, start = ckpt.resolve(args.base_dir, "sft", args.model_tag)
        # before any rank looks for its own trainer-state file, which may not exist (or may be
        # left over from another run: only the meta says who wrote this step)
        saved_world = ckpt.saved_world_size(out_dir, start)
        if saved_world != info.world_size:
            raise ckpt.CheckpointError(f"{out_dir} step {start} was written by {saved_world} ranks, resuming with {info.world_size}")
        model_state, trainer_state, meta = ckpt.load_checkpoint(out_dir, start, device, load_trainer_state=True, rank=info.rank)
        if trainer_state.get("world_size", saved_world) != saved_world or trainer_state.get("step", start) != start:
            raise ckpt.CheckpointError(f"{ckpt.optim_path(out_dir, start, info.rank)} is not this checkpoint's: it was written "
                                       f"at step {trainer_state.get('step')} by {trainer_state.get('world_size')} ranks")
        check_resume_settings(trainer_state.get("settings"), settings, f"{out_dir} step {start}")
        model = ckpt.build_model(model_state, meta, device, where=f"{out_dir} step {start}")
        log.print(f"resuming {out_dir} at step {start}")
    else:
        model, meta = ckpt.load_model(args.base_dir, args.source, args.model_tag, args.step, device)
        tag = meta["model_tag"]
        out_dir = os.path.join(out_root, tag)
        # an earlier run's checkpoints would outlive this run's (a later step wins in
        # find_last_step), and --resume would then continue the wrong run
        earlier = ckpt.complete_steps(out_dir)
        if earlier and not args.overwrite:
            raise ckpt.CheckpointError(
                f"{out_dir} holds checkpoints of an earlier run (steps {', '.join(map(str, earlier))}): "
                "--resume continues it, --overwrite deletes them and starts over")
        # with --overwrite, or when all there is are the files of an interrupted save, start
        # clean: removed once the run's data, loaders and optimizers are set up (a typo in a
        # flag must not cost the earlier run its checkpoints)
        stale = ckpt.checkpoint_files(out_dir)
        log.print(f"loaded {meta['checkpoint_dir']} step {meta['step']}: {model.num_params():,} parameters")
    config = model.config
    if tokenizer is None:
        from sftfast.engine import find_tokenizer, load_tokenizer

        tokenizer = load_tokenizer(find_tokenizer(args.base_dir, meta, args.tokenizer))
    if tokenizer.n_vocab > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_vocab} tokens, the model {config.vocab_size}")
    model.train()
    fwd = torch.compile(model, dynamic=False) if args.compile else model

    # --- data
    if train_ds is None and args.val_data and not args.train_data:
        raise ValueError(f"--val-data {args.val_data} goes with --train-data; a --mixture has its own validation part")
    if train_ds is None and args.train_data:
        train_ds = read_training_data(args.train_data, tokenizer)
        val_ds = read_training_data(args.val_data, tokenizer, shuffle=False) if args.val_data else None
        for flag, data in (("--train-data", train_ds), ("--val-data", val_ds)):
            warn_shard_cut_short(flag, data, args.max_seq_len + 1, log)
    if train_ds is None:
        from sftfast import tasks

        train_ds = tasks.build_mixture(args.mixture, split="train", data_dir=args.data_dir)
        val_ds = tasks.build_mixture(args.mixture, split="val", data_dir=args.data_dir)
    if val_ds is None:
        log.print("no validation data (--val-data goes with --train-data): no validation loss is computed")
    elif len(val_ds) < info.world_size:
        # checked now: the validation loader is first made at the first evaluation, possibly
        # only at the end of the run
        raise ValueError(f"the validation data has {len(val_ds)} conversations, fewer than the {info.world_size} "
                         "ranks: every rank needs at least one")
    fingerprint = data_fingerprint(train_ds)  # saved with each checkpoint, checked by --resume
    if metric_tasks is None and args.eval_tasks:  # whatever the training data (a shard too)
        from sftfast import tasks

        names = [name.strip() for name in args.eval_tasks.split(",") if name.strip()]
        try:
            metric_tasks = {name.lower().replace("-", "_"): tasks.get_task(name, data_dir=args.data_dir, role="eval")
                            for name in names}
        except tasks.TaskError as e:
            raise tasks.TaskError(f"--eval-tasks {args.eval_tasks}: {e} (--eval-tasks '' scores no task)") from None
    metric_tasks = metric_tasks or {}
    generative = [task.name for task in metric_tasks.values() if task.eval_type != "categorical"]
    if generative:  # refused now, not at the first metric evaluation after hours of training
        raise ValueError(f"--eval-tasks takes categorical tasks (e.g. MMLU, ARC-Easy, ARC-Challenge); "
                         f"generative ones are scored by python -m sftfast.eval: {', '.join(generative)}")
    grad_accum = grad_accum_steps(args, info.world_size)
    num_iterations = args.num_iterations
    if num_iterations == 0 or num_iterations < -1:
        raise ValueError(f"--num-iterations must be positive, or -1 to derive it from the data; got {num_iterations}")
    if num_iterations < 0:
        num_iterations = (len(train_ds) // args.target_examples_per_step) * args.num_epochs
    if num_iterations <= 0:
        raise ValueError(f"{len(train_ds)} training conversations give no step of {args.target_examples_per_step} examples")
    if trainer_state is not None:
        num_iterations = trainer_state["num_iterations"]  # a derived count is the checkpoint's (same flags, same data)
    T = args.max_seq_len
    derived = args.num_iterations < 0
    # A run whose length the data defines reads exactly num_epochs passes: the packer's buffer is
    # emptied at the end, so every conversation is trained once per epoch (an endless stream
    # ended by a count of consumed conversations left ~100 unread and trained as many of the
    # next epoch's instead, as nanochat's generator does). An explicit --num-iterations reads on.
    train_loader = make_loader(train_ds, tokenizer, args.device_batch_size, T, info.rank, info.world_size, args.packing, args.loader, device,
                               args.loader_workers, num_epochs=args.num_epochs if derived else None)
    opened.append(train_loader)
    token_bytes = token_bytes_tensor(tokenizer, device)
    # Only packed rows hold several conversations. A padded row holds one, so plain causal
    # attention is already per-conversation, and it keeps FlexAttention from recompiling for
    # every batch width (padded batches are as wide as their longest conversation).
    doc_mask = not args.cross_doc_attention and args.packing == "bestfit"
    # packed rows hold several conversations: such a run usually takes fewer steps
    bound = " (an estimate: the run ends when the data is consumed)" if derived and args.packing == "bestfit" else ""
    log.print(f"world {info.world_size} | grad_accum {grad_accum} | num_iterations {num_iterations}{bound} | loss_norm {args.loss_norm}")

    # --- optimizers and resumed state
    optimizers = build_optimizers(model, args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay,
                                  args.init_lr_frac, info.rank, info.world_size)
    step = 0
    if trainer_state is not None:
        saved = trainer_state.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(optimizers):
            found = f"{len(saved)}" if isinstance(saved, list) else f"a {type(saved).__name__}"
            raise ckpt.CheckpointError(f"{out_dir} step {trainer_state['step']}: its trainer state holds {found} optimizer "
                                       f"states, this run has {len(optimizers)} optimizers")
        for opt, s in zip(optimizers, saved):
            try:
                opt.load_state_dict(s)
            except (KeyError, TypeError, ValueError) as e:
                raise ckpt.CheckpointError(f"{out_dir} step {trainer_state['step']}: its {type(opt).__name__} state "
                                           f"does not fit this model's parameters: {e!r}") from e
        saved_data = trainer_state.get("data_fingerprint")
        if isinstance(saved_data, dict) and (why := fingerprint_difference(saved_data, fingerprint)):
            raise ckpt.CheckpointError(f"{out_dir} step {trainer_state['step']}: the training data changed: {why}; "
                                       "resuming would not give the batches the run would have seen. "
                                       "Restore the data, or start a new run with --overwrite")
        try:
            train_loader.load_state_dict(trainer_state["loader"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{out_dir} step {trainer_state['step']}: its loader state does not fit this loader: {e!r}") from e
        _set_rng_state(trainer_state["rng"])
        step = trainer_state["step"]
    start_step = step
    if info.ddp:
        dist.barrier()  # every rank is set up before rank 0 deletes anything (a failing rank stops it here)
    if stale:
        if info.rank == 0:
            ckpt.remove_checkpoints(out_dir)
        what = f"checkpoints (steps {', '.join(map(str, earlier))})" if earlier else f"incomplete checkpoint files ({', '.join(stale)})"
        log.print(f"removed an earlier run's {what} from {out_dir}")
    def gather(obj):  # every rank's checkpoint file digests, for the meta rank 0 writes last
        if not info.ddp:
            return [obj]
        every_rank = [None] * info.world_size
        dist.all_gather_object(every_rank, obj)
        return every_rank

    def save(step, metrics):
        trainer = dict(optimizers=[o.state_dict() for o in optimizers], loader=train_loader.state_dict(), rng=_rng_state(),
                       step=step, num_iterations=num_iterations, world_size=info.world_size, settings=settings,
                       data_fingerprint=fingerprint)
        meta_out = dict(**ckpt.model_config_meta(config), step=step, num_iterations=num_iterations, world_size=info.world_size,
                        source=args.source,
                        args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
                        metrics=finite_or_none(metrics))
        if isinstance(meta.get("tokenizer"), str):  # where sftfast.engine finds the tokenizer
            meta_out["tokenizer"] = meta["tokenizer"]
        ckpt.save_checkpoint(out_dir, step, model.state_dict(), trainer, meta_out, rank=info.rank, gather=gather)
        log.print(f"saved checkpoint {out_dir} step {step}")

    flops_per_token = model.estimate_flops(T)
    peak = gpu_peak_flops(device)
    metrics: dict = {}
    history = []
    train_loss = float("nan")
    t_total = 0.0
    log.progress_bar(num_iterations, step)
    while True:
        # epoch progress by consumption, the slowest rank's (MIN: every rank sees the same value)
        progress = torch.tensor(train_loader.consumed / (args.num_epochs * train_loader.shard_len), dtype=torch.float64, device=device)
        all_reduce(progress, info, dist.ReduceOp.MIN if info.ddp else None)
        progress = progress.item()
        # the last step: the iteration budget is spent (an explicit one; a derived one with padded
        # rows, the seed's len(train) // examples-per-step steps), or every rank read its epochs
        # (a rank done before the others takes part in their last steps with no micro-batches)
        budget = not derived or args.packing == "padded"
        last_step = (budget and step >= num_iterations) or (derived and progress >= 1.0)

        if val_ds is not None and (last_step or (args.eval_every > 0 and step % args.eval_every == 0)):
            # one pass at most: an endless loader's best-fit buffer would mix in the next pass's
            # copies before the first ends (some conversations counted twice, others never)
            val_loader = make_loader(val_ds, tokenizer, args.device_batch_size, T, info.rank, info.world_size, args.packing,
                                     args.loader, device, num_epochs=1)
            opened.append(val_loader)
            metrics.update(evaluate_loss(model, val_loader, args.eval_steps, token_bytes, info, autocast, doc_mask))
            if hasattr(val_loader, "close"):
                val_loader.close()
            opened.remove(val_loader)
            log.print(f"step {step:05d} | val loss {metrics['val_loss']:.6f} | val bpb {metrics['val_bpb']:.4f}")
            log.record("eval", dict(step=step, val_loss=metrics["val_loss"], val_bpb=metrics["val_bpb"]))
        if metric_tasks and (last_step or (args.eval_metrics_every > 0 and step > 0 and step % args.eval_metrics_every == 0)):
            with autocast:
                accs = {f"{name}_acc": categorical_accuracy(model, tokenizer, task, args.eval_metrics_max_problems)
                        for name, task in metric_tasks.items()}
            metrics.update(accs)
            log.print(f"step {step:05d} | " + ", ".join(f"{k}: {v:.4f}" for k, v in accs.items()))
            log.record("eval", dict(step=step, **accs))
        if last_step:
            break
        # periodic checkpoints here, after this step's evaluations (so their metrics are its own),
        # never at the last step (the final save below) nor at the step a resumed run starts from
        if args.save_every > 0 and step % args.save_every == 0 and step > start_step:
            save(step, dict(metrics, train_loss=train_loss))
        # --- one optimizer step
        t0 = time.perf_counter()
        batches = []
        while len(batches) < grad_accum and (b := train_loader.next()) is not None:
            batches.append(b)  # fewer at the end of the data (none on a rank that is done)
        # the step's supervised tokens, micro-batches and tokens, over all ranks
        counts = torch.tensor([sum(int((b.targets >= 0).sum()) for b in batches), len(batches),
                               sum(b.inputs.numel() for b in batches)], dtype=torch.float64, device=device)
        all_reduce(counts, info)
        n_sup, n_micro = counts[0], counts[1]
        loss_log = torch.zeros(2, dtype=torch.float64, device=device)  # (loss for the log, non-finite flag)
        bad = None
        for micro, b in enumerate(batches):
            x, y = b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True)
            d = b.doc_ids.to(device, non_blocking=True) if doc_mask else None
            with autocast:
                if args.loss_norm == "token":
                    raw = fwd(x, y, loss_reduction="sum", doc_ids=d)
                    # DDP sums gradients over ranks: divide by the global count here
                    loss = raw / n_sup.clamp(min=1).to(raw.dtype)
                else:
                    raw = fwd(x, y, loss_reduction="mean", doc_ids=d)
                    loss = raw / n_micro.to(raw.dtype)  # the mean over the step's micro-batches, all ranks
            if not torch.isfinite(raw.detach()):
                bad = bad or (micro, raw.item())
            loss.backward()
            loss_log[0] += loss.detach().double()
        loss_log[1] = 1.0 if bad else 0.0
        all_reduce(loss_log, info)
        if loss_log[1] > 0:
            where = f"rank {info.rank} micro-batch {bad[0]} (loss {bad[1]})" if bad else "another rank"
            raise TrainingDivergedError(
                f"non-finite loss at step {step} in {where}; conversations consumed so far on this rank: "
                f"{train_loader.consumed}; the last good checkpoint is left untouched")
        sync_gradients(model, info)
        # with a derived num_iterations the schedule follows consumption: packed rows hold several
        # conversations, so the epoch ends before len(train) // target_examples_per_step steps
        sched_step = min(progress, 1.0) * num_iterations if derived else step
        lrm = lr_multiplier(sched_step, num_iterations, args.schedule, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        t_total += dt
        train_loss = loss_log[0].item()
        if not math.isfinite(train_loss):
            raise TrainingDivergedError(f"non-finite loss at step {step - 1}")
        tok_s = counts[2].item() / dt
        rec = dict(step=step, num_iterations=num_iterations, loss=train_loss, lrm=lrm, sup_tokens=int(n_sup.item()),
                   tokens_per_s=tok_s, dt=dt, epoch=train_loader.consumed / train_loader.shard_len)
        mfu_s = ""
        if peak:
            rec["mfu"] = flops_per_token * tok_s / (peak * info.world_size)
            mfu_s = f" | mfu {100 * rec['mfu']:.2f}%"
        # a derived num_iterations is only an estimate (packed rows hold several conversations):
        # such a run ends when the data is consumed, so show how much of it is
        where = f"{step:05d} | data {100 * min(rec['epoch'] / args.num_epochs, 1.0):5.1f}%" if derived else f"{step:05d}/{num_iterations:05d}"
        log.print(f"step {where} | loss {train_loss:.6f} | lrm {lrm:.4f} | sup tokens {int(n_sup.item()):,}"
                  f" | {tok_s:,.0f} tok/s{mfu_s} | {1000 * dt:.0f} ms")
        log.record("step", rec)
        if log.bar is not None:
            log.bar.update(1)
        history.append(train_loss)

    report_data(train_loader, train_ds, info, log)
    metrics["train_loss"] = train_loss
    if step > start_step:
        save(step, metrics)
    else:  # --resume of a run that had already ended: its final checkpoint stays as it is
        log.print(f"the checkpoint at step {step} already ends this run: nothing trained, nothing saved")
    log.close()
    return dict(step=step, num_iterations=num_iterations, losses=history, metrics=metrics, checkpoint_dir=out_dir,
                train_time_s=t_total, model=model, tokenizer=tokenizer, grad_accum_steps=grad_accum)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default when it has one worth showing (not an unset None or an off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftfast.train", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.demo:
        from sftfast import demo

        demo.main(args)
    else:
        try:
            run(args)
        except (ValueError, FileNotFoundError, ckpt.CheckpointError, TrainingDivergedError) as e:
            # user-facing failures: one clear line (and the exit status), not a traceback per rank
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            if dist.is_initialized():
                dist.destroy_process_group()
            return 1
    if dist.is_initialized():
        dist.barrier()  # every rank done before gloo/NCCL is torn down (see sftfast.eval)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
