"""The decode attention of triton_attention.py against torch's scaled_dot_product_attention in float64.

Without a GPU the kernel runs in Triton's interpreter (numpy); shapes stay small. bench_kernels.py --attention
times it on a GPU.
"""
import pytest
import torch
from torch.testing import assert_close

import triton_attention
import triton_ops
from bench_kernels import rope_reference


def attention_case(b, h, hkv, s, t, d, dtype, pos, seed=0):
    # queries at slots pos .. pos + s - 1 of a cache of t slots, causal; row 0 has 3 slots of left padding
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, length, d, generator=g).to(dtype) for n, length in ((h, s), (hkv, t), (hkv, t)))
    slots = torch.arange(pos, pos + s)
    mask = (torch.arange(t)[None, :] <= slots[:, None])[None, None].repeat(b, 1, 1, 1)  # [B, 1, S, T]
    mask[0, :, :, :3] = False
    return q, k, v, mask


@pytest.mark.parametrize("b,h,hkv,s,t,d,dtype,splits", [
    (1, 4, 4, 1, 70, 64, torch.float32, 1),  # a decode step, one pass
    (2, 8, 2, 3, 200, 32, torch.float32, 3),  # grouped query heads, a 3-token verify step, split key ranges
    (1, 4, 1, 5, 130, 128, torch.bfloat16, 2),  # multi-query, bf16 on tensor cores
    (2, 2, 2, 1, 64, 16, torch.bfloat16, 1),
    (1, 2, 2, 1, 192, 64, torch.float32, 3),  # 3 ranges of 64 keys, padded to 4 in the combine
])  # fmt: skip
def test_attention_matches_torch_sdpa(b, h, hkv, s, t, d, dtype, splits):
    # split ranges are combined by the last program of each key/value head, counting in a shared zeroed
    # buffer that every call leaves zeroed (checked on a buffer with room for more heads)
    q, k, v, mask = attention_case(b, h, hkv, s, t, d, dtype, pos=t - s - 4)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
    )  # fmt: skip
    counters = torch.zeros(b * hkv + 3, dtype=torch.int32)
    for _ in range(2):
        out = triton_attention.attention(q, k, v, mask, counters, splits)
        assert out.shape == q.shape and out.dtype == dtype
        assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
        assert not counters.any()
    assert_close(triton_attention.attention(q, k, v, mask, None, splits), out, atol=0, rtol=0)  # a fresh buffer per call


def rope_case(b, h, hkv, t, d, dtype, pos, seed=0):
    # a decode step at slot pos: the qkv matmul's output row [B, 1, (H + 2 Hkv) D], the rotary row, full caches
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g).to(dtype)
    caches = [torch.randn(b, hkv, t, d, generator=g).to(dtype) for _ in range(2)]
    angle = torch.rand(1, d // 2, generator=g) * 6
    angle = torch.cat([angle, angle], dim=-1)  # rotate-half layout, as model.rope_cos_sin builds it
    mask = (torch.arange(t) <= pos)[None, None, None].repeat(b, 1, 1, 1)  # [B, 1, 1, T]
    mask[0, ..., :3] = False
    return qkv, angle.cos().to(dtype), angle.sin().to(dtype), torch.tensor([pos]), caches, mask


@pytest.mark.parametrize("b,h,hkv,t,d,dtype,splits,pos", [
    (2, 4, 2, 70, 64, torch.float32, 1, 61),  # grouped query heads, one pass
    (1, 4, 4, 200, 32, torch.float32, 3, 191),  # key ranges: only the range holding the slot writes it
    (1, 4, 4, 200, 32, torch.float32, 3, 5),  # the new slot in the first range, the later ones all masked
    (2, 8, 2, 130, 128, torch.bfloat16, 2, 121),
])  # fmt: skip
def test_rope_attention_is_rotary_then_cache_write_then_attention(b, h, hkv, t, d, dtype, splits, pos):
    # triton_attention.rope_attention against model.Attention's own steps: apply_rotary (in float32, rounded once, as
    # inductor computes it), index_copy_ into the caches, sdpa over them
    qkv, cos, sin, pos, (k_cache, v_cache), mask = rope_case(b, h, hkv, t, d, dtype, pos=pos)
    q, k_ref, v_ref = rope_reference(qkv, cos, sin, pos, k_cache, v_cache, h)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k_ref.double(), v_ref.double(), attn_mask=mask, enable_gqa=True
    )  # fmt: skip
    counters = torch.zeros(b * hkv, dtype=torch.int32)
    out = triton_attention.rope_attention(qkv, cos, sin, pos, k_cache, v_cache, mask, h, counters, splits)
    assert out.shape == (b, h, 1, d) and out.dtype == dtype and not counters.any()
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    ulp = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: FMA contraction may move the rounding by one step
    assert_close(k_cache, k_ref, atol=ulp, rtol=ulp)
    assert torch.equal(v_cache, v_ref)  # the value is only copied


