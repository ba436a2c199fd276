"""Fused linear + cross-entropy in Triton: the loss of `hidden @ weight.T` without the logits.

    from sftfast.kernels.fused_linear_ce import FusedLinearCrossEntropy
    loss = FusedLinearCrossEntropy.apply(hidden, weight, targets, -1, None, "mean")

Users call `sftfast.loss.fused_linear_cross_entropy(..., impl="triton")`, which validates
arguments first; this module assumes valid input. On CPU the kernels run only under
`TRITON_INTERPRET=1` (the tests do that at small shapes).

Maths, per valid row i (target t_i != ignore_index), z = h_i W^T (optionally z <- c tanh(z / c)):
    loss_i = logsumexp(z) - z[t_i]
    dloss_i / dz = softmax(z) - onehot(t_i)             (times 1 - tanh^2 with the softcap)
    dH = dZ @ W,  dW = dZ^T @ H

Forward (`_lse_fwd_kernel`): the grid is (row blocks) x (vocabulary splits). A program walks its
split tile by tile (BLOCK_M x BLOCK_V logits, each a tl.dot over D in BLOCK_K steps with fp32
accumulation), keeps a running max and sum of exponentials in fp32 and picks up the target logit
when its column passes by. Each split writes (max, sumexp, target logit) per row: 3 x 4 bytes x
splits x rows, a few MB. torch combines the splits into the log-sum-exp. Nothing N x V is stored.

Backward: the vocabulary is cut into chunks of C columns. For each chunk `_dlogits_kernel`
recomputes the logits tile by tile, turns them into dZ with the saved log-sum-exp and writes
dZ (rows x C, input dtype) into scratch space; then two cuBLAS GEMMs consume it:
    dH       += dZ @ W[chunk] into an fp32 (rows, D) accumulator
    dW[chunk] = dZ^T @ H     one GEMM reducing over all rows with fp32 accumulation, written once
dH's accumulator and most dZ chunks live in dW's own not-yet-written rows (the accumulator's
rows get their logits computed twice); a half-size buffer serves the other chunks. Memory
above inputs and gradients: that buffer (lce_backward).

Performance notes (what was weighed; measured numbers live in docs/BENCHMARKS.md):
- dW strategy. CCE adds each (row block, vocab block) tile's dZ^T H into dW under a spin lock
  (read-modify-write in the gradient's dtype): N / BLOCK_M rounded updates per dW element
  (64 at N = 8192), affordable when its filtering skips most tiles. Liger accumulates dW
  with addmm over row chunks of ~256 rows, so the whole V x D dW is read and written N / 256
  times. Per-vocabulary-chunk GEMMs touch every dW element exactly once, need no fp32 dW
  buffer (the GEMM accumulates in fp32 in registers over all N), are deterministic and run at
  cuBLAS speed. The price is scratch space for dZ (mostly dW's own unwritten rows) and
  recomputing the logits (the backward costs 6 N D V FLOPs, forward 2 N D V).
- Splits in forward instead of one program per row block: N / BLOCK_M row blocks alone
  (64 at N = 8192) cannot fill 132 SMs; splits give ~8 programs per SM. Programs are grouped
  GROUP_M row blocks at a time so that concurrently running programs share W tiles in L2
  while their H blocks (GROUP_M x BLOCK_M x D x 2 bytes) also stay in L2.
- Ignored rows are compacted away (index_select) before any kernel runs, so masked tokens
  cost nothing. That needs a host sync (torch.nonzero sizes the compacted rows). sftfast.loss
  syncs just before it anyway to validate the targets (a bad target raises a ValueError naming
  its index instead of a device assert), so the nonzero finds the queue drained: one real
  sync per call. Liger syncs too (`.item()` on the non-ignored count), and so does CCE
  (`nonzero()` in `_build_flat_valids`). Backward needs no sync: the upstream gradient and
  1 / n_valid reach the kernel as a device scalar.
- Measured on H200 (docs/BENCHMARKS.md): 128 x 256 tiles beat 128 x 128 by 8-16%; 4 stages,
  256 x 128, BLOCK_K 128 and GROUP_M 8 were no better. Forward runs at ~450 TFLOP/s (2 N D V),
  so with 8 N D V in all the fused loss is ~0.8-1.2x eager with nothing ignored and 1.5-2.4x
  with half the targets ignored. Not tried yet: TMA descriptors / persistent kernels for the
  two matmul kernels, and CCE-style skipping of negligible dZ tiles.
- tanh is written with exp and, near 0, its Taylor series (`libdevice.tanh` fails in the
  interpreter); program ids are cast to int64 before pointer arithmetic (N x V overflows int32).
- fp16 only: the part of the backward scale above 2^15 (reduction="sum" under a GradScaler)
  is applied after the GEMMs, so dZ stays within fp16's range.
- Under the interpreter bf16/fp16 tiles are upcast to fp32 before tl.dot (bf16 arithmetic
  and tl.dot are unreliable there); on GPU they go to the tensor cores as they are.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Size of a dZ chunk in backward (rows x C x element size). 64 MiB keeps the GEMMs it feeds
# (K = rows for dW, K = C for dH) large enough to run at full cuBLAS speed (32 MiB was 5-9%
# slower on H200). Most chunks live in dW's unwritten rows; the buffer of its own that the last
# chunks need is half of this (lce_backward).
CHUNK_BYTES = int(os.environ.get("SFTFAST_LCE_CHUNK_MB", "64")) * 1024 * 1024
# Keep dH's fp32 accumulator inside dW's last rows (lce_backward): CCE's memory at the price of
# computing ~2n vocabulary columns' logits twice. SFTFAST_LCE_DH_IN_DW=0 turns it off.
DH_IN_DW = os.environ.get("SFTFAST_LCE_DH_IN_DW", "1") != "0"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _tanh(x):
    """tanh without libdevice (its tanh fails under TRITON_INTERPRET).

    The exp form saturates cleanly to +-1 but has an absolute error of ~1e-7, a large relative
    one near 0; a large softcap c makes z / c small, so c * tanh(z / c) was off by ~1e-7 c
    (c = 1e10 collapsed every logit to 0). Below |x| = 0.25 the Taylor series to x^11 is used
    instead (truncation < 3e-10 relative).
    """
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    return tl.where(tl.abs(x) < 0.25, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows, cols, n_rows, n_cols, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_V) fp32 tile of H[rows] @ W[cols]^T; rows and cols are int64."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    h_ptrs = h_ptr + rows[:, None] * stride_hn + rk[None, :] * stride_hd
    w_ptrs = w_ptr + cols[:, None] * stride_wv + rk[None, :] * stride_wd
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk) < D
            h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
    return acc


@triton.jit
def _grouped_pid(num_m, num_cols, GROUP_M: tl.constexpr):
    """(row block, column block) of this program in grouped order: GROUP_M row blocks x all
    column blocks per group, row block fastest, so programs running at the same time read the
    same W tiles (see module docstring). Program ids as int64 for the pointer arithmetic."""
    pid = tl.program_id(0).to(tl.int64)
    per_group = GROUP_M * num_cols
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _lse_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, max_ptr, sum_ptr, tlogit_ptr,
    n_rows, V, D, num_splits, tiles_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_s = _grouped_pid(tl.cdiv(n_rows, BLOCK_M), num_splits, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)

    # -1e30 rather than -inf: a split made only of padding columns must give (m, s) = (-1e30, 0),
    # not exp(-inf - -inf) = NaN.
    m_run = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    s_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_tile = pid_s * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits_tile(
            h_ptr, w_ptr, rows, cols, n_rows, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
            BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION,
        )
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_run = m_new
        t_run += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = pid_s * n_rows + rows
    tl.store(max_ptr + out, m_run, mask=row_ok)
    tl.store(sum_ptr + out, s_run, mask=row_ok)
    tl.store(tlogit_ptr + out, t_run, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, scale_ptr, out_ptr,
    n_rows, n_cols, D, col_offset,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_on,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dZ for the vocabulary chunk [col_offset, col_offset + n_cols); w_ptr points at its first row."""
    pid_m, pid_v = _grouped_pid(tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_V), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    z = _logits_tile(
        h_ptr, w_ptr, rows, cols, n_rows, n_cols, D, stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_M, BLOCK_V, BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION,
    )
    if HAS_SOFTCAP:
        th = _tanh(z / softcap)
        z = softcap * th
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - col_offset
    g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    g = g * tl.load(scale_ptr)
    out_ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launch configuration


