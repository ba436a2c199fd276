"""Tests for sftfast.loss: chunked, Triton (interpreted on CPU, native on CUDA) vs the eager fp32 reference.

    PYTHONPATH=python python -m pytest -q tests/test_loss.py

The Triton kernels run on CPU under TRITON_INTERPRET=1, which must be set before triton is
imported; `test_triton_kernels_in_subprocess` therefore re-runs this file's `interp_case` tests in
a child process with that variable set, so no other test module sees an interpreted triton.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sftfast import loss as loss_mod
from sftfast.loss import eager_linear_cross_entropy, fused_linear_cross_entropy

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

INTERP_CHILD = os.environ.get("SFTFAST_LOSS_INTERP_CHILD") == "1"
HAS_CUDA = torch.cuda.is_available()

# Relative error ||got - ref|| / ||ref|| allowed per input dtype (ref: fp32 maths on the same,
# already-rounded inputs). fp32 differs only by summation order; half types round dZ and the
# gradients to their 8 (bf16) or 11 (fp16) mantissa bits. fp16 also loses the smallest dZ
# entries: (softmax - onehot) / n_valid falls below fp16's normal range (6e-5) and even its
# smallest subnormal at realistic V and N, exactly as eager fp16's logits gradient does
# without a GradScaler (seen on H200: dH error 1.02e-2 at N=2048, D=512, V=50304, nothing
# ignored; under 1e-2 with half the rows ignored).
REL_TOL = {torch.float32: 1e-5, torch.float16: 1.5e-2, torch.bfloat16: 2.5e-2}
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def make_case(N, D, V, dtype, ignore_frac, seed=0, device="cpu", ignore_index=-1, target_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 2.0).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    drop = torch.rand(N, generator=g) < ignore_frac
    if ignore_frac >= 1.0:
        drop[:] = True
    targets[drop] = ignore_index
    return hidden.to(device), weight.to(device), targets.to(target_dtype).to(device)


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def run(impl, hidden, weight, targets, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets, impl=impl, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def reference(hidden, weight, targets, **kw):
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = eager_linear_cross_entropy(h, w, targets, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def check_against_reference(impl, hidden, weight, targets, dtype, **kw):
    loss, dh, dw = run(impl, hidden, weight, targets, **kw)
    rloss, rdh, rdw = reference(hidden, weight, targets, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert dh.shape == hidden.shape and dw.shape == weight.shape
    for t in (loss, dh, dw):
        assert torch.isfinite(t.float()).all()
    assert abs(float(loss) - float(rloss)) <= LOSS_TOL[dtype] * max(1.0, abs(float(rloss)))
    n_valid = int((targets != kw.get("ignore_index", -1)).sum())
    if n_valid == 0:
        assert float(loss) == 0.0
        assert not dh.any() and not dw.any()
    else:
        assert rel_err(dh.float(), rdh) <= REL_TOL[dtype], rel_err(dh.float(), rdh)
        assert rel_err(dw.float(), rdw) <= REL_TOL[dtype], rel_err(dw.float(), rdw)
        # rows whose target is ignored get exactly zero gradient
        ignored = targets == kw.get("ignore_index", -1)
        assert not dh[ignored].any()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(4 * 47, 31, 123), (64, 16, 1000), (1, 8, 5)]


# ----------------------------------------------------------------------------------------------
# chunked path (CPU, the default there)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_matches_eager(shape, dtype, ignore_frac, softcap, reduction):
    hidden, weight, targets = make_case(*shape, dtype, ignore_frac, seed=hash((shape, ignore_frac)) % 1000)
    check_against_reference("chunked", hidden, weight, targets, dtype, softcap=softcap, reduction=reduction)


def test_chunked_many_chunks(monkeypatch):
    # 4 rows per chunk: exercises the chunk loop and the dW accumulation across chunks
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * 123 * 4)
    hidden, weight, targets = make_case(4 * 47, 31, 123, torch.float32, 0.5, seed=3)
    check_against_reference("chunked", hidden, weight, targets, torch.float32, softcap=10.0)


def test_auto_on_cpu_is_chunked_and_matches():
    hidden, weight, targets = make_case(50, 12, 77, torch.float32, 0.3, seed=5)
    a = run("auto", hidden, weight, targets)
    b = run("chunked", hidden, weight, targets)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_sum_is_mean_times_count():
    hidden, weight, targets = make_case(40, 12, 50, torch.float32, 0.5, seed=7)
    n = int((targets != -1).sum())
    m = fused_linear_cross_entropy(hidden, weight, targets, reduction="mean", impl="chunked")
    s = fused_linear_cross_entropy(hidden, weight, targets, reduction="sum", impl="chunked")
    torch.testing.assert_close(s, m * n)


@pytest.mark.parametrize("impl", ["chunked", "eager"])
def test_all_ignored_is_zero_not_nan(impl):
    hidden, weight, targets = make_case(9, 8, 20, torch.bfloat16, 1.0)
    loss, dh, dw = run(impl, hidden, weight, targets)
    assert float(loss) == 0.0
    assert dh is not None and dw is not None
    assert not dh.any() and not dw.any()
    assert torch.isfinite(dh.float()).all() and torch.isfinite(dw.float()).all()


@pytest.mark.parametrize("impl", ["chunked", "eager"])
@pytest.mark.parametrize("bad", [123, 1000, -2])
def test_out_of_range_target_raises(impl, bad):
    hidden, weight, targets = make_case(10, 8, 123, torch.float32, 0.0)
    targets[6] = bad
    targets[8] = 5000  # the first bad one is named
    with pytest.raises(ValueError, match=r"targets\[6\] = " + str(bad)):
        fused_linear_cross_entropy(hidden, weight, targets, impl=impl)


def test_custom_ignore_index():
    hidden, weight, targets = make_case(30, 8, 40, torch.float32, 0.5, ignore_index=-100)
    check_against_reference("chunked", hidden, weight, targets, torch.float32, ignore_index=-100)
    # -1 is now an ordinary (invalid) target
    targets[0] = -1
    with pytest.raises(ValueError, match="ignore_index=-100"):
        fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100)


def test_non_contiguous_inputs_and_int32_targets():
    hidden, weight, targets = make_case(33, 24, 70, torch.float32, 0.4, target_dtype=torch.int32)
    h_nc = hidden.t().contiguous().t()  # column-major view
    w_big = torch.zeros(70, 48)
    w_big[:, ::2] = weight
    w_nc = w_big[:, ::2]  # strided columns
    t_big = torch.zeros(66, dtype=torch.int32)
    t_big[::2] = targets
    t_nc = t_big[::2]
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous() and not t_nc.is_contiguous()
    check_against_reference("chunked", h_nc, w_nc, t_nc, torch.float32)


def strided_targets(targets):
    """The same targets as a strided view (every other element of a larger buffer)."""
    big = torch.full((2 * targets.numel(),), 7, dtype=targets.dtype, device=targets.device)
    big[::2] = targets
    return big[::2]


def test_autocast_does_not_change_the_loss():
    """Under CPU autocast the chunked path (and the eager reference) keep fp32 logits and fp32
    gradient buffers: same loss and gradients as without autocast (before: the logits GEMM ran
    in bf16 and writing its product into the fp32 dH buffer raised). Forward under autocast,
    backward outside it, as PyTorch recommends; the chunked backward is also fine inside."""
    hidden, weight, targets = make_case(40, 16, 100, torch.float32, 0.3, seed=13)
    want = run("chunked", hidden, weight, targets, softcap=5.0)
    for impl, backward_inside in (("chunked", False), ("chunked", True), ("eager", False)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(h, w, targets, impl=impl, softcap=5.0)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        for got, ref in zip((loss.detach(), h.grad, w.grad), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def check_double_backward_is_refused(impl):
    """create_graph=True would silently treat our gradients as constants: refused, clearly."""
    hidden, weight, targets = make_case(12, 8, 20, torch.float32, 0.2)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets, impl=impl)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_double_backward_is_refused():
    check_double_backward_is_refused("chunked")


def test_empty_vocabulary_with_every_target_ignored():
    hidden, weight = torch.randn(5, 8), torch.empty(0, 8)
    targets = torch.full((5,), -1)
    for impl in ("chunked", "eager"):
        assert float(fused_linear_cross_entropy(hidden, weight, targets, impl=impl)) == 0.0


def test_ignore_index_outside_int32_with_int32_targets():
    """Comparing int32 targets with 2**32 - 1 wrapped it to -1, silently ignoring -1 targets."""
    hidden, weight, targets = make_case(6, 8, 10, torch.float32, 0.0, target_dtype=torch.int32)
    want = fused_linear_cross_entropy(hidden, weight, targets.long(), ignore_index=2**32 - 1)
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, ignore_index=2**32 - 1), want)
    targets[2] = -1
    with pytest.raises(ValueError, match=r"targets\[2\] = -1 .* ignore_index=4294967295"):
        fused_linear_cross_entropy(hidden, weight, targets, ignore_index=2**32 - 1)


def check_zero_width_hidden(impl):
    """D = 0: every logit is 0, so each valid row's loss is log V and the gradients are empty
    (the (-1, D) reshape used to fail on it)."""
    h = torch.zeros(5, 0, requires_grad=True)
    w = torch.zeros(7, 0, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, -1, 6]), impl=impl)
    loss.backward()
    assert abs(float(loss) - math.log(7)) < 1e-6
    assert h.grad.shape == (5, 0) and w.grad.shape == (7, 0)


@pytest.mark.parametrize("impl", ["chunked", "eager"])
def test_zero_width_hidden(impl):
    check_zero_width_hidden(impl)


def test_batched_hidden():
    hidden, weight, targets = make_case(24, 16, 30, torch.float32, 0.3)
    a = fused_linear_cross_entropy(hidden.view(4, 6, 16), weight, targets.view(4, 6), impl="chunked")
    b = fused_linear_cross_entropy(hidden, weight, targets, impl="chunked")
    torch.testing.assert_close(a, b)


def test_no_grad_gives_same_loss():
    hidden, weight, targets = make_case(30, 16, 64, torch.float32, 0.2, seed=11)
    with torch.no_grad():
        a = fused_linear_cross_entropy(hidden, weight, targets, softcap=5.0)
    b = eager_linear_cross_entropy(hidden, weight, targets, softcap=5.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_weight_requires_grad():
    hidden, weight, targets = make_case(30, 16, 64, torch.float32, 0.2, seed=12)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, targets).backward()
    w2 = weight.clone().requires_grad_()
    eager_linear_cross_entropy(hidden, w2, targets).backward()
    assert rel_err(w.grad, w2.grad) < 1e-5


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(impl="cuda"), ValueError, "impl"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "finite"),  # inf * tanh(z / inf) would be NaN
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(softcap=True), TypeError, "softcap"),  # was taken as 1.0
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=1.7), TypeError, "ignore_index must be an int"),  # was truncated to 1
        (dict(ignore_index=2**64), ValueError, "int64"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    hidden, weight, targets = make_case(4, 8, 10, torch.float32, 0.0)
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(hidden, weight, targets, **kwargs)


def test_bad_shapes_and_dtypes():
    hidden, weight, targets = make_case(4, 8, 10, torch.float32, 0.0)
    with pytest.raises(ValueError, match="last dimension"):
        fused_linear_cross_entropy(hidden[:, :7], weight, targets)
    with pytest.raises(ValueError, match="targets shape"):
        fused_linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="int32 or int64"):
        fused_linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="same dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="must be on one device"):
        fused_linear_cross_entropy(hidden, weight, targets.to("meta"))
    if not loss_mod._triton_available(hidden.device):
        with pytest.raises(RuntimeError, match="impl='triton'"):
            fused_linear_cross_entropy(hidden, weight, targets, impl="triton")


if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(
        n=st.integers(1, 40),
        d=st.integers(1, 20),
        v=st.integers(2, 60),
        frac=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
        softcap=st.sampled_from([None, 2.0, 30.0]),
        reduction=st.sampled_from(["mean", "sum"]),
        seed=st.integers(0, 2**16),
    )
    def test_property_chunked_equals_eager(n, d, v, frac, softcap, reduction, seed):
        hidden, weight, targets = make_case(n, d, v, torch.float32, frac, seed=seed)
        check_against_reference("chunked", hidden, weight, targets, torch.float32, softcap=softcap, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (run in a child process, see module docstring)

needs_interp = pytest.mark.skipif(not INTERP_CHILD, reason="runs in the TRITON_INTERPRET=1 subprocess")

INTERP_CASES = [
    # (shape, dtype, ignore_frac, softcap, reduction)
    ((4 * 47, 31, 123), torch.float32, 0.5, None, "mean"),
    ((4 * 47, 31, 123), torch.float32, 0.5, 5.0, "mean"),
    ((4 * 47, 31, 123), torch.float16, 0.5, None, "mean"),
    ((4 * 47, 31, 123), torch.float16, 0.5, 5.0, "sum"),
    ((4 * 47, 31, 123), torch.bfloat16, 0.5, None, "sum"),
    ((4 * 47, 31, 123), torch.bfloat16, 0.5, 5.0, "mean"),
    ((4 * 47, 31, 123), torch.float32, 0.0, None, "sum"),
    ((4 * 47, 31, 123), torch.bfloat16, 1.0, 5.0, "mean"),
    ((70, 64, 300), torch.float32, 0.0, 30.0, "mean"),  # several vocabulary splits, even K
    ((70, 64, 300), torch.bfloat16, 0.3, None, "mean"),
]


@needs_interp
@pytest.mark.parametrize("shape, dtype, ignore_frac, softcap, reduction", INTERP_CASES)
def test_interp_case_triton_matches_eager(shape, dtype, ignore_frac, softcap, reduction):
    hidden, weight, targets = make_case(*shape, dtype, ignore_frac, seed=shape[0] + int(ignore_frac * 10))
    check_against_reference("triton", hidden, weight, targets, dtype, softcap=softcap, reduction=reduction)


@needs_interp
def test_interp_case_backward_chunks_and_strides(monkeypatch):
    from sftfast.kernels import fused_linear_ce

    # 2 KB chunks: 64-column vocabulary chunks, so the backward loops over 5 chunks
    monkeypatch.setattr(fused_linear_ce, "CHUNK_BYTES", 2048)
    hidden, weight, targets = make_case(30, 40, 300, torch.float32, 0.2, seed=4, target_dtype=torch.int32)
    w_nc = torch.zeros(300, 80)
    w_nc[:, 1::2] = weight
    w_nc = w_nc[:, 1::2]
    check_against_reference("triton", hidden.t().contiguous().t(), w_nc, targets, torch.float32, softcap=3.0)


def _backward_chunk_kinds(chunks, n, V, D, full):
    """Check a backward chunk plan and return which kinds of chunk it has."""
    assert chunks[0][0] == 0 and chunks[-1][1] == V
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    kinds = set()
    for v0, v1, carved in chunks:
        if carved:  # dZ (n x C) fits in dW's rows past the chunk; never below half a chunk
            assert (V - v1) * D >= n * (v1 - v0) and full // 2 <= v1 - v0 <= full
            kinds.add("full" if v1 - v0 == full else "shrunk")
        else:
            assert v1 - v0 <= full // 2
            kinds.add("own")
    return kinds


CARVE_CASE = dict(n=30, D=40, V=2150, chunk_bytes=256 * 30 * 4)  # fp32: 256-column chunks, 128-column tail


def test_backward_chunk_plan(monkeypatch):
    pytest.importorskip("triton")
    from sftfast.kernels import fused_linear_ce

    n, D, V = CARVE_CASE["n"], CARVE_CASE["D"], CARVE_CASE["V"]
    monkeypatch.setattr(fused_linear_ce, "CHUNK_BYTES", CARVE_CASE["chunk_bytes"])
    plan = fused_linear_ce._backward_chunks(n, V, D, 4, 64, carve=True)
    assert _backward_chunk_kinds(plan, n, V, D, 256) == {"full", "shrunk", "own"}
    assert all(not carved for _, _, carved in fused_linear_ce._backward_chunks(n, V, D, 4, 64, carve=False))
    # the third GPU shape (bf16, 128 x 256 tiles, 64 MiB chunks): a 32 MiB buffer serves
    # the last 1024 x (n + D) / D columns at most
    monkeypatch.setattr(fused_linear_ce, "CHUNK_BYTES", 64 * 2**20)
    n, D, V = 16384, 2048, 131072
    plan = fused_linear_ce._backward_chunks(n, V, D, 2, 256, carve=True)
    assert _backward_chunk_kinds(plan, n, V, D, 2048) == {"full", "shrunk", "own"}
    assert sum(v1 - v0 for v0, v1, carved in plan if not carved) < 1024 * (n + D) // D


def check_dz_in_unwritten_dw_rows(monkeypatch, dtype, ignore_frac, device, n, D, V):
    """dZ chunks stored in dW's own unwritten rows (full and shrunk chunks), then the tail in a
    buffer of its own: every chunk kind in one backward, gradients as the reference's."""
    from sftfast.kernels import fused_linear_ce

    itemsize = torch.empty(0, dtype=dtype).element_size()
    block_v = fused_linear_ce.kernel_config(torch.device(device), dtype, D)["BLOCK_V"]
    monkeypatch.setattr(fused_linear_ce, "CHUNK_BYTES", 4 * block_v * n * itemsize)  # 4-block chunks, 2-block tail
    plan = fused_linear_ce._backward_chunks(n, V, D, itemsize, block_v, carve=True)
    assert _backward_chunk_kinds(plan, n, V, D, 4 * block_v) == {"full", "shrunk", "own"}
    hidden, weight, targets = make_case(n, D, V, dtype, ignore_frac, seed=31, device=device)
    n_valid = int((targets != -1).sum())
    # half dtypes: dH's fp32 accumulator in dW's last rows (their logits computed twice) as well
    assert (fused_linear_ce._dh_in_dw_split(n_valid, V, D, itemsize) is not None) == (itemsize == 2)
    for dh_in_dw in (True, False):
        monkeypatch.setattr(fused_linear_ce, "DH_IN_DW", dh_in_dw)
        check_against_reference("triton", hidden, weight, targets, dtype, softcap=4.0)
    # only one of the two gradients: no dW to carve from, or no dH to accumulate
    _, rdh, rdw = reference(hidden, weight, targets)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, targets, impl="triton").backward()
    assert rel_err(h.grad.float(), rdh) <= REL_TOL[dtype]
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, targets, impl="triton").backward()
    assert rel_err(w.grad.float(), rdw) <= REL_TOL[dtype]


