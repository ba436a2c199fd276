"""Optimizers and learning-rate schedules for the trainer.

    from sftfast.optim import build_optimizers, lr_multiplier
    optimizers = build_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                                  weight_decay=0.0, init_lr_frac=0.02)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(step, num_iterations, "linear")

nanochat's split: AdamW for the token embedding (embedding_lr) and the lm_head (unembedding_lr),
their lrs scaled by 1/sqrt(d_model/768) as nanochat tuned them at width 768; Muon (SGD-momentum
whose update is orthogonalised by a Newton-Schulz iteration) for every transformer matrix
(matrix_lr). Every group starts at `lr * init_lr_frac`, kept as `group["initial_lr"]`; the
schedule multiplies that.

Distributed: gradients are all-reduced by the trainer before `step()` (so AdamW runs replicated,
identically on every rank). Muon's Newton-Schulz work, the expensive part, is split: parameter i of
a shape group is owned by rank i % world; the owner keeps its momentum buffer, computes the update
and broadcasts the new weights. Muon's optimizer state therefore differs per rank, which is why
checkpoints hold one `optim_{step}_rank{r}.pt` per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): maximise the slope at zero so that 5
# steps push all singular values into roughly [0.7, 1.2]; exact orthogonality is not needed.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int = 5) -> Tensor:
    """Approximate U V^T of G = U S V^T. bf16 on CUDA (stable there, and fast); fp32 on CPU where
    bf16 matmuls are slow and we want bitwise-reproducible runs."""
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X^T is then the smaller square
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D matrices only.

    update = NS(nesterov(momentum(grad))) * max(1, rows/cols) ** 0.5; p -= lr * update.
    With world_size > 1 each parameter's update is computed by its owner rank and broadcast.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, rank=0, world_size=1):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        # one group per shape, sorted so that every rank assigns ownership identically
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, defaults)
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        handles = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                owner = i % self.world_size
                if owner == self.rank:
                    if p.grad is None:
                        raise RuntimeError(f"Muon: parameter of shape {tuple(p.shape)} has no gradient")
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                    g = newton_schulz(g, group["ns_steps"])
                    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    p.add_(g.to(p.dtype), alpha=-group["lr"] * scale)
                if self.world_size > 1:
                    handles.append(dist.broadcast(p, src=owner, async_op=True))
        for h in handles:
            h.wait()


def build_optimizers(
    model,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    init_lr_frac: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
):
    """[AdamW(lm_head, embedding), Muon(matrices)] with `initial_lr` set on every group."""
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    n_all = len(list(model.parameters()))
    if n_all != len(matrix_params) + len(embedding_params) + len(lm_head_params):
        raise ValueError("model has parameters outside transformer.h / transformer.wte / lm_head")
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale, name="lm_head"),
        dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale, name="embedding"),
    ]
    fused = model.get_device().type == "cuda"
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=fused)
    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, rank=rank, world_size=world_size)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * init_lr_frac
            group["initial_lr"] = group["lr"]
    return optimizers


SCHEDULES = ("linear", "wsd")


def lr_multiplier(step: float, num_iterations: int, schedule: str = "linear", warmup_ratio: float = 0.0,
                  warmdown_ratio: float = 0.5, final_lr_frac: float = 0.0) -> float:
    """Learning-rate multiplier at `step` of `num_iterations` (step may be fractional: the trainer
    passes progress * num_iterations when it schedules by epoch consumption).

    linear: the seed's `1 - step / num_iterations`.
    wsd: nanochat's warmup / constant / warmdown by progress: linear warmup over the first
    warmup_ratio, constant 1, then linear decay to final_lr_frac over the last warmdown_ratio.
    """
    if num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    if schedule == "linear":
        return 1.0 - step / num_iterations
    if schedule == "wsd":
        warmup = round(warmup_ratio * num_iterations)
        warmdown = round(warmdown_ratio * num_iterations)
        if step < warmup:
            # a fractional step (consumption) in the last warmup step must not pass 1
            return min(1.0, (step + 1) / warmup)
        if step <= num_iterations - warmdown:
            return 1.0
        progress = (num_iterations - step) / warmdown
        return progress * 1.0 + (1 - progress) * final_lr_frac
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
