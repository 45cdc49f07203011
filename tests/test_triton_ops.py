"""The Triton decode matmuls of triton_ops.py, each against its dequantized float32 reference; and the sm_90
compile test of every Triton kernel (triton_attention.py's and triton_sample.py's too).

Without a GPU, triton_ops.py builds its kernels for Triton's interpreter (numpy), so these tests run the very
kernel code on the CPU; shapes stay small. bench_kernels.py --check repeats the comparison on a GPU.
"""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import bench_kernels
import triton_attention  # noqa: F401  (its ops: test_inductor_gets_a_fallback_for_every_op_up_front)
import triton_ops
import triton_sample  # noqa: F401  (likewise)
from bench_kernels import make_weights, norm_pair

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ["float32", "bfloat16", "float16", "int8", "fp8", "int4g32", "int4g64", "int4g128"]
# relative error bounds by activation dtype: the output is rounded to it (fp32: accumulation order only)
BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def case(fmt: str, m: int, n: int, k: int, act: torch.dtype, seed: int = 0):
    weights = make_weights(fmt, n, k, DEVICE, dtype=act, seed=seed)  # scales in the activations' dtype
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, act)
    ref = x.double() @ triton_ops.dequantize(fmt, *weights).double().T  # [M, N]
    return x, weights, ref


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_op_matches_dequantized_reference(fmt, m):
    # the public op with its default config; M = 20 takes two row blocks (the kernels stay correct past MAX_M)
    act = torch.float32 if fmt == "float32" else torch.float16 if fmt == "float16" else torch.bfloat16
    x, weights, ref = case(fmt, m, 256, 384, act, seed=m)
    y = triton_ops.call(fmt, x, *weights)
    assert y.shape == (m, 256) and y.dtype == act
    assert rel_err(y, ref) < BOUND[act]


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "fp8", "int4g32", "int4g128"])
def test_fp32_activations_are_exact_up_to_accumulation(fmt):
    # fp32 activations: the dequantization itself must be exact (int4: the 1 + q/16 and 1 + q/256 floats at
    # M = 2, the denormal ones at M = 1 in test_int4_matrix_vector_over_the_range_of_x)
    x, weights, ref = case(fmt, 2, 256, 512, torch.float32)
    weights = (weights[0].float(),) if fmt == "bfloat16" else weights
    fmt = "float32" if fmt == "bfloat16" else fmt
    assert rel_err(triton_ops.call(fmt, x, *weights), ref) < 2e-5


CONFIGS = {  # every code path: CUDA-core matrix-vector, tensor cores at M = 1, split-K (ragged: 5 tiles / 3 or 4)
    "gemv": (1, triton_ops.Config(block_n=64, block_k=128)),
    "gemv_split_ragged": (1, triton_ops.Config(block_n=128, block_k=128, split_k=3)),
    "gemv_split_uneven": (1, triton_ops.Config(block_n=128, block_k=128, split_k=4)),  # 2 + 2 + 1 + 0 tiles
    "gemv_tail": (1, triton_ops.Config(block_n=64, block_k=256)),  # K = 2.5 tiles: the last one masked
    "gemv_split_tail": (1, triton_ops.Config(block_n=128, block_k=512, split_k=2)),  # 512 + 128 inputs
    "dot_m1": (1, triton_ops.Config(block_n=128, block_k=128, dot=True)),
    "dot_split": (5, triton_ops.Config(block_n=64, block_k=128, split_k=2, dot=True)),
}


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "fp8", "int4g32", "int4g128"])
def test_every_code_path(fmt, path):
    m, cfg = CONFIGS[path]
    act = torch.bfloat16 if fmt != "float32" else torch.float32
    x, weights, ref = case(fmt, m, 128, 640, act)
    assert triton_ops.valid(cfg, fmt, 128, 640)
    assert rel_err(triton_ops.run_with(fmt, x, weights, cfg), ref) < BOUND[act]


@pytest.mark.parametrize("group", [32, 128])
def test_int4_matrix_vector_tiles_from_wide_to_short(group):
    # the int4 M = 1 tiles the tuner tries beyond the common ones: all of K in one step, two rows, 1-8 warps;
    # plain, split-K and GLU
    x, weights, ref = case(f"int4g{group}", 1, 256, 4096, torch.bfloat16)
    glu_ref = triton_ops.glu_reference(f"int4g{group}", x, *weights)
    for cfg in (triton_ops.Config(block_n=8, block_k=4096, num_warps=4), triton_ops.Config(block_n=2, block_k=2048, num_warps=2),
                triton_ops.Config(block_n=4, block_k=1024, split_k=2, num_warps=8)):  # fmt: skip
        assert rel_err(triton_ops.run_with(f"int4g{group}", x, weights, cfg), ref) < BOUND[torch.bfloat16], cfg
        if cfg.split_k == 1:
            glu = triton_ops.run_with(f"int4g{group}", x, weights, cfg, glu=True)
            assert rel_err(glu, glu_ref) < BOUND[torch.bfloat16], cfg


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "int8", "fp8", "int4g32", "int4g128"])
def test_matrix_vector_tiles_may_run_past_k(fmt):
    # K = 1408 = 11 x 128 (as 11008 = 43 x 256 for Llama-2-7B's w2): on CUDA cores the last tile along K is
    # masked, so wide tiles serve such K too; plain, split-K (the tail in the last split) and GLU. Tensor-core
    # configs keep whole tiles.
    act = torch.float32 if fmt == "float32" else torch.float16 if fmt == "float16" else torch.bfloat16
    x, weights, ref = case(fmt, 1, 256, 1408, act)
    glu_ref = triton_ops.glu_reference(fmt, x, *weights)
    bits = 4 if fmt.startswith("int4") else 8
    wide = 2048 if bits == 4 else 512
    for cfg in (triton_ops.Config(block_n=8, block_k=wide, num_warps=2 if bits == 4 else 4),
                triton_ops.Config(block_n=16, block_k=512, split_k=2), triton_ops.Config(block_n=16, block_k=256, split_k=4)):
        assert triton_ops.valid(cfg, fmt, 256, 1408) and 1408 % cfg.block_k
        assert rel_err(triton_ops.run_with(fmt, x, weights, cfg), ref) < BOUND[act], cfg
        if cfg.split_k == 1:
            assert rel_err(triton_ops.run_with(fmt, x, weights, cfg, glu=True), glu_ref) < BOUND[act], cfg
    assert not triton_ops.valid(triton_ops.Config(block_n=16, block_k=512, dot=True), fmt, 256, 1408)
    with pytest.raises(AssertionError, match="runs past K"):  # rows > 1 take the tensor-core loop, unmasked
        triton_ops.run_with(fmt, x.expand(2, -1), weights, triton_ops.Config(block_n=16, block_k=512))
    assert any(1408 % c.block_k for c in triton_ops.candidates(fmt, 256, 1408, 1))


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "fp8", "int4g32"])
def test_one_row_tiles_in_flight_through_shared_memory(fmt):
    # Config.stages > 1: the M = 1 loop keeps tiles in flight (cp.async on the GPU; the interpreter runs the
    # loop as written): the same sums as with stages = 1, over several tiles, a masked tail (K = 1408), split K
    # and GLU. The tuner offers stages only to one-row CUDA-core tiles with a loop long enough to fill them,
    # and a several-row call of a config with stages takes the tensor-core loop without them.
    x, weights, ref = case(fmt, 1, 256, 1408, torch.bfloat16)
    glu_ref = triton_ops.glu_reference(fmt, x, *weights)
    for block_k, split_k in ((256, 1), (256, 2)):
        plain = triton_ops.Config(block_n=8, block_k=block_k, split_k=split_k)
        piped = triton_ops.Config(block_n=8, block_k=block_k, split_k=split_k, stages=3)
        assert triton_ops.valid(piped, fmt, 256, 1408) and 1408 % block_k
        y = triton_ops.run_with(fmt, x, weights, piped)
        assert rel_err(y, ref) < BOUND[torch.bfloat16] and torch.equal(y, triton_ops.run_with(fmt, x, weights, plain))
        if split_k == 1:
            assert rel_err(triton_ops.run_with(fmt, x, weights, piped, glu=True), glu_ref) < BOUND[torch.bfloat16]
    assert not triton_ops.valid(triton_ops.Config(block_n=16, block_k=128, dot=True, stages=3), fmt, 256, 1408)
    cands = triton_ops.candidates(fmt, 4096, 4096, 1)
    assert any(c.stages > 1 for c in cands) and all(not c.dot for c in cands if c.stages > 1)
    assert all(math.ceil(4096 / c.block_k / c.split_k) > c.stages for c in cands if c.stages > 1)
    assert all(c.stages == 1 for c in triton_ops.candidates(fmt, 4096, 4096, 16))


