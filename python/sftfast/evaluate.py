"""Task evaluation: categorical (restricted-choice letters), generative (sampling + tools), ChatCORE.

    from sftfast.evaluate import evaluate_task, chatcore
    acc = evaluate_task(model, tokenizer, get_task("ARC-Easy"), max_problems=1024)["accuracy"]
    score = chatcore({"ARC-Easy": 0.41, "MMLU": 0.32, "GSM8K": 0.05})

Categorical (ARC, MMLU): each conversation is rendered for completion (the prompt, then
<|assistant_start|>), a batch of prompts is padded on the right and run once, and the
prediction is the letter whose token has the highest logit at the last prompt position,
*among the allowed letters only* (so a base model that would rather say "The" still gets
a fair answer). Generative (GSM8K, SpellingBee, ...): the Engine samples a reply, tool
calls run, and the task's `evaluate` checks the reply (e.g. its `#### N` number).

Distributed: under torchrun, rank r evaluates problems r, r+W, r+2W, ... and the counts are
summed with all_reduce, so every rank returns the same accuracy.

ChatCORE (nanochat's summary): each task's accuracy centred on its chance level,
(acc - baseline) / (1 - baseline), averaged over the tasks: 0 is chance, 1 is perfect. Here it
averages the tasks evaluated; nanochat's is over its six (HumanEval among them, not here), so
compare the two only task by task.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from sftfast.engine import Engine

# Chance accuracy of each task: 1/4 for four-way multiple choice, 0 for open answers.
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0, "SimpleSpelling": 0.0, "Arithmetic": 0.0}


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_across_ranks(values: list[int], device) -> list[int]:
    rank, world = _dist()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _problem_indices(task, max_problems: int | None) -> range:
    n = len(task) if max_problems is None else min(len(task), max_problems)
    rank, world = _dist()
    return range(rank, n, world)


def _letter_ids(tokenizer, letters) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens with this tokenizer; categorical "
                             "evaluation needs one token per letter")
        ids.append(enc[0])
    return ids


@torch.inference_mode()
def run_categorical_eval(model, tokenizer, task, batch_size: int = 8, max_problems: int | None = None) -> dict:
    """Accuracy of the highest-logit allowed letter; returns {correct, total, accuracy}."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = tokenizer.bos_id
    indices = list(_problem_indices(task, max_problems))
    correct = total = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start : start + batch_size]]
        prompts = [list(tokenizer.render_for_completion(c)) for c in conversations]
        width = max(len(p) for p in prompts)
        # Right padding: causal attention means the pad never influences the real positions.
        batch = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        rows = torch.arange(len(prompts), device=device)
        if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
            # Only the last prompt position matters: project just those rows, never (B, T, V).
            # (The softcap is monotonic, so skipping it leaves the argmax unchanged.)
            final = model.hidden_states(batch)[rows, last] @ model.lm_head.weight.t()  # (B, V)
        else:
            final = model(batch)[rows, last]  # (B, V)
        for conv, row in zip(conversations, final):
            letters = conv.get("letters")
            if not letters:
                raise ValueError(f"{task.name}: categorical evaluation needs 'letters' on each conversation")
            ids = torch.tensor(_letter_ids(tokenizer, letters), device=device)
            predicted = letters[int(torch.argmax(row[ids]))]
            correct += int(task.evaluate(conv, predicted))
            total += 1
    correct, total = _sum_across_ranks([correct, total], device)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


@torch.inference_mode()
def run_generative_eval(model, tokenizer, task, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None,
                        engine: Engine | None = None, seed: int = 42) -> dict:
    """pass@num_samples: a problem counts when any sample's reply passes task.evaluate."""
    engine = engine or Engine(model, tokenizer)
    device = next(model.parameters()).device
    correct = total = 0
    for i in _problem_indices(task, max_problems):
        conv = task[i]
        prompt = list(tokenizer.render_for_completion(conv))
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + i)
        replies = [tokenizer.decode(r[len(prompt):]) for r in results]
        correct += int(any(task.evaluate(conv, reply) for reply in replies))
        total += 1
    correct, total = _sum_across_ranks([correct, total], device)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def evaluate_task(model, tokenizer, task, batch_size: int = 8, max_problems: int | None = None, **generative) -> dict:
    """Dispatch on task.eval_type; adds the task name and the seconds it took."""
    t0 = time.perf_counter()
    if task.eval_type == "categorical":
        out = run_categorical_eval(model, tokenizer, task, batch_size=batch_size, max_problems=max_problems)
    elif task.eval_type == "generative":
        out = run_generative_eval(model, tokenizer, task, max_problems=max_problems, **generative)
    else:
        raise ValueError(f"{task.name}: unknown eval_type {task.eval_type!r}")
    return dict(out, task=task.name, eval_type=task.eval_type, seconds=round(time.perf_counter() - t0, 3))


def centered_accuracy(name: str, accuracy: float) -> float:
    if name not in BASELINES:
        raise ValueError(f"no chance baseline known for task {name!r}; known: {sorted(BASELINES)}")
    baseline = BASELINES[name]
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean over tasks of accuracy centred on chance: 0 = chance, 1 = perfect."""
    if not accuracies:
        raise ValueError("chatcore needs at least one task accuracy")
    return sum(centered_accuracy(n, a) for n, a in accuracies.items()) / len(accuracies)
