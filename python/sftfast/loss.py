"""The training loss: masked cross-entropy of `hidden @ weight.T`, without the full logits.

    from sftfast.loss import fused_linear_cross_entropy
    loss = fused_linear_cross_entropy(hidden, lm_head.weight, targets, ignore_index=-1,
                                      softcap=15.0, reduction="mean")
    loss.backward()

hidden (N, D) (or (..., D) with targets (...)), weight (V, D), targets int32/int64.
Three implementations compute the same function:
- "triton"  (sftfast/kernels/fused_linear_ce.py): blockwise Triton kernels; CUDA (or CPU under
            TRITON_INTERPRET=1 for tests).
- "chunked" plain PyTorch, one chunk of rows' logits at a time; the CPU path and fallback.
- "eager"   the reference: full fp32 logits and F.cross_entropy. Tests compare against it.
"auto" is Triton on CUDA and chunked elsewhere.

Semantics shared by all three: "mean" divides by the number of non-ignored targets, "sum" does
not (for token-normalised gradient accumulation: sum per micro-batch, divide by the step's
token count). If every target is ignored the loss is 0 and the gradients are 0, never NaN. A
target outside [0, V) that is not ignore_index raises ValueError naming its index. The loss is
an fp32 scalar; gradients come back in the dtypes of hidden and weight. Autocast is switched
off inside (the maths runs in the inputs' dtype with fp32 accumulation, as written, rather than
with bf16 logits); the caller casts hidden and weight to the dtype it wants. First-order only:
a backward with create_graph=True (e.g. a gradient penalty) raises rather than return a
gradient that autograd cannot differentiate.

Benchmark: python -m sftfast.bench loss --json
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch
import torch.nn.functional as F

IMPLS = ("auto", "triton", "chunked", "eager")
REDUCTIONS = ("mean", "sum")

# Budget for the chunked path's per-chunk buffers (rows x V x 4 bytes each; one buffer, two with
# the softcap). 128 MiB: 512 rows at V = 65536. Smaller chunks cost speed on CPU because each
# chunk's dW update reads and writes the whole V x D fp32 accumulator (Liger's weakness).
CHUNK_BYTES = 128 * 1024 * 1024


def autocast_off(device_type: str):
    """A context with autocast disabled for `device_type` (a no-op when it is not enabled).
    The loss's GEMMs must keep their dtypes: under autocast the chunked path's fp32 logits GEMM
    would run in bf16 and then fail to write into its fp32 gradient buffers."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def refuse_double_backward(name: str) -> None:
    """Called first in a backward: with create_graph=True autograd would accept our gradients
    (computed by kernels and in-place ops) as constants, and a gradient penalty built on them
    would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{name}: double backward (create_graph=True) is not supported; use impl='eager' to "
            "differentiate through the gradient"
        )


def _triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# validation (one place, shared by every implementation)


def _check_args(hidden, weight, targets, ignore_index, softcap, reduction, impl):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be torch.Tensor")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, D), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must equal weight's D={weight.shape[1]}, got shape {tuple(hidden.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
            "must be on one device"
        )
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)):
        raise TypeError(f"softcap must be None or a number, got {type(softcap).__name__} {softcap!r}")
    if softcap is not None and not (float(softcap) > 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def _check_targets(targets, V, ignore_index):
    """Raise ValueError for the first target outside [0, V) that is not ignore_index (one sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is outside [0, V={V}) and is not ignore_index={ignore_index}"
        )


# ----------------------------------------------------------------------------------------------
# eager reference


def eager_linear_cross_entropy(hidden, weight, targets, ignore_index=-1, softcap=None, reduction="mean"):
    """Reference: full fp32 logits (N, V), F.cross_entropy. Memory N x V x 4 bytes (and more)."""
    logits = hidden.float() @ weight.float().t()  # (N, V) fp32
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return total / n_valid


