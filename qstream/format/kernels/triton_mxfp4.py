"""MXFP4 quantize + pack as one Triton kernel for CUDA tensors: same contract and bytes as `mxfp4.quantize`.

One pass, and each thread owns whole 32-element blocks (four 16-byte loads), so every per-block
reduction stays in registers. The exponent comes from amax's float32 bits; each MSE3 candidate rounds
by the "magic number" trick (y + M) - M, M = 2^22 * max(pow2floor(y), 2^-s), which lands on the
E2M1 grid of candidate s with ties to even in one add and one subtract, and the codes are read off
the same sum's bits. Candidates are compared on fp32 error sums; where two sums are closer than
their rounding could explain (TIE_MARGIN), the program redoes the comparison exactly, in integer sums
of squares of d * 2^SHIFT (d = q - y0 in R units, over the elements with y0 > 1/16) as the C kernel
does, so ties resolve as the rational reference does. Statistics are fp64. Importing this module
needs neither triton nor CUDA; `available()` says whether it can run.
"""

from __future__ import annotations

import torch

from qstream.format.mxfp4 import BLOCK, NonFiniteError, Quantized, check_shape
from qstream.format.rules import RULES, Rule

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; quantize_fast falls back
    triton = None

BLOCKS_PER_PROGRAM = 32  # one 32-element block per thread: every per-block reduction stays in registers
NUM_WARPS = 1  # best of the sweep on H100 (bench_kernels.py --sweep): 1.107 ms for 537 M elements
# Two fp32 candidate errors closer than this (relative) may be ordered wrongly by rounding (a sum of 32
# rounded squares is within 33 * 2^-24 of exact): such programs redo the comparison in exact integers.
TIE_MARGIN = 8e-6
MAXNREG = 168  # registers per thread: the compiler alone takes 241 (12.5% occupancy on H100); 168 measured best
SKIP_R2 = 2 not in RULES[Rule.MSE3].searched  # R-2 provably never wins (qstream.format.rules); False computes it anyway


def available() -> bool:
    return triton is not None