@pytest.mark.parametrize("fmt", ["bfloat16", "fp8", "int8"])
def test_one_row_tiles_through_tensor_descriptors(fmt):
    # Config.tma: one-row weight tiles come through a tensor descriptor (TMA bulk copies on the GPU; the
    # interpreter reads the block, zeros past K): the same sums as plain loads, for a masked tail (K = 1408),
    # split K, stages in flight, GLU and the add_norm epilogue. Descriptor blocks are at most 256 a side (int8:
    # 256 int32 words of 4 weights); int4 has no such path; several rows take the tensor-core loop without it.
    x, weights, ref = case(fmt, 1, 256, 1408, torch.bfloat16)
    glu_ref = triton_ops.glu_reference(fmt, x, *weights)
    residual, g = torch.randn(1, 256, dtype=torch.bfloat16), torch.rand(256, dtype=torch.bfloat16) + 0.5
    for block_n, block_k, split_k, stages in ((16, 256, 1, 1), (8, 256, 2, 3), (16, 256, 4, 2)):
        plain = triton_ops.Config(block_n, block_k, split_k, stages=stages)
        tma = triton_ops.Config(block_n, block_k, split_k, stages=stages, tma=True)
        assert triton_ops.valid(tma, fmt, 256, 1408) and 1408 % block_k
        y = triton_ops.run_with(fmt, x, weights, tma)
        assert rel_err(y, ref) < BOUND[torch.bfloat16] and torch.equal(y, triton_ops.run_with(fmt, x, weights, plain))
        if split_k == 1:
            assert rel_err(triton_ops.run_with(fmt, x, weights, tma, glu=True), glu_ref) < BOUND[torch.bfloat16]
        scratch = torch.zeros(triton_ops.scratch_numel(1, 256), dtype=torch.int32)
        h = triton_ops.run_with(fmt, x, weights, tma, add_norm=(residual, g, scratch))
        assert torch.equal(h, triton_ops.run_with(fmt, x, weights, plain, add_norm=(residual, g, scratch)))
        assert not scratch.any()
    if fmt == "int8":  # float32 x: int8 reads bytes, not words, and takes plain loads whatever the entry says
        x32, tma = x.float(), triton_ops.Config(16, 512, stages=2, tma=True)
        assert torch.equal(triton_ops.run_with(fmt, x32, weights, tma),
                           triton_ops.run_with(fmt, x32, weights, triton_ops.Config(16, 512, stages=2)))
    limit = 1024 if fmt == "int8" else 256
    for cfg in (triton_ops.Config(16, 2 * limit, tma=True), triton_ops.Config(16, 128, dot=True, tma=True)):
        assert not triton_ops.valid(cfg, fmt, 256, 2816), cfg
    assert triton_ops.valid(triton_ops.Config(16, limit, tma=True), fmt, 256, 2816)
    assert not triton_ops.valid(triton_ops.Config(16, 128, tma=True), "int4g32", 256, 1408)
    assert not any(c.tma for c in triton_ops.candidates("int4g32", 4096, 4096, 1))
    cands = triton_ops.candidates(fmt, 4096, 4096, 1)
    assert any(c.tma for c in cands) and all(c.block_k <= limit and c.stages > 1 for c in cands if c.tma)
    assert not any(c.tma for c in triton_ops.candidates(fmt, 4096, 4096, 16))
    x4 = x.expand(4, -1).contiguous()  # several rows: the tensor-core loop, whatever the one-row entry says
    y4 = triton_ops.run_with(fmt, x4, weights, triton_ops.Config(16, 128, stages=2, tma=True))
    assert rel_err(y4, ref.expand(4, -1)) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "fp8", "int4g32"])
def test_first_weight_tile_loaded_before_the_pdl_wait_changes_nothing(fmt, monkeypatch):
    # Under PDL (sm_90+) the M = 1 loops request their first weight tile before waiting for the previous kernel
    # (triton_ops.preloads): that tile is peeled off the loop, so every sum must come out bit for bit the same:
    # one tile per program, several, a masked tail (K = 1408), split K with the tail in the last split, split K
    # with an empty last split (K = 1024: 4 tiles of 256 over 3 splits, 2 + 2 + 0), GLU
    wide = 2048 if fmt.startswith("int4") else 512
    runs = [(1408, triton_ops.Config(block_n=8, block_k=wide, num_warps=2), False),
            (1408, triton_ops.Config(block_n=16, block_k=256), True),
            (1408, triton_ops.Config(block_n=16, block_k=512, split_k=2), False),
            (1024, triton_ops.Config(block_n=16, block_k=256, split_k=3), False),
            (wide, triton_ops.Config(block_n=8, block_k=wide, num_warps=2), True)]
    if fmt != "int4g32":  # and the same through tensor descriptors (Config.tma)
        runs += [(1408, triton_ops.Config(block_n=16, block_k=256, stages=2, tma=True), True),
                 (1408, triton_ops.Config(block_n=16, block_k=256, split_k=2, tma=True), False),
                 (1024, triton_ops.Config(block_n=16, block_k=256, split_k=3, stages=2, tma=True), False)]
    for k, cfg, glu in runs:
        x, weights, ref = case(fmt, 1, 256, k, torch.bfloat16)
        outs = []
        for preload in (False, True):
            monkeypatch.setattr(triton_ops, "preloads", lambda device, on=preload: on)
            outs.append(triton_ops.run_with(fmt, x, weights, cfg, glu))
        assert torch.equal(outs[0], outs[1]), (k, cfg, glu)
        if not glu:
            assert rel_err(outs[1], ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("fmt, act", [("int4g32", torch.bfloat16), ("int4g32", torch.float16), ("int4g32", torch.float32),
                                      ("int4g64", torch.bfloat16), ("int4g128", torch.bfloat16), ("int4g128", torch.float16)])  # fmt: skip
def test_int4_one_row_loop_reading_x_as_words(fmt, act, monkeypatch):
    # Config.x_words (int4, one row, CUDA cores): x read as int64 words of four 16-bit values, at g32 two nibble
    # positions a 16-byte load (_int4_gemv_words), in larger groups one nibble's chunks of four words a load
    # (_int4_gemv_chunks). The same sums as the plain loop, up to float32 rounding: one tile per program, several
    # with a masked tail (K = 1408), split K, GLU, with and without the first tile loaded before the PDL wait.
    # float32 x takes the plain loop.
    runs = [(1408, triton_ops.Config(block_n=8, block_k=2048, num_warps=2), False),
            (1408, triton_ops.Config(block_n=16, block_k=256), True),
            (1408, triton_ops.Config(block_n=16, block_k=512, split_k=2), False),
            (2048, triton_ops.Config(block_n=8, block_k=2048, num_warps=2), True)]
    for k, plain, glu in runs:
        words = replace(plain, x_words=True)
        assert triton_ops.valid(words, fmt, 256, k)
        x, weights, ref = case(fmt, 1, 256, k, act)
        ref = triton_ops.glu_reference(fmt, x, *weights) if glu else ref
        for preload in (False, True):
            monkeypatch.setattr(triton_ops, "preloads", lambda device, on=preload: on)
            y = triton_ops.run_with(fmt, x, weights, words, glu)
            assert rel_err(y, ref) < BOUND[act], (k, plain, glu, preload)
            assert rel_err(y, triton_ops.run_with(fmt, x, weights, plain, glu).double()) < BOUND[act] / 10


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_one_row_loop_keeping_x_one_row(act, monkeypatch):
    # Config.x_words for int8 (one row): the weight tile seen as chunks of four words and x, one row, as the four
    # int64 words of each chunk (_int8_gemv_words), in place of x broadcast to the tile. The same sums as the plain
    # loop up to float32 rounding: one tile per program, several with a masked tail (K = 1408), split K, GLU,
    # stages in flight, tensor descriptors, the add_norm epilogue, with and without the first tile loaded before
    # the PDL wait. float32 x takes the byte loop whatever the entry says.
    runs = [(1408, triton_ops.Config(block_n=8, block_k=1024), False),
            (1408, triton_ops.Config(block_n=16, block_k=256), True),
            (1408, triton_ops.Config(block_n=16, block_k=512, split_k=2), False),
            (1408, triton_ops.Config(block_n=16, block_k=256, stages=2), True),
            (1408, triton_ops.Config(block_n=16, block_k=256, stages=2, tma=True), True),
            (2048, triton_ops.Config(block_n=8, block_k=2048, num_warps=8), False)]
    for k, plain, glu in runs:
        words = replace(plain, x_words=True)
        assert triton_ops.valid(words, "int8", 256, k)
        x, weights, ref = case("int8", 1, 256, k, act)
        ref = triton_ops.glu_reference("int8", x, *weights) if glu else ref
        for preload in (False, True):
            monkeypatch.setattr(triton_ops, "preloads", lambda device, on=preload: on)
            y = triton_ops.run_with("int8", x, weights, words, glu)
            assert rel_err(y, ref) < BOUND[act], (k, plain, glu, preload)
            expected = triton_ops.run_with("int8", x, weights, plain, glu)
            if act == torch.float32:
                assert torch.equal(y, expected)
            else:
                assert rel_err(y, expected.double()) < BOUND[act] / 10
    x, weights, _ = case("int8", 1, 256, 1408, torch.bfloat16)
    residual, g = torch.randn(1, 256, dtype=torch.bfloat16), torch.rand(256, dtype=torch.bfloat16) + 0.5
    words = triton_ops.Config(block_n=8, block_k=1024, x_words=True)
    h_words = triton_ops.run_with("int8", x, weights, words, add_norm=(residual, g, None))
    h_plain = triton_ops.run_with("int8", x, weights, replace(words, x_words=False), add_norm=(residual, g, None))
    assert rel_err(h_words, h_plain.double()) < BOUND[torch.bfloat16]


def test_only_one_row_int4_and_int8_tiles_read_x_as_words():
    # x as words needs int4 weights (one int64 of x per nibble position and four words) or int8 (one per word)
    # and the one-row CUDA-core loop; the tuner offers it with every one-row int4 g32 tile without stages (with
    # stages it was slower), and not yet at g64, g128 and int8 (tables take those from bench.py --choose)
    words = triton_ops.Config(block_n=16, block_k=512, x_words=True)
    for fmt in ("int4g32", "int4g64", "int4g128", "int8"):
        assert triton_ops.valid(words, fmt, 4096, 4096), fmt
    for fmt in ("fp8", "bfloat16"):
        assert not triton_ops.valid(words, fmt, 4096, 4096), fmt
    assert not triton_ops.valid(replace(words, dot=True), "int4g32", 4096, 4096)
    cands = triton_ops.candidates("int4g32", 4096, 4096, 1)
    with_words = [c for c in cands if c.x_words]
    assert with_words and all(not c.dot and c.stages == 1 for c in with_words)
    plain = {c for c in cands if not c.x_words and not c.dot and c.stages == 1}
    assert {replace(c, x_words=False) for c in with_words} == plain
    assert not any(c.x_words for c in triton_ops.candidates("int4g32", 4096, 4096, 16))
    assert not any(c.x_words for c in triton_ops.candidates("int4g128", 4096, 4096, 1))
    assert not any(c.x_words for c in triton_ops.candidates("int8", 4096, 4096, 1))


def test_int4_layout():
    # pack_int4: in each group, word j holds q[i * group/8 + j] in bits 4i..4i+3
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 256), generator=g, dtype=torch.uint8)
    w = triton_ops.pack_int4(q, 64)
    assert w.shape == (128, 32) and w.dtype == torch.int32
    word = int(w[5, 8 + 3]) & 0xFFFFFFFF  # row 5, group 1 (8 words per group of 64), word 3
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(q[5, 64 + i * 8 + 3]) for i in range(8)]
    assert torch.equal(triton_ops.unpack_int4(w, 64), q)