def kernel_config(device: torch.device, dtype: torch.dtype, D: int) -> dict:
    """Block sizes by device and dtype.

    Hopper, bf16/fp16: 128 x 256 logits tiles with BLOCK_K = 64 over 8 warps (two warpgroups
    of wgmma); the fp32 accumulator is 128 x 256 x 4 = 128 KB of registers (128 per thread)
    and 3 pipeline stages of (128 + 256) x 64 x 2 = 48 KB of operands fit shared memory.
    Measured on H200 (docs/BENCHMARKS.md): 128 x 256 beat 128 x 128 by 8-13% end to end on all
    three benchmark shapes; 4 warps or 64-row tiles were slower; GROUP_M 8 vs 16 made no
    difference. fp32 inputs halve BLOCK_K to keep the stages in shared
    memory. The interpreter gets small tiles: it runs numpy per program.
    """
    if device.type != "cuda":
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, GROUP_M=16, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_V=256, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        # follow torch's own fp32 matmul setting (tf32 only when the user enabled it)
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # Triton's default; only fp32 operands look at it


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# plain forward / backward on compacted rows (every target valid and in [0, V))


def lse_forward(h, weight, targets, softcap=None, config=None):
    """Per-row (logsumexp, target logit), fp32, of (h @ weight.T) with the optional softcap.

    h (n, D) and targets (n,) hold only valid rows; weight (V, D) may be non-contiguous.
    """
    n, D = h.shape
    V = weight.shape[0]
    cfg = dict(config or kernel_config(h.device, h.dtype, D))
    BM, BV = cfg["BLOCK_M"], cfg["BLOCK_V"]
    num_m = triton.cdiv(n, BM)
    num_tiles = triton.cdiv(V, BV)
    # ~8 programs per SM over the whole grid; at least 2 vocabulary tiles per program so the
    # pipeline's prologue amortises.
    splits = max(1, min(triton.cdiv(num_tiles, 2), triton.cdiv(8 * _num_sms(h.device), num_m)))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    part = torch.empty((3, splits, n), device=h.device, dtype=torch.float32)
    grid = (num_m * splits,)
    _lse_fwd_kernel[grid](
        h, weight, targets, part[0], part[1], part[2],
        n, V, D, splits, tiles_per_split,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
        float(softcap) if softcap else 1.0,
        **_launch_options(cfg, h.dtype, D, softcap),
    )
    m, s, t = part[0], part[1], part[2]  # (splits, n) each
    m_max = m.max(dim=0).values
    lse = m_max + torch.log((s * torch.exp(m - m_max)).sum(dim=0))
    return lse, t.sum(dim=0)