if triton is not None:
    _TIE = tl.constexpr(TIE_MARGIN)
    _EVEN = tl.constexpr(RULES[Rule.EVEN].code)
    _RCEIL = tl.constexpr(RULES[Rule.RCEIL].code)
    _MSE3 = tl.constexpr(RULES[Rule.MSE3].code)

    @triton.jit
    def _pow2_neg(e):
        """2^-e as float32 for int32 e in [-127, 126] (all normal)."""
        return ((127 - e) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _load(x_ptr, rows64, valid, j: tl.constexpr, BF16: tl.constexpr):
        """Elements 8j..8j+7 of each block as float32 [BLOCKS, 8] (16 contiguous bytes per thread for bf16)."""
        raw = tl.load(x_ptr + rows64[:, None] * 32 + (j * 8 + tl.arange(0, 8))[None, :], mask=valid[:, None], other=0)
        if BF16:  # bf16 arrives as int16 bits: widening them is the exact conversion
            return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return raw.to(tl.float32)

    @triton.jit
    def _round(y0, eb22, floor22):
        """y0 (R units) to the grid E2M1 * 2^-s, nearest with ties to even, before clipping at its top.

        (y0 + M) - M with M = 2^22 * max(pow2floor(y0), 2^-s) rounds to M's ulp, which is the grid's
        step at y0; eb22 = bits(2^22 * pow2floor(y0)), floor22 = bits(2^22 * 2^-s).
        Returns the rounded value, the sum and M's bits.
        """
        mb = tl.maximum(eb22, floor22)
        m = mb.to(tl.float32, bitcast=True)
        total = y0 + m
        return total - m, total, mb

    @triton.jit
    def _candidate(y0, eb22, s: tl.constexpr):
        """Candidate s's rounding of y0, clipped at the top of its grid, 6 * 2^-s (never exceeded for s = 0)."""
        q, _, _ = _round(y0, eb22, (149 - s) << 23)
        return tl.minimum(q, 6.0 / (1 << s)) if s > 0 else q

    @triton.jit
    def _error_fast(y0, eb22, s: tl.constexpr):
        """Candidate s's squared error per block over this chunk, in fp32."""
        d = _candidate(y0, eb22, s) - y0
        return tl.sum(d * d, axis=1)

    @triton.jit
    def _error_exact(y0, eb22, s: tl.constexpr, BF16: tl.constexpr):
        """The same, exactly: integer sums of (d * 2^SHIFT)^2 over the elements with y0 > 1/16."""
        d = tl.where(y0 > 0.0625, _candidate(y0, eb22, s) - y0, 0.0)  # the rest round to 0 under every s
        if BF16:  # |d| * 2^11 < 2^14: the magic add converts it to an int exactly; 32 squares fit a uint32
            k = (d * 2048.0 + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
            err = tl.sum((k * k).to(tl.uint32), axis=1).to(tl.uint64)
        else:
            k = (d * 134217728.0).to(tl.int32).to(tl.int64)
            err = tl.sum((k * k).to(tl.uint64), axis=1)
        return err

    @triton.jit
    def _errors_fast(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, s: tl.constexpr):
        return ((_error_fast(y0a, eba, s) + _error_fast(y0b, ebb, s))
                + (_error_fast(y0c, ebc, s) + _error_fast(y0d, ebd, s)))

    @triton.jit
    def _errors_exact(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, s: tl.constexpr, BF16: tl.constexpr):
        return (_error_exact(y0a, eba, s, BF16) + _error_exact(y0b, ebb, s, BF16)
                + _error_exact(y0c, ebc, s, BF16) + _error_exact(y0d, ebd, s, BF16))

    @triton.jit
    def _pick(e0, e1, e2, r):
        """Offset of least error among the valid candidates (E = R - s >= -127); ties keep the smaller s."""
        e1 = tl.where(r - 1 >= -127, e1, float("inf"))
        e2 = tl.where(r - 2 >= -127, e2, float("inf"))
        best = tl.where(e1 < e0, 1, 0)
        return tl.where(e2 < tl.minimum(e0, e1), 2, best)

    @triton.jit
    def _close(a, b):
        return tl.abs(a - b) <= _TIE * tl.maximum(a, b)

    @triton.jit
    def _chunk_out(x, y0, eb22, floor22, top, base2):
        """Codes of 8 elements packed into one uint32 (element 2i in the low nibble of byte i), and the
        per-block fp64 sums of (q - y0)^2 and y0^2 in R units."""
        q, total, mb = _round(y0, eb22, floor22)
        q = tl.minimum(q, top)
        # the sum counts steps of M's ulp: step k in binade j above the floor is index k + 2j; >7 clips
        idx = tl.minimum(total.to(tl.uint32, bitcast=True) - mb + (mb >> 22) - base2, 7)
        sign = (x.to(tl.uint32, bitcast=True) >> 28) & 8
        codes = idx | ((idx + 7) & sign)  # no sign on a zero code
        word = tl.sum(codes << (tl.arange(0, 8) * 4)[None, :].to(tl.uint32), axis=1)
        d = (q - y0).to(tl.float64)
        y = y0.to(tl.float64)
        return word, tl.sum(d * d, axis=1), tl.sum(y * y, axis=1)

    @triton.jit
    def _mxfp4_kernel(x_ptr, packed_ptr, scales_ptr, stats_ptr, counts_ptr, nblocks,
                      RULE: tl.constexpr, BF16: tl.constexpr, BLOCKS: tl.constexpr, SKIP_R2: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCKS + tl.arange(0, BLOCKS)
        valid = rows < nblocks
        rows64 = rows.to(tl.int64)
        xa = _load(x_ptr, rows64, valid, 0, BF16)
        xb = _load(x_ptr, rows64, valid, 1, BF16)
        xc = _load(x_ptr, rows64, valid, 2, BF16)
        xd = _load(x_ptr, rows64, valid, 3, BF16)
        aa = xa.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        ab = xb.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        ac = xc.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        ad = xd.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        amax = tl.maximum(tl.maximum(tl.max(aa, axis=1), tl.max(ab, axis=1)),
                          tl.maximum(tl.max(ac, axis=1), tl.max(ad, axis=1)))
        bad = amax >= 0x7F800000
        nonfinite = tl.zeros([BLOCKS], dtype=tl.int32)
        if tl.max(bad.to(tl.int32)) > 0:
            nonfinite = (tl.sum((aa >= 0x7F800000).to(tl.int32), axis=1)
                         + tl.sum((ab >= 0x7F800000).to(tl.int32), axis=1)
                         + tl.sum((ac >= 0x7F800000).to(tl.int32), axis=1)
                         + tl.sum((ad >= 0x7F800000).to(tl.int32), axis=1))

        # RCEIL's R from the bits of amax = m * 2^F: F - 2, +1 when m > 1.5; zero/subnormal -> -127.
        f = (amax >> 23).to(tl.int32) - 127
        mant = amax & 0x7FFFFF
        r = f - 2 + (mant > 0x400000).to(tl.int32)
        r = tl.where(amax < 0x800000, -127, tl.minimum(tl.maximum(r, -127), 126))
        p = _pow2_neg(r)[:, None]
        y0a = aa.to(tl.float32, bitcast=True) * p
        y0b = ab.to(tl.float32, bitcast=True) * p
        y0c = ac.to(tl.float32, bitcast=True) * p
        y0d = ad.to(tl.float32, bitcast=True) * p
        eba = (y0a.to(tl.uint32, bitcast=True) & 0x7F800000) + (22 << 23)
        ebb = (y0b.to(tl.uint32, bitcast=True) & 0x7F800000) + (22 << 23)
        ebc = (y0c.to(tl.uint32, bitcast=True) & 0x7F800000) + (22 << 23)
        ebd = (y0d.to(tl.uint32, bitcast=True) & 0x7F800000) + (22 << 23)
        if RULE == _MSE3:
            e0 = _errors_fast(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, 0)
            e1 = _errors_fast(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, 1)
            v2 = r - 2 >= -127
            if SKIP_R2:  # R-2 never wins (see qstream.format.rules): its candidate is not computed
                e2 = tl.full([BLOCKS], float("inf"), tl.float32)
            else:
                e2 = _errors_fast(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, 2)
            s = _pick(e0, e1, e2, r)
            v1 = r - 1 >= -127
            near = v1 & _close(e0, e1)
            if not SKIP_R2:
                near = near | (v2 & (_close(e0, e2) | _close(e1, e2)))
            if tl.max(near.to(tl.int32)) > 0:  # rare: settle near-ties exactly, as the reference does
                x0 = _errors_exact(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, 0, BF16)
                x1 = _errors_exact(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, 1, BF16)
                ok1 = v1 & (x1 < x0)
                s = tl.where(ok1, 1, 0)
                if not SKIP_R2:
                    x2 = _errors_exact(y0a, y0b, y0c, y0d, eba, ebb, ebc, ebd, 2, BF16)
                    s = tl.where(v2 & (x2 < tl.where(ok1, x1, x0)), 2, s)
            e = r - s
        elif RULE == _RCEIL:
            e = r
        else:
            up = (mant >= 0x600000).to(tl.int32) if RULE == _EVEN else 0
            e = tl.where(amax < 0x800000, -127, tl.minimum(tl.maximum(f - 2 + up, -127), 126))

        off = r - e  # the final grid is E2M1 * 2^-off in R units
        floor22 = ((149 - off) << 23).to(tl.uint32)[:, None]
        top = (6.0 * _pow2_neg(off))[:, None]
        base2 = (2 * (149 - off)).to(tl.uint32)[:, None]
        wa, ea, na = _chunk_out(xa, y0a, eba, floor22, top, base2)
        wb, eb, nb = _chunk_out(xb, y0b, ebb, floor22, top, base2)
        wc, ec, nc = _chunk_out(xc, y0c, ebc, floor22, top, base2)
        wd, ed, nd = _chunk_out(xd, y0d, ebd, floor22, top, base2)
        words = tl.reshape(tl.join(tl.join(wa, wc), tl.join(wb, wd)), [BLOCKS, 4])
        tl.store(packed_ptr + rows64[:, None] * 4 + tl.arange(0, 4)[None, :], words, mask=valid[:, None])
        tl.store(scales_ptr + rows64, (e + 127).to(tl.uint8), mask=valid)

        scale2 = ((2 * r + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        tl.store(stats_ptr + pid * 2, tl.sum(((ea + eb) + (ec + ed)) * scale2))
        tl.store(stats_ptr + pid * 2 + 1, tl.sum(((na + nb) + (nc + nd)) * scale2))
        # three offset counts in one sum: fields of 10 bits (BLOCKS < 1024)
        field = tl.where(valid, 1 << (10 * tl.minimum(off, 2)), 0)
        packed_counts = tl.sum(field)
        tl.store(counts_ptr + pid * 4, (packed_counts & 1023).to(tl.int64))
        tl.store(counts_ptr + pid * 4 + 1, ((packed_counts >> 10) & 1023).to(tl.int64))
        tl.store(counts_ptr + pid * 4 + 2, ((packed_counts >> 20) & 1023).to(tl.int64))
        tl.store(counts_ptr + pid * 4 + 3, tl.sum(nonfinite).to(tl.int64))


def launch(w: torch.Tensor, rule: Rule, blocks: int = BLOCKS_PER_PROGRAM, num_warps: int = NUM_WARPS,
           skip_r2: bool = SKIP_R2, maxnreg: int | None = MAXNREG):
    """Run the kernel; returns (packed, scales, per-program stats [P, 2], per-program counts [P, 4])."""
    lead, n = tuple(w.shape[:-1]), w.shape[-1]
    nblocks = w.numel() // BLOCK
    programs = max(1, triton.cdiv(nblocks, blocks))
    packed = torch.empty(*lead, n // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*lead, n // BLOCK, dtype=torch.uint8, device=w.device)
    stats = torch.empty(programs, 2, dtype=torch.float64, device=w.device)
    counts = torch.empty(programs, 4, dtype=torch.int64, device=w.device)
    bf16 = w.dtype is torch.bfloat16
    _mxfp4_kernel[(programs,)](w.view(torch.int16) if bf16 else w, packed.view(torch.int32), scales, stats, counts,
                               nblocks, RULE=rule.spec.code, BF16=bf16, BLOCKS=blocks, SKIP_R2=skip_r2,
                               num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    return packed, scales, stats, counts


def quantize(w: torch.Tensor, rule: Rule = Rule.MSE3) -> Quantized:
    """Same contract and bytes as `qstream.format.mxfp4.quantize`; needs triton (and CUDA, or TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use qstream.format.mxfp4.quantize or the CPU kernel")
    check_shape(tuple(w.shape))
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        w = w.float()
    packed, scales, stats, counts = launch(w.contiguous(), rule)
    totals = torch.cat([stats.sum(0), counts.sum(0).double()]).tolist()  # one device sync; counts < 2^53
    sq_error, sq_norm = totals[:2]
    c0, c1, c2, bad = (int(c) for c in totals[2:])
    if bad:
        raise NonFiniteError(f"{bad} NaN or Inf value(s)")  # as mxfp4.quantize says it
    return Quantized(packed, scales, sq_error, sq_norm, (c0, c1, c2))