def test_dh_accumulator_placement_in_dw(monkeypatch):
    pytest.importorskip("triton")
    from sftfast.kernels import fused_linear_ce

    split = fused_linear_ce._dh_in_dw_split
    # the GPU shapes, nothing ignored: the accumulator's 2n rows end dW, 16-byte aligned
    for n, D, V in ((8192, 4096, 128256), (8192, 2304, 256000), (16384, 2048, 131072), (30, 31, 1001)):
        first, start = split(n, V, D, 2)
        assert start == (V * D - 2 * n * D) // 8 * 8 and first == start // D and start % 8 == 0 and V - first <= V // 4
        assert (V - first) * D >= 2 * n * D  # the rows from `first` on hold all of it
    assert split(16384, 64000, 2048, 2) is None  # 2n rows would be over a quarter of V
    assert split(100, 5000, 64, 4) is None  # fp32: dH is the accumulator itself
    assert split(0, 5000, 64, 2) is None and split(10, 5000, 0, 2) is None
    monkeypatch.setattr(fused_linear_ce, "DH_IN_DW", False)
    assert split(8192, 128256, 4096, 2) is None


@needs_interp
@pytest.mark.parametrize("dtype, ignore_frac", [(torch.float32, 0.0), (torch.bfloat16, 0.4), (torch.float16, 0.0)])
def test_interp_case_dz_in_unwritten_dw_rows(monkeypatch, dtype, ignore_frac):
    check_dz_in_unwritten_dw_rows(monkeypatch, dtype, ignore_frac, "cpu", n=30, D=40, V=2150)