@pytest.mark.parametrize("b,h,hkv,t,d,dtype,splits,pos", [
    (1, 4, 4, 200, 32, torch.float32, 1, 150),  # one pass over two blocks: the first preloaded, then the loop
    (1, 4, 4, 200, 32, torch.float32, 3, 5),  # ranges, the new slot in the first (preloaded) block
    (2, 8, 2, 130, 128, torch.bfloat16, 2, 121),  # grouped heads, the slot in the last range's partial block
])  # fmt: skip
def test_rope_attention_first_block_loaded_before_the_pdl_wait_changes_nothing(b, h, hkv, t, d, dtype, splits, pos,
                                                                                monkeypatch):  # fmt: skip
    # Under PDL the rotary attention requests its range's first block of cached keys and values before waiting
    # for the previous kernel (triton_ops.preloads(device, "attn")); that block, stale at the new slot, is
    # peeled off the loop: the output and the caches must come out bit for bit the same
    outs = []
    for preload in (False, True):
        monkeypatch.setattr(triton_ops, "preloads", lambda device, what="matmul", on=preload: on)
        qkv, cos, sin, slot, caches, mask = rope_case(b, h, hkv, t, d, dtype, pos=pos)
        out = triton_attention.rope_attention(qkv, cos, sin, slot, *caches, mask, h, None, splits)
        outs.append((out, *caches))
    for before, after in zip(*outs):
        assert torch.equal(before, after)


