"""Triton kernels for decode steps: matmuls y[M, N] = x[M, K] @ W[N, K]^T with M small (1 to ~16), and what
every kernel of the decode step shares (programmatic dependent launch, custom op registration). The decode
attention is in triton_attention.py, the sampling kernels in triton_sample.py.

Batch-1 decoding reads every weight once per token, so these kernels are built to stream the weight at the
memory-bandwidth floor: every weight byte is read exactly once for all M rows, loads are wide and
contiguous along K, and the grid is split along K when N alone gives too few programs to fill the GPU.

Weight formats (activations x: bf16, fp16 or fp32; accumulation in fp32):
    linear(x, w)                   w: [N, K] in x's dtype
    int8_linear(x, w, scale)       w: [N, K] int8, scale: [N]        W = w * scale[:, None]
    fp8_linear(x, w, scale)        w: [N, K] float8_e4m3fn, scale: [N]  W = w * scale[:, None]
    int4_linear(x, w, sz, group)   w: [N, K/8] int32 (pack_int4), sz: [N, K/group, 2] (pack_scales_zeros)
                                   W[n, k] = (q[n, k] - 8) * scale[n, k // group] + zero[n, k // group]
Each takes a last argument glu: the weight then holds 2N rows (gate, then up) and the op returns
silu(x @ gate^T) * (x @ up^T), [..., N]: the feed-forward's SwiGLU in the matmul's epilogue. The output is in
x's dtype, except for shapes whose decode config splits K: those return the float32 buffer the programs
add into (`out_dtype`), and the caller's cast fuses into the next kernel.
The norms between matmuls can live in their epilogues: linear_add_norm(fmt, x, w, aux, residual, g) returns
h = x @ W^T + residual, h * g and h's partial sums of squares, and norm_linear(fmt, h * g, w, aux, ss, eps)
is RMSNorm(h) @ W^T from them (aux: the scales, or None for plain weights; quantize.NormFusedBlock).
The int4 formula is that of torch's tinygemm (`_weight_int4pack_mm`), so its scales and zeros serve both
paths: tinygemm's scales_and_zeros [K/group, N, 2] is `pack_scales_zeros(*scales_and_zeros.unbind(-1))` after
`.transpose(0, 1)`; the nibbles q [N, K] (0..15) are repacked once at load time with pack_int4.

When to call the matmuls: `supported(x, n, k)`: a CUDA tensor with at most MAX_M rows (decode, speculative
verification); anything else (prefill, CPU) should take the stock path (F.linear, tinygemm, _scaled_mm).
The kernels are correct for any M, just not faster than cuBLAS for large M; for those, `int4_weight` gives
int4's dense weight in one pass, for one cuBLAS matmul. fp8 needs sm_89+ (`fp8_ok`).

Each op is a torch.library custom op with a fake implementation, so torch.compile(fullgraph=True,
mode="reduce-overhead") captures it in the CUDA graph without a graph break; an eager call (a prefill) runs
the kernel without the op's dispatch (`_op`). On sm_90+ every kernel is
launched with programmatic dependent launch (`uses_pdl`; FASTGEN_PDL=0 turns it off) and waits for the
previous kernel in `_pdl_wait` before its first load of x; the matrix-vector loops (M = 1) request their first
weight tile before that wait, and the decode attention its first block of cached keys and values (`preloads`;
FASTGEN_PRELOAD=0 turns it off).
Block sizes come from kernel_configs.json (written once per GPU model by `python bench_kernels.py --tune`),
else from a heuristic; nothing is tuned at start-up. Without a GPU the same kernels run in Triton's
interpreter (numpy): slow, but it lets CPU CI test them on small shapes.
"""
import functools
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

if not torch.cuda.is_available():
    # No GPU: @triton.jit must build interpreted kernels. Set before the decorators below run (triton reads
    # the variable at decoration time), so it holds whichever module imported triton_ops first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_M = 16  # rows up to which the kernels beat the prefill paths; also the tensor-core tile height
CONFIG_FILE = Path(__file__).with_name("kernel_configs.json")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NORM_SLOT = 8  # outputs per partial sum of squares that linear_add_norm returns
_SLOT: tl.constexpr = tl.constexpr(NORM_SLOT)
X_EXP: tl.constexpr = tl.constexpr(76)  # int4 M = 1: x is prescaled by 2^(X_EXP - bit offset), see _int4_gemv_step


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    # programmatic dependent launch (sm_90+, see uses_pdl): this kernel may start while the previous one drains;
    # wait here, before the first load of anything another kernel writes or the first store, until that kernel
    # has finished and its writes are visible; then let the next kernel's programs be scheduled early in turn
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_l2(w_ptr, n0, ld, k0, k_len, PREFETCH: tl.constexpr, ROWS: tl.constexpr):
    # Opt-in (FASTGEN_PREFETCH, see prefetch_bytes), before _pdl_wait: ask L2 for this program's weights, ROWS
    # rows from row n0 (ld elements apart), elements [k0, k0 + k_len) of each, at most PREFETCH bytes in all.
    # No earlier kernel writes a weight, so under PDL they stream while the previous kernel drains.
    # cp.async.bulk.prefetch.L2 (sm_90) is a hint: no registers, no effect on results. It takes warp-uniform
    # operands (ptxas loops over the distinct ones), so whole rows, which are contiguous, go as one request.
    if PREFETCH > 0:
        esize: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        row = tl.arange(0, ROWS).to(tl.int64)
        row_bytes = k_len * esize
        whole = k_len == ld
        first = (w_ptr + n0.to(tl.int64) * ld + k0).to(tl.pointer_type(tl.int8))
        ptrs = tl.where(whole, first, first + row * ld * esize)
        size = tl.where(whole, tl.minimum(ROWS * row_bytes, PREFETCH), tl.minimum(row_bytes, PREFETCH // ROWS) + 0 * row)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, size & -16], dtype=tl.int32, is_pure=False, pack=1,  # sizes: multiples of 16 bytes
        )


@triton.jit
def _in_k(offs, rest, TAIL: tl.constexpr):
    # the mask of a tile's loads along K: offs < rest (the inputs left before the end of the program's range)
    # where tiles may run past K (TAIL), else all true, which the compiler folds into plain loads
    ok = tl.full(offs.shape, True, tl.int1)
    if TAIL:
        ok = offs < rest
    return ok


@triton.jit
def _int8_to_f32(q):
    # int8 -> float32 without the (quarter-rate) I2F instruction: put 128 + q in the low mantissa bits of
    # 2^23 and subtract 2^23 + 128; both steps are exact
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dot_t(a, b, acc, DOT_F32: tl.constexpr):
    # acc + a @ b^T on tensor cores; DOT_F32 for fp32 activations (exact "ieee" products), and for bf16 in
    # the interpreter, whose tl.dot multiplies bf16 bit patterns as integers (triton 3.9)
    if DOT_F32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b.to(a.dtype)), acc)


