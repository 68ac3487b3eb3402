"""Fast kernels (C on CPU, Triton on CUDA or its interpreter) equal the reference bit for bit.

Every backend is held to both `mxfp4_ref.quantize_ref` (the bytes) and `mxfp4.quantize` (the bytes and
the statistics) on special values and random data; a backend that cannot run here is skipped with why.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qstream.format.kernels as kernels
from qstream.format.kernels import cpu
from qstream.format.mxfp4 import BLOCK, NonFiniteError, quantize
from qstream.format.mxfp4_ref import quantize_ref
from qstream.format.rules import Rule
from tests.test_mxfp4 import finite_blocks, special_tensor

if not torch.cuda.is_available():
    # Triton's interpreter runs the same kernel on CPU tensors; it is chosen when the kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from qstream.format.kernels import triton_mxfp4  # noqa: E402


def _cpu_quantize(w, rule):
    try:
        return cpu.quantize(w, rule)
    except cpu.BuildError as exc:
        pytest.skip(f"C kernel cannot be built here: {exc}")


def _triton_quantize(w, rule):
    if not triton_mxfp4.available():
        pytest.skip("triton is not installed (pip install 'qstream[test]')")
    if torch.cuda.is_available():
        return triton_mxfp4.quantize(w.cuda(), rule)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET was set to something else than 1")
    return triton_mxfp4.quantize(w, rule)


BACKENDS = {"c": _cpu_quantize, "triton": _triton_quantize}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def extreme_tensor(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """special_tensor's rows plus -0 mixes, subnormals of the dtype, its largest values and exact ties."""
    g = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    w = special_tensor(torch.float32, seed).clamp(-finfo.max, finfo.max)
    extra = torch.randn(9, w.shape[1], generator=g)
    extra[0] = -0.0
    extra[0, 5] = 1.0  # one value among negative zeros
    extra[1] = torch.randn(w.shape[1], generator=g) * finfo.smallest_normal  # straddles subnormal/normal
    extra[2] = finfo.smallest_normal * torch.randint(-3, 4, (w.shape[1],), generator=g) / 4  # subnormals
    extra[3] = torch.randn(w.shape[1], generator=g).sign() * finfo.max * torch.rand(w.shape[1], generator=g)
    extra[4, :32] = finfo.max
    # amax = 6 * 2^k exactly and 1.5 * 2^k (RCEIL boundaries) with every midpoint in the block
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    extra[5] = (mids.repeat(w.shape[1] // 8) * torch.tensor([1.0, -1.0]).repeat(w.shape[1] // 2))
    extra[6] = extra[5] / 4 * 1.5
    extra[7] = extra[5] * 2.0**-100
    extra[8, ::3] = 3e3  # outliers: most of each block then falls in the excluded y0 <= 1/16 zone
    out = torch.cat([w, extra])
    if dtype is torch.float16:
        out = out.clamp(-finfo.max, finfo.max)
    return out.to(dtype)


def assert_same(got, w: torch.Tensor, rule: Rule) -> None:
    want = quantize(w, rule)
    packed, scales = quantize_ref(w, rule)
    assert torch.equal(got.packed.cpu(), packed) and torch.equal(got.scales.cpu(), scales)
    assert torch.equal(got.packed.cpu(), want.packed) and torch.equal(got.scales.cpu(), want.scales)
    assert got.offset_counts == want.offset_counts
    assert got.sq_error == pytest.approx(want.sq_error, rel=1e-9, abs=0)
    assert got.sq_norm == pytest.approx(want.sq_norm, rel=1e-9, abs=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("rule", list(Rule))
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_bit_exact(backend: str, rule: Rule, dtype: torch.dtype) -> None:
    w = extreme_tensor(dtype, seed=DTYPES.index(dtype) * 10 + list(Rule).index(rule))
    assert_same(BACKENDS[backend](w, rule), w, rule)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (1, 32), (33, 32)])
def test_shapes_and_random_scales(backend: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape[:-1] + (1,), generator=g).float())
    w = w.to(torch.bfloat16)
    for rule in Rule:
        got = BACKENDS[backend](w, rule)
        assert got.packed.shape == (*shape[:-1], shape[-1] // 2) and got.scales.shape == (*shape[:-1], shape[-1] // 32)
        assert_same(got, w, rule)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gaussian_weights_many_blocks(backend: str) -> None:
    """Enough blocks that MSE3 picks each offset often, and the C kernel splits rows across threads."""
    w = (torch.randn(2 * 257, 1024, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    got = BACKENDS[backend](w, Rule.MSE3)
    want = quantize(w, Rule.MSE3)
    assert min(want.offset_counts[:2]) > 1000
    assert torch.equal(got.packed.cpu(), want.packed) and torch.equal(got.scales.cpu(), want.scales)
    assert got.offset_counts == want.offset_counts
    assert got.sq_error == pytest.approx(want.sq_error, rel=1e-9)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_refused(backend: str, bad: float) -> None:
    w = torch.randn(4, 64)
    w[2, 7] = bad
    w[3, 40] = bad
    with pytest.raises(NonFiniteError) as want:
        quantize(w.to(torch.bfloat16), Rule.MSE3)
    with pytest.raises(NonFiniteError) as got:
        BACKENDS[backend](w.to(torch.bfloat16), Rule.MSE3)
    assert str(got.value) == str(want.value) and str(got.value).startswith("2 ")


@settings(max_examples=40, deadline=None)
@given(finite_blocks, st.sampled_from(list(Rule)))
def test_c_kernel_equals_reference_property(w: torch.Tensor, rule: Rule) -> None:
    assert_same(_cpu_quantize(w, rule), w, rule)


@settings(max_examples=25, deadline=None)
@given(finite_blocks, st.sampled_from(list(Rule)))
def test_triton_equals_reference_property(w: torch.Tensor, rule: Rule) -> None:
    assert_same(_triton_quantize(w, rule), w, rule)


def test_c_kernel_threads_do_not_change_results() -> None:
    w = (torch.randn(97, 256, generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16)
    try:
        one = cpu.quantize(w, Rule.MSE3, threads=1)
    except cpu.BuildError as exc:
        pytest.skip(f"C kernel cannot be built here: {exc}")
    for threads in (2, 5, 97, 300):
        many = cpu.quantize(w, Rule.MSE3, threads=threads)
        assert torch.equal(one.packed, many.packed) and torch.equal(one.scales, many.scales)
        assert one.offset_counts == many.offset_counts and one.sq_error == pytest.approx(many.sq_error, rel=1e-12)


def _bytes(q) -> tuple[bytes, bytes, tuple[int, ...], float]:
    return q.packed.numpy().tobytes(), q.scales.numpy().tobytes(), q.offset_counts, q.sq_error


def test_c_kernel_pool_serves_concurrent_callers() -> None:
    """The kernel keeps its worker threads between calls for one caller at a time; callers on other threads at
    the same moment (the interpreter lock is released in the call) run on threads of their own: same results."""
    ws = [(torch.randn(64, 512, generator=torch.Generator().manual_seed(s)) * 2).to(torch.bfloat16) for s in range(4)]
    try:
        want = [_bytes(cpu.quantize(w, Rule.MSE3, threads=1)) for w in ws]
    except cpu.BuildError as exc:
        pytest.skip(f"C kernel cannot be built here: {exc}")
    got: list[list] = [[] for _ in ws]

    def caller(i: int) -> None:
        for threads in (3, 4, 2, 5) * 5:
            got[i].append(_bytes(cpu.quantize(ws[i], Rule.MSE3, threads=threads)))

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(len(ws))]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    for i, results in enumerate(got):
        assert len(results) == 20 and all(r == want[i] for r in results), i


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_c_kernel_pool_in_a_forked_child() -> None:
    """A child forked after the pool started has none of its workers: it starts its own instead of waiting."""
    w = (torch.randn(32, 1024, generator=torch.Generator().manual_seed(5))).to(torch.bfloat16)
    try:
        want = _bytes(cpu.quantize(w, Rule.MSE3, threads=4))  # the parent's pool is up
    except cpu.BuildError as exc:
        pytest.skip(f"C kernel cannot be built here: {exc}")
    pid = os.fork()
    if pid == 0:  # only the kernel and small tensor allocations here: nothing that needs torch's thread pools
        ok = all(_bytes(cpu.quantize(w, Rule.MSE3, threads=4)) == want for _ in range(3))
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 120  # a safety net against a hang, not part of the check
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the kernel")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_build_is_cached_and_safe_under_concurrent_first_use(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QSTREAM_CACHE", str(tmp_path))
    try:
        cpu.compiler()
    except cpu.BuildError as exc:
        pytest.skip(str(exc))
    paths, errors = [], []

    def build() -> None:
        try:
            paths.append(cpu.build())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    built = paths[0]
    assert built.parent == tmp_path / "kernels" and built.exists()
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary files left behind
    mtime = built.stat().st_mtime_ns
    assert cpu.build() == built and built.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_machine_build_writes_the_generic_builds_bytes(monkeypatch) -> None:
    """The build for this CPU (AVX2 where it has it) against the one with no machine-specific flag, on the extreme
    values of every dtype and on many Gaussian blocks: the same bytes and the very same statistics."""
    if cpu.machine_flags() == cpu.FLAGS:
        pytest.skip("this machine's build is the generic one")
    try:
        generic = cpu.load(cpu.build(cpu.FLAGS))
    except cpu.BuildError as exc:
        pytest.skip(str(exc))
    tensors = [extreme_tensor(dtype, seed=7) for dtype in DTYPES]
    tensors.append((torch.randn(257, 1024, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16))
    for w in tensors:
        for rule in Rule:
            mine = cpu.quantize(w, rule)
            monkeypatch.setattr(cpu, "library", lambda: generic)
            theirs = cpu.quantize(w, rule)
            monkeypatch.undo()
            assert torch.equal(mine.packed, theirs.packed) and torch.equal(mine.scales, theirs.scales), (w.dtype, rule)
            assert (mine.sq_error, mine.sq_norm, mine.offset_counts) == (theirs.sq_error, theirs.sq_norm,
                                                                         theirs.offset_counts)


def test_flags_the_compiler_refuses_fall_back_to_the_generic_build(monkeypatch) -> None:
    try:
        generic = cpu.build(cpu.FLAGS)
    except cpu.BuildError as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(cpu, "machine_flags", lambda: cpu.FLAGS + ("-fqstream-no-such-flag",))
    with pytest.raises(cpu.BuildError, match="failed"):
        cpu.build()
    assert cpu.library.__wrapped__() is cpu.load(generic)


def test_dispatch_and_fallback_without_compiler(monkeypatch) -> None:
    w = torch.randn(8, 64).to(torch.bfloat16)
    assert kernels.backend_name("meta") == "torch"
    assert kernels.backend_name("cuda") in ("triton", "torch")
    kernels._cpu_kernel.cache_clear()
    monkeypatch.setenv("CC", "qstream-no-such-compiler")
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpu, "library", cpu.library.__wrapped__)  # skip the loaded-library cache
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.backend_name("cpu") == "torch"
            got = kernels.quantize_fast(w)
            kernels.quantize_fast(w)
        assert sum("C MXFP4 kernel unavailable" in str(c.message) for c in caught) == 1
        assert_same(got, w, Rule.MSE3)
    finally:
        kernels._cpu_kernel.cache_clear()
    monkeypatch.undo()
    assert kernels.backend_name("cpu") == "c"
    assert_same(kernels.quantize_fast(w), w, Rule.MSE3)


def test_every_block_written() -> None:
    """Output buffers are fresh torch.empty: a skipped block would show as garbage beside the reference."""
    w = torch.randn(3 * 64 + 5, BLOCK * 3).to(torch.bfloat16)  # row count not a multiple of any tile
    for backend in BACKENDS.values():
        assert_same(backend(w, Rule.MSE3), w, Rule.MSE3)


@pytest.mark.parametrize("margin", [1e30, -1.0])
def test_triton_fast_and_exact_comparisons_agree(monkeypatch, margin: float) -> None:
    """Margin 1e30 sends every program through the exact-integer comparison, -1 none: both must give the
    reference bytes, on Gaussian blocks and on a tie (3.5 * 2^R: error 0.25 at E = R and at E = R - 1,
    so the larger exponent must win)."""
    if torch.cuda.is_available() or not triton_mxfp4.available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("patches a kernel constant: interpreter only")
    monkeypatch.setattr(triton_mxfp4, "_TIE", triton_mxfp4.tl.constexpr(margin))
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    w[5, :32] = 0.0
    w[5, 0] = 3.5 * 2.0**-4
    assert quantize(w[5:6, :32], Rule.MSE3).offset_counts == (1, 0, 0)
    assert_same(triton_mxfp4.quantize(w, Rule.MSE3), w, Rule.MSE3)


def test_warm_up_loads_the_backend_on_its_thread_first(monkeypatch) -> None:
    """quantize_fast waits for the warm-up (no two threads load a backend), a second warm-up does nothing, and a
    warm-up's error is left to the real call, whose bytes are those of the reference."""
    monkeypatch.setattr(kernels, "_warm_ups", {})
    real = kernels._backend
    entered, gate, calls = threading.Event(), threading.Event(), []

    def backend(device: torch.device):
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "qstream-warm-up":
            entered.set()
            gate.wait()
            raise RuntimeError("warm-up failed")  # dropped: the real call meets its own errors
        return real(device)

    monkeypatch.setattr(kernels, "_backend", backend)
    kernels.warm_up("cpu")
    kernels.warm_up("cpu")
    entered.wait()
    w = torch.randn(4, 64).to(torch.bfloat16)
    got = []
    user = threading.Thread(target=lambda: got.append(kernels.quantize_fast(w)))
    user.start()
    user.join(timeout=0.2)
    assert user.is_alive() and calls == ["qstream-warm-up"]  # waiting for the warm-up
    gate.set()
    user.join()
    assert calls == ["qstream-warm-up", user.name]
    assert_same(got[0], w, Rule.MSE3)
