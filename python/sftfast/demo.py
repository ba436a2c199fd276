"""The embedded default run: the whole SFT stage on a CPU, no downloads, a few minutes.

    python -m sftfast.train --demo            # what `make run` runs; everything goes under runs/demo
    python -m sftfast.train --demo --base-dir runs/demo2 --demo-scale 0.5

1. a tokenizer trained on bundled text (plus the plain text of the demo tasks' train split);
2. a tiny GPT given a short base training on that text (next-token, no chat format), saved as
   {run}/base_checkpoints/demo/;
3. SFT (sftfast.train.run, the real trainer) on a bundled mixture: spelling, spelling bee,
   arithmetic with calculator calls, identity conversations (sftfast.tasks) and a multiple-choice
   task (FindTheNumber, below);
4. evaluation before and after on held-out conversations (validation loss, bits per byte) and on a
   held-out categorical task (restricted-choice accuracy), printed side by side;
5. the checkpoint in {run}/chatsft_checkpoints/demo/, and a sample chat through sftfast.engine
   (KV cache, calculator).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from sftfast import checkpoint as ckpt
from sftfast.model import GPT, GPTConfig
from sftfast.optim import build_optimizers, lr_multiplier

# ---- demo settings: sized for ~2 minutes on a 2-core x86_64 CPU (95-99 s measured, 2026-11-28)
VOCAB_SIZE = 1024  # BPE vocabulary, the 9 special tokens included
MODEL = dict(sequence_len=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128)
BASE_STEPS, BASE_BATCH = 120, 8  # base training: 120 x 8 x 256 tokens
CHOICE_EXAMPLES = 1200  # FindTheNumber conversations in the SFT mixture
HELDOUT = 200  # problems per held-out evaluation task
SEED = 42

# ---------------------------------------------------------------------------------------------
# the demo's own synthetic tasks (seeded by index; split "train" and "test" never overlap)

_SPLIT_OFFSET = {"train": 0, "test": 10_000_000}


class FindTheNumber:
    """Multiple choice (ARC/MMLU rendering): three words and one number; which option is the
    number? Answer: the bare letter. Learnable by a tiny model in a couple of minutes (spot the
    number token, copy the letter after it), yet at chance (25%) before SFT."""

    name = "FindTheNumber"
    eval_type = "categorical"
    LETTERS = ["A", "B", "C", "D"]

    def __init__(self, size, split="train"):
        from sftfast.tasks.spelling import load_words

        self.size, self.offset = size, _SPLIT_OFFSET[split]
        self.words = [w for w in load_words() if 3 <= len(w) <= 8]

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = random.Random(self.offset + 104729 * i + 3)
        options = rng.sample(self.words, 3)
        k = rng.randrange(4)
        options.insert(k, str(rng.randint(10, 999)))
        q = "Multiple Choice question: Which option is a number?\n"
        q += "".join(f"- {o}={letter}\n" for o, letter in zip(options, self.LETTERS))
        q += "\nRespond only with the letter of the correct answer."
        return dict(messages=[dict(role="user", content=q), dict(role="assistant", content=self.LETTERS[k])], letters=self.LETTERS)

    def evaluate(self, conversation, response):
        return response == conversation["messages"][-1]["content"]


def build_mixtures(scale=1.0):
    """(train, held-out) mixtures: sftfast.tasks' "demo" mixture (spelling, spelling bee, arithmetic
    with calculator calls, identity conversations) plus the multiple-choice task."""
    from sftfast import tasks

    n = lambda k: max(8, int(k * scale))  # noqa: E731  (tests run a scaled-down demo)
    spec = f"SimpleSpelling:size={n(400)},SpellingBee:size={n(400)},Arithmetic:size={n(600)},identity:stop={n(320)}"
    train = tasks.build_mixture(spec, split="train").tasks + [FindTheNumber(n(CHOICE_EXAMPLES), "train")]
    val = tasks.build_mixture("demo", split="val").tasks + [FindTheNumber(64, "test")]
    return tasks.TaskMixture(train), tasks.TaskMixture(val)


def conversation_text(conv) -> str:
    """Plain text of a conversation (base-training and tokenizer-training text: no chat tokens)."""
    out = []
    for m in conv["messages"]:
        c = m["content"]
        out.append(c if isinstance(c, str) else " ".join(p["text"] for p in c))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# tokenizer

def bundled_text() -> str:
    """The bundled English and code text (sftfast/assets, written for this project)."""
    here = os.path.join(os.path.dirname(__file__), "assets")
    texts = []
    for name in ("english.txt", "code.txt"):
        with open(os.path.join(here, name), encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def train_tokenizer(texts, path):
    """BPE (sftfast's trainer) on `texts`, saved to `path` in the tokenizer's plain format."""
    from sftfast.tokenizer import Tokenizer

    tok = Tokenizer.train(iter(texts), VOCAB_SIZE)
    tok.save(path)
    return tok


# ---------------------------------------------------------------------------------------------
# base training: plain next-token prediction on the text stream

def base_train(model, ids, steps, batch, log):
    T = model.config.sequence_len
    data = torch.tensor(ids, dtype=torch.long)
    n_windows = (len(data) - 1) // T
    if n_windows < batch:
        raise ValueError(f"base corpus has {len(data)} tokens: too few for batches of {batch} x {T}")
    optimizers = build_optimizers(model, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.04)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        loss = model(x, y)
        loss.backward()
        lrm = lr_multiplier(step, steps, "wsd", warmup_ratio=0.05, warmdown_ratio=0.4)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            opt.step()
        model.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            log(f"base step {step:04d}/{steps} | loss {loss.item():.4f} | {time.time() - t0:.0f}s")
    return loss.item()


# ---------------------------------------------------------------------------------------------
# sample chat: greedy generation with the calculator (sftfast.engine.Engine when present)

@torch.no_grad()
def chat(model, tokenizer, question, max_tokens=48):
    """Greedy reply through sftfast.engine.Engine (KV cache; calculator calls are evaluated and
    their output forced into the stream)."""
    from sftfast.engine import Engine

    conv = dict(messages=[dict(role="user", content=question), dict(role="assistant", content="")])
    prompt = list(tokenizer.render_for_completion(conv))
    model.eval()
    tokens, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0)
    reply = tokens[0][len(prompt):]
    names = {tokenizer.special_token_id(n): n for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    text, chunk = [], []
    for t in reply + [None]:
        if t is None or t in names:
            if chunk:
                text.append(tokenizer.decode(chunk))
                chunk = []
            if t is not None:
                text.append(names[t])
        else:
            chunk.append(t)
    return "".join(text)


# ---------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    from sftfast import train

    t_start = time.time()
    scale = float(getattr(args, "demo_scale", 1.0))
    run_dir = args.base_dir or os.path.join("runs", "demo")
    os.makedirs(run_dir, exist_ok=True)

    def log(msg):
        print(f"[demo {time.time() - t_start:6.1f}s] {msg}", flush=True)

    # OpenMP threads spin-wait for each other: on an oversubscribed CPU two threads run several
    # times slower than one (measured on the shared 2-core box: 6.2 s vs 2.1 s per step)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1):
        torch.set_num_threads(1)
        log(f"CPU oversubscribed (load {load:.1f} on {os.cpu_count()} cores): torch uses 1 thread")
    torch.manual_seed(SEED)
    train_mix, test_mix = build_mixtures(scale)
    log(f"mixture: {len(train_mix)} train / {len(test_mix)} held-out conversations "
        f"({', '.join(sorted({t.name for t in train_mix.tasks}))})")

    # 1. tokenizer on bundled text + the train split's plain text
    corpus = bundled_text()
    task_text = [conversation_text(train_mix[i]) for i in range(len(train_mix))]
    os.makedirs(os.path.join(run_dir, "tokenizer"), exist_ok=True)
    tokenizer = train_tokenizer([corpus] + task_text, os.path.join(run_dir, "tokenizer", "tokenizer.sftfast"))
    log(f"tokenizer: {tokenizer.n_vocab} tokens (bundled text: {len(corpus):,} chars)")

    # 2. base model: short next-token training on the plain text, saved in nanochat's layout
    bos = tokenizer.bos_id
    stream = []
    for doc in [corpus] + task_text:
        stream.append(bos)
        stream.extend(tokenizer.encode(doc))
    config = GPTConfig(vocab_size=tokenizer.n_vocab, **MODEL)
    model = GPT(config)
    model.init_weights(seed=SEED)
    log(f"base model: {model.num_params():,} parameters, {len(stream):,} tokens of text")
    base_steps = max(10, int(BASE_STEPS * scale))
    base_loss = base_train(model, stream, base_steps, BASE_BATCH, log)
    base_dir = os.path.join(ckpt.checkpoints_dir(run_dir, "base"), "demo")
    # saved under its last step, as nanochat saves a base model (an earlier demo's base
    # checkpoint of another length would otherwise be the one found: the latest step wins)
    ckpt.remove_checkpoints(base_dir)
    ckpt.save_checkpoint(base_dir, base_steps, model.state_dict(), None,
                         dict(**ckpt.model_config_meta(config), step=base_steps, train_loss=base_loss,
                              tokenizer="tokenizer/tokenizer.sftfast"))

    # 3-4. SFT with the real trainer; evaluation before (step 0) and after (last step)
    sft_args = argparse.Namespace(**vars(args))
    sft_args.base_dir, sft_args.source, sft_args.model_tag, sft_args.step = run_dir, "base", "demo", base_steps
    sft_args.max_seq_len = config.sequence_len
    sft_args.device_batch_size, sft_args.target_examples_per_step = 8, 16
    sft_args.num_epochs, sft_args.num_iterations = 2, -1
    sft_args.init_lr_frac = 0.5  # a tiny, briefly pre-trained model needs more than the seed's 0.02
    sft_args.eval_every = sft_args.eval_metrics_every = 10**9  # evaluate at the first and last step only
    sft_args.eval_steps = 10**9  # the whole held-out set
    sft_args.loss_norm = "token"
    sft_args.eval_tasks = ""
    sft_args.device = "cpu"
    sft_args.log_jsonl = sft_args.log_jsonl or os.path.join(run_dir, "sft.jsonl")
    sft_args.overwrite = True  # the demo redoes the whole stage: an earlier demo's SFT checkpoints go
    held_out = {"find_the_number": FindTheNumber(HELDOUT, "test")}
    # the trainer scores task metrics from its first eval_metrics_every step on: score the base model here
    acc0 = {f"{k}_acc": train.categorical_accuracy(model, tokenizer, t) for k, t in held_out.items()}
    if os.path.exists(sft_args.log_jsonl):
        os.unlink(sft_args.log_jsonl)
    summary = train.run(sft_args, train_ds=train_mix, val_ds=test_mix, metric_tasks=held_out, tokenizer=tokenizer)
    with open(sft_args.log_jsonl) as f:
        evals = [r for r in map(json.loads, f) if r["type"] == "eval"]
    before = dict(acc0, **{k: v for r in evals if r["step"] == 0 for k, v in r.items() if k not in ("type", "step")})
    after = {k: v for r in evals if r["step"] == summary["step"] for k, v in r.items() if k not in ("type", "step")}
    log("held-out evaluation, before SFT -> after SFT:")
    for k in before:
        log(f"  {k:24s} {before[k]:.4f} -> {after.get(k, float('nan')):.4f}")

    # 5. sample chat
    model = summary["model"]
    replies = {}
    for q in ["What is 23 + 58?", "Spell the word: apple", "Who are you?", "Multiple Choice question: Which option is a number?\n- tree=A\n- house=B\n- 417=C\n- river=D\n\nRespond only with the letter of the correct answer."]:
        log(f"user: {q!r}")
        replies[q] = chat(model, tokenizer, q)
        log(f"assistant: {replies[q]!r}")
    result = dict(before=before, after=after, chat=replies, checkpoint_dir=summary["checkpoint_dir"], steps=summary["step"],
                  seconds=time.time() - t_start)
    log(f"done in {result['seconds']:.0f}s; checkpoint in {summary['checkpoint_dir']}")
    return result