def test_int4_formula_matches_tinygemm_convention():
    # W = (q - 8) * scale + zero, with scales and zeros interleaved per group: [N, K/group, 2]
    q = torch.tensor([[0, 15] * 16 + [8] * 32])  # [1, 64]: two groups of 32
    sz = triton_ops.pack_scales_zeros(torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -3.0]]))
    w = triton_ops.dequantize_int4(triton_ops.pack_int4(q, 32), sz, 32)
    assert w[0, :2].tolist() == [-3.0, 4.5] and w[0, 32:].unique().tolist() == [-3.0]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weight_is_the_dequantized_reference_in_one_pass(group):
    # the prefill path's dense weight (then one cuBLAS matmul): dequantize_int4's float32 values, rounded once
    # to the requested dtype (the interpreter rounds bf16 and fp16 towards zero, the GPU to nearest: within 1 ulp)
    g = torch.Generator().manual_seed(group)
    q = torch.randint(0, 16, (256, 384), generator=g, dtype=torch.uint8)  # 384: groups not a power of two
    sz = triton_ops.pack_scales_zeros(torch.rand(256, 384 // group, generator=g) + 0.01,
                                      torch.randn(256, 384 // group, generator=g)).to(torch.bfloat16)  # fmt: skip
    w = triton_ops.pack_int4(q, group)
    ref = triton_ops.dequantize_int4(w, sz, group)
    assert torch.equal(triton_ops.int4_weight(w, sz, group, torch.float32), ref)
    for dtype in (torch.bfloat16, torch.float16):
        out = triton_ops.int4_weight(w, sz, group, dtype)
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(out.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=0)
    torch.library.opcheck(triton_ops.int4_weight.op, (w, sz, group, torch.bfloat16), test_utils=("test_faketensor",))


def test_eager_calls_skip_the_custom_op_dispatch():
    # only torch.compile needs the registered op: an eager call runs the same kernel without the dispatcher
    # (a prefill runs its ops eagerly, and their host time, not the GPU's, sets how long it takes)
    x, (w8, s8), _ = case("int8", 3, 256, 512, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = triton_ops.int8_linear(x, w8, s8)
    assert not any(e.key.startswith("fastgen::") for e in prof.key_averages())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y_op = triton_ops.int8_linear.op(x, w8, s8)
    assert any(e.key == "fastgen::int8_linear" for e in prof.key_averages())
    assert torch.equal(y, y_op)


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "fp8", "int4g32"])
def test_custom_op_registration(fmt):
    # schema, fake (meta) implementation and functionalization, as torch.compile needs them
    x, weights, _ = case(fmt, 2, 128, 256, torch.bfloat16)
    ops = {"int8": triton_ops.int8_linear, "fp8": triton_ops.fp8_linear, "int4g32": triton_ops.int4_linear}
    op = ops.get(fmt, triton_ops.linear)
    checks = ("test_faketensor", "test_aot_dispatch_static")
    if fmt != "fp8":  # test_schema multiplies the inputs, which CPU torch cannot do in fp8
        checks += ("test_schema",)
    torch.library.opcheck(op.op, (x, *weights), test_utils=checks)


def test_compiles_with_fullgraph_and_no_graph_break():
    x, (w, sz, group), ref = case("int4g32", 1, 128, 256, torch.bfloat16)
    x8, (w8, s8), ref8 = case("int8", 1, 128, 256, torch.bfloat16)

    def step(x, x8):  # a decode-step-like mix: two custom ops and pointwise work between them
        return torch.nn.functional.silu(triton_ops.int4_linear(x, w, sz, group)) + triton_ops.int8_linear(x8, w8, s8)

    explained = torch._dynamo.explain(step)(x, x8)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, x8), step(x, x8))