@needs_interp
def test_interp_case_strided_targets_with_nothing_ignored():
    """Nothing ignored means no compaction copy: the kernels must still see dense targets
    (a strided or expanded view was read as if contiguous: wrong loss, or out of bounds)."""
    for target_dtype in (torch.int32, torch.int64):
        hidden, weight, targets = make_case(30, 16, 50, torch.float32, 0.0, seed=5, target_dtype=target_dtype)
        check_against_reference("triton", hidden, weight, strided_targets(targets), torch.float32)
    check_against_reference("triton", hidden, weight, targets[:1].expand(30), torch.float32)


@needs_interp
def test_interp_case_zero_width_hidden():
    check_zero_width_hidden("triton")


@needs_interp
def test_interp_case_large_softcap_is_accurate():
    """A cap far above the logits leaves them as they are. tanh's exp form has an absolute
    error of ~1e-7, so c * tanh(z / c) was off by ~1e-7 c: 16% loss error at c = 1e8, and at
    c = 1e10 every logit became 0 (loss log V)."""
    hidden, weight, targets = make_case(50, 12, 77, torch.float32, 0.0, seed=21)
    for softcap in (30.0, 1e3, 1e8, 1e10):
        h64 = hidden.double().requires_grad_()
        z = h64 @ weight.double().t()
        ref = torch.nn.functional.cross_entropy(softcap * torch.tanh(z / softcap), targets)
        ref.backward()
        loss, dh, _ = run("triton", hidden, weight, targets, softcap=softcap)
        assert abs(float(loss) - float(ref)) <= 1e-6 * float(ref), softcap
        assert rel_err(dh, h64.grad) <= 1e-5, softcap