@triton.jit
def _store(y_ptr, out, rm, rn, M, N, ATOMIC: tl.constexpr):
    # out: [BLOCK_M, BLOCK_N] fp32 partial (split-K) or final result
    ptrs = y_ptr + rm[:, None] * N + rn[None, :]
    mask = rm[:, None] < M
    if ATOMIC:  # split-K: programs along K add into a zeroed fp32 buffer
        tl.atomic_add(ptrs, out, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(out, out_up, y_ptr, rm, rn, M, N, K, res_ptr, g_ptr, yn_ptr, ss_ptr, ss_in_ptr, n_in, eps, acc_ptr,
              cnt_ptr, GLU: tl.constexpr, ATOMIC: tl.constexpr, ADD_NORM: tl.constexpr, NORM_IN: tl.constexpr,
              PARTS_IN: tl.constexpr):  # fmt: skip
    # out, out_up: [BLOCK_M, BLOCK_N] fp32 sums over this program's inputs (out_up: GLU's up half)
    row_ok = rm[:, None] < M
    if NORM_IN:
        # x was h * g, RMSNorm's input h times its weight: the rows' rsqrt(mean(h^2) + eps) scales the sums,
        # from the n_in partial sums of h^2 the producing matmul wrote (ADD_NORM) [M, n_in]
        rp = tl.arange(0, PARTS_IN)[None, :]
        parts = tl.load(ss_in_ptr + rm[:, None] * n_in + rp, mask=row_ok & (rp < n_in), other=0.0)
        r = tl.rsqrt(tl.sum(parts, axis=1) / K + eps)[:, None]
        out, out_up = out * r, out_up * r
    if GLU:
        out = out * tl.sigmoid(out) * out_up
    if ADD_NORM and ATOMIC:
        # split K: the programs of a tile add into a zeroed float32 buffer acc [M, N] and count themselves in
        # cnt [tiles]; the last to arrive reads the whole sums back (from L2), zeroes what the tile used (so a
        # caller can keep the buffer for the next call) and finishes the tile. The barrier and the counter's
        # acquire-release order every thread's additions before the count, and the count before the last
        # program's loads; a second barrier orders every load before the zeroing stores.
        offs = rm[:, None] * N + rn[None, :]
        tl.atomic_add(acc_ptr + offs, out, mask=row_ok, sem="relaxed")
        tl.debug_barrier()
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == tl.num_programs(1) - 1:
            sums = tl.load(acc_ptr + offs, mask=row_ok, other=0.0, cache_modifier=".cg")
            tl.debug_barrier()  # the loads may be laid out over other threads than the stores: all load first
            tl.store(acc_ptr + offs, tl.zeros_like(sums), mask=row_ok, cache_modifier=".cg")
            tl.store(cnt_ptr + tile, 0)
            _add_norm_store(sums, y_ptr, rm, rn, M, N, res_ptr, g_ptr, yn_ptr, ss_ptr)
    elif ADD_NORM:
        _add_norm_store(out, y_ptr, rm, rn, M, N, res_ptr, g_ptr, yn_ptr, ss_ptr)
    else:
        _store(y_ptr, out, rm, rn, M, N, ATOMIC)


@triton.jit
def _add_norm_store(out, y_ptr, rm, rn, M, N, res_ptr, g_ptr, yn_ptr, ss_ptr):
    # out: [BLOCK_M, BLOCK_N] whole fp32 sums. h = out + residual, rounded to y's dtype as the model's residual
    # stream is; also h * g (the next matmul's NORM_IN input) and h's sums of squares over each NORM_SLOT
    # (_SLOT) outputs: [M, N / NORM_SLOT]
    row_ok = rm[:, None] < M
    offs = rm[:, None] * N + rn[None, :]
    h = (out + tl.load(res_ptr + offs, mask=row_ok, other=0.0).to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, h, mask=row_ok)
    hf = h.to(tl.float32)
    tl.store(yn_ptr + offs, (hf * tl.load(g_ptr + rn).to(tl.float32)[None, :]).to(y_ptr.dtype.element_ty), mask=row_ok)
    sq = tl.sum(tl.reshape(hf * hf, [out.shape[0], out.shape[1] // _SLOT, _SLOT]), axis=2)
    first = tl.program_id(0) * (out.shape[1] // _SLOT)
    slots = rm[:, None] * (N // _SLOT) + first + tl.arange(0, out.shape[1] // _SLOT)[None, :]
    tl.store(ss_ptr + slots, sq, mask=row_ok)


@triton.jit
def _x_lanes(x4, X_BF16: tl.constexpr):
    # x4: int64 words of four 16-bit x (bf16, else fp16) -> the four lanes as float32, lane b holding x[4j + b]
    lo, hi = x4.to(tl.int32), (x4 >> 32).to(tl.int32)
    if X_BF16:  # a bf16 is the top half of its float32
        return (lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True), \
            (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True)
    return _f16(lo), _f16(lo >> 16), _f16(hi), _f16(hi >> 16)


@triton.jit
def _f16(h):
    # the low 16 bits of int32 h as an fp16, converted to float32
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int8_gemv_step(acc, q, x0, x1, x2, x3):
    # one tile for M == 1 int8: q [BLOCK_N, BLOCK_K/4] int32 words, byte b of word j the weight at k = 4j + b;
    # xb the matching lanes of x (_x_lanes) -> acc + (q + 128) * x * 2^(X_EXP - 149) summed over each word.
    # As for int4 (_int4_gemv_step): byte b, flipped to offset binary (q + 128 in 0..255, one XOR per word) and
    # masked in place, reads as the float (q + 128) * 2^(8b - 149), exact because every bit pattern below 2^24
    # is pattern * 2^-149 (denormals and the first normal binade); byte 3 is shifted down first. Its x is
    # prescaled by 2^(X_EXP - 8b), so all products share one scale and chain into acc: a mask and an FFMA per
    # weight where a conversion took four instructions.
    u = q ^ -2139062144  # 0x80808080
    acc += (u & 0xFF).to(tl.float32, bitcast=True) * (x0 * 2.0**X_EXP)
    acc += (u & 0xFF00).to(tl.float32, bitcast=True) * (x1 * 2.0 ** (X_EXP - 8))
    acc += (u & 0xFF0000).to(tl.float32, bitcast=True) * (x2 * 2.0 ** (X_EXP - 16))
    return acc + (u.to(tl.uint32, bitcast=True) >> 24).to(tl.float32, bitcast=True) * (x3 * 2.0**X_EXP)


@triton.jit
def _split4(t):
    # t [..., 2, 2]: four values, value w at [..., w // 2, w % 2] -> (t0, t1, t2, t3)
    even, odd = tl.split(t)  # values 0, 2 and 1, 3
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _int8_x(x_ptrs, x_ok, X_WORDS: tl.constexpr, X_BF16: tl.constexpr):
    # a tile's x for int8's one-row loop (x_ptrs at int64 words of four x): its four lanes as float32 (_x_lanes;
    # x broadcast to the weights' layout, or one row), or X_WORDS (x_ptrs [1, C, 2] at words 0 and 1 of each chunk
    # of four, _int8_gemv_words) the four int64 words of each chunk, [1, C] each
    x4 = tl.load(x_ptrs, mask=x_ok, other=0)
    if X_WORDS:
        x0, x1 = tl.split(x4)
        x2, x3 = tl.split(tl.load(x_ptrs + 2, mask=x_ok, other=0))
    else:
        x0, x1, x2, x3 = _x_lanes(x4, X_BF16)
    return x0, x1, x2, x3


@triton.jit
def _int8_tile(acc, xs, q, x0, x1, x2, x3, X_WORDS: tl.constexpr, X_BF16: tl.constexpr):
    # one weight tile of int8's one-row loop: q [BLOCK_N, BLOCK_K/4] words, x0..x3 its x from _int8_x -> acc and
    # xs (the sums of x) updated. A GLU's up half passes the same x again: the compiler shares the x work
    if X_WORDS:
        acc, xs = _int8_gemv_words(acc, xs, q, x0, x1, x2, x3, X_BF16)
    else:
        acc = _int8_gemv_step(acc, q, x0, x1, x2, x3)
        xs += (x0 + x1) + (x2 + x3)
    return acc, xs


@triton.jit
def _int8_gemv_words(acc, xs, q, xw0, xw1, xw2, xw3, X_BF16: tl.constexpr):
    # _int8_gemv_step with x kept one row (Config.x_words): q [BLOCK_N, BLOCK_K/4] words seen as chunks of four,
    # [BLOCK_N, C, 4], xw0..xw3 [1, C] the int64 words of x (four x each) of each chunk's words (_int8_x: two
    # 16-byte loads) -> acc [BLOCK_N, C] and xs [1, C] (the sums of x) updated. The x sums are once per chunk,
    # not once per row and chunk as with x broadcast to the weights' layout
    BN: tl.constexpr = q.shape[0]
    C: tl.constexpr = q.shape[1] // 4
    qw = _split4(q.reshape([BN, C, 2, 2]))
    xw = (xw0, xw1, xw2, xw3)
    for w in tl.static_range(4):
        x0, x1, x2, x3 = _x_lanes(xw[w], X_BF16)
        acc = _int8_gemv_step(acc, qw[w], x0, x1, x2, x3)
        xs += (x0 + x1) + (x2 + x3)
    return acc, xs


@triton.jit
def _w_tile(ptrs, ok, w_desc, row, col, TMA: tl.constexpr, ZERO: tl.constexpr = False):
    # one weight tile [BLOCK_N, BLOCK_K] of the one-row loop: through the tensor descriptor w_desc at (row, col)
    # (TMA: columns past K read as zeros), else loaded from ptrs where ok, zeros elsewhere if ZERO (integer words;
    # fp8 has no literal zero, so the float loop zeroes masked weights itself)
    if TMA:
        return w_desc.load([row, col])
    if ZERO:
        return tl.load(ptrs, mask=ok, other=0)
    return tl.load(ptrs, mask=ok)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, k_len, KW, KW_LEN, res_ptr, g_ptr, yn_ptr, ss_ptr, ss_in_ptr, n_in, eps,
    acc_ptr, cnt_ptr,
    HAS_SCALE: tl.constexpr, W_INT8: tl.constexpr, X16: tl.constexpr, X_BF16: tl.constexpr, GLU: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
    ADD_NORM: tl.constexpr = False, NORM_IN: tl.constexpr = False, PARTS_IN: tl.constexpr = 1,
    TAIL: tl.constexpr = False, PRELOAD: tl.constexpr = False, STAGES: tl.constexpr = 1, w_desc=None,
    TMA: tl.constexpr = False, X_WORDS: tl.constexpr = False,
):  # fmt: skip
    # x: [M, K], w: [N, K] (float, int8 or fp8), s: [N] per-output-channel scale, y: [M, N]
    # GLU: w is [2N, K], gate rows then up rows, and y = silu(x @ gate^T) * (x @ up^T) (no split-K)
    # grid: (N / BLOCK_N, split-K, cdiv(M, BLOCK_M)); this program: BLOCK_N outputs over inputs
    # [pid_k * k_len, (pid_k + 1) * k_len) cut at K; k_len is a multiple of BLOCK_K. TAIL (M = 1 on CUDA
    # cores only): BLOCK_K does not divide K, so the last tile's loads are masked (zeros add nothing);
    # otherwise no masks along K. STAGES (M = 1 on CUDA cores): the loop after the first tile keeps STAGES - 1
    # tiles of weights (and x) in flight through cp.async into shared memory, which holds them without registers.
    # TMA (M = 1, sm_90; int8 as int32 words): the weight tiles come through w_desc, a tensor descriptor of w
    # [rows, K] with block [BLOCK_N, BLOCK_K] (_w_tile): one bulk copy per tile into shared memory, issued by the
    # copy engine with no address arithmetic per thread, STAGES - 1 in flight. X_WORDS (int8, M = 1, 16-bit x):
    # x kept one row, its words shared by the rows a thread holds (_int8_gemv_words)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * k_len + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]  # [BLOCK_N, BLOCK_K], contiguous along K
    up_ptrs = w_ptrs + N.to(tl.int64) * K  # GLU: the matching rows of the up half
    k_end = tl.minimum(k_len, K - pid_k * k_len)
    _prefetch_l2(w_ptr, pid_n * BLOCK_N, K, pid_k * k_len, k_end, PREFETCH, BLOCK_N)
    if GLU:
        _prefetch_l2(w_ptr, N + pid_n * BLOCK_N, K, pid_k * k_len, k_end, PREFETCH, BLOCK_N)
    if not (BLOCK_M == 1 and PRELOAD):
        _pdl_wait(PDL)
    if BLOCK_M == 1 and W_INT8 and X16:
        # int8 matrix-vector: 4 weights per int32 word (_int8_gemv_step), x as int64 words of 4 (_x_lanes)
        rj = pid_k * KW_LEN + tl.arange(0, BLOCK_K // 4)
        q_ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None].to(tl.int64) * KW + rj[None, :]
        q_up = q_ptrs + N.to(tl.int64) * KW
        x64 = x_ptr.to(tl.pointer_type(tl.int64)) + pid_m * KW
        if X_WORDS:  # x as [1, C, 2], words 0 and 1 of each chunk of four (_int8_gemv_words)
            rx = tl.arange(0, BLOCK_K // 16)[None, :, None] * 4 + tl.arange(0, 2)[None, None, :]
            x_ptrs = x64 + pid_k * KW_LEN + rx
        else:  # x at the weights' columns (its mask is theirs)
            rx = tl.arange(0, BLOCK_K // 4)[None, :]
            x_ptrs = x64 + rj[None, :]
            if not TMA:  # x in the weights' layout, as in the float loop below
                x_ptrs = x_ptrs + 0 * rn[:, None]  # [BLOCK_N, BLOCK_K // 4]
        # X_WORDS: sums per chunk of four words (_int8_gemv_words)
        ACC_K: tl.constexpr = BLOCK_K // 16 if X_WORDS else BLOCK_K // 4
        acc = tl.zeros([BLOCK_N, ACC_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, ACC_K], dtype=tl.float32)
        if TMA or X_WORDS:  # x stays one row: its sums once per tile, not once per weight row
            xs = tl.zeros([1, ACC_K], dtype=tl.float32)
        else:
            xs = tl.zeros([BLOCK_N, ACC_K], dtype=tl.float32)
        n0, j0 = pid_n * BLOCK_N, pid_k * KW_LEN  # the tile's origin in w_desc, a descriptor of int32 words (TMA)
        k_first = 0
        if PRELOAD:  # the first tile's weights before the wait (see _int4_kernel)
            ok = _in_k(tl.arange(0, BLOCK_K // 4)[None, :], k_end // 4, True)
            q0 = _w_tile(q_ptrs, ok, w_desc, n0, j0, TMA, True)
            q0_up = q0
            if GLU:
                q0_up = _w_tile(q_up, ok, w_desc, N + n0, j0, TMA, True)
            _pdl_wait(PDL)
            x0, x1, x2, x3 = _int8_x(x_ptrs, _in_k(rx, k_end // 4, True), X_WORDS, X_BF16)
            acc, xs_new = _int8_tile(acc, xs, q0, x0, x1, x2, x3, X_WORDS, X_BF16)
            if GLU:
                acc_up, _ = _int8_tile(acc_up, xs, q0_up, x0, x1, x2, x3, X_WORDS, X_BF16)
            xs = xs_new
            k_first = BLOCK_K
        for k in tl.range(k_first, k_end, BLOCK_K, num_stages=STAGES):
            ok = _in_k(tl.arange(0, BLOCK_K // 4)[None, :], (k_end - k) // 4, TAIL)
            x0, x1, x2, x3 = _int8_x(x_ptrs + k // 4, _in_k(rx, (k_end - k) // 4, TAIL), X_WORDS, X_BF16)
            q = _w_tile(q_ptrs + k // 4, ok, w_desc, n0, j0 + k // 4, TMA, True)
            acc, xs_new = _int8_tile(acc, xs, q, x0, x1, x2, x3, X_WORDS, X_BF16)
            if GLU:
                q = _w_tile(q_up + k // 4, ok, w_desc, N + n0, j0 + k // 4, TMA, True)
                acc_up, _ = _int8_tile(acc_up, xs, q, x0, x1, x2, x3, X_WORDS, X_BF16)
            xs = xs_new
        # sum q x = sum (q + 128) x - 128 sum x
        x_sum = tl.sum(xs, axis=1)[None, :]
        out = tl.sum(acc, axis=1)[None, :] * 2.0 ** (149 - X_EXP) - 128.0 * x_sum
        out_up = tl.sum(acc_up, axis=1)[None, :] * 2.0 ** (149 - X_EXP) - 128.0 * x_sum
    elif BLOCK_M == 1:
        # matrix-vector on CUDA cores: accumulate elementwise, reduce over K once at the end
        # x pointers broadcast over the rows: x is loaded in the weights' own layout (no shared-memory
        # shuffle and barrier per step); the repeated loads hit L1. With TMA the weights come from shared memory
        # in any layout and x stays one row, [1, BLOCK_K]: broadcast over the rows, the loop's stages would hold
        # a copy of it per row in shared memory
        x_ptrs = x_ptr + pid_m * K + rk[None, :]
        if not TMA:
            x_ptrs = x_ptrs + 0 * rn[:, None]  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        n0, k0 = pid_n * BLOCK_N, pid_k * k_len  # the tile's origin in w_desc (TMA)
        k_first = 0
        if PRELOAD:  # the first tile's weights before the wait (see _int4_kernel)
            ok = _in_k(tl.arange(0, BLOCK_K)[None, :], k_end, True)
            w0 = _w_tile(w_ptrs, ok, w_desc, n0, k0, TMA)
            w0_up = w0
            if GLU:
                w0_up = _w_tile(up_ptrs, ok, w_desc, N + n0, k0, TMA)
            _pdl_wait(PDL)
            xk = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
            acc += tl.where(ok, _int8_to_f32(w0) if W_INT8 else w0.to(tl.float32), 0.0) * xk
            if GLU:
                acc_up += tl.where(ok, _int8_to_f32(w0_up) if W_INT8 else w0_up.to(tl.float32), 0.0) * xk
            k_first = BLOCK_K
        for k in tl.range(k_first, k_end, BLOCK_K, num_stages=STAGES):
            ok = _in_k(tl.arange(0, BLOCK_K)[None, :], k_end - k, TAIL)
            xk = tl.load(x_ptrs + k, mask=ok, other=0.0).to(tl.float32)
            w = _w_tile(w_ptrs + k, ok, w_desc, n0, k0 + k, TMA)
            acc += tl.where(ok, _int8_to_f32(w) if W_INT8 else w.to(tl.float32), 0.0) * xk
            if GLU:
                w = _w_tile(up_ptrs + k, ok, w_desc, N + n0, k0 + k, TMA)
                acc_up += tl.where(ok, _int8_to_f32(w) if W_INT8 else w.to(tl.float32), 0.0) * xk
        out, out_up = tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        # up to 16 rows: tensor cores on x[16, BLOCK_K] @ w^T; int8 and fp8 are exact in bf16/fp16
        x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]  # [BLOCK_M, BLOCK_K]
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        out_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, k_end, BLOCK_K):
            xk = tl.load(x_ptrs + k, mask=rm[:, None] < M, other=0.0)
            out = _dot_t(xk, tl.load(w_ptrs + k), out, DOT_F32)
            if GLU:
                out_up = _dot_t(xk, tl.load(up_ptrs + k), out_up, DOT_F32)
    if HAS_SCALE:  # per-channel scale factors out of the sum over K
        out = out * tl.load(s_ptr + rn).to(tl.float32)[None, :]
        if GLU:
            out_up = out_up * tl.load(s_ptr + N + rn).to(tl.float32)[None, :]
    _epilogue(out, out_up, y_ptr, rm, rn, M, N, K, res_ptr, g_ptr, yn_ptr, ss_ptr, ss_in_ptr, n_in, eps, acc_ptr,
              cnt_ptr, GLU, ATOMIC, ADD_NORM, NORM_IN, PARTS_IN)


@triton.jit
def _nibble_pair(q, p: tl.constexpr):
    # int32 words q -> floats (1 + q_hi / 16, 1 + q_lo / 256) for nibbles hi = 2p + 1 and lo = 2p. One shift
    # puts nibble hi in bits 19..22 and nibble lo in bits 15..18, the top of 1.0's mantissa; a mask and
    # 1.0's exponent bits then make each a float: no int-to-float conversion, half a shift per weight.
    if p < 2:
        t = q << (15 - 8 * p)
    else:
        t = q >> (8 * p - 15)
    hi = ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
    lo = ((t & 0x00078000) | 0x3F800000).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _nibble_x(q, q_hi, x, i: tl.constexpr):
    # nibble i of words q (q_hi = q >> 12 for nibbles 5..7) masked in place at bit b = 4i - 12 (i // 5), read as
    # a float, times its x prescaled by 2^(X_EXP - b): q_i * x * 2^(X_EXP - 149) (see _int4_gemv_step)
    b: tl.constexpr = 4 * i - 12 * (i // 5)
    return ((q if i < 5 else q_hi) & (15 << b)).to(tl.float32, bitcast=True) * (x * 2.0 ** (X_EXP - b))


@triton.jit
def _int4_gemv_step(q, sz, x_ptrs, x_ok, WG: tl.constexpr):
    # one tile for M == 1: q [BLOCK_N, G, WG] words, sz [BLOCK_N, G, 2] (scale, zero), x_ptrs [1, G, WG]
    # at the tile's first word column, x_ok [1, G, 1] its groups before K -> sum over the tile of W * x per
    # row and group: [BLOCK_N, G]
    # A nibble masked in place, q & (15 << b), read as a float is the denormal q * 2^(b - 149): one LOP3 per
    # weight, and a shift only for nibbles 5..7 (one per word). Its x is prescaled by 2^(X_EXP - b), so every
    # product is q * x * 2^(X_EXP - 149), a normal float for 2^-52 < |x| < 2^52 (FFMA keeps denormal inputs;
    # the kernels are compiled without flush-to-zero, which tests/test_triton_ops.py checks).
    # The x work (loads, conversions, scaling, sums) does not depend on the row: x has one row, broadcast to
    # the tile, so a thread holding several rows does it once for all of them.
    scale, zero = tl.split(sz.to(tl.float32))
    q_hi = q >> 12  # nibbles 5, 6, 7 at bits 8..19
    fx = tl.zeros(q.shape, dtype=tl.float32)  # sum of q * x * 2^(X_EXP - 149)
    xs = tl.zeros([1, q.shape[1], q.shape[2]], dtype=tl.float32)  # sum of x
    for i in tl.static_range(8):
        x = tl.load(x_ptrs + i * WG, mask=x_ok, other=0.0).to(tl.float32)
        fx += _nibble_x(q, q_hi, x, i)
        xs += x
    # per group: sum_k ((q - 8) * scale + zero) * x = scale * sum q x + (zero - 8 * scale) * sum x
    qx = tl.sum(fx, axis=2) * 2.0 ** (149 - X_EXP)
    return scale * qx + (zero - 8.0 * scale) * tl.sum(xs, axis=2)


@triton.jit
def _four_words(q):
    # q [..., 2, 2]: four words, word w at [..., w // 2, w % 2] -> the words (w0, w1, w2, w3) and each shifted right
    # by 12 (nibbles 5, 6, 7 at bits 8..19, for _nibble_x)
    w0, w1, w2, w3 = _split4(q)
    return (w0, w1, w2, w3), (w0 >> 12, w1 >> 12, w2 >> 12, w3 >> 12)


@triton.jit
def _int4_gemv_words(q, sz, x64_ptrs, x_ok, X_BF16: tl.constexpr):
    # _int4_gemv_step for GROUP 32 and 16-bit x (Config.x_words): q [BLOCK_N, G, 4] (a thread holds each
    # group's four words), x64_ptrs [1, G, 2] int64 pointers at x of nibbles 0 and 1 of each group. Nibble i of
    # the four words meets x[32 g + 4 i .. 4 i + 3], one int64 of four x: a thread reads two nibbles' x in one
    # 16-byte load and unpacks the words (_x_lanes), where _int4_gemv_step's 8-byte loads of x a group apart take
    # an L1 wavefront per thread pair. Fewer instructions and registers, yet not faster everywhere (it lost on
    # 8B's qkv tile and with stages), so the tuned table chooses it per call.
    scale, zero = tl.split(sz.to(tl.float32))
    BN: tl.constexpr = q.shape[0]
    G: tl.constexpr = q.shape[1]
    words, words_hi = _four_words(q.reshape([BN, G, 2, 2]))  # [BLOCK_N, G] each
    fx = tl.zeros([BN, G], dtype=tl.float32)  # sum of q * x * 2^(X_EXP - 149)
    xs = tl.zeros([1, G], dtype=tl.float32)  # sum of x
    for p in tl.static_range(4):
        pair = tl.split(tl.load(x64_ptrs + 2 * p, mask=x_ok, other=0))  # x of nibbles 2p, 2p + 1: int64 [1, G]
        for h in tl.static_range(2):
            lanes = _x_lanes(pair[h], X_BF16)  # lane w: the x of word w
            for w in tl.static_range(4):
                fx += _nibble_x(words[w], words_hi[w], lanes[w], 2 * p + h)
                xs += lanes[w]
    return scale * (fx * 2.0 ** (149 - X_EXP)) + (zero - 8.0 * scale) * xs


@triton.jit
def _int4_gemv_chunks(q, sz, x64_ptrs, x_ok, X_BF16: tl.constexpr):
    # _int4_gemv_words for groups of 64 and 128 (WG = 8, 16 words): q [BLOCK_N, G, WG], x64_ptrs [1, G, WG / 4] int64
    # pointers at x of nibble 0's chunks of four words. Nibble i of word j meets x[WG i + j], so the WG / 4 chunks
    # of one nibble take adjacent int64s: one load of 2 WG bytes a nibble (8 of them a group).
    scale, zero = tl.split(sz.to(tl.float32))
    BN: tl.constexpr = q.shape[0]
    G: tl.constexpr = q.shape[1]
    C: tl.constexpr = q.shape[2] // 4  # chunks of four words a group
    words, words_hi = _four_words(q.reshape([BN, G, C, 2, 2]))  # word 4c + w: [BLOCK_N, G, C] each
    fx = tl.zeros([BN, G, C], dtype=tl.float32)  # sum of q * x * 2^(X_EXP - 149)
    xs = tl.zeros([1, G, C], dtype=tl.float32)  # sum of x
    for i in tl.static_range(8):
        lanes = _x_lanes(tl.load(x64_ptrs + C * i, mask=x_ok, other=0), X_BF16)  # [1, G, C]; lane w: word 4c + w
        for w in tl.static_range(4):
            fx += _nibble_x(words[w], words_hi[w], lanes[w], i)
            xs += lanes[w]
    return scale * (tl.sum(fx, axis=2) * 2.0 ** (149 - X_EXP)) + (zero - 8.0 * scale) * tl.sum(xs, axis=2)


@triton.jit
def _int4_tile(q, sz, x_ptrs, x64_ptrs, x_ok, WG: tl.constexpr, X_WORDS: tl.constexpr, X_BF16: tl.constexpr):
    if X_WORDS and WG == 4:
        return _int4_gemv_words(q, sz, x64_ptrs, x_ok, X_BF16)
    if X_WORDS:
        return _int4_gemv_chunks(q, sz, x64_ptrs, x_ok, X_BF16)
    return _int4_gemv_step(q, sz, x_ptrs, x_ok, WG)


@triton.jit
def _int4_mma_step(q, sz, x_ptrs, x_mask, acc, WG: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr):
    # one tile for M > 1: dequantize one nibble position at a time ([BLOCK_N, BLOCK_K/8]) and feed the tensor
    # cores with the matching slice of x ([BLOCK_M, G, WG] pointers) -> acc [BLOCK_M, BLOCK_N]
    scale, zero = tl.split(sz.to(tl.float32))
    a_hi, b_hi = (16.0 * scale)[:, :, None], (zero - 24.0 * scale)[:, :, None]
    a_lo, b_lo = (256.0 * scale)[:, :, None], (zero - 264.0 * scale)[:, :, None]
    cols: tl.constexpr = q.shape[1] * q.shape[2]  # BLOCK_K / 8
    for p in tl.static_range(4):
        f_hi, f_lo = _nibble_pair(q, p)
        xh = tl.load(x_ptrs + (2 * p + 1) * WG, mask=x_mask, other=0.0)
        xl = tl.load(x_ptrs + 2 * p * WG, mask=x_mask, other=0.0)
        wh, wl = f_hi * a_hi + b_hi, f_lo * a_lo + b_lo  # dequantized [BLOCK_N, G, WG]
        xh, xl = tl.reshape(xh, [BLOCK_M, cols]), tl.reshape(xl, [BLOCK_M, cols])
        acc = _dot_t(xh, tl.reshape(wh, [q.shape[0], cols]), acc, DOT_F32)
        acc = _dot_t(xl, tl.reshape(wl, [q.shape[0], cols]), acc, DOT_F32)
    return acc


@triton.jit
def _int4_kernel(
    x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, k_len, KW, KW_LEN, res_ptr, g_ptr, yn_ptr, ss_ptr, ss_in_ptr, n_in, eps,
    acc_ptr, cnt_ptr,
    GROUP: tl.constexpr, GLU: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
    ADD_NORM: tl.constexpr = False, NORM_IN: tl.constexpr = False, PARTS_IN: tl.constexpr = 1,
    TAIL: tl.constexpr = False, PRELOAD: tl.constexpr = False, STAGES: tl.constexpr = 1,
    X_WORDS: tl.constexpr = False, X_BF16: tl.constexpr = True,
):  # fmt: skip
    # x: [M, K]; w: [N, K/8] int32 from pack_int4; sz: [N, K/GROUP, 2] (scale, zero); KW = K / 8 and
    # KW_LEN = k_len / 8 are passed as arguments so Triton sees they are multiples of 16 (16-byte word loads)
    # W[n, k] = (q[n, k] - 8) * scale + zero. Within a group, word j's nibble i holds q[i * GROUP/8 + j], so
    # every nibble position meets a contiguous slice of x. M > 1: _nibble_pair gives f = 1 + q/16 for odd i and
    # 1 + q/256 for even i, so W = 16 * scale * f + (zero - 24 * scale), or 256 * scale * f + (zero - 264 * scale);
    # M = 1 multiplies the nibbles as denormal floats instead (_int4_gemv_step; X_WORDS, 16-bit x only:
    # _int4_gemv_words reads x as int64 words, X_BF16 saying which 16-bit type).
    # GLU: w, sz hold 2N rows (gate, then up) and y = silu(x @ gate^T) * (x @ up^T), as in _linear_kernel.
    # TAIL (M = 1 only): the last tile runs past K, its loads masked by group, as in _linear_kernel. STAGES (M = 1):
    # tiles kept in flight through shared memory, as in _linear_kernel.
    G: tl.constexpr = BLOCK_K // GROUP  # groups per tile
    WG: tl.constexpr = GROUP // 8  # words per group
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rg, rw = tl.arange(0, G), tl.arange(0, WG)
    k0 = pid_k * k_len
    up_w, up_sz = N.to(tl.int64) * KW, N.to(tl.int64) * (K // GROUP * 2)  # GLU: offsets of the up half
    k_end = tl.minimum(k_len, K - pid_k * k_len)
    _prefetch_l2(w_ptr, pid_n * BLOCK_N, KW, pid_k * KW_LEN, k_end // 8, PREFETCH, BLOCK_N)
    if GLU:
        _prefetch_l2(w_ptr, N + pid_n * BLOCK_N, KW, pid_k * KW_LEN, k_end // 8, PREFETCH, BLOCK_N)
    if not (BLOCK_M == 1 and PRELOAD):
        _pdl_wait(PDL)
    if BLOCK_M == 1:
        # Words and (scale, zero) pairs are loaded through 2D pointers, [BLOCK_N, BLOCK_K/8] and [BLOCK_N, 2G],
        # whose contiguity along K the compiler can see, then reshaped to [BLOCK_N, G, WG] and [BLOCK_N, G, 2]:
        # the threads of a warp then run along K, and x, loaded once as [1, G, WG] in that same layout, serves
        # every row a thread holds from registers. (3D pointers let triton 3.6 lay threads out along the rows,
        # and x broadcast over the rows was then loaded and converted once per row.)
        q_ptrs = w_ptr + rn[:, None].to(tl.int64) * KW + pid_k * KW_LEN + tl.arange(0, G * WG)[None, :]
        s_ptrs = sz_ptr + rn[:, None].to(tl.int64) * (K // GROUP * 2) + k0 // GROUP * 2 + tl.arange(0, 2 * G)[None, :]
        x_ptrs = x_ptr + pid_m * K + k0 + rg[None, :, None] * GROUP + rw[None, None, :]  # [1, G, WG]
        # X_WORDS (16-bit x): x as int64 words of four, per group two nibbles' (GROUP 32, _int4_gemv_words) or
        # nibble 0's WG / 4 chunks (_int4_gemv_chunks): [1, G, 2 or WG / 4]
        x64_ptrs = x_ptr.to(tl.pointer_type(tl.int64)) + (pid_m * K + k0) // 4 + rg[None, :, None] * (GROUP // 4)
        x64_ptrs += tl.arange(0, 2 if WG == 4 else WG // 4)[None, None, :]
        acc = tl.zeros([BLOCK_N, G], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, G], dtype=tl.float32)
        k_first = 0
        if PRELOAD:
            # No kernel writes the weights: the first tile's words and (scale, zero) pairs are requested before
            # the PDL wait, so their latency overlaps the previous kernel's last programs; x comes after it.
            # Always masked: a split of K may hold less than a tile, or none (k_end <= 0: it adds zeros)
            groups = k_end // GROUP
            q_ok = _in_k(tl.arange(0, G * WG)[None, :] // WG, groups, True)
            s_ok = _in_k(tl.arange(0, 2 * G)[None, :] // 2, groups, True)
            q0, sz0 = tl.load(q_ptrs, mask=q_ok, other=0), tl.load(s_ptrs, mask=s_ok, other=0.0)
            q0_up, sz0_up = q0, sz0
            if GLU:
                q0_up, sz0_up = tl.load(q_ptrs + up_w, mask=q_ok, other=0), tl.load(s_ptrs + up_sz, mask=s_ok, other=0.0)
            _pdl_wait(PDL)
            x_ok = _in_k(rg[None, :, None], groups, True)
            q0, sz0 = tl.reshape(q0, [BLOCK_N, G, WG]), tl.reshape(sz0, [BLOCK_N, G, 2])
            acc += _int4_tile(q0, sz0, x_ptrs, x64_ptrs, x_ok, WG, X_WORDS, X_BF16)
            if GLU:
                q0_up, sz0_up = tl.reshape(q0_up, [BLOCK_N, G, WG]), tl.reshape(sz0_up, [BLOCK_N, G, 2])
                acc_up += _int4_tile(q0_up, sz0_up, x_ptrs, x64_ptrs, x_ok, WG, X_WORDS, X_BF16)
            k_first = BLOCK_K
        for k in tl.range(k_first, k_end, BLOCK_K, num_stages=STAGES):
            groups = (k_end - k) // GROUP  # left in the range: whole groups (K is a multiple of GROUP)
            q_ok = _in_k(tl.arange(0, G * WG)[None, :] // WG, groups, TAIL)
            s_ok = _in_k(tl.arange(0, 2 * G)[None, :] // 2, groups, TAIL)
            x_ok = _in_k(rg[None, :, None], groups, TAIL)
            q = tl.reshape(tl.load(q_ptrs + k // 8, mask=q_ok, other=0), [BLOCK_N, G, WG])
            sz = tl.reshape(tl.load(s_ptrs + k // GROUP * 2, mask=s_ok, other=0.0), [BLOCK_N, G, 2])
            acc += _int4_tile(q, sz, x_ptrs + k, x64_ptrs + k // 4, x_ok, WG, X_WORDS, X_BF16)
            if GLU:
                q = tl.reshape(tl.load(q_ptrs + up_w + k // 8, mask=q_ok, other=0), [BLOCK_N, G, WG])
                sz = tl.reshape(tl.load(s_ptrs + up_sz + k // GROUP * 2, mask=s_ok, other=0.0), [BLOCK_N, G, 2])
                acc_up += _int4_tile(q, sz, x_ptrs + k, x64_ptrs + k // 4, x_ok, WG, X_WORDS, X_BF16)
        out, out_up = tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        w_ptrs = w_ptr + rn[:, None, None].to(tl.int64) * KW + pid_k * KW_LEN + rg[None, :, None] * WG + rw[None, None, :]
        # (scale, zero) pairs as [BLOCK_N, G, 2]: one load serves both
        sz_ptrs = sz_ptr + rn[:, None, None].to(tl.int64) * (K // GROUP * 2) + (k0 // GROUP + rg[None, :, None]) * 2
        sz_ptrs += tl.arange(0, 2)[None, None, :]
        x_ptrs = x_ptr + rm[:, None, None] * K + k0 + rg[None, :, None] * GROUP + rw[None, None, :]  # [M, G, WG]
        x_mask = rm[:, None, None] < M
        out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        out_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, k_end, BLOCK_K):
            q, sz = tl.load(w_ptrs + k // 8), tl.load(sz_ptrs + k // GROUP * 2)
            out = _int4_mma_step(q, sz, x_ptrs + k, x_mask, out, WG, BLOCK_M, DOT_F32)
            if GLU:
                q, sz = tl.load(w_ptrs + up_w + k // 8), tl.load(sz_ptrs + up_sz + k // GROUP * 2)
                out_up = _int4_mma_step(q, sz, x_ptrs + k, x_mask, out_up, WG, BLOCK_M, DOT_F32)
    _epilogue(out, out_up, y_ptr, rm, rn, M, N, K, res_ptr, g_ptr, yn_ptr, ss_ptr, ss_in_ptr, n_in, eps, acc_ptr,
              cnt_ptr, GLU, ATOMIC, ADD_NORM, NORM_IN, PARTS_IN)


@triton.jit
def _dequant_int4_kernel(w_ptr, sz_ptr, out_ptr, K, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    # w [N, K/8] int32 (pack_int4), sz [N, K/GROUP, 2] -> out [N, K] in out's dtype. grid: (N, groups / BLOCK_G).
    # Word j of a group holds the group's elements i * GROUP/8 + j in nibbles i = 0..7, so the words shifted by
    # 4i along a middle axis and reshaped [BLOCK_G, 8, WG] -> [BLOCK_G, GROUP] are the group's elements in order.
    WG: tl.constexpr = GROUP // 8
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < K // GROUP
    words = tl.load(w_ptr + n * (K // 8) + g[:, None] * WG + tl.arange(0, WG)[None, :], mask=g_ok[:, None], other=0)
    q = (words[:, None, :] >> (4 * tl.arange(0, 8))[None, :, None]) & 15  # [BLOCK_G, 8, WG]
    sz = sz_ptr + (n * (K // GROUP) + g) * 2
    scale = tl.load(sz, mask=g_ok, other=0.0).to(tl.float32)[:, None]
    zero = tl.load(sz + 1, mask=g_ok, other=0.0).to(tl.float32)[:, None]
    w = (tl.reshape(q, [BLOCK_G, GROUP]).to(tl.float32) - 8.0) * scale + zero  # the reference's float32 formula
    out = out_ptr + n * K + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


# ----------------------------------------------------------------------------- launch configurations


def _cdiv(a: int, b: int) -> int:
    # ceil(a / b) for the host code (triton.cdiv is a @jit function: a Python call to it costs microseconds)
    return -(-a // b)


@dataclass(frozen=True)
class Config:
    block_n: int  # output channels per program
    block_k: int  # weight elements along K per loop step
    split_k: int = 1  # programs along K (fp32 atomics, then a cast) when N alone gives too few programs
    num_warps: int = 4
    num_stages: int = 2
    dot: bool = False  # M == 1 only: use the tensor-core path too (M > 1 always does)
    stages: int = 1  # M == 1 on CUDA cores: weight tiles in flight through cp.async and shared memory (1: none)
    tma: bool = False  # M == 1, TMA_FORMATS, sm_90: weight tiles through tensor descriptors
    x_words: bool = False  # int4, int8, M == 1 on CUDA cores, 16-bit x: x as int64 words (_int4_gemv_words, _int8_gemv_words)


def m_bucket(m: int) -> int:
    return 1 if m == 1 else 4 if m <= 4 else 16


def config_key(fmt: str, n: int, k: int, m: int) -> str:
    # fmt: "bfloat16" / "float16" / "float32" (plain weights), "int8", "fp8", "int4g32", ...
    return f"{fmt}:{n}x{k}:m{m_bucket(m)}"


def _bits(fmt: str) -> int:
    return 4 if fmt.startswith("int4") else 8 if fmt in ("int8", "fp8") else torch.finfo(getattr(torch, fmt)).bits


def _tile_bytes(cfg: Config, fmt: str) -> int:
    # weight bytes a program reads per loop step
    return cfg.block_n * cfg.block_k * _bits(fmt) // 8


def _group(fmt: str) -> int:
    # weights per (scale, zero) pair: int4's group size ("int4g32" -> 32), 1 for the other formats
    return int(fmt[5:]) if fmt.startswith("int4") else 1


def act_dtype(fmt: str) -> torch.dtype:
    # activations used when tuning/benchmarking fmt: bf16 for quantized weights, else the weight's dtype
    return getattr(torch, fmt) if fmt in ("bfloat16", "float16", "float32") else torch.bfloat16


def valid(cfg: Config, fmt: str, n: int, k: int) -> bool:
    # the last tile along K may run past K (masked: TAIL) on CUDA cores, not on tensor cores
    group = _group(fmt)
    tiles_k = _cdiv(k, cfg.block_k)
    whole_k = k % cfg.block_k == 0 or not cfg.dot
    return (n % cfg.block_n == 0 and whole_k and k % group == 0 and cfg.block_k % group == 0 and cfg.split_k <= tiles_k
            and (cfg.stages == 1 or not cfg.dot) and (not cfg.tma or tma_ok(cfg, fmt, k))
            and (not cfg.x_words or (fmt.startswith("int4") or fmt == "int8") and not cfg.dot))


def call_accepts(cfg: Config, glu: bool = False, add_norm: bool = False) -> bool:
    # whether a GLU call (whole K: its epilogue needs whole sums) or a linear_add_norm call (a sum of squares per
    # NORM_SLOT outputs: whole slots per program) can run cfg; a plain call runs any valid one
    return not (glu and cfg.split_k > 1) and not (add_norm and cfg.block_n % NORM_SLOT)


def parse_key(key: str) -> tuple[str, int, int, int, str]:
    """A table key (config_key's, and ":glu", ":add_norm" or ":k1" after it) -> (fmt, N, K, row bucket, call:
    "" or that suffix). ValueError if it is not one."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+)x(\d+):m(1|4|16)(?::(glu|add_norm|k1))?", key)
    if m is None:
        raise ValueError(f"{key!r} is not a table key such as int8:4096x4096:m1 or ...:m1:glu")
    return m[1], int(m[2]), int(m[3]), int(m[4]), m[5] or ""


def entry_ok(key: str, cfg: Config) -> bool:
    # whether a table entry is a config its key's call can run: valid for the weight (a ":glu" key's N counts the
    # gate and up halves, each call's tiles cover one), whole K for ":glu" and ":k1" (the whole-K entry GLU calls
    # fall back to), whole norm slots for ":add_norm", and the tensor cores for more rows than one
    fmt, n, k, m, call = parse_key(key)
    return (valid(cfg, fmt, n // 2 if call == "glu" else n, k) and (cfg.dot or m == 1)
            and call_accepts(cfg, call in ("glu", "k1"), call == "add_norm"))


TMA_FORMATS = ("bfloat16", "float16", "fp8", "int8")  # the formats whose one-row tiles may come through descriptors


def _tma_per_element(fmt: str) -> int:
    # weights per element of the descriptor: int8's one-row loop reads int32 words of 4 (see _launch)
    return 4 if fmt == "int8" else 1


def tma_ok(cfg: Config, fmt: str, k: int) -> bool:
    # a tensor descriptor's block: at most 256 elements a side, rows 16-byte aligned; CUDA cores only (int4 has
    # its own kernel)
    return (fmt in TMA_FORMATS and not cfg.dot and cfg.block_k <= 256 * _tma_per_element(fmt)
            and cfg.block_n <= 256 and k * _bits(fmt) % 128 == 0)


_TABLE: dict[str, dict[str, dict]] = {}  # {gpu name: {config_key: Config fields}}, from store_configs


def load_configs(path: Path = CONFIG_FILE) -> None:
    """Use the tuned block sizes of path (a file bench_kernels.py --tune wrote): kernel_configs.json at import,
    another to compare two tunings in one process (bench.py --configs). Launches and compiles from then on
    read it; a decode step compiled before keeps the configs it captured."""
    table = json.loads(Path(path).read_text())
    _TABLE.clear()
    _TABLE.update(table)


if CONFIG_FILE.exists():
    load_configs()
_GPUS: dict[int, tuple[str, int, int]] = {}  # device index -> (name, SM count, compute capability major)


def _gpu(device: torch.device) -> tuple[str, int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _GPUS:
        props = torch.cuda.get_device_properties(idx)
        _GPUS[idx] = (props.name, props.multi_processor_count, props.major)
    return _GPUS[idx]


def _device_name(device: torch.device) -> str:
    return _gpu(device)[0] if device.type == "cuda" else device.type


def uses_pdl(device: torch.device) -> bool:
    # Programmatic dependent launch on sm_90+ (off with FASTGEN_PDL=0): a kernel is scheduled while the one
    # before it drains and waits in _pdl_wait, which hides most of the gap between the small kernels of a
    # decode step. generate.setup_compile turns it on for inductor's kernels too.
    if device.type != "cuda" or INTERPRET or os.environ.get("FASTGEN_PDL", "1") == "0":
        return False
    return _gpu(device)[2] >= 9


def _sm_count(device: torch.device) -> int:
    # the interpreter runs programs one by one: fewer, bigger ones are faster
    return _gpu(device)[1] if device.type == "cuda" else 1


def _warps(tile_bytes: int, bits: int, dot: bool, m: int = 1) -> tuple[int, ...]:
    # warps per program tried for a tile: fewer warps give each thread more rows, which share its x work; several
    # rows (prefill, verify steps) dequantize each weight once for all of them, so more warps share that work
    if dot:
        return (4, 8) if m > 1 else (8 if tile_bytes > 8192 else 4,)
    if bits == 4:
        return (2, 4) if tile_bytes <= 8192 else (4, 8)
    return (4, 8) if tile_bytes > 8192 else (4,)


def candidates(fmt: str, n: int, k: int, m: int, sms: int = 132, tma: bool = True) -> list[Config]:
    """The configs bench_kernels.py --tune tries: weight tiles of 4-16 KB per loop step (int4 on CUDA cores
    2-32 KB, as wide as BLOCK_K = 4096 and as short as 2 rows: see _int4_kernel; the one-row tensor-core path 8
    KB), shaped from wide (BLOCK_K up to 1024) to tall (BLOCK_N up to 128, the one-row tensor-core path 64; on CUDA
    cores a K like 11008 = 2^8 * 43 ends in a masked tile), 2-8 warps (_warps), split-K 1-8 (while that leaves < 8
    programs per SM); for M == 1 also the tensor-core path, and CUDA-core tiles
    with 2-4 stages in flight (Config.stages) where the loop after the first tile has at least as many steps as
    stages and the stages hold at most 32 KB; for one-row TMA_FORMATS and tma, also tiles through tensor
    descriptors (_tma_candidates); for one-row int4 g32 tiles without stages, each with x read as words too
    (Config.x_words: with stages it was slower, 7B's GLU 24.2 -> 32.7 µs)."""
    bits, out = _bits(fmt), []
    for dot in (False, True) if m == 1 else (True,):
        int4_cores = bits == 4 and not dot
        one_row_dot = dot and m == 1  # the one-row tensor-core path: 8 KB tiles of at most 64 rows
        if int4_cores:
            sizes = (2048, 4096, 8192, 16384, 32768)
        else:
            sizes = (8192,) if one_row_dot else (4096, 8192, 16384)
        for tile_bytes in sizes:
            for block_k in (128, 256, 512, 1024) + ((2048, 4096) if int4_cores else ()):
                block_n = tile_bytes * 8 // (bits * block_k)
                if not (16 if dot else 2 if int4_cores else 8) <= block_n <= (64 if one_row_dot else 128):
                    continue
                for split_k in (1, 2, 4, 8):
                    # tiles after the first (loaded before the PDL wait) along this split of K
                    loop = _cdiv(_cdiv(k, block_k), split_k) - 1
                    for warps in _warps(tile_bytes, bits, dot, m):
                        for stages in (1,) if dot or m > 1 else (1, 2, 3, 4):
                            cfg = Config(block_n, block_k, split_k, warps, 3 if dot else 2, dot, stages)
                            if stages > 1 and (loop < stages or tile_bytes * stages > 32768):
                                continue
                            if valid(cfg, fmt, n, k) and _split_ok(n, block_n, split_k, sms):
                                out.append(cfg)
                                words = replace(cfg, x_words=True)  # x as words too: g32, without stages
                                if stages == 1 and fmt == "int4g32" and valid(words, fmt, n, k):
                                    out.append(words)
    if tma and m == 1 and fmt in TMA_FORMATS:  # tma: the GPU has the copy engine (sm_90)
        out += _tma_candidates(fmt, n, k, sms)
    return out


def _tma_candidates(fmt: str, n: int, k: int, sms: int) -> list[Config]:
    # one-row tiles through tensor descriptors (Config.tma): 8-32 KB per step (128 or 256 elements along K, the
    # descriptor's limit; int8: int32 words), 2-4 steps in flight within 96 KB of shared memory, split-K as above
    out, per_element = [], _tma_per_element(fmt)
    for block_k, tile_bytes in ((bk * per_element, tb) for bk in (128, 256) for tb in (8192, 16384, 32768)):
        block_n = tile_bytes * 8 // (_bits(fmt) * block_k)
        for split_k in (1, 2, 4, 8):
            loop = _cdiv(_cdiv(k, block_k), split_k) - 1
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = Config(block_n, block_k, split_k, warps, 2, False, stages, tma=True)
                    in_flight = loop >= stages and tile_bytes * stages <= 98304
                    if in_flight and valid(cfg, fmt, n, k) and _split_ok(n, block_n, split_k, sms):
                        out.append(cfg)
    return out


def _split_ok(n: int, block_n: int, split_k: int, sms: int) -> bool:
    # split K only while that leaves fewer than 8 programs per SM
    return split_k == 1 or (n // block_n) * split_k // 2 < 4 * sms


def heuristic(fmt: str, n: int, k: int, m: int, sms: int = 132) -> Config:
    """The config used when the table has none: an 8 KB tile from candidates(), with enough programs for
    two per SM, using as little split-K (atomics, a zero fill and a cast) as gets there. int4 on CUDA cores:
    2 warps and BLOCK_K up to 2048, so every thread holds one group of 8 rows (what the H200 tuning chose)."""
    dot = m > 1
    int4_cores = _bits(fmt) == 4 and not dot
    cands = [c for c in candidates(fmt, n, k, m, sms)
             if c.dot == dot and c.num_warps == (2 if int4_cores else 4) and c.stages == 1
             and (not dot or c.block_n <= 64 and _tile_bytes(c, fmt) == 8192)]
    if not cands:  # tiny or odd shapes: the smallest tile that always fits (N, K multiples of 128)
        return Config(16, max(128, _group(fmt)), 1, 4, 3 if dot else 2, dot)
    def score(c: Config) -> tuple:
        programs = (n // c.block_n) * c.split_k
        if programs < 2 * sms:
            return (1, -programs)
        return (0, c.split_k, abs(_tile_bytes(c, fmt) - 8192), abs(c.block_k - (2048 if int4_cores else 512)))

    return min(cands, key=score)


def store_configs(configs: dict[str, Config], device: torch.device, path: Path = CONFIG_FILE) -> None:
    # merge tuned configs (config_key -> Config) into path under this GPU's name; written whole or not at all
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(_device_name(device), {}).update({key: asdict(cfg) for key, cfg in configs.items()})
    write_table(table, path)
    _TABLE.clear()
    _TABLE.update(table)


def write_table(table: dict, path: Path) -> None:
    # a {gpu name: {key: entry}} table in kernel_configs.json's layout, written whole or not at all
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def get_config(fmt: str, n: int, k: int, m: int, device: torch.device, split: bool = True,
               add_norm: bool = False) -> Config:  # fmt: skip
    # split=False (GLU calls, which cannot split K): prefer the tuner's best GLU config (key + ":glu", timed as
    # GLU calls), else its best whole-K config, stored under key + ":k1" where the fastest overall splits K;
    # plan() runs whichever entry with split_k = 1. add_norm (linear_add_norm calls): prefer the best config
    # timed as such calls (key + ":add_norm"), whose split-K epilogue costs more than a plain call's
    key = config_key(fmt, n, k, m)
    keys = ([] if split else [key + ":glu", key + ":k1"]) + ([key + ":add_norm"] if add_norm else []) + [key]
    mine = _TABLE.get(_device_name(device), {})
    entry = next((mine[c] for c in keys if c in mine), None)
    if entry is None:  # tuned on another GPU model: still a better guess than the heuristic
        entry = next((t[c] for c in keys for t in _TABLE.values() if c in t), None)
    cfg = Config(**entry) if entry is not None else heuristic(fmt, n, k, m, _sm_count(device))
    if cfg.tma and device.type == "cuda" and not INTERPRET and _gpu(device)[2] < 9:
        cfg = replace(cfg, tma=False, stages=1)  # an entry from an sm_90 GPU on an older one: plain loads
    return cfg if m == 1 else replace(cfg, dot=True, stages=1, tma=False)  # several rows: the tensor-core loop


# ----------------------------------------------------------------------------- launching


def plan(fmt: str, m: int, n: int, k: int, device: torch.device, glu: bool = False, add_norm: bool = False) -> Config:
    # the config a call with m rows, n outputs and k inputs runs with; a GLU call runs the [2n, K] shape's
    # config without split-K (its epilogue needs whole sums)
    cfg = get_config(fmt, 2 * n if glu else n, k, m, device, split=not glu, add_norm=add_norm)
    if add_norm and cfg.block_n < NORM_SLOT:  # add_norm writes a sum of squares per NORM_SLOT outputs
        # the same tile area, as valid as the tuned one
        block_k = max(cfg.block_k * cfg.block_n // NORM_SLOT, _group(fmt))
        cfg = replace(cfg, block_n=NORM_SLOT, block_k=block_k)
    return replace(cfg, split_k=1) if glu else cfg


def out_dtype(fmt: str, x: Tensor, n: int, k: int, glu: bool = False) -> torch.dtype:
    # Shapes whose decode (M = 1) config splits K return the float32 buffer the programs add into: the
    # caller's cast then fuses into whatever consumes the result (inductor) instead of costing a kernel inside
    # the op. Decided without M, so a compiled graph with a symbolic row count needs no guard on it; a call
    # whose own config splits K where the one-row config does not casts its sums to this (see _launch).
    return torch.float32 if plan(fmt, 1, n, k, x.device, glu).split_k > 1 else x.dtype


def _pdl_args(device: torch.device) -> dict:
    # the kernel's PDL constexpr and Triton's launch option, or nothing (the interpreter takes no launch_pdl).
    # The matmuls take them for one row only: a several-row call scheduled early holds SM slots that the call
    # before it still needs for its later programs (H100, the 16-row prefill of 7B int4: w2 after the GLU call
    # 203 us with PDL, 42 without; the replay 11.2 -> 8.9 ms)
    return {"PDL": True, "launch_pdl": True} if uses_pdl(device) else {}


def preloads(device: torch.device, what: str = "matmul") -> bool:
    # under PDL, what ("matmul": M = 1 matmuls, their first weight tile; "attn": the decode attention with
    # rotary, its first block of cached keys and values) loads before waiting for the previous kernel.
    # FASTGEN_PRELOAD=0 turns both off, a list such as "attn" keeps those it names
    env = os.environ.get("FASTGEN_PRELOAD", "1")
    return uses_pdl(device) and env != "0" and (env == "1" or what in env.split(","))


def prefetch_bytes(device: torch.device) -> int:
    # FASTGEN_PREFETCH=<KiB>: each matmul program asks L2 for up to that much of its weights before its PDL
    # wait (_prefetch_l2; per half of a GLU weight). Off by default: slower where measured (H200, SPEED_LOG.md).
    kib = os.environ.get("FASTGEN_PREFETCH", "0")
    return int(kib) * 1024 if kib.isdigit() and uses_pdl(device) else 0


def _launch(kernel, fmt: str, x: Tensor, weights: tuple, n: int, cfg: Config | None = None, glu: bool = False,
            add_norm: tuple[Tensor, Tensor, Tensor | None] | None = None, norm_in: tuple[Tensor, float] | None = None,
            **constexprs) -> Tensor | tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    # x: [..., K] -> y [..., n] in out_dtype (x's dtype, or float32 where the shape's decode config splits K)
    # add_norm (residual, g, scratch): y = x @ W^T + residual, returned with y * g and y's partial sums of squares
    # [..., n / NORM_SLOT] (linear_add_norm); norm_in (ss, eps): y scaled by rsqrt(sum(ss) / K + eps) (norm_linear)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    if m == 0:
        y = x.new_empty(*x.shape[:-1], n, dtype=x.dtype if add_norm else out_dtype(fmt, x, n, k, glu))
        return (y, y.clone(), x.new_empty(*x.shape[:-1], n // NORM_SLOT, dtype=torch.float32)) if add_norm else y
    cfg = cfg or plan(fmt, m, n, k, x.device, glu, add_norm is not None)
    assert valid(cfg, fmt, n, k), f"config {cfg} does not tile {fmt} {n}x{k}"
    assert call_accepts(cfg, glu, add_norm is not None), \
        f"config {cfg}: GLU calls cannot split K, add_norm needs BLOCK_N a multiple of {NORM_SLOT}"
    block_m = MAX_M if (m > 1 or cfg.dot) else 1
    atomic = cfg.split_k > 1
    grid = (n // cfg.block_n, cfg.split_k, _cdiv(m, block_m))
    split_sums = atomic and not add_norm  # a plain split-K call adds into a float32 buffer
    promised = x.dtype if add_norm else out_dtype(fmt, x, n, k, glu)  # what the fake implementations say
    dtype = torch.float32 if split_sums else promised
    y = torch.zeros(m, n, device=x.device, dtype=dtype) if split_sums else x.new_empty(m, n, dtype=dtype)
    # the fused epilogues' arguments, unused (y as a placeholder pointer) unless add_norm / norm_in ask for them
    fused = dict(res_ptr=y, g_ptr=y, yn_ptr=y, ss_ptr=y, ss_in_ptr=y, n_in=0, eps=0.0, acc_ptr=y, cnt_ptr=y)
    if add_norm:
        residual, g, scratch = add_norm
        assert residual.shape == (*x.shape[:-1], n) and g.shape == (n,), "residual [..., N] and norm weight [N] expected"
        yn, ss = torch.empty_like(y), y.new_empty(m, n // NORM_SLOT, dtype=torch.float32)
        fused.update(res_ptr=residual.reshape(m, n).contiguous(), g_ptr=g.contiguous(), yn_ptr=yn, ss_ptr=ss)
        assert scratch is None or (scratch.dtype in (torch.int32, torch.float32) and scratch.is_contiguous()
            and scratch.numel() >= scratch_numel(m, n) and scratch.device == x.device), \
            f"scratch must be {scratch_numel(m, n)} zeroed int32 or float32 on x's device"  # fmt: skip
        if atomic:  # the sums and a counter per tile (see _epilogue): the caller's zeroed scratch, or a zero fill
            ws = torch.zeros(scratch_numel(m, n), device=x.device, dtype=torch.int32) if scratch is None else scratch
            fused.update(acc_ptr=ws[: m * n].view(torch.float32), cnt_ptr=ws[m * n :].view(torch.int32))
        constexprs.update(ADD_NORM=True)
    if norm_in:
        ss_in, eps = norm_in
        ss_in = ss_in.reshape(m, -1).contiguous()
        fused.update(ss_in_ptr=ss_in, n_in=ss_in.shape[1], eps=float(eps))
        constexprs.update(NORM_IN=True, PARTS_IN=triton.next_power_of_2(ss_in.shape[1]))
    k_len = _cdiv(_cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k  # inputs per split, whole tiles
    if k % cfg.block_k:  # the last tile runs past K, masked on the M = 1 CUDA-core paths only (see valid)
        assert block_m == 1, f"config {cfg} runs past K = {k}: only M = 1 off the tensor cores masks that"
        constexprs.update(TAIL=True)
    words = 8 if kernel is _int4_kernel else 4  # weights per int32 word (int4, int8; unused for the others)
    constexprs.update(KW=k // words, KW_LEN=k_len // words)  # plain ints, not constexprs (see the kernels)
    w_aligned = weights[0].data_ptr() % 16 == 0  # for int8's int32-word loop and for bulk prefetches
    if kernel is _linear_kernel:  # X16: int8 at M = 1 reads the weight as int32 words
        constexprs.update(X16=x.element_size() == 2 and w_aligned, X_BF16=x.dtype == torch.bfloat16)
    if x2.data_ptr() % 16:  # the kernels load x in 16-byte vectors (int8 at M = 1: as int64 words)
        x2 = x2.clone()
    as_words = weights[0].dtype == torch.int8  # int8's one-row loop reads int32 words (X16; float x: plain loads)
    if cfg.tma and block_m == 1 and (constexprs.get("X16") or not as_words):  # weights through a tensor descriptor
        w, block_k = weights[0], cfg.block_k
        assert w_aligned and w.is_contiguous(), "TMA configs need a contiguous, 16-byte aligned weight"
        if as_words:
            w, block_k = w.view(torch.int32), block_k // 4
        constexprs.update(TMA=True, w_desc=TensorDescriptor(w, list(w.shape), [w.shape[1], 1], [cfg.block_n, block_k]))
    if cfg.x_words and block_m == 1 and x.element_size() == 2:  # int4, int8 (valid); float32 x: the plain loops
        constexprs.update(X_WORDS=True, X_BF16=x.dtype == torch.bfloat16)  # see _int4_gemv_words
    prefetch = prefetch_bytes(x.device) if w_aligned else 0
    if prefetch:
        constexprs.update(PREFETCH=prefetch)
    pdl = _pdl_args(x.device) if m == 1 else {}  # (see _pdl_args)
    kernel[grid](
        x2, *weights, y, m, n, k, k_len, GLU=glu, ATOMIC=atomic,
        DOT_F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **fused, **constexprs, **pdl,
        **({"PRELOAD": True} if pdl and preloads(x.device) else {}), **({"STAGES": cfg.stages} if block_m == 1 else {}),
    )  # fmt: skip
    shape = x.shape[:-1]
    if add_norm:
        return y.reshape(*shape, n), yn.reshape(*shape, n), ss.reshape(*shape, n // NORM_SLOT)
    # out_dtype decides from the one-row config: where only these rows' config splits K, the sums are cast to
    # what the fake said (a compiled prefill or verify step reads the buffer as that dtype)
    return y.to(promised).reshape(*shape, n)


def _check(x: Tensor, w: Tensor, k: int, glu: bool = False) -> None:
    assert x.dtype in FLOAT_DTYPES, f"activations must be bf16, fp16 or fp32, got {x.dtype}"
    assert x.shape[-1] == k, f"x has {x.shape[-1]} features, the weight expects {k}"
    rows = 256 if glu else 128
    assert w.shape[0] % rows == 0 and k % 128 == 0, f"N and K must be multiples of {rows} and 128, got {w.shape[0]}x{k}"
    assert w.is_contiguous() and w.device == x.device, "weight must be contiguous and on x's device"


_OP_NAMES: list[str] = []  # every fastgen:: op imported so far (triton_attention.py's and triton_sample.py's too)


def register_inductor_fallbacks() -> None:
    """Give inductor its fallback for each fastgen:: op up front, the one it would make on first meeting the op.
    torch 2.11's inductor then formats all the op's arguments into a log line, built even when nothing is
    logged; an argument that is another custom op's output prints that op's inputs in turn. The sampler's
    logits come after the whole model's chain of ops, several outputs of each feeding the next, so that string
    grew exponentially with the layers: a 7B quantized decode step with the sampler never finished compiling
    (H100, seventh session). Best effort: inductor internals, left alone where they differ."""
    try:
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:
        return
    if not hasattr(lowering, "tag_to_layout_constraint"):
        return
    for name in _OP_NAMES:
        op = getattr(torch.ops.fastgen, name).default
        if op not in lowering.lowerings:
            constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False)


def _op(name: str, fake, mutates: tuple[str, ...] = ()):
    """Register fn as the custom op fastgen::name with its fake (shape-only) implementation. An opaque op
    rather than a triton_op: inductor then leaves the launch code alone, so symbolic shapes (a dynamically
    compiled prefill, a verify step) never reach it, and CUDA graphs capture the kernel all the same."""

    def register(fn):
        op = torch.library.custom_op(f"fastgen::{name}", fn, mutates_args=mutates)
        op.register_fake(fake)
        _OP_NAMES.append(name)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            # Only torch.compile needs the op; an eager call (prefill, CPU runs, tuning) runs fn directly: the
            # op's dispatch added ~25 us of host time per call (H100 machine, torch 2.11) to a launch of ~95 us.
            return op(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

        call.op = op  # the registered op (torch.library.opcheck, torch.ops.fastgen.<name>)
        return call

    return register


def _fake_y(fmt: str, x: Tensor, w: Tensor, glu: bool) -> Tensor:
    # what a matmul op returns: [..., N] (N / 2 for GLU) in out_dtype
    n, k = w.shape[0] // (2 if glu else 1), x.shape[-1]
    return x.new_empty(*x.shape[:-1], n, dtype=out_dtype(fmt, x, n, k, glu))


def _fake_linear(x: Tensor, w: Tensor, glu: bool = False) -> Tensor:
    return _fake_y(str(w.dtype).removeprefix("torch."), x, w, glu)


def _fake_int8(x: Tensor, w: Tensor, scale: Tensor, glu: bool = False) -> Tensor:
    return _fake_y("int8", x, w, glu)


def _fake_fp8(x: Tensor, w: Tensor, scale: Tensor, glu: bool = False) -> Tensor:
    return _fake_y("fp8", x, w, glu)


def _fake_int4(x: Tensor, w: Tensor, scales_zeros: Tensor, group_size: int, glu: bool = False) -> Tensor:
    return _fake_y(f"int4g{group_size}", x, w, glu)


def _check_format(fmt: str, x: Tensor, weights: tuple | list, glu: bool) -> None:
    # the weights of format fmt (as call() takes them, int4's group size left out) for x: [..., K]
    w = weights[0]
    k = w.shape[1] * (8 if fmt.startswith("int4") else 1)
    _check(x, w, k, glu)
    if fmt.startswith("int4"):
        _check_int4(w, weights[1], _group(fmt))
    elif fmt in ("int8", "fp8"):
        dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        assert w.dtype == dtype and weights[1].shape == (w.shape[0],), f"{dtype} weight [N, K] with scale [N] expected"
    else:
        assert w.dtype == x.dtype, f"weight dtype {w.dtype} differs from activations {x.dtype}"


def _check_int4(w: Tensor, sz: Tensor, group: int) -> None:
    # a packed int4 weight w [N, K/8] from pack_int4 with its scales_zeros sz [N, K/group, 2]
    k = w.shape[1] * 8
    assert group in (32, 64, 128, 256), f"group size must be 32, 64, 128 or 256, got {group}"
    assert w.dtype == torch.int32, f"packed int4 weight must be int32 from pack_int4, got {w.dtype}"
    assert sz.shape == (w.shape[0], k // group, 2) and sz.is_contiguous(), (
        f"scales_zeros must be [N, K/group, 2] = {[w.shape[0], k // group, 2]}, got {list(sz.shape)}"
    )


def _dispatch(fmt: str, x: Tensor, weights: tuple | list, glu: bool = False, cfg: Config | None = None, **fused):
    # fmt's kernel on x (weights as _check_format takes them); fused: _launch's add_norm / norm_in
    n = weights[0].shape[0] // (2 if glu else 1)
    if fmt.startswith("int4"):
        return _launch(_int4_kernel, fmt, x, tuple(weights[:2]), n, cfg, glu, GROUP=_group(fmt), **fused)
    per_channel = fmt in ("int8", "fp8")
    w, s = weights[0], weights[1] if per_channel else weights[0]
    return _launch(_linear_kernel, fmt, x, (w, s), n, cfg, glu, HAS_SCALE=per_channel, W_INT8=fmt == "int8", **fused)


@_op("linear", _fake_linear)
def linear(x: Tensor, w: Tensor, glu: bool = False) -> Tensor:
    # x: [..., K], w: [N, K] in x's dtype -> [..., N]; glu: w is [2N', K] and y = silu(gate) * up [..., N']
    fmt = str(w.dtype).removeprefix("torch.")
    _check_format(fmt, x, (w,), glu)
    return _dispatch(fmt, x, (w,), glu)


@_op("int8_linear", _fake_int8)
def int8_linear(x: Tensor, w: Tensor, scale: Tensor, glu: bool = False) -> Tensor:
    # x: [..., K], w: [N, K] int8, scale: [N] -> [..., N] (glu as in linear)
    _check_format("int8", x, (w, scale), glu)
    return _dispatch("int8", x, (w, scale), glu)


@_op("fp8_linear", _fake_fp8)
def fp8_linear(x: Tensor, w: Tensor, scale: Tensor, glu: bool = False) -> Tensor:
    # x: [..., K], w: [N, K] float8_e4m3fn, scale: [N] -> [..., N] (glu as in linear)
    _check_format("fp8", x, (w, scale), glu)
    return _dispatch("fp8", x, (w, scale), glu)


@_op("int4_linear", _fake_int4)
def int4_linear(x: Tensor, w: Tensor, scales_zeros: Tensor, group_size: int, glu: bool = False) -> Tensor:
    # x: [..., K], w: [N, K/8] int32 from pack_int4, scales_zeros: [N, K/group_size, 2] -> [..., N] (glu as in linear)
    fmt = f"int4g{group_size}"
    _check_format(fmt, x, (w, scales_zeros), glu)
    return _dispatch(fmt, x, (w, scales_zeros), glu)


def _fake_int4_weight(w: Tensor, scales_zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    return w.new_empty(w.shape[0], w.shape[1] * 8, dtype=dtype)


@_op("int4_weight", _fake_int4_weight)
def int4_weight(w: Tensor, scales_zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """The int4 weight as a dense [N, K] tensor in dtype (bf16, fp16 or fp32), for inputs too large for
    int4_linear (prefill: then one cuBLAS matmul). One pass, in the float32 formula of dequantize_int4 and
    rounded once, so it equals dequantize_int4(...).to(dtype)."""
    n, k = w.shape[0], w.shape[1] * 8
    _check_int4(w, scales_zeros, group_size)
    assert w.is_contiguous(), "w must be the contiguous int32 [N, K/8] of pack_int4"
    assert dtype in FLOAT_DTYPES, f"dtype must be bf16, fp16 or fp32, got {dtype}"
    out = w.new_empty(n, k, dtype=dtype)
    block_g = max(1, 4096 // group_size)  # 4096 weights per program
    _dequant_int4_kernel[(n, _cdiv(k // group_size, block_g))](w, scales_zeros, out, k, GROUP=group_size, BLOCK_G=block_g)
    return out


def _fake_add_norm(fmt: str, x: Tensor, w: Tensor, aux: Tensor | None, residual: Tensor, norm_weight: Tensor,
                   scratch: Tensor | None = None):  # fmt: skip
    n = w.shape[0]
    return x.new_empty(*x.shape[:-1], n), x.new_empty(*x.shape[:-1], n), \
        x.new_empty(*x.shape[:-1], n // NORM_SLOT, dtype=torch.float32)  # fmt: skip


def _fake_norm_linear(fmt: str, x: Tensor, w: Tensor, aux: Tensor | None, ss: Tensor, eps: float, glu: bool = False):
    return _fake_y(fmt, x, w, glu)


def scratch_numel(m: int, n: int) -> int:
    """Elements (4 bytes each) of the scratch a split-K linear_add_norm call with m rows and n outputs uses:
    float32 sums [m, n] and a counter per tile (at most one per NORM_SLOT outputs and row)."""
    return m * n + m * (n // NORM_SLOT)


@_op("linear_add_norm", _fake_add_norm, mutates=("scratch",))
def linear_add_norm(fmt: str, x: Tensor, w: Tensor, aux: Tensor | None, residual: Tensor, norm_weight: Tensor,
                    scratch: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """A matmul whose epilogue adds the residual stream and prepares the RMSNorm that follows it, so the norm
    costs no kernel of its own. x [..., K] and a weight w of format fmt with aux: its scales (int8, fp8),
    scales_zeros (int4; the group size is in fmt) or None (plain weights). Returns h = x @ W^T + residual
    [..., N] and h * norm_weight [..., N], both in x's dtype, and h's partial sums of squares
    [..., N / NORM_SLOT] in float32: what norm_linear needs to finish the norm. Shapes whose config splits K
    add into a float32 buffer, and the last program of each tile finishes it. That buffer is scratch where
    given: at least scratch_numel(M, N) int32 or float32 zeros, which the call leaves zeroed, so one scratch
    kept by the caller serves every call and saves a zero fill each; None: a fresh one per call."""
    weights = (w,) if aux is None else (w, aux)
    _check_format(fmt, x, weights, False)
    return _dispatch(fmt, x, weights, add_norm=(residual, norm_weight, scratch))


@_op("norm_linear", _fake_norm_linear)
def norm_linear(fmt: str, x: Tensor, w: Tensor, aux: Tensor | None, ss: Tensor, eps: float, glu: bool = False) -> Tensor:
    """RMSNorm(h) @ W^T from what linear_add_norm returned: x = h * g, ss = h's partial sums of squares;
    y = rsqrt(sum(ss) / K + eps) * (x @ W^T), with glu as in linear (the scale applies before the silu). The
    same as the model's norm then matmul but for rounding: h * g is rounded to x's dtype where the model rounds
    the normalised h, and the rsqrt is applied in float32 after the sums."""
    weights = (w,) if aux is None else (w, aux)
    _check_format(fmt, x, weights, glu)
    return _dispatch(fmt, x, weights, glu, norm_in=(ss, eps))


def supported(x: Tensor, n: int, k: int, glu: bool = False) -> bool:
    """Whether y = x @ W^T ([..., K] -> [..., N]; glu: the fused silu(gate) * up of N outputs) should use these
    kernels: decode-sized inputs on a GPU. Depends only on x's device, dtype and shape, so it is free inside
    torch.compile (a guard at most)."""
    m = x.numel() // max(k, 1)
    return x.is_cuda and x.dtype in FLOAT_DTYPES and m <= MAX_M and n % (256 if glu else 128) == 0 and k % 128 == 0


def fp8_ok(device: torch.device) -> bool:
    # e4m3 loads and conversions need sm_89 (Ada) or newer; check once at load time, not per call
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ----------------------------------------------------------------------------- int4 layout


def pack_int4(q: Tensor, group_size: int) -> Tensor:
    # q: [N, K] integers in 0..15 -> [N, K/8] int32. In each group of group_size, word j holds
    # q[i * group_size/8 + j] in bits 4i..4i+3 (i = 0..7): each nibble position meets a contiguous slice of x.
    n, k = q.shape
    assert k % group_size == 0 and group_size % 8 == 0, f"K={k} must be a multiple of the group size {group_size}"
    q = q.to(torch.int32).view(n, k // group_size, 8, group_size // 8)  # [N, groups, nibble i, word j]
    words = torch.zeros_like(q[:, :, 0])
    for i in range(8):
        words |= q[:, :, i] << (4 * i)  # nibble 7 reaches bit 31: the sign bit, harmless
    return words.reshape(n, k // 8).contiguous()


def unpack_int4(w: Tensor, group_size: int) -> Tensor:
    # [N, K/8] int32 from pack_int4 -> [N, K] uint8 in 0..15
    n = w.shape[0]
    words = w.view(n, -1, 1, group_size // 8)  # [N, groups, 1, word j]
    shifts = torch.arange(0, 32, 4, device=w.device, dtype=torch.int32).view(1, 1, 8, 1)
    return ((words >> shifts) & 0xF).to(torch.uint8).reshape(n, -1)


def pack_scales_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    # scales, zeros: [N, K/group] -> [N, K/group, 2], so the kernel fetches both with one load
    return torch.stack([scales, zeros], dim=-1).contiguous()


def dequantize_int4(w: Tensor, scales_zeros: Tensor, group_size: int) -> Tensor:
    # the reference the kernel is tested against: [N, K] float32
    q = unpack_int4(w, group_size).float().view(w.shape[0], -1, group_size)  # [N, K/group, group]
    sz = scales_zeros.float()
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(w.shape[0], -1)


# ----------------------------------------------------------------------------- by format name (tests, tuning)


def dequantize(fmt: str, *weights) -> Tensor:
    # the reference of each format: the weights call(fmt, x, *weights) takes -> [N, K] float32
    if fmt in ("int8", "fp8"):
        return weights[0].float() * weights[1].float()[:, None]
    if fmt.startswith("int4"):
        return dequantize_int4(*weights)
    return weights[0].float()


def call(fmt: str, x: Tensor, *weights, glu: bool = False) -> Tensor:
    # the op for format fmt: "bfloat16" / "float16" / "float32" (linear), "int8", "fp8", "int4g<group>"; in x's dtype
    if fmt.startswith("int4"):
        y = int4_linear(x, *weights, glu)
    elif fmt in ("int8", "fp8"):
        y = (int8_linear if fmt == "int8" else fp8_linear)(x, *weights, glu)
    else:
        y = linear(x, *weights, glu)
    return y.to(x.dtype)


def run_with(fmt: str, x: Tensor, weights: tuple, cfg: Config, glu: bool = False,
             add_norm: tuple[Tensor, Tensor, Tensor | None] | None = None) -> Tensor:  # fmt: skip
    # the kernel with an explicit config, outside the custom op: for tuning and for tests of every code path.
    # add_norm (residual, norm weight, scratch): linear_add_norm's call, returning only h = x @ W^T + residual
    if add_norm:
        return _dispatch(fmt, x, weights, glu, cfg, add_norm=add_norm)[0]
    return _dispatch(fmt, x, weights, glu, cfg).to(x.dtype)


def glu_reference(fmt: str, x: Tensor, *weights) -> Tensor:
    # what call(fmt, x, *weights, glu=True) computes, in float64 from the dequantized weight: [M, N / 2]
    gate, up = (x.double() @ dequantize(fmt, *weights).double().T).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