def test_compiles_with_a_symbolic_row_count(monkeypatch):
    # a dynamically compiled prefill or verify step traces the ops with a symbolic M: the fake implementation
    # (output shape and dtype) must not need its value, split-K shapes (fp32 output) included, and must give
    # the dtype the call returns when only the config for several rows splits K (the tuned tables have such
    # shapes: Llama-2-7B's qkv on the H100 splits K in two at M = 16, not at M = 1)
    x, (w8, s8), _ = case("int8", 3, 256, 512, torch.bfloat16)
    split_k = triton_ops.Config(64, 128, split_k=2)
    for split in ("none", "all", "rows"):  # the configured path, a forced split-K, split-K for M > 1 only
        if split == "all":
            monkeypatch.setattr(triton_ops, "get_config", lambda *a, **kw: split_k)
        if split == "rows":
            monkeypatch.setattr(triton_ops, "get_config", lambda fmt, n, k, m, *a, **kw: split_k if m > 1 else
                                triton_ops.Config(64, 128))  # fmt: skip
            assert triton_ops.int8_linear(x, w8, s8).dtype == x.dtype == triton_ops._fake_int8(x, w8, s8).dtype
            torch.library.opcheck(triton_ops.int8_linear.op, (x, w8, s8), test_utils=("test_faketensor",))
        torch._dynamo.reset()
        step = torch.compile(lambda x: triton_ops.int8_linear(x, w8, s8).to(x.dtype) * 2, fullgraph=True, dynamic=True,
                             backend="aot_eager")  # fmt: skip
        for rows in (3, 5):
            xr = torch.randn(rows, 512).to(torch.bfloat16)
            torch.testing.assert_close(step(xr), triton_ops.int8_linear(xr, w8, s8).to(xr.dtype) * 2)


def test_supported_routes_only_decode_sized_gpu_inputs():
    x = torch.randn(1, 4096, device="cpu")
    assert not triton_ops.supported(x, 4096, 4096)  # CPU: the stock path
    assert not triton_ops.supported(torch.randn(1, 100), 128, 100)  # K not a multiple of 128
    if DEVICE == "cuda":
        assert triton_ops.supported(x.cuda().bfloat16(), 4096, 4096)
        assert not triton_ops.supported(torch.randn(17, 4096, device="cuda"), 4096, 4096)  # prefill


def test_every_shipped_table_entry_is_a_config_its_call_can_run():
    # kernel_configs.json is written by the tuner and edited by hand after end-to-end A/Bs: each entry must
    # still be a Config its key's call accepts (entry_ok: GLU calls whole K and N / 2 rows a half, add_norm whole
    # norm slots, more rows than one on the tensor cores), under a key parse_key reads (m1, m4 or m16, and
    # :glu, :add_norm or :k1 or nothing after it)
    table = json.loads(triton_ops.CONFIG_FILE.read_text())
    checked = 0
    for gpu, entries in table.items():
        for key, entry in entries.items():
            assert triton_ops.entry_ok(key, triton_ops.Config(**entry)), (gpu, key, entry)  # parses the key too
            checked += 1
    assert checked > 100
    # what entry_ok refuses: tiles past N (a GLU key's N counts both halves), split K in a GLU or whole-K
    # entry, part of a norm slot, CUDA cores for more rows than one; and keys parse_key does not read
    cfg = triton_ops.Config(block_n=64, block_k=256)
    assert triton_ops.entry_ok("int8:4096x4096:m1", cfg) and triton_ops.entry_ok("int8:128x4096:m1:glu", cfg)
    assert not triton_ops.entry_ok("int8:192x4096:m1:glu", cfg)  # 96 rows a half
    for suffix in (":glu", ":k1"):
        assert not triton_ops.entry_ok("int8:4096x4096:m1" + suffix, replace(cfg, split_k=2))
    assert not triton_ops.entry_ok("int8:4096x4096:m1:add_norm", replace(cfg, block_n=triton_ops.NORM_SLOT // 2))
    assert not triton_ops.entry_ok("int8:4096x4096:m16", cfg) and triton_ops.entry_ok("int8:4096x4096:m16",
                                                                                        replace(cfg, dot=True))
    for key in ("int8:4096x4096", "int8:4096x4096:m2", "int8:4096x4096:m1:gate", "int8:4096:m1"):
        with pytest.raises(ValueError):
            triton_ops.parse_key(key)
    assert triton_ops.parse_key("int4g32:22016x4096:m1:glu") == ("int4g32", 22016, 4096, 1, "glu")


def test_tuned_table_overrides_the_heuristic(monkeypatch):
    key = triton_ops.config_key("int8", 4096, 4096, 1)
    tuned = triton_ops.Config(block_n=64, block_k=256, split_k=2, num_warps=8)
    device = torch.device(DEVICE)
    entry = json.loads(json.dumps(tuned.__dict__))  # as read back from kernel_configs.json
    monkeypatch.setattr(triton_ops, "_TABLE", {triton_ops._device_name(device): {key: entry}})
    assert triton_ops.get_config("int8", 4096, 4096, 1, device) == tuned
    default = triton_ops.heuristic("int8", 4096, 11008, 1, triton_ops._sm_count(device))
    assert triton_ops.get_config("int8", 4096, 11008, 1, device) == default
    assert triton_ops.get_config("int8", 4096, 4096, 5, device).dot  # M > 1 always takes the tensor-core path
    # a GLU call cannot split K: the shape's entry without its split, or the tuner's best whole-K config
    assert triton_ops.plan("int8", 1, 2048, 4096, device, glu=True) == triton_ops.Config(64, 256, 1, num_warps=8)
    whole = triton_ops.Config(block_n=16, block_k=1024, num_warps=4)
    triton_ops._TABLE[triton_ops._device_name(device)][key + ":k1"] = json.loads(json.dumps(whole.__dict__))
    assert triton_ops.plan("int8", 1, 2048, 4096, device, glu=True) == whole
    assert triton_ops.get_config("int8", 4096, 4096, 1, device) == tuned  # calls that may split keep theirs
    # linear_add_norm calls take the config tuned as such calls where there is one, and only they do
    assert triton_ops.plan("int8", 1, 4096, 4096, device, add_norm=True) == tuned
    fused = triton_ops.Config(block_n=8, block_k=512, num_warps=4)
    triton_ops._TABLE[triton_ops._device_name(device)][key + ":add_norm"] = json.loads(json.dumps(fused.__dict__))
    assert triton_ops.plan("int8", 1, 4096, 4096, device, add_norm=True) == fused
    assert triton_ops.plan("int8", 1, 4096, 4096, device) == tuned
    assert triton_ops.plan("int8", 1, 2048, 4096, device, glu=True) == whole


def test_heuristic_tiles_every_shape():
    for fmt in ["bfloat16", "int8", "fp8", "int4g32", "int4g128"]:
        for n, k in [(128, 128), (384, 640), (12288, 4096), (4096, 11008), (128256, 4096), (4096, 14336)]:
            for m in (1, 4, 16):
                cfg = triton_ops.heuristic(fmt, n, k, m)
                assert triton_ops.valid(cfg, fmt, n, k), (fmt, n, k, m, cfg)


def test_several_rows_tune_over_wider_tensor_core_tiles():
    # a prefill or verify step (M > 1) dequantizes each weight once for all its rows: the tuner tries 4-16 KB
    # tensor-core tiles up to 128 rows with 4 or 8 warps there, while one row keeps its 8 KB tensor-core tiles;
    # the heuristic (no table entry) stays the 8 KB tile with 4 warps
    for fmt in ["bfloat16", "int8", "int4g32"]:
        several, one = triton_ops.candidates(fmt, 4096, 4096, 16), triton_ops.candidates(fmt, 4096, 4096, 1)
        tile_bytes = {triton_ops._tile_bytes(c, fmt) for c in several}
        assert all(c.dot for c in several) and tile_bytes == {4096, 8192, 16384}
        assert {c.num_warps for c in several} == {4, 8}
        assert max(c.block_n for c in several) == (64 if fmt == "bfloat16" else 128)  # BLOCK_K from 128
        assert {triton_ops._tile_bytes(c, fmt) for c in one if c.dot} == {8192}
        assert max(c.block_n for c in one if c.dot) <= 64
        cfg = triton_ops.heuristic(fmt, 4096, 4096, 16)
        assert cfg.num_warps == 4 and triton_ops._tile_bytes(cfg, fmt) == 8192


def test_bad_shapes_are_clear_errors():
    x, (w, s), _ = case("int8", 1, 128, 256, torch.bfloat16)
    with pytest.raises(AssertionError, match="multiples of 128"):
        triton_ops.int8_linear(x[:, :200], w[:, :200].contiguous(), s)
    with pytest.raises(AssertionError, match="features"):
        triton_ops.int8_linear(torch.randn(1, 128, dtype=torch.bfloat16), w, s)


# ----------------------------------------------------------------------------- GLU epilogue, split-K output


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "fp8", "int4g32", "int4g128"])
@pytest.mark.parametrize("m", [1, 3])
def test_glu_epilogue_is_silu_of_gate_times_up(fmt, m):
    # glu=True: the weight's first half of rows is the gate, the second the up projection; one kernel
    act = torch.float32 if fmt == "float32" else torch.bfloat16
    x, weights, _ = case(fmt, m, 512, 512, act, seed=m)
    ref = triton_ops.glu_reference(fmt, x, *weights)
    y = triton_ops.call(fmt, x, *weights, glu=True)
    assert y.shape == (m, 256) and y.dtype == act
    assert rel_err(y, ref) < BOUND[act]
    # and over several tiles along K, gate and up halves alike
    y = triton_ops.run_with(fmt, x, weights, triton_ops.Config(block_n=64, block_k=128), glu=True)
    assert rel_err(y, ref) < BOUND[act]