# ----------------------------------------------------------------------------------------------
# chunked PyTorch path


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """One chunk of rows' fp32 logits at a time; dH and dW computed in forward (Liger's order).

    Why gradients in forward rather than recomputing in backward: backward would redo the
    logits GEMM (8 N D V FLOPs instead of 6), and on CPU that GEMM is the whole cost. The price
    is holding dH (n, D) and dW (V, D) fp32 from forward to backward, which backward needs
    anyway. When no input needs a gradient only the loss is computed (2 N D V).

    Memory above inputs: rows x V x 4 bytes per buffer (rows = CHUNK_BYTES / (V x 4)), one
    buffer, two with the softcap; + dW fp32 (V x D x 4) + dH fp32 (n x D x 4).

    apply(hidden (N, D), weight (V, D), targets (N,), ignore_index, softcap, reduction, need_dh,
    need_dw) -> fp32 scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, softcap, reduction, need_dh, need_dw):
        N, D = hidden.shape
        V = weight.shape[0]
        valid_idx = torch.nonzero(targets != ignore_index).squeeze(1)
        n = valid_idx.numel()
        h = hidden if n == N else hidden.index_select(0, valid_idx)
        tgt = (targets if n == N else targets.index_select(0, valid_idx)).long()
        w32 = weight.float()  # no copy for fp32 weights
        dh32 = torch.empty((n, D), dtype=torch.float32, device=hidden.device) if need_dh else None
        dw32 = torch.zeros((V, D), dtype=torch.float32, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, CHUNK_BYTES // (max(V, 1) * 4))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            h_c = h[r0:r1].float()  # (r, D)
            t_c = tgt[r0:r1]
            z = h_c @ w32.t()  # (r, V) fp32: the only logits-sized buffer
            if softcap:
                z.div_(softcap).tanh_()
                chain = (1.0 - z * z) if (need_dh or need_dw) else None  # d capped / d raw
                z.mul_(softcap)
            tlogit = z.gather(1, t_c[:, None]).squeeze(1)
            zmax = z.amax(dim=1, keepdim=True)
            z.sub_(zmax).exp_()  # z <- exp(z - max), in place
            sumexp = z.sum(dim=1, keepdim=True)
            lse = zmax.squeeze(1) + sumexp.squeeze(1).log()
            total += (lse - tlogit).sum()
            if need_dh or need_dw:
                z.div_(sumexp)  # softmax
                z[torch.arange(r1 - r0, device=z.device), t_c] -= 1.0
                if softcap:
                    z.mul_(chain)
                if need_dh:
                    torch.mm(z, w32, out=dh32[r0:r1])
                if need_dw:
                    dw32.addmm_(z.t(), h_c)
            del z
        denom = float(max(n, 1)) if reduction == "mean" else 1.0
        ctx.save_for_backward(dh32, dw32, valid_idx)
        ctx.N, ctx.n, ctx.denom = N, n, denom
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("fused_linear_cross_entropy(impl='chunked')")
        dh32, dw32, valid_idx = ctx.saved_tensors
        scale = grad_out.to(torch.float32) / ctx.denom
        dhidden = dweight = None
        if ctx.needs_input_grad[0] and dh32 is not None:
            dh = (dh32 * scale).to(ctx.dtypes[0])
            if ctx.n == ctx.N:
                dhidden = dh
            else:
                dhidden = torch.zeros((ctx.N, dh32.shape[1]), dtype=ctx.dtypes[0], device=dh32.device)
                dhidden.index_copy_(0, valid_idx, dh)
        if ctx.needs_input_grad[1] and dw32 is not None:
            dweight = (dw32 * scale).to(ctx.dtypes[1])
        return dhidden, dweight, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public entry point


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -1,
    softcap: float | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight.T) against targets, skipping ignore_index; fp32 scalar."""
    _check_args(hidden, weight, targets, ignore_index, softcap, reduction, impl)
    softcap = float(softcap) if softcap is not None else None
    ignore_index = int(ignore_index)
    h2 = hidden.reshape(targets.numel(), hidden.shape[-1])  # not (-1, D): D may be 0
    t1 = targets.reshape(-1).contiguous()  # the kernels index targets as a dense vector
    if t1.dtype == torch.int32 and not -(2**31) <= ignore_index < 2**31:
        # no int32 target can equal it; comparing in int32 would wrap it (2**32 - 1 -> -1)
        t1 = t1.long()
    _check_targets(t1, weight.shape[0], ignore_index)
    with autocast_off(hidden.device.type):
        return _dispatch(h2, weight, t1, ignore_index, softcap, reduction, impl)


def _dispatch(hidden, weight, targets, ignore_index, softcap, reduction, impl):
    """Runs the chosen implementation on validated (N, D) hidden and dense (N,) targets."""
    if impl == "auto":
        impl = "triton" if hidden.device.type == "cuda" and _triton_available(hidden.device) else "chunked"
    if impl == "eager":
        return eager_linear_cross_entropy(hidden, weight, targets, ignore_index, softcap, reduction)
    if impl == "triton":
        if not _triton_available(hidden.device):
            raise RuntimeError(
                f"impl='triton' needs a CUDA tensor with triton installed (or TRITON_INTERPRET=1 on CPU); "
                f"got a {hidden.device.type} tensor. Use impl='chunked' or 'auto'."
            )
        from sftfast.kernels.fused_linear_ce import FusedLinearCrossEntropy

        return FusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap, reduction)
    grad = torch.is_grad_enabled()
    need_dh = grad and hidden.requires_grad
    need_dw = grad and weight.requires_grad
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap, reduction, need_dh, need_dw)