@needs_interp
def test_interp_case_fp16_upstream_gradient_above_fp16_max():
    """reduction="sum" under a GradScaler's 65536: dZ = 65536 x (softmax - onehot) overflowed
    fp16 in the target columns, making dH inf although every true dH entry fits in fp16."""
    hidden, weight, targets = make_case(8, 16, 5000, torch.float16, 0.0, seed=22)
    weight = (weight.float() * 0.01).half()
    grads = {}
    for impl in ("triton", "eager"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        (fused_linear_cross_entropy(h, w, targets, reduction="sum", impl=impl) * 65536.0).backward()
        grads[impl] = (h.grad.float(), w.grad.float())
    (dh, dw), (rdh, rdw) = grads["triton"], grads["eager"]
    assert torch.isfinite(rdh).all() and torch.isfinite(dh).all()
    assert rel_err(dh, rdh) <= REL_TOL[torch.float16]
    # dW does overflow in places (the fp32 reference rounded to fp16 too): the same places
    finite = torch.isfinite(rdw)
    assert (~finite).any() and torch.equal(torch.isfinite(dw), finite) and torch.equal(dw[~finite], rdw[~finite])
    assert rel_err(dw[finite], rdw[finite]) <= REL_TOL[torch.float16]


@needs_interp
def test_interp_case_double_backward_is_refused():
    check_double_backward_is_refused("triton")


@needs_interp
def test_interp_case_errors_and_all_ignored():
    hidden, weight, targets = make_case(12, 8, 20, torch.float32, 0.0)
    targets[3] = 20
    with pytest.raises(ValueError, match=r"targets\[3\] = 20"):
        fused_linear_cross_entropy(hidden, weight, targets, impl="triton")
    targets[:] = -1
    loss, dh, dw = run("triton", hidden, weight, targets)
    assert float(loss) == 0.0 and not dh.any() and not dw.any()


@needs_interp
def test_interp_case_partial_grads_and_no_grad():
    hidden, weight, targets = make_case(40, 16, 100, torch.float32, 0.3, seed=9)
    _, rdh, rdw = reference(hidden, weight, targets)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, targets, impl="triton").backward()
    assert rel_err(h.grad, rdh) <= 1e-5
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, targets, impl="triton").backward()
    assert rel_err(w.grad, rdw) <= 1e-5
    with torch.no_grad():
        a = fused_linear_cross_entropy(hidden, weight, targets, impl="triton", softcap=4.0)
    b = eager_linear_cross_entropy(hidden, weight, targets, softcap=4.0)
    assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(b)))