def test_split_k_returns_its_float32_buffer(monkeypatch):
    # a split-K call returns the fp32 buffer its programs add into (the caller's cast then fuses into the next
    # kernel); a call without split-K returns x's dtype; out_dtype() tells which, for the fake implementation
    x, weights, ref = case("int8", 1, 256, 512, torch.bfloat16)
    for split, dtype in ((2, torch.float32), (1, torch.bfloat16)):
        monkeypatch.setattr(triton_ops, "get_config", lambda *a, s=split, **kw: triton_ops.Config(64, 128, split_k=s))
        y = triton_ops.int8_linear(x, *weights)
        assert y.dtype == dtype == triton_ops.out_dtype("int8", x, 256, 512)
        assert rel_err(y, ref) < BOUND[dtype]
    assert triton_ops.plan("int8", 1, 128, 512, x.device, glu=True).split_k == 1  # GLU never splits K


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "fp8", "int4g32", "int4g128"])
@pytest.mark.parametrize("m", [1, 3])
def test_add_norm_then_norm_linear_is_residual_rmsnorm_and_swiglu(fmt, m):
    # linear_add_norm: h = x @ Wo^T + residual, with h * g and h's partial sums of squares; norm_linear: the
    # SwiGLU of RMSNorm(h) @ W13^T from those, so the norm between the two matmuls needs no kernel
    act = torch.float32 if fmt == "float32" else torch.bfloat16
    (h, y), (h_ref, y_ref) = norm_pair(fmt, m, 256, 256, 384, DEVICE, act, seed=m)
    assert h.shape == (m, 256) and y.shape == (m, 256) and h.dtype == y.dtype == act
    # y's bound is twice the matmuls': h * g is rounded to x's dtype before the matmul (the model rounds its
    # norm's output too), and the SwiGLU's product doubles that error
    assert rel_err(h, h_ref) < BOUND[act] and rel_err(y, y_ref) < 2 * BOUND[act]