def _launch_options(cfg, dtype, D, softcap) -> dict:
    """The compile-time options and launch sizes both kernels take from a tile config."""
    return dict(
        HAS_SOFTCAP=bool(softcap),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=D % cfg["BLOCK_K"] == 0,
        UPCAST=_interpreting() or dtype == torch.float32,
        DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def dlogits_chunk(h, w_chunk, targets, lse, scale, col_offset, out, softcap=None, config=None):
    """Write dZ for the vocabulary columns [col_offset, col_offset + len(w_chunk)) into out."""
    n, D = h.shape
    C = w_chunk.shape[0]
    cfg = dict(config or kernel_config(h.device, h.dtype, D))
    BM, BV = cfg["BLOCK_M"], cfg["BLOCK_V"]
    grid = (triton.cdiv(n, BM) * triton.cdiv(C, BV),)
    _dlogits_kernel[grid](
        h, w_chunk, targets, lse, scale, out,
        n, C, D, col_offset,
        h.stride(0), h.stride(1), w_chunk.stride(0), w_chunk.stride(1), out.stride(0),
        float(softcap) if softcap else 1.0,
        **_launch_options(cfg, h.dtype, D, softcap),
    )
    return out


def chunk_columns(n: int, V: int, itemsize: int, block_v: int, budget: int | None = None) -> int:
    """Vocabulary columns per backward chunk: budget (CHUNK_BYTES) / (rows x itemsize), a
    multiple of block_v."""
    cols = (CHUNK_BYTES if budget is None else budget) // max(1, n * itemsize)
    cols = max(block_v, (cols // block_v) * block_v)
    return min(cols, triton.cdiv(V, block_v) * block_v)


def _backward_chunks(n, V, D, itemsize, block_v, carve):
    """[(v0, v1, carved)]: the backward's vocabulary chunks, and whether each one's dZ lives in
    the rows of dW that are still unwritten (see lce_backward).

    dZ for the chunk [v0, v1) fits in dW[v1:] when (V - v1) x D >= n x (v1 - v0), i.e. for
    chunks up to (V - v0) x D / (n + D) columns. Chunks are CHUNK_BYTES wide while that fits,
    then shrink, but never below half of it (smaller GEMMs run slower: 32 MiB chunks instead
    of 64 cost 5-9% on H200); past that point the rest is done in half-size chunks from a
    buffer of their own. Without carving, every chunk is CHUNK_BYTES wide in its own buffer.
    """
    full = chunk_columns(n, V, itemsize, block_v)
    if not carve:
        return [(v0, min(V, v0 + full), False) for v0 in range(0, V, full)]
    half = chunk_columns(n, V, itemsize, block_v, CHUNK_BYTES // 2)
    chunks, v0 = [], 0
    while v0 < V:
        fit = (V - v0) * D // (n + D) // block_v * block_v
        carved = fit >= half
        v1 = v0 + min(full, fit) if carved else min(V, v0 + half)
        chunks.append((v0, v1, carved))
        v0 = v1
    return chunks


def _dh_in_dw_split(n, V, D, itemsize) -> tuple[int, int] | None:
    """Where dH's fp32 accumulator can live in dW's storage: (the first vocabulary row of the
    final region it overlaps, its first element in dW), or None when that region would exceed
    a quarter of the vocabulary (its logits are computed twice: see lce_backward)."""
    if not DH_IN_DW or itemsize != 2 or n == 0 or D == 0:
        return None
    start = (V * D - 2 * n * D) // 8 * 8  # the last 2 n D elements, 16-byte aligned for the fp32 view
    if start < 0 or 4 * (V - start // D) > V:
        return None
    return start // D, start


def lce_backward(h, weight, targets, lse, scale, softcap=None, need_dh=True, need_dw=True, config=None):
    """(dH (n, D) in h's dtype, dW (V, D) in weight's dtype) for compacted rows.

    scale: 0-d fp32 tensor on h's device (upstream grad / normaliser), read inside the kernel
    so that backward needs no host sync.

    Memory. Besides the gradients there are dH's fp32 accumulator (n x D x 4) and the dZ scratch,
    and converting the finished accumulator to the half dtype needs both at once: dW + 6 n D
    bytes, ~1.24x Cut Cross-Entropy's memory at N=16384, D=2048, V=131072 (CCE keeps no fp32
    accumulator: it rounds every partial sum into bf16). dW is written one vocabulary chunk at a
    time, in order, so its rows past the current chunk are free space, used twice:
    - the accumulator lives in dW's last ~2n rows (half dtypes, both gradients wanted, when
      those rows are at most a quarter of the vocabulary: DH_IN_DW). The vocabulary before
      them is done first; then the final region's chunks add their dH; the accumulator is
      converted into dH; then the final region's logits are recomputed for its dW rows. Extra
      work: 2 n D x 2n FLOPs, n / 2V of the total (3-6% at the issue's shapes);
    - each chunk's dZ is stored in dW's rows between the chunk and the accumulator while they
      are large enough (consumed before those rows are written); the rest of the chunks use a
      buffer of their own, CHUNK_BYTES / 2.
    Peak: dW + n x D x 2 + CHUNK_BYTES / 2, the gradients plus the buffer, where a separate
    accumulator and buffer gave dW + n x D x 4 + max(n x D x 2, CHUNK_BYTES). Counted on CPU by
    scripts/loss_memory_accounting.py; the GPU run measures it.
    """
    n, D = h.shape
    V = weight.shape[0]
    cfg = dict(config or kernel_config(h.device, h.dtype, D))
    post = None
    if h.dtype == torch.float16:
        # dZ is stored in fp16 times the scale: with reduction="sum" and a GradScaler's 65536
        # the target column's -1 x 65536 overflows (fp16 max 65504) although the gradients fit.
        # |softmax - onehot| <= 1, so the part of |scale| above 2^15 is taken out as a power of
        # two (exact) and applied to the GEMM outputs instead; a smaller scale is left whole,
        # as it keeps dZ's small entries out of fp16's subnormals (what a GradScaler is for).
        # bf16 has fp32's range and needs none of this.
        post = torch.exp2((torch.ceil(torch.log2(scale.abs())) - 15).clamp_min(0))
        scale = scale / post
    dw = torch.empty((V, D), device=weight.device, dtype=weight.dtype) if need_dw else None
    same_dtype = need_dw and weight.dtype == h.dtype
    split = _dh_in_dw_split(n, V, D, h.element_size()) if same_dtype and need_dh else None
    if split is None:  # the accumulator on its own; chunks over the whole vocabulary
        main_end, dh32 = V, torch.zeros((n, D), device=h.device, dtype=torch.float32) if need_dh else None
    else:
        main_end, start = split
        dh32 = dw.view(-1)[start:start + 2 * n * D].view(torch.float32).view(n, D).zero_()
    chunks = _backward_chunks(n, main_end, D, h.element_size(), cfg["BLOCK_V"], same_dtype)
    half = chunk_columns(n, V, h.element_size(), cfg["BLOCK_V"], CHUNK_BYTES // 2)
    final = [(v0, min(V, v0 + half)) for v0 in range(main_end, V, half)]
    own_cols = max([v1 - v0 for v0, v1, carved in chunks if not carved] + [v1 - v0 for v0, v1 in final], default=0)
    own = torch.empty((n, own_cols), device=h.device, dtype=h.dtype) if own_cols else None

    def dz_of(v0, v1, carved):
        C = v1 - v0
        # carved: in dW's rows from v1 on, written only by later chunks, after this one's use
        dz_c = dw.view(-1)[v1 * D: v1 * D + n * C].view(n, C) if carved else own[:, :C]
        return dlogits_chunk(h, weight[v0:v1], targets, lse, scale, v0, dz_c, softcap, cfg)

    def write_dw(v0, v1, dz_c):
        # one GEMM over all rows: fp32 accumulation inside cuBLAS, each dW element written once
        torch.mm(dz_c.t(), h, out=dw[v0:v1])
        if post is not None:
            dw[v0:v1].mul_(post)

    for v0, v1, carved in chunks:
        dz_c = dz_of(v0, v1, carved)
        if need_dh:
            _accumulate_fp32(dh32, dz_c, weight[v0:v1])
        if need_dw:
            write_dw(v0, v1, dz_c)
    for v0, v1 in final:  # dH only: these dW rows hold the accumulator
        _accumulate_fp32(dh32, dz_of(v0, v1, False), weight[v0:v1])
    dh = None
    if need_dh:
        if post is not None:
            dh32.mul_(post)
        dh = dh32 if h.dtype == torch.float32 else dh32.to(h.dtype)
        del dh32
    for v0, v1 in final:  # the accumulator is dH now: recompute dZ for these rows of dW
        write_dw(v0, v1, dz_of(v0, v1, False))
    return dh, dw


_FP32_ADDMM_OK = None  # whether this torch has CUDA addmm with out_dtype=float32 (checked once)


def _accumulate_fp32(acc32, a, b):
    """acc32 += a @ b, with acc32 fp32 and a, b possibly in a half dtype.

    cuBLAS takes the fp32 accumulator as its C operand (torch >= 2.8: addmm(out_dtype=)), so
    no rows x D temporary exists. Without it the product is materialised in a's dtype and
    added: an extra rows x D x 2 bytes at the memory peak and a round trip through memory per
    chunk. H200 runs (docs/BENCHMARKS.md): 59.9 ms with addmm vs 60.6 ms without at N=8192,
    D=4096, V=128256 (two separate machines, so within noise: the point is the memory), and
    the CUDA tests gave the same errors either way (fp16 dH 1.022e-2 vs 1.0245e-2 without).
    """
    global _FP32_ADDMM_OK
    if a.dtype != torch.float32 and a.is_cuda and _FP32_ADDMM_OK is not False:
        try:
            torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
            _FP32_ADDMM_OK = True
            return
        except (RuntimeError, TypeError):
            if _FP32_ADDMM_OK:
                raise
            _FP32_ADDMM_OK = False  # older torch: no fp32-output addmm for half inputs
    acc32.add_(a @ b)


# ----------------------------------------------------------------------------------------------
# autograd


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper. Inputs must already be validated (sftfast.loss does that).

    apply(hidden (N, D), weight (V, D), targets (N,), ignore_index, softcap, reduction)
    -> fp32 scalar loss; gradients come back in hidden's and weight's dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, softcap, reduction):
        N, D = hidden.shape
        # One host sync: the number of valid rows (compaction). Everything after is sync-free.
        valid_idx = torch.nonzero(targets != ignore_index).squeeze(1)
        n = valid_idx.numel()
        if n == N:
            h = hidden.contiguous()
            tgt = targets.contiguous()  # the kernels read targets at tgt_ptr + row
        else:
            h = hidden.index_select(0, valid_idx)  # (n, D) contiguous copy of the valid rows
            tgt = targets.index_select(0, valid_idx)
        denom = float(max(n, 1)) if reduction == "mean" else 1.0
        if n == 0:
            loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
            lse = torch.empty(0, device=hidden.device, dtype=torch.float32)
        else:
            lse, tlogit = lse_forward(h, weight, tgt, softcap)
            loss = (lse - tlogit).sum() / denom
        ctx.save_for_backward(h, weight, tgt, lse, valid_idx)
        ctx.N, ctx.n, ctx.denom, ctx.softcap = N, n, denom, softcap
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        from sftfast.loss import autocast_off, refuse_double_backward

        refuse_double_backward("fused_linear_cross_entropy(impl='triton')")
        with autocast_off(grad_out.device.type):
            return FusedLinearCrossEntropy._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        h, weight, tgt, lse, valid_idx = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, n = ctx.N, ctx.n
        D = weight.shape[1]
        dhidden = dweight = None
        if n == 0:
            if need_dh:
                dhidden = torch.zeros((N, D), device=h.device, dtype=ctx.hidden_dtype)
            if need_dw:
                dweight = torch.zeros_like(weight)
            return dhidden, dweight, None, None, None, None
        scale = (grad_out.detach().to(torch.float32) / ctx.denom).reshape(())
        dh, dw = lce_backward(h, weight, tgt, lse, scale, ctx.softcap, need_dh, need_dw)
        if need_dh:
            if n == N:
                dhidden = dh
            else:
                dhidden = torch.zeros((N, D), device=h.device, dtype=dh.dtype)
                dhidden.index_copy_(0, valid_idx, dh)
        return dhidden, dw if need_dw else None, None, None, None, None