@pytest.mark.skipif(INTERP_CHILD, reason="this is the parent")
def test_triton_kernels_in_subprocess():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", SFTFAST_LOSS_INTERP_CHILD="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interp_case"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, out[-2000:]


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERP_CHILD, reason="needs CUDA")
GPU_SHAPES = [(4 * 47, 31, 123), (1000, 256, 5000), (513, 128, 32000), (2048, 512, 50304)]


@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cuda_triton_matches_eager(shape, dtype, ignore_frac, softcap):
    hidden, weight, targets = make_case(*shape, dtype, ignore_frac, seed=1, device="cuda")
    check_against_reference("triton", hidden, weight, targets, dtype, softcap=softcap)


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_auto_is_triton_and_chunked_agrees(reduction):
    hidden, weight, targets = make_case(700, 128, 3000, torch.bfloat16, 0.3, device="cuda")
    a = run("auto", hidden, weight, targets, reduction=reduction, softcap=15.0)
    b = run("chunked", hidden, weight, targets, reduction=reduction, softcap=15.0)
    assert abs(float(a[0]) - float(b[0])) < 5e-3 * max(1.0, abs(float(b[0])))
    assert rel_err(a[1].float(), b[1].float()) < 2.5e-2
    assert rel_err(a[2].float(), b[2].float()) < 2.5e-2