def test_add_norm_outputs_and_its_plan(monkeypatch):
    # h * g in x's dtype and one float32 sum of squares per NORM_SLOT outputs; a tuned config with fewer rows
    # than a slot is replaced by one of the same tile area
    x, (w, scale), _ = case("int8", 2, 256, 512, torch.float32)
    residual, g = torch.randn(2, 256), torch.rand(256) + 0.5
    h, hn, ss = triton_ops.linear_add_norm("int8", x, w, scale, residual, g)
    assert hn.dtype == h.dtype == torch.float32 and ss.shape == (2, 256 // triton_ops.NORM_SLOT)
    assert_close(hn, h * g)
    assert_close(ss, h.view(2, -1, triton_ops.NORM_SLOT).pow(2).sum(-1))
    monkeypatch.setattr(triton_ops, "get_config", lambda *a, **kw: triton_ops.Config(4, 256, split_k=2))
    assert triton_ops.plan("int8", 1, 256, 512, x.device, add_norm=True) == triton_ops.Config(8, 128, split_k=2)


def test_the_tuner_times_add_norm_calls_with_an_explicit_config():
    # bench_kernels.py --tune times wo and w2 as linear_add_norm calls through run_with: h = x @ W^T + residual
    # with the config it is given (here split K, into the caller's scratch, which it leaves zeroed)
    x, (w, scale), ref = case("int8", 1, 256, 512, torch.float32)
    residual, g = torch.randn(1, 256), torch.rand(256) + 0.5
    scratch = torch.zeros(triton_ops.scratch_numel(1, 256), dtype=torch.int32)
    cfg = triton_ops.Config(8, 128, split_k=2)
    h = triton_ops.run_with("int8", x, (w, scale), cfg, add_norm=(residual, g, scratch))
    assert h.shape == (1, 256) and rel_err(h, ref + residual.double()) < BOUND[torch.float32]
    assert not scratch.any()
    assert rel_err(h, triton_ops.linear_add_norm("int8", x, w, scale, residual, g)[0].double()) < 1e-6


def test_the_tuner_times_the_feed_forward_calls_next_to_each_other():
    # w13's GLU call runs right before w2's linear_add_norm in every layer: the tuner times each of them in a
    # graph that alternates it with the other (the table's config there), copy i of one weight then copy i of
    # the other, in the model's order
    near = bench_kernels.ffn_neighbours(["7b", "8b"])
    assert near[22016, 4096, "glu"] == (4096, 11008, "add_norm", True)
    assert near[4096, 11008, "add_norm"] == (22016, 4096, "glu", False)
    assert near[28672, 4096, "glu"] == (4096, 14336, "add_norm", True)
    assert (4096, 4096, "add_norm") not in near and len(near) == 4  # wo's predecessor, the attention, varies
    mine, theirs = ["w13 0", "w13 1", "w13 2"], ["w2 0", "w2 1"]
    assert bench_kernels.pair_runs(mine, theirs, after=True) == ["w13 0", "w2 0", "w13 1", "w2 1"]
    assert bench_kernels.pair_runs(theirs, mine, after=False) == ["w13 0", "w2 0", "w13 1", "w2 1"]


def test_the_tuner_picks_by_a_second_timing_of_its_finalists():
    # one timing per candidate can be lucky: the fastest few and the table's config are timed again, twice,
    # interleaved, and the pick is the finalist with the best retimed figure
    cfgs = [triton_ops.Config(8 * (i + 1), 256) for i in range(6)]
    first = [(10.0, cfgs[0]), (11.0, cfgs[1]), (12.0, cfgs[2]), (13.0, cfgs[3]), (14.0, cfgs[4]), (20.0, cfgs[5])]
    later = {cfgs[0]: [15.0, 16.0], cfgs[1]: [12.0, 11.5], cfgs[2]: [13.0, 12.5], cfgs[3]: [14.0, 13.0],
             cfgs[5]: [11.8, 11.0]}
    order = []

    def time_fn(cfg):
        order.append(cfg)
        return later[cfg][sum(c == cfg for c in order) - 1]

    assert bench_kernels.confirm(first, time_fn, default=cfgs[5]) == (11.0, cfgs[5])
    assert order == [cfgs[0], cfgs[1], cfgs[2], cfgs[3], cfgs[5]] * 2  # the fifth fastest is not retimed
    order.clear()
    assert bench_kernels.confirm(first, time_fn, default=None) == (11.5, cfgs[1])
    order.clear()
    # a table config that is not among the timed candidates (it failed, or the tuner does not offer it) is not retimed
    assert bench_kernels.confirm(first[:4], time_fn, default=triton_ops.Config(128, 64)) == (11.5, cfgs[1])


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4g32"])
@pytest.mark.parametrize("m", [1, 3])
def test_split_k_add_norm_is_finished_by_the_last_program_of_each_tile(fmt, m, monkeypatch):
    # programs along K add into a float32 buffer and count themselves; the last of a tile adds the residual
    # and writes h, h * g and the sums of squares, as a whole-K call does. The buffer is the caller's scratch
    # where given, left zeroed, so the next call (here with another x) can use it as it is
    act = torch.bfloat16
    x, weights, _ = case(fmt, m, 256, 384, act, seed=m)
    w, aux = weights[0], weights[1] if len(weights) > 1 else None
    residual, g = torch.randn(m, 256).to(act), (torch.rand(256) + 0.5).to(act)
    scratch = torch.zeros(triton_ops.scratch_numel(triton_ops.MAX_M, 256), dtype=torch.int32)
    outs = {}
    for split, xs, ws in ((1, x, None), (3, x, None), (3, x.flip(0), scratch), (3, x, scratch), (1, x.flip(0), None)):
        monkeypatch.setattr(triton_ops, "get_config", lambda *a, s=split, **kw: triton_ops.Config(16, 128, split_k=s))
        outs[split, ws is None, xs is x] = triton_ops.linear_add_norm(fmt, xs, w, aux, residual, g, ws)
        assert not scratch.any()
    for fresh in (True, False):
        for whole, split in zip(outs[1, True, True], outs[3, fresh, True]):
            assert whole.dtype == split.dtype and rel_err(split, whole.double()) < 1e-2
    for whole, split in zip(outs[1, True, False], outs[3, False, False]):
        assert rel_err(split, whole.double()) < 1e-2
    if m == 1:  # M = 1: tiles past K too (256 + a masked 128 in the second split)
        monkeypatch.setattr(triton_ops, "get_config", lambda *a, **kw: triton_ops.Config(16, 256, split_k=2))
        for whole, split in zip(outs[1, True, True], triton_ops.linear_add_norm(fmt, x, w, aux, residual, g, scratch)):
            assert rel_err(split, whole.double()) < 1e-2
        assert not scratch.any()
    with pytest.raises(AssertionError, match="scratch must be"):
        triton_ops.linear_add_norm(fmt, x, w, aux, residual, g, scratch[:100])


def test_preloads_follows_fastgen_preload(monkeypatch):
    # FASTGEN_PRELOAD: unset or 1 both loads, 0 neither, a list the ones it names (under PDL only)
    monkeypatch.setattr(triton_ops, "uses_pdl", lambda device: True)
    cuda = torch.device("cuda")
    for env, on in ((None, (True, True)), ("1", (True, True)), ("0", (False, False)), ("attn", (False, True)),
                    ("matmul", (True, False)), ("matmul,attn", (True, True))):  # fmt: skip
        if env is None:
            monkeypatch.delenv("FASTGEN_PRELOAD", raising=False)
        else:
            monkeypatch.setenv("FASTGEN_PRELOAD", env)
        assert (triton_ops.preloads(cuda), triton_ops.preloads(cuda, "attn")) == on, env
    monkeypatch.setattr(triton_ops, "uses_pdl", lambda device: False)
    assert not triton_ops.preloads(cuda, "attn")


def test_only_one_row_matmuls_launch_under_pdl(monkeypatch):
    # programmatic dependent launch (and the first tile loaded before its wait) for M = 1 only: a several-row call
    # scheduled early holds SM slots that the call before it still needs (see triton_ops._pdl_args)
    monkeypatch.setattr(triton_ops, "uses_pdl", lambda device: True)
    launches = []

    class Recorder:  # kernel[grid](...) records the launch's keyword arguments instead of running
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    for name in ("_linear_kernel", "_int4_kernel"):
        monkeypatch.setattr(triton_ops, name, Recorder())
    for fmt in ("bfloat16", "int8", "int4g32"):
        for m in (1, 3, 16):
            x, weights, _ = case(fmt, m, 256, 256, torch.bfloat16)
            triton_ops.call(fmt, x, *weights)
            pdl = {key: launches[-1].get(key, False) for key in ("PDL", "launch_pdl", "PRELOAD")}
            assert pdl == dict.fromkeys(pdl, m == 1), (fmt, m, pdl)
    assert len(launches) == 9


def test_fake_implementations_agree_with_the_kernels():
    # torch.library.opcheck: each matmul op's fake (what torch.compile plans with) gives the real output's shape,
    # dtype and strides (triton_attention's and triton_sample's: in their own tests)
    for fmt, op in (("bfloat16", triton_ops.linear), ("int8", triton_ops.int8_linear), ("int4g32", triton_ops.int4_linear)):
        x, weights, _ = case(fmt, 3, 256, 256, torch.bfloat16)
        for glu in (False, True):
            torch.library.opcheck(op.op, (x, *weights, glu))
        w, aux = weights[0], weights[1] if len(weights) > 1 else None
        residual, g = torch.randn(3, 256, dtype=torch.bfloat16), torch.rand(256, dtype=torch.bfloat16)
        h, hn, ss = triton_ops.linear_add_norm(fmt, x, w, aux, residual, g)
        torch.library.opcheck(triton_ops.linear_add_norm.op, (fmt, x, w, aux, residual, g))
        scratch = torch.zeros(triton_ops.scratch_numel(3, 256), dtype=torch.int32)
        torch.library.opcheck(triton_ops.linear_add_norm.op, (fmt, x, w, aux, residual, g, scratch))  # (mutates scratch)
        torch.library.opcheck(triton_ops.norm_linear.op, (fmt, hn, w, aux, ss, 1e-5, True))




def test_inductor_gets_a_fallback_for_every_op_up_front():
    # prepare_for_device registers them on a GPU: inductor then never builds its implicit-fallback message, which
    # printed a deep op's arguments recursively (torch 2.11: a 7B decode step with the sampler never compiled)
    from torch._inductor import lowering

    triton_ops.register_inductor_fallbacks()
    assert {"linear", "int4_linear", "linear_add_norm", "rope_attention", "sample"} <= set(triton_ops._OP_NAMES)
    assert all(getattr(torch.ops.fastgen, name).default in lowering.lowerings for name in triton_ops._OP_NAMES)


def test_int4_matrix_vector_over_the_range_of_x():
    # M = 1 reads each masked nibble as a denormal float and prescales x by up to 2^76 (_int4_gemv_step):
    # exact for |x| from 2^-52 to 2^52; zeros, tiny and huge activations alike
    x, weights, _ = case("int4g32", 1, 128, 640, torch.float32)
    x[:, ::3] = 0.0
    for mag in (2.0**-50, 1e-6, 1.0, 1e6, 2.0**50):
        xm = x * mag
        ref = xm.double() @ triton_ops.dequantize("int4g32", *weights).double().T
        for cfg in (triton_ops.Config(block_n=64, block_k=128), triton_ops.Config(block_n=128, block_k=128, split_k=2)):
            assert rel_err(triton_ops.run_with("int4g32", xm, weights, cfg), ref) < 2e-5, (mag, cfg)


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
def test_int8_matrix_vector_over_the_range_of_x(act):
    # M = 1 with 16-bit activations reads each masked byte as a denormal float and prescales x by up to 2^76
    # (_int8_gemv_step); zeros, tiny and huge activations (fp16: its normal range) alike; GLU at the small end
    x, weights, _ = case("int8", 1, 256, 640, torch.float32)
    x[:, ::3] = 0.0
    w_glu = (torch.cat([weights[0], weights[0].flip(0)]), torch.cat([weights[1], weights[1]]))
    mags = (2.0**-50, 1e-6, 1.0, 1e6, 2.0**50) if act == torch.bfloat16 else (2.0**-10, 1.0)
    for mag in mags:
        xm = (x * mag).to(act)
        ref = xm.double() @ triton_ops.dequantize("int8", *weights).double().T
        for cfg in (triton_ops.Config(block_n=64, block_k=128), triton_ops.Config(block_n=128, block_k=128, split_k=2)):
            assert rel_err(triton_ops.run_with("int8", xm, weights, cfg), ref) < BOUND[act], (mag, cfg)
        if mag <= 1:  # (larger x saturates the sigmoid: numpy warns of exp overflow in the interpreter)
            glu = triton_ops.run_with("int8", xm, w_glu, triton_ops.Config(block_n=32, block_k=128), glu=True)
            assert rel_err(glu, triton_ops.glu_reference("int8", xm, *w_glu)) < BOUND[act], mag


def test_weight_at_an_odd_address():
    # a contiguous int8 weight need not be 16-byte aligned (a view into a larger buffer): M = 1 then takes the
    # byte loop instead of the int32-word one (misaligned word loads fault on a GPU), with the same result
    x, (w, s), ref = case("int8", 1, 128, 256, torch.bfloat16)
    buf = torch.empty(w.numel() + 1, dtype=torch.int8, device=w.device)
    odd = buf[1:].view(w.shape)
    odd.copy_(w)
    assert odd.is_contiguous() and odd.data_ptr() % 2 == 1
    for cfg in (triton_ops.Config(block_n=64, block_k=128), triton_ops.Config(block_n=128, block_k=128, split_k=2)):
        assert rel_err(triton_ops.run_with("int8", x, (odd, s), cfg), ref) < BOUND[torch.bfloat16]


GPU_COMPILE = r"""
import re
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_attention
import triton_ops
import triton_sample

def build(fn, sig, consts, num_warps=4):
    # pointers and the K-sized ints are 16-divisible, as the JIT would specialise them at a real launch
    if "PRELOAD" in fn.arg_names:  # a constexpr with a default must still be given here (triton 3.9)
        consts = {"PRELOAD": False, **consts}
    if "STAGES" in fn.arg_names:
        consts = {"STAGES": 1, **consts}
    if "X_WORDS" in fn.arg_names:
        consts = {"X_WORDS": False, "X_BF16": True, **consts}
    if "TMA" in fn.arg_names:  # no descriptor in the signature: the argument is None
        consts = {"TMA": False, **consts, **({} if "w_desc" in sig else {"w_desc": None})}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(sig.items())
             if t[0] == "*" or name not in ("M", "n_in", "eps")}
    src = ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in consts}}, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})

ints = {"M": "i32", "N": "i32", "K": "i32", "k_len": "i32", "KW": "i32", "KW_LEN": "i32"}
def zeroes_after_loading(ptx):
    # split-K add_norm: the last program of a tile loads the sums (.cg) in one layout and zeroes them in another,
    # so a barrier must keep every thread's loads before any zeroing store (without it a GPU check failed)
    first_zero = ptx.index("st.global.cg")
    assert "bar.sync" in ptx[ptx.rindex("ld.global.cg", 0, first_zero):first_zero]
def fused(x):  # the residual / norm arguments (linear_add_norm, norm_linear)
    return {"res_ptr": x, "g_ptr": x, "yn_ptr": x, "ss_ptr": "*fp32", "ss_in_ptr": "*fp32", "n_in": "i32", "eps": "fp32",
            "acc_ptr": "*fp32", "cnt_ptr": "*i32"}
for w, x, bm, atomic, glu, norm in [("*i8", "*bf16", 1, True, False, ""), ("*i8", "*fp16", 1, False, True, "in"),
                                    ("*i8", "*bf16", 16, False, False, "add"), ("*fp8e4nv", "*bf16", 16, False, True, ""),
                                    ("*bf16", "*bf16", 1, False, True, ""), ("*fp8e4nv", "*bf16", 1, False, False, "add"),
                                    ("*i8", "*bf16", 1, True, False, "add"), ("*i8", "*bf16", 16, True, False, "add")]:
    # both paths, both stores, the GLU epilogue, the norm's two halves
    sig = {"x_ptr": x, "w_ptr": w, "s_ptr": x, "y_ptr": "*fp32" if atomic and norm != "add" else x, **ints, **fused(x)}
    consts = dict(HAS_SCALE=w != "*bf16", W_INT8=w == "*i8", X16=True, X_BF16=x == "*bf16", GLU=glu, ATOMIC=atomic,
                  DOT_F32=False, BLOCK_M=bm, BLOCK_N=32, BLOCK_K=256, PDL=glu, PREFETCH=65536 * glu,
                  ADD_NORM=norm == "add", NORM_IN=norm == "in", PARTS_IN=512, TAIL=False)
    ptx = build(triton_ops._linear_kernel, sig, consts).asm["ptx"]
    if atomic and norm == "add":
        zeroes_after_loading(ptx)
    assert ("griddepcontrol.wait" in ptx) == glu  # the grid-dependency wait, and the L2 prefetch of both halves
    assert ptx.count("cp.async.bulk.prefetch.L2") == 2 * glu
    # int8 at M = 1 multiplies denormal floats (the masked bytes) too
    assert not re.search(r"(fma|mul)[.a-z]*[.]ftz", ptx), f"flush-to-zero arithmetic in the linear kernel ({w}, M={bm})"
for bm, glu, norm, atomic in ((1, False, "add", True), (16, False, "", False), (1, True, "in", False), (16, True, "", False)):
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "sz_ptr": "*bf16", "y_ptr": "*bf16", **ints, **fused("*bf16")}
    ptx = build(triton_ops._int4_kernel, sig, dict(GROUP=32, GLU=glu, ATOMIC=atomic, DOT_F32=False, BLOCK_M=bm,
                                                BLOCK_N=32, BLOCK_K=512, PDL=glu, PREFETCH=16384 * glu,
                                                ADD_NORM=norm == "add", NORM_IN=norm == "in", PARTS_IN=512, TAIL=False)).asm["ptx"]
    if atomic and norm == "add":
        zeroes_after_loading(ptx)
    assert ptx.count("cp.async.bulk.prefetch.L2") == 2 * glu
    # M = 1 multiplies denormal floats (the masked nibbles): flush-to-zero products would zero the weights
    assert not re.search(r"(fma|mul)[.a-z]*[.]ftz", ptx), f"flush-to-zero arithmetic in the int4 kernel (M={bm})"
# M = 1 tiles that run past K (TAIL): int8 words, fp8 elements and int4 words, masked loads
for fn, w, extra in ((triton_ops._linear_kernel, "*i8", dict(HAS_SCALE=True, W_INT8=True, X16=True, X_BF16=True)),
                     (triton_ops._linear_kernel, "*fp8e4nv", dict(HAS_SCALE=True, W_INT8=False, X16=True, X_BF16=True)),
                     (triton_ops._int4_kernel, "*i32", dict(GROUP=32))):
    sig = {"x_ptr": "*bf16", "w_ptr": w, "sz_ptr" if w == "*i32" else "s_ptr": "*bf16", "y_ptr": "*bf16", **ints,
           **fused("*bf16")}
    ptx = build(fn, sig, dict(**extra, GLU=True, ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=1024,
                              PDL=False, PREFETCH=0, ADD_NORM=False, NORM_IN=False, PARTS_IN=1, TAIL=True)).asm["ptx"]
    assert re.search(r"@%p[0-9]+ ld[.]global", ptx), f"no masked loads in the TAIL kernel ({w})"
# M = 1, a tile of 8 rows by 4096: each thread holds 8 rows of one group; x is loaded once for all of them
# (8 nibble positions x 8 bytes), the words and (scale, zero) pairs once per row, and the layout needs no
# shared-memory round trips but the final reduction's
sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "sz_ptr": "*bf16", "y_ptr": "*bf16", **ints, **fused("*bf16")}
ptx = build(triton_ops._int4_kernel, sig, dict(GROUP=32, GLU=False, ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=8,
                                            BLOCK_K=4096, PDL=False, PREFETCH=0, ADD_NORM=False, NORM_IN=False,
                                            PARTS_IN=1, TAIL=False)).asm["ptx"]
loads = re.findall(r"ld[.]global[.a-z0-9]*", ptx)
assert (loads.count("ld.global.v2.b32"), loads.count("ld.global.v4.b32"), loads.count("ld.global.b32")) == (8, 8, 8), loads
assert ptx.count("bar.sync") <= 4
# X_WORDS (Config.x_words): x in 4 loads of 16 bytes (two int64 words: two nibble positions), still no shared memory
ptx = build(triton_ops._int4_kernel, sig, dict(GROUP=32, GLU=False, ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=8,
                                            BLOCK_K=4096, PDL=False, PREFETCH=0, ADD_NORM=False, NORM_IN=False,
                                            PARTS_IN=1, TAIL=False, X_WORDS=True, X_BF16=True)).asm["ptx"]
loads = re.findall(r"ld[.]global[.a-z0-9]*", ptx)
counts = loads.count("ld.global.v2.b64"), loads.count("ld.global.v4.b32"), loads.count("ld.global.b32")
assert counts == (4, 8, 8), loads
assert ptx.count("bar.sync") <= 4 and "ld.global.v2.b32" not in loads
# ... and at GROUP 128 (_int4_gemv_chunks): one nibble's x for a thread's four words as one int64 load (8 a tile
# here), in place of the plain loop's pairs of 32-bit halves
ptx = build(triton_ops._int4_kernel, sig, dict(GROUP=128, GLU=False, ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=8,
                                            BLOCK_K=2048, PDL=False, PREFETCH=0, ADD_NORM=False, NORM_IN=False,
                                            PARTS_IN=1, TAIL=False, X_WORDS=True, X_BF16=True), num_warps=2).asm["ptx"]
loads = re.findall(r"ld[.]global[.a-z0-9]*", ptx)
assert loads.count("ld.global.b64") == 8 and "ld.global.v2.b32" not in loads, loads
# PRELOAD (under PDL): the first tile's words (16-byte loads) and (scale, zero) pairs are requested before the
# grid-dependency wait, x only after it; int8's first words too
ptx = build(triton_ops._int4_kernel, sig, dict(GROUP=32, GLU=True, ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=4,
                                            BLOCK_K=2048, PDL=True, PREFETCH=0, ADD_NORM=False, NORM_IN=True,
                                            PARTS_IN=512, TAIL=False, PRELOAD=True)).asm["ptx"]
wait = ptx.index("griddepcontrol.wait")
before = re.findall(r"ld[.]global[.a-z0-9]*", ptx[:wait])  # gate and up halves: 2 x (words, pairs) per thread here
assert sorted(before) == ["ld.global.b32"] * 4 + ["ld.global.v4.b32"] * 4, f"weights before the wait: {before}"
sig8 = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "y_ptr": "*bf16", **ints, **fused("*bf16")}
ptx = build(triton_ops._linear_kernel, sig8, dict(HAS_SCALE=True, W_INT8=True, X16=True, X_BF16=True, GLU=False,
                                               ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=16, BLOCK_K=512, PDL=True,
                                               PREFETCH=0, ADD_NORM=False, NORM_IN=False, PARTS_IN=1, TAIL=False,
                                               PRELOAD=True)).asm["ptx"]
assert "ld.global" in ptx[: ptx.index("griddepcontrol.wait")], "int8: no weight load before the wait"
# STAGES (one row): the loop's weight tiles are copied ahead into shared memory (cp.async), in each M = 1 loop;
# with STAGES = 1 none are
for fn, s, w in ((triton_ops._int4_kernel, sig, dict(GROUP=32)), (triton_ops._linear_kernel, sig8, dict(
        HAS_SCALE=True, W_INT8=True, X16=True, X_BF16=True)), (triton_ops._linear_kernel, sig8, dict(
        HAS_SCALE=True, W_INT8=True, X16=False, X_BF16=True))):  # fmt: skip
    for stages in (1, 3):
        ptx = build(fn, s, dict(**w, GLU=True, ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, PDL=True,
                                PREFETCH=0, ADD_NORM=False, NORM_IN=False, PARTS_IN=1, TAIL=False, PRELOAD=True,
                                STAGES=stages)).asm["ptx"]  # fmt: skip
        assert ("cp.async.cg" in ptx or "cp.async.ca" in ptx) == (stages > 1), (fn.__name__, w, stages)
# TMA (one row; bf16, and int8 as int32 words): the weight tiles are bulk tensor copies, the first before the
# wait, the loop's in flight (STAGES); without it, plain loads
sig16 = {**sig8, "w_ptr": "*bf16"}
for tma, int8 in ((False, False), (True, False), (False, True), (True, True)):
    s = {**sig8} if int8 else {**sig16}
    if tma:
        s["w_desc"] = "tensordesc<i32[16, 64]>" if int8 else "tensordesc<bf16[16, 256]>"
    ptx = build(triton_ops._linear_kernel, s, dict(HAS_SCALE=int8, W_INT8=int8, X16=True, X_BF16=True, GLU=True,
                                                  ATOMIC=False, DOT_F32=False, BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, PDL=True,
                                                  PREFETCH=0, ADD_NORM=False, NORM_IN=False, PARTS_IN=1, TAIL=False,
                                                  PRELOAD=True, STAGES=3, TMA=tma)).asm["ptx"]  # fmt: skip
    copies = ptx.count("cp.async.bulk.tensor")
    before = ptx[: ptx.index("griddepcontrol.wait")].count("cp.async.bulk.tensor")
    assert (copies >= 4 and before == 2) if tma else copies == 0, (tma, int8, copies, before)  # gate and up halves
strides = {f"s{t}_{d}": "i32" for t, dims in (("q", "bhs"), ("k", "bht"), ("v", "bht"), ("m", "bs")) for d in dims}
# one pass (7B heads), split ranges with grouped query heads (8B); each also with rotary and the cache write
stores = {}
for g, split, rope in ((1, False, False), (4, True, False), (1, False, True), (4, True, True)):
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*u8", "o_ptr": "*bf16",
           "part_ptr": "*fp32", "lse_ptr": "*fp32", "cnt_ptr": "*i32", **strides, "HKV": "i32", "S": "i32", "T": "i32",
           "t_len": "i32", "qk_scale": "fp32", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64", "new_k": "i32",
           "new_v": "i32"}
    ptx = build(triton_attention._attention_kernel, sig, dict(G=g, D=128, BLOCK_R=16, BLOCK_T=64, SPLIT=split,
                                                           DOT_F32=False, ROPE=rope, PDL=split, P_POW2=8 if split else 1,
                                                           PRELOAD=rope and split)).asm["ptx"]  # fmt: skip
    stores[split, rope] = ptx.count("st.global")
    if rope and split:  # PRELOAD: the first block of keys and values before the wait, nothing else (no store)
        before = ptx[: ptx.index("griddepcontrol.wait")]
        assert "st.global" not in before and "atom" not in before
        # keys and values, 64 x 128 bf16 each, in 16-byte loads over 4 warps' 128 threads, all issued before
        # the wait: their move into the dot layouts (shared memory, which waits for the data) comes after it
        loads = re.findall(r"ld[.]global[.a-z0-9]*", before)
        assert loads == ["ld.global.v4.b32"] * (2 * 64 * 128 * 2 // 16 // 128) and "st.shared" not in before, loads
    if split:  # the combine: the count after a barrier, acquire-release at GPU scope, then loads that bypass L1
        assert re.search(r"bar[.]sync[^;]*;(?:(?!ld[.]global).)*atom[.]global[.]gpu[.]acq_rel[.]add", ptx, re.S), "barrier, count"
        assert "ld.global.cg" in ptx
assert all(stores[split, True] > stores[split, False] for split in (False, True))  # the cache writes
# sampling: radix select levels and the race, bf16 and fp32 logits (a 128256 vocabulary's block, as sample()
# launches them): after the PDL wait, each program's adds before the count, acquire-release, then L2 loads
for logits in ("*bf16", "*fp32"):
    bits = 16 if logits == "*bf16" else 32
    sig = {"logits_ptr": logits, "scratch_ptr": "*i64", "V": "i32", "stride_l": "i32", "temperature": "fp32", "top_k": "i32"}
    for level in range(bits // 8):
        ptx = build(triton_sample._radix_kernel, sig, dict(LEVEL=level, KEY_BITS=bits, BLOCK=1024, PDL=True)).asm["ptx"]
        assert "griddepcontrol.wait" in ptx and "ld.global.cg" in ptx
        assert re.search(r"bar[.]sync[^;]*;(?:(?!ld[.]global).)*atom[.]global[.]gpu[.]acq_rel[.]add", ptx, re.S), "barrier, count"
    sig = {"logits_ptr": logits, "noise_ptr": "*fp32", "out_ptr": "*i32", "scratch_ptr": "*i64", "V": "i32",
           "stride_l": "i32", "temperature": "fp32"}
    ptx = build(triton_sample._race_kernel, sig, dict(KEY_BITS=bits, TOP_K=True, BLOCK=1024, PDL=True)).asm["ptx"]
    assert "griddepcontrol.wait" in ptx and re.search(r"(atom|red)[.]global[.][a-z.]*max[.]s64", ptx), "the packed maximum"
# the prefill path's int4 dequantization: whole groups of contiguous stores, 16 bytes at a time
for out in ("*bf16", "*fp32"):
    sig = {"w_ptr": "*i32", "sz_ptr": "*bf16", "out_ptr": out, "K": "i32"}
    ptx = build(triton_ops._dequant_int4_kernel, sig, dict(GROUP=32, BLOCK_G=128)).asm["ptx"]
    assert "st.global.v4" in ptx, f"no vector stores in the int4 dequantization ({out})"
print("ok")
"""


def test_triton_ops_compile_for_h100():
    # The interpreter accepts code the GPU compiler may reject: compile every kernel variant for sm_90 with
    # Triton's bundled ptxas (no GPU needed), in a process where TRITON_INTERPRET is off.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-c", GPU_COMPILE, str(ROOT)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
