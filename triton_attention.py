"""Decode attention in Triton: the few query positions of a decode or verify step over the KV cache.

`sdpa` has F.scaled_dot_product_attention's signature and sends decode and verify steps on a GPU (a bool mask,
few query rows per key/value head: `attention_supported`) to one kernel; long caches are cut into key ranges
whose partial results are combined by their log-sum-exp. `rope_attention` does a decode step's rotary and KV
cache write in the same kernel, from the qkv matmul's output (quantize.RopeAttention). Both are custom ops
registered like the matmuls (triton_ops._op) and launched like them: under programmatic dependent launch on
sm_90+, with the first block of cached keys and values requested before the PDL wait (triton_ops.preloads).
"""
import torch
from torch import Tensor

# triton_ops first: without a GPU it points Triton at its interpreter before triton is imported
import triton_ops  # isort: skip
from triton_ops import FLOAT_DTYPES, INTERPRET, _cdiv, _dot_t, _op, _pdl_wait  # isort: skip
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ATTN_MAX_ROWS = 128  # query heads per key/value head x query positions, per program
ATTN_COUNTERS = 4096  # the counters DecodeAttention keeps: enough for batch x key/value heads up to this


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    # acc + a @ b; a is fp32 (softmax weights) and goes to tensor cores in b's dtype unless DOT_F32
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _attend(q, k, v, m_rows, t, t_ok, row_ok, pos, m_i, l_i, acc, qk_scale, ROPE: tl.constexpr, DOT_F32: tl.constexpr):
    # one block of keys of the online softmax: q [R, D], k/v [BLOCK_T, D] at slots t [BLOCK_T] (t_ok: in the
    # range), m_rows [R, 1] the mask rows -> (max m_i, sum l_i [R], acc [R, D]) updated, in base 2
    allowed = tl.load(m_rows + t[None, :], mask=row_ok[:, None] & t_ok[None, :], other=0) != 0  # [R, BLOCK_T]
    if ROPE:  # the new slot's store may not be visible yet, even in this program: it joins after the loop
        allowed = allowed & (t != pos)[None, :]
    scores = _dot_t(q, k, tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), DOT_F32) * qk_scale
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _dot(p, v, acc * alpha[:, None], DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, part_ptr, lse_ptr, cnt_ptr,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_s,
    HKV, S, T, t_len, qk_scale, cos_ptr, sin_ptr, pos_ptr, new_k, new_v,
    G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr, ROPE: tl.constexpr = False, PDL: tl.constexpr = False, P_POW2: tl.constexpr = 1,
    PRELOAD: tl.constexpr = False,
):  # fmt: skip
    # q: [B, H, S, D], k/v: [B, HKV, T, D], mask: [B, 1, S, T] bool (True: may attend); D contiguous everywhere.
    # grid: (B * HKV, P). This program: key/value head hk of batch row b with the G = H / HKV query heads that
    # share it, times the S query positions (rows r = g * S + s, padded to BLOCK_R), over the keys
    # [pid_p * t_len, (pid_p + 1) * t_len) cut at T. Online softmax in fp32, in base 2 (qk_scale includes
    # log2(e)). Like torch's sdpa it reads every key of the range (masked ones too): no branch on the mask,
    # so the loop's loads can be pipelined.
    # o: [B, H, S, D], contiguous, in the caches' dtype. SPLIT (P = the grid's second dimension > 1): each
    # program writes its range's output normalised by its own sum, part [B, H, S, P, D] fp32, and lse
    # [B, H, S, P] (natural log of that sum, -inf for a range that saw no key); the last program of the head to
    # finish combines the P ranges into o (_combine_ranges), counting in cnt [B * HKV] (zeroed int32, left zeroed).
    # ROPE (decode, S = 1): q points at the qkv matmul's output row of batch row b, [H + 2 HKV, D] (query
    # heads, then keys at element new_k, values at new_v); the queries and the new key are rotated here
    # (cos, sin: [D] at the new position, rotate-half pairs (i, i + D/2)) and rounded to the cache's dtype, the
    # program whose range holds slot pos (pos_ptr) writes the new key and value there; the loop skips that
    # slot and the owning program adds it from registers afterwards: rotary, the cache write and attention in
    # one kernel.
    # PRELOAD (ROPE under PDL): the range's first block of keys and values is requested before the PDL wait.
    # In a decode step only this kernel writes the caches; the slots before pos were written by the prefill or
    # earlier steps: earlier CUDA graph replays, finished before this one began, or (no graph) kernels many
    # launches back, with matmuls between that each wait for the kernel before them. The new slot, read stale
    # there, is skipped as above. (Without ROPE a kernel just before this one may write the caches.)
    pid_bh, pid_p = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HKV, pid_bh % HKV
    r, d = tl.arange(0, BLOCK_R), tl.arange(0, D)
    h, s = hk * G + r // S, r % S
    row_ok = r < G * S
    t_first = pid_p * t_len
    t_end = tl.minimum(t_first + t_len, T)
    k_ptrs = k_ptr + b * sk_b + hk * sk_h + d[None, :]  # [1, D] at slot 0
    v_ptrs = v_ptr + b * sv_b + hk * sv_h + d[None, :]
    if PRELOAD:
        t0 = t_first + tl.arange(0, BLOCK_T)  # the first block's slots
        k0 = tl.load(k_ptrs + t0[:, None] * sk_t, mask=(t0 < t_end)[:, None], other=0.0)  # [BLOCK_T, D]
        v0 = tl.load(v_ptrs + t0[:, None] * sv_t, mask=(t0 < t_end)[:, None], other=0.0)
    _pdl_wait(PDL)
    pos = 0
    if ROPE:
        cache_t: tl.constexpr = k_ptr.dtype.element_ty
        pair = (d + D // 2) % D
        cos = tl.load(cos_ptr + d).to(tl.float32)
        sin = tl.where(d < D // 2, -1.0, 1.0) * tl.load(sin_ptr + d).to(tl.float32)  # rotate_half's sign
        row = q_ptr + b * sq_b
        q_rows = row + h[:, None] * D
        q = tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * cos[None, :]
        q += tl.load(q_rows + pair[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * sin[None, :]
        q = q.to(cache_t)
        k_in = row + new_k + hk * D
        k_new = (tl.load(k_in + d).to(tl.float32) * cos + tl.load(k_in + pair).to(tl.float32) * sin).to(cache_t)
        v_new = tl.load(row + new_v + hk * D + d).to(cache_t)
        pos = tl.load(pos_ptr)
        slot = pos + 0 * d  # [D]: the store masks below as tensors (the interpreter rejects a scalar mask)
        mine = (slot >= t_first) & (slot < t_end)  # this program's range holds the new slot
        tl.store(k_ptr + b * sk_b + hk * sk_h + pos * sk_t + d, k_new, mask=mine)
        tl.store(v_ptr + b * sv_b + hk * sv_h + pos * sv_t + d, v_new, mask=mine)
    else:
        q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + s[:, None] * sq_s + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    m_rows = mask_ptr + b * sm_b + s[:, None] * sm_s  # [BLOCK_R, 1]
    t_loop = t_first
    if PRELOAD:
        # the new slot, read stale, is zeroed: a value after the wait, so the compiler keeps the blocks' move
        # into the dot layouts (through shared memory, which waits for the loads) after it too
        fresh = (t0 != pos)[:, None]
        k0, v0 = tl.where(fresh, k0, 0.0), tl.where(fresh, v0, 0.0)
        m_i, l_i, acc = _attend(q, k0, v0, m_rows, t0, t0 < t_end, row_ok, pos, m_i, l_i, acc, qk_scale, ROPE, DOT_F32)
        t_loop += BLOCK_T
    for t_block in range(t_loop, t_end, BLOCK_T):
        t = t_block + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        k = tl.load(k_ptrs + t[:, None] * sk_t, mask=t_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + t[:, None] * sv_t, mask=t_ok[:, None], other=0.0)
        m_i, l_i, acc = _attend(q, k, v, m_rows, t, t_ok, row_ok, pos, m_i, l_i, acc, qk_scale, ROPE, DOT_F32)
    if ROPE:
        # the new key and value from registers, one more column of the online softmax, in the program whose
        # range holds the slot (a score of -inf, so no change, in the others)
        own = (pos >= t_first) & (pos < t_end)
        score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale  # [R]
        ok = (tl.load(mask_ptr + b * sm_b + s * sm_s + pos, mask=row_ok, other=0) != 0) & own
        score = tl.where(ok, score, float("-inf"))
        m_new = tl.maximum(m_i, score)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, p = tl.exp2(m_i - m_safe), tl.exp2(score - m_safe)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    row = (b * HKV * G + h) * S + s  # [BLOCK_R]: the query rows of o, [B * H * S]
    o_ptrs = o_ptr + row[:, None] * D + d[None, :]
    if SPLIT:
        n_p = tl.num_programs(1)
        part_ptrs = part_ptr + row[:, None] * (n_p * D) + d[None, :]  # [BLOCK_R, D] at range 0
        tl.store(part_ptrs + pid_p * D, out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + row * n_p + pid_p, lse, mask=row_ok)
        _combine_ranges(part_ptrs, lse_ptr + row * n_p, o_ptrs, row_ok, cnt_ptr + pid_bh, BLOCK_R, D, P_POW2)
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_ranges(part_ptrs, lse_ptrs, o_ptrs, row_ok, cnt_ptr, BLOCK_R: tl.constexpr, D: tl.constexpr,
                    P_POW2: tl.constexpr):  # fmt: skip
    # The end of a SPLIT attention program, after it stored its range's part and lse (part_ptrs [BLOCK_R, D]
    # and lse_ptrs [BLOCK_R] point at range 0's; ranges lie D and 1 apart). It counts itself in cnt; the last
    # of the head's P programs to arrive reads every range back (from L2) and writes o = sum over ranges of
    # part * exp(lse) / sum of exp(lse), then zeroes cnt for the next launch. As in triton_ops._epilogue, the
    # barrier and the count's acquire-release order every thread's stores before the count, and the count before
    # the loads.
    n_p = tl.num_programs(1)
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == n_p - 1:
        rp = tl.arange(0, P_POW2)
        lse = tl.load(lse_ptrs[:, None] + rp[None, :], mask=row_ok[:, None] & (rp < n_p)[None, :],
                      other=float("-inf"), cache_modifier=".cg")  # [BLOCK_R, P_POW2]  # fmt: skip
        top = tl.max(lse, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)  # rows that saw no key anywhere (padding rows) stay 0
        total = tl.sum(tl.exp(lse - top[:, None]), axis=1)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for p in range(n_p):
            w = tl.exp(tl.load(lse_ptrs + p, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - top)
            acc += w[:, None] * tl.load(part_ptrs + p * D, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        tl.store(o_ptrs, (acc / tl.where(total > 0, total, 1.0)[:, None]).to(o_ptrs.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip
        tl.store(cnt_ptr, 0)


@triton.jit
def _rope_write_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, s_b, s_s, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, S,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # qkv: [B, S, (H + 2 HKV) D] with D contiguous (query heads, then keys, then values); cos/sin: [S, D]
    # contiguous; pos: [S] the cache slots. grid: (B * S, heads / BLOCK_H). This program: BLOCK_H of one
    # position's heads. Queries and keys are rotated (rotate-half pairs (i, i + D/2), in float32, rounded once);
    # queries go to q [B, S, H, D] (contiguous, the caches' dtype), keys and values into their slot of the caches.
    pid, pid_h = tl.program_id(0), tl.program_id(1)
    b, s = pid // S, pid % S
    hh, d = pid_h * BLOCK_H + tl.arange(0, BLOCK_H), tl.arange(0, D)
    ok = hh < H + 2 * HKV
    row = qkv_ptr + b * s_b + s * s_s + hh[:, None] * D
    x = tl.load(row + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_H, D]
    x_pair = tl.load(row + ((d + D // 2) % D)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + s * D + d).to(tl.float32)
    sin = tl.where(d < D // 2, -1.0, 1.0) * tl.load(sin_ptr + s * D + d).to(tl.float32)  # rotate_half's sign
    y = tl.where((hh < H + HKV)[:, None], x * cos[None, :] + x_pair * sin[None, :], x).to(k_ptr.dtype.element_ty)
    slot = tl.load(pos_ptr + s)
    kh, vh = tl.maximum(hh - H, 0), tl.maximum(hh - H - HKV, 0)  # (clamped: masked rows still form pointers)
    tl.store(q_ptr + (pid * H + hh[:, None]) * D + d[None, :], y, mask=(hh < H)[:, None])
    tl.store(k_ptr + b * sk_b + kh[:, None] * sk_h + slot * sk_t + d[None, :], y, mask=((hh >= H) & (hh < H + HKV))[:, None])
    tl.store(v_ptr + b * sv_b + vh[:, None] * sv_h + slot * sv_t + d[None, :], y, mask=((hh >= H + HKV) & ok)[:, None])


# ----------------------------------------------------------------------------- ops


def attention_supported(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether sdpa should use the Triton kernel: GPU tensors that attention_shapes_ok() accepts."""
    return q.is_cuda and attention_shapes_ok(q, k, v, mask)


def attention_shapes_ok(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """What the kernel takes: few query rows per key/value head (decode, speculative verification), a bool
    mask of shape [B or 1, 1, S, T], head_dim a power of two from 16 to 256, one float dtype."""
    if mask is None or q.dim() != 4 or q.dtype not in FLOAT_DTYPES:
        return False
    B, H, S, D = q.shape
    hkv = k.shape[1]
    return (
        k.dtype == v.dtype == q.dtype and k.shape == v.shape and k.shape[0] == B and k.shape[3] == D
        and H % hkv == 0 and (H // hkv) * S <= ATTN_MAX_ROWS and D in (16, 32, 64, 128, 256)
        and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2:] == (S, k.shape[2])
        and mask.shape[0] in (1, B)
    )  # fmt: skip


def _attention_launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, counters: Tensor | None, splits: int,
                      rope: tuple | None = None) -> Tensor:  # fmt: skip
    # rope: (cos, sin, input_pos, n_head) with q the qkv rows [B, 1, (H + 2 HKV) D] (see rope_attention)
    hkv, T, D = k.shape[1], k.shape[2], k.shape[3]
    if rope is None:
        B, H, S, _ = q.shape
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        sq = q.stride()[:3]
        cos = sin = pos = q
        new_k = new_v = 0
    else:  # the caches are written in place: their strides are used as they are
        assert k.stride(-1) == v.stride(-1) == 1, "the caches need a contiguous last dimension"
        cos, sin, pos, H = rope
        B, S = q.shape[0], 1
        q = q.contiguous()
        sq = (q.stride(0), D, 0)
        cos, sin = cos.reshape(D).contiguous(), sin.reshape(D).contiguous()
        new_k, new_v = H * D, (H + hkv) * D
    g = H // hkv
    block_t = _block_t(splits, D)
    t_len = _cdiv(_cdiv(T, splits), block_t) * block_t  # keys per range, whole blocks
    splits = _cdiv(T, t_len)
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    o = torch.empty(B, H, S, D, device=q.device, dtype=k.dtype)
    part = lse = cnt = o  # placeholders unless split
    if splits > 1:
        part = torch.empty(B, H, S, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, S, splits, device=q.device, dtype=torch.float32)
        if counters is None:
            cnt = torch.zeros(B * hkv, device=q.device, dtype=torch.int32)
        else:
            assert counters.dtype == torch.int32 and counters.is_contiguous() and counters.device == q.device \
                and counters.numel() >= B * hkv, f"counters must be at least {B * hkv} zeroed int32 on q's device"  # fmt: skip
            cnt = counters
    sm_b = mask.stride(0) if mask.shape[0] > 1 else 0
    _attention_kernel[(B * hkv, splits)](
        q, k, v, mask.view(torch.uint8), o, part, lse, cnt,
        *sq, *k.stride()[:3], *v.stride()[:3], sm_b, mask.stride(2),
        hkv, S, T, t_len, D ** -0.5 * 1.4426950408889634, cos, sin, pos, new_k, new_v,
        G=g, D=D, BLOCK_R=max(16, triton.next_power_of_2(g * S)), BLOCK_T=block_t, SPLIT=splits > 1,
        DOT_F32=k.dtype == torch.float32 or (INTERPRET and k.dtype == torch.bfloat16), ROPE=rope is not None,
        P_POW2=triton.next_power_of_2(splits), num_warps=8, num_stages=2 if splits == 1 else 3,
        **triton_ops._pdl_args(q.device),
        **({"PRELOAD": True} if rope is not None and triton_ops.preloads(q.device, "attn") else {}),
    )  # fmt: skip
    return o


def _block_t(splits: int, D: int) -> int:
    # keys per loop step: on the H100 (bench_kernels.py) 128 was fastest for one pass over a short cache
    # (7B and 8B heads, 206 slots), 64 for split ranges of a long one (4096 slots)
    return (128 if splits == 1 else 64) * 128 // max(D, 128)


def _fake_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, counters: Tensor | None = None,
                    splits: int = 1) -> Tensor:  # fmt: skip
    return q.new_empty(q.shape)  # contiguous, whatever q's strides (a transposed view in model.py)


@_op("attention", _fake_attention, mutates=("counters",))
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, counters: Tensor | None = None, splits: int = 1) -> Tensor:
    """softmax(q k^T / sqrt(D) | mask) v for q [B, H, S, D], k/v [B, Hkv, T, D], mask [B, 1, S, T] bool:
    [B, H, S, D]. splits > 1 cuts the keys into about that many ranges (whole blocks of keys), one program
    each, and the last program of each key/value head to finish combines them: counters is then at least
    B * Hkv zeroed int32, which the call leaves zeroed (so one buffer serves every call), or None for a
    fresh zeroed buffer per call."""
    return _attention_launch(q, k, v, mask, counters, splits)


def _fake_rope_attention(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                         mask: Tensor, n_head: int, counters: Tensor | None = None, splits: int = 1) -> Tensor:  # fmt: skip
    return k_cache.new_empty(qkv.shape[0], n_head, 1, k_cache.shape[3])


@_op("rope_attention", _fake_rope_attention, mutates=("k_cache", "v_cache", "counters"))
def rope_attention(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                   mask: Tensor, n_head: int, counters: Tensor | None = None, splits: int = 1) -> Tensor:  # fmt: skip
    """A decode step's attention from the qkv matmul's output: qkv [B, 1, (n_head + 2 Hkv) D] (queries, keys,
    values), cos/sin [1, D] at the new position input_pos [1], caches [B, Hkv, T, D], mask [B, 1, 1, T] bool.
    Rotates q and k (rotate-half), writes k and v into slot input_pos of the caches (in place) and returns
    attention over the caches, [B, n_head, 1, D]: model.Attention's rotary, cache update and sdpa in one
    kernel. counters and splits as in attention."""
    return _attention_launch(qkv, k_cache, v_cache, mask, counters, splits, (cos, sin, input_pos, n_head))


def rope_attention_supported(x: Tensor, k_cache: Tensor, mask: Tensor, n_head: int) -> bool:
    """Whether the decode step of an attention layer with input x [B, S, dim] should take rope_attention: GPU
    tensors that rope_attention_shapes_ok() accepts."""
    return x.is_cuda and rope_attention_shapes_ok(x, k_cache, mask, n_head)


def rope_attention_shapes_ok(x: Tensor, k_cache: Tensor, mask: Tensor, n_head: int) -> bool:
    """One new position (S = 1), and shapes attention_shapes_ok accepts for [B, n_head, 1, D] queries."""
    q = k_cache.new_empty(x.shape[0], n_head, 1, k_cache.shape[3], device="meta")
    return x.shape[1] == 1 and x.dtype in FLOAT_DTYPES and attention_shapes_ok(q, k_cache, k_cache, mask)


def _fake_rope_write(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                     n_head: int) -> Tensor:  # fmt: skip
    return k_cache.new_empty(qkv.shape[0], qkv.shape[1], n_head, k_cache.shape[3])


@_op("rope_write", _fake_rope_write, mutates=("k_cache", "v_cache"))
def rope_write(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
               n_head: int) -> Tensor:  # fmt: skip
    """A prefill's (or verify step's) rotary and cache write from the qkv matmul's output: qkv [B, S, (n_head +
    2 Hkv) D], cos/sin [S, D] at the positions input_pos [S], caches [B, Hkv, T, D]. Rotates q and k
    (rotate-half, in float32), writes k and v into the slots input_pos of the caches (in place) and returns the
    rotated queries [B, S, n_head, D] in the caches' dtype: model.Attention's two apply_rotary and the cache
    update (a dozen small kernels) in one."""
    B, S = qkv.shape[:2]
    hkv, D = k_cache.shape[1], k_cache.shape[3]
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1, "the caches need a contiguous last dimension"
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    q = torch.empty(B, S, n_head, D, device=qkv.device, dtype=k_cache.dtype)
    heads = n_head + 2 * hkv
    block_h = min(16, triton.next_power_of_2(heads))
    _rope_write_kernel[(B * S, _cdiv(heads, block_h))](
        qkv, cos.contiguous(), sin.contiguous(), input_pos, q, k_cache, v_cache, qkv.stride(0), qkv.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], S, H=n_head, HKV=hkv, D=D, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return q


def rope_write_supported(qkv: Tensor, k_cache: Tensor, n_head: int) -> bool:
    """Whether a prefill or verify step of an attention layer should take rope_write: GPU tensors that
    rope_write_shapes_ok() accepts."""
    return qkv.is_cuda and rope_write_shapes_ok(qkv, k_cache, n_head)


def rope_write_shapes_ok(qkv: Tensor, k_cache: Tensor, n_head: int) -> bool:
    """qkv [B, S, (n_head + 2 Hkv) D] in a float dtype and caches of head_dim D, a power of two from 16 to 256."""
    hkv, D = k_cache.shape[1], k_cache.shape[3]
    return (qkv.dim() == 3 and qkv.dtype in FLOAT_DTYPES and k_cache.dtype in FLOAT_DTYPES
            and D in (16, 32, 64, 128, 256) and qkv.shape[2] == (n_head + 2 * hkv) * D)  # fmt: skip


def attention_splits(batch: int, kv_heads: int, T: int, device: torch.device) -> int:
    # key ranges per head: up to about one program per SM, ranges of at least 64 keys, and one pass where
    # DecodeAttention's counters would not cover the heads. On the H100 (bench_kernels.py --attention, per
    # layer): 206 slots, 7B heads 6.3 us in one pass, 5.3 in 4 ranges; 8B heads 5.8, 4.7 in 4 ranges (5.1 in 7
    # ranges of 32 keys); 4096 slots: 4 ranges for 7B (28.1 us; 8: 32.2), 16 for 8B (11.9 us; 8: 14.4, 32: 19.2)
    if batch * kv_heads > ATTN_COUNTERS:
        return 1
    return max(1, min(_cdiv(T, 64), triton_ops._sm_count(device) // (batch * kv_heads)))


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, enable_gqa: bool = False,
         counters: Tensor | None = None, **kwargs) -> Tensor:  # fmt: skip
    """F.scaled_dot_product_attention, with the Triton kernel for what attention_supported() accepts (decode
    and verification steps on a GPU with a bool mask), its keys split as attention_splits() says; everything
    else (prefill, CPU, dropout, an explicit scale) goes to torch. counters: as in attention."""
    if kwargs or not attention_supported(q, k, v, attn_mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kwargs)
    return attention(q, k, v, attn_mask, counters, attention_splits(q.shape[0], k.shape[1], k.shape[2], q.device))


class DecodeAttention(torch.nn.Module):
    """sdpa as a module that holds its counters: what quantize.prepare_for_device puts in Attention.sdpa, so
    that the buffer (shared by the layers, not in the state dict) is a module buffer, which torch.compile
    and CUDA graphs treat as static."""

    def __init__(self, counters: Tensor):
        super().__init__()
        self.register_buffer("counters", counters, persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, enable_gqa: bool = False,
                **kwargs) -> Tensor:  # fmt: skip
        return sdpa(q, k, v, attn_mask, enable_gqa, self.counters, **kwargs)