@needs_cuda
@pytest.mark.parametrize("dtype, ignore_frac", [(torch.float32, 0.0), (torch.bfloat16, 0.4), (torch.float16, 0.0)])
def test_cuda_dz_in_unwritten_dw_rows(monkeypatch, dtype, ignore_frac):
    check_dz_in_unwritten_dw_rows(monkeypatch, dtype, ignore_frac, "cuda", n=300, D=64, V=20000)


@needs_cuda
def test_cuda_non_contiguous_and_errors():
    hidden, weight, targets = make_case(300, 64, 1000, torch.bfloat16, 0.5, device="cuda", target_dtype=torch.int32)
    check_against_reference("triton", hidden.t().contiguous().t(), weight.t().contiguous().t(), targets, torch.bfloat16)
    dense = make_case(300, 64, 1000, torch.bfloat16, 0.0, device="cuda")
    check_against_reference("triton", dense[0], dense[1], strided_targets(dense[2]), torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # inputs already bf16: autocast changes nothing
        check_against_reference("triton", hidden, weight, targets, torch.bfloat16)
    targets[5] = 1000
    with pytest.raises(ValueError, match=r"targets\[5\]"):
        fused_linear_cross_entropy(hidden, weight, targets, impl="triton")


@pytest.mark.skipif(INTERP_CHILD, reason="runs in the parent")
def test_bench_cli_prints_lines_or_json(capsys):
    from sftfast.bench.__main__ import main

    argv = ["loss", "--shapes", "16,8,20", "--impls", "eager", "chunked", "--repeats", "1", "--warmup", "0"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "results.shapes[0].N: 16" in lines and not lines[0].startswith("{")
    assert all(": " in line for line in lines)  # one figure per line
    assert "results.shapes[0].results[1].available: True" in lines
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]["shapes"][0]["results"]
    assert [(r["impl"], r["available"]) for r in rows] == [("eager", True), ("chunked", True)]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-5
    assert main(["loss", "--impls", "eager,chunked", "--json"]) == 1  # a typo is an error, not a row
    # a benchmark that cannot run fails the command (an error in the JSON alone was exit 0)
    if not HAS_CUDA:
        assert main(["loss", "--device", "cuda", "--json"]) == 1
    assert main(["loss", "--device", "cpu", "--triton-config", "64,64,32,4,2", "--json"]) == 1
    # every target ignored: eager's loss is NaN (torch's mean over nothing); the JSON says null,
    # as strict parsers want (Python's json wrote the non-standard token NaN)
    capsys.readouterr()
    assert main(argv + ["--ignore-frac", "1.0", "--json"]) == 0
    strict = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    rows = strict["results"]["shapes"][0]["results"]
    assert rows[0]["loss"] is None and rows[1]["loss"] == 0.0


@pytest.mark.parametrize("argv", [["loss", "--repeats", "0"], ["loss", "--warmup", "-1"], ["data", "--n", "0"],
                                  ["data", "--repeat", "0"], ["generate", "--new-tokens", "0"], ["generate", "--batch", "0"],
                                  ["train", "--steps", "0"], ["tokenizer", "--repeat", "0"], ["prep", "--scale", "0"],
                                  ["loss", "--shapes", "64,16"], ["loss", "--shapes", "0,8,20"]])
def test_bench_cli_refuses_counts_below_their_minimum(argv, capsys):
    """0 repeats or 0 new tokens divided by zero deep in a benchmark (or read as an unavailable
    peer, exit 0); such flags are refused as they are read."""
    from sftfast.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {argv[1]}: " in err
    assert ("shape must be N,D,V" in err or "N, D and V must be >= 1" in err) if argv[1] == "--shapes" else "must be an integer >= " in err