@pytest.mark.parametrize("b,h,hkv,s,d,dtype", [
    (2, 4, 2, 6, 64, torch.float32),  # grouped query heads, a prompt of 6
    (1, 16, 4, 3, 32, torch.float32),  # 24 heads: two programs per position, the second one part masked
    (2, 8, 8, 5, 128, torch.bfloat16),
])  # fmt: skip
def test_rope_write_is_rotary_then_cache_write(b, h, hkv, s, d, dtype):
    # triton_attention.rope_write (a prefill's or verify step's rotary and cache write in one kernel) against
    # model.Attention's steps: apply_rotary in float32, rounded once, and index_copy_ into the caches at slots that
    # need not be consecutive; the other slots keep what they held
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, generator=g).to(dtype)
    k_cache, v_cache = (torch.randn(b, hkv, 40, d, generator=g).to(dtype) for _ in range(2))
    angle = torch.rand(s, d // 2, generator=g) * 6
    cos, sin = (f(torch.cat([angle, angle], dim=-1)).to(dtype) for f in (torch.cos, torch.sin))  # [S, D]
    pos = torch.tensor([3, 4, 5, 9, 10, 11][:s])
    q, k_ref, v_ref = rope_reference(qkv, cos, sin, pos, k_cache, v_cache, h)
    out = triton_attention.rope_write(qkv, cos, sin, pos, k_cache, v_cache, h)
    assert out.shape == (b, s, h, d) and out.dtype == dtype and out.is_contiguous()
    ulp = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: FMA contraction may move the rounding by one step
    assert_close(out.transpose(1, 2), q, atol=ulp, rtol=ulp)
    assert_close(k_cache, k_ref, atol=ulp, rtol=ulp)
    assert torch.equal(v_cache, v_ref)  # the value is only copied
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    assert triton_attention.rope_write_shapes_ok(qkv, k_cache, h)
    assert not triton_attention.rope_write_shapes_ok(qkv, k_cache, h + 1)  # heads that do not add up
    assert not triton_attention.rope_write_shapes_ok(meta(1, 2, 3 * 96), meta(1, 1, 8, 96), 1)  # D not a power of two
    assert not triton_attention.rope_write_supported(qkv, k_cache, h)  # CPU tensors: model.Attention's steps


def test_masked_keys_do_not_count():
    # keys past the position (cache slots not written yet) and padding slots change nothing, whatever they hold
    q, k, v, mask = attention_case(2, 2, 2, 1, 256, 64, torch.float32, pos=70)
    ref = triton_attention.attention(q, k, v, mask, None, 2)
    k[:, :, 71:], v[:, :, 71:] = k[:, :, 71:] * 100, torch.randn_like(v[:, :, 71:]) * 100
    k[0, :, :3], v[0, :, :3] = -k[0, :, :3] * 100, v[0, :, :3] * 100
    assert_close(triton_attention.attention(q, k, v, mask, None, 2), ref, atol=1e-6, rtol=1e-6)
    assert_close(triton_attention.attention(q, k, v, mask, None, 4), ref, atol=1e-6, rtol=1e-6)  # 2 ranges see no key
    assert_close(triton_attention.attention(q, k, v, mask), ref, atol=1e-6, rtol=1e-6)


def test_sdpa_sends_only_decode_sized_gpu_inputs_to_the_kernel():
    q, k, v, mask = attention_case(1, 4, 2, 1, 64, 64, torch.float32, pos=10)
    assert not triton_attention.attention_supported(q, k, v, mask)  # CPU tensors: torch's sdpa
    assert torch.equal(triton_attention.sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    # what the kernel takes, device aside: a bool [B, 1, S, T] mask, few query rows per program, power-of-two D
    shapes_ok = triton_attention.attention_shapes_ok
    assert shapes_ok(meta(1, 32, 1, 128), meta(1, 8, 64, 128), meta(1, 8, 64, 128), meta(1, 1, 1, 64, dtype=torch.bool))
    assert not shapes_ok(meta(1, 32, 1, 128), meta(1, 8, 64, 128), meta(1, 8, 64, 128), None)
    assert not shapes_ok(meta(1, 32, 1, 96), meta(1, 8, 64, 96), meta(1, 8, 64, 96), meta(1, 1, 1, 64, dtype=torch.bool))
    assert not shapes_ok(meta(1, 32, 64, 128), meta(1, 8, 64, 128), meta(1, 8, 64, 128),
                         meta(1, 1, 64, 64, dtype=torch.bool))  # a prefill: 4 x 64 rows per program  # fmt: skip
    assert not shapes_ok(meta(1, 32, 1, 128), meta(1, 8, 64, 128), meta(1, 8, 64, 128), meta(1, 1, 1, 64))  # float mask


def test_fake_implementations_agree_with_the_kernel():
    # torch.library.opcheck: each op's fake (what torch.compile plans with) gives the real output's shape, dtype
    # and strides, also for a transposed query view with several positions (a verify step)
    q, k, v, mask = attention_case(1, 4, 2, 3, 64, 32, torch.float32, pos=20)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D], as in model.py
    counters = torch.zeros(2, dtype=torch.int32)
    torch.library.opcheck(triton_attention.attention.op, (q, k, v, mask))
    torch.library.opcheck(triton_attention.attention.op, (q, k, v, mask, counters, 2))  # (mutates the counters)
    qkv, cos, sin, pos, (k_cache, v_cache), mask = rope_case(1, 4, 2, 64, 32, torch.float32, pos=20)
    caches = (k_cache, v_cache)
    torch.library.opcheck(triton_attention.rope_attention.op, (qkv, cos, sin, pos, *caches, mask, 4))  # mutates the caches
    torch.library.opcheck(triton_attention.rope_attention.op, (qkv, cos, sin, pos, *caches, mask, 4, counters, 2))
    qkv = torch.randn(1, 3, (4 + 2 * 2) * 32)  # a 3-position verify step's rotary and cache write
    rows = (qkv, cos.expand(3, 32), sin.expand(3, 32), pos + torch.arange(3))
    torch.library.opcheck(triton_attention.rope_write.op, (*rows, *caches, 4))
