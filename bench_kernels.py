"""Check, tune and benchmark the Triton decode kernels (triton_ops.py, triton_attention.py, triton_sample.py) on
one GPU.

    python bench_kernels.py --check          # every op vs its dequantized float32 reference, compiled capture,
                                             # and two model layers vs torch's kernels
    python bench_kernels.py --tune           # time candidate configs on the 7B shapes, write kernel_configs.json
    python bench_kernels.py --tune --calls add_norm --tune_m 1   # only wo and w2 as linear_add_norm calls
    python bench_kernels.py                  # GB/s per primitive and shape, next to the device copy GB/s
    python bench_kernels.py --check --tune --bench --shapes 7b 8b

The benchmark times each primitive inside a CUDA graph (as the decode step runs) while rotating over enough
copies of the weight to overflow L2, so no weight is read from cache. GB/s counts weight and scale bytes.
"""
import argparse
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from copy import deepcopy

import torch
import torch.nn.functional as F

import generate
import quantize
import triton_attention
import triton_ops
import triton_sample
from bench import random_transformer
from model import ModelArgs, apply_rotary

# Llama-2-7B and Llama-3-8B layer matmuls (N outputs, K inputs): fused qkv, wo, fused gate|up, down; and the
# output projection (reported apart from the per-layer sum)
SHAPES = {
    "7b": [("qkv", 12288, 4096), ("wo", 4096, 4096), ("w13", 22016, 4096), ("w2", 4096, 11008), ("out", 32000, 4096)],
    "8b": [("qkv", 6144, 4096), ("wo", 4096, 4096), ("w13", 28672, 4096), ("w2", 4096, 14336), ("out", 128256, 4096)],
}
N_LAYERS = {"7b": 32, "8b": 32}
FORMATS = ["bfloat16", "int8", "fp8", "int4g32", "int4g128"]
BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative error, by activation dtype


def make_weights(fmt: str, n: int, k: int, device, dtype=torch.bfloat16, seed: int = 0) -> tuple:
    """Random weights in fmt's layout, as triton_ops.call(fmt, x, *weights) takes them (scales in dtype); drawn
    on the device itself, so 7B-sized ones take milliseconds. Also used by tests/test_triton_ops.py."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, device=device)  # noqa: E731
    if fmt == "int8":
        w = torch.randint(-128, 128, (n, k), generator=g, device=device, dtype=torch.int8)
        return w, (rand(n) * 0.01 + 0.001).to(dtype)
    if fmt == "fp8":
        w = (torch.randn(n, k, generator=g, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return w, (rand(n) * 0.001 + 1e-4).to(dtype)
    if fmt.startswith("int4"):
        group = int(fmt[5:])
        q = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.uint8)
        scales, zeros = rand(n, k // group) * 0.02 + 0.001, (rand(n, k // group) - 0.5) * 0.04
        return triton_ops.pack_int4(q, group), triton_ops.pack_scales_zeros(scales, zeros).to(dtype), group
    return ((torch.randn(n, k, generator=g, device=device) * 0.02).to(getattr(torch, fmt)),)


def norm_pair(fmt: str, m: int, dim: int, hidden: int, k: int, device, dtype=torch.bfloat16, seed: int = 0,
              scratch: torch.Tensor | None = None):  # fmt: skip
    """A linear_add_norm call feeding a norm_linear one, as NormFusedBlock makes them (wo [dim, k] or w2 with
    k = hidden, then w13 [2 hidden, dim] with the SwiGLU), run, with float64 references: (h, y), (h_ref, y_ref).
    The reference norm starts from h rounded to dtype, as the kernel's does. scratch: the zeroed buffer of
    split-K calls (NormFusedBlock.norm_scratch), or None for a fresh one. Also used by tests/test_triton_ops.py."""
    g = torch.Generator(device=device).manual_seed(seed)
    wo, w13 = make_weights(fmt, dim, k, device, dtype, seed), make_weights(fmt, 2 * hidden, dim, device, dtype, seed + 1)
    x, residual = (torch.randn(m, n, generator=g, device=device).to(dtype) for n in (k, dim))
    norm_weight, eps = (torch.rand(dim, generator=g, device=device) + 0.5).to(dtype), 1e-5
    kernel_args = [(w[0], w[1] if len(w) > 1 else None) for w in (wo, w13)]  # int4's group size is in fmt
    h, hn, ss = triton_ops.linear_add_norm(fmt, x, *kernel_args[0], residual, norm_weight, scratch)
    y = triton_ops.norm_linear(fmt, hn, *kernel_args[1], ss, eps, True)
    h_ref = x.double() @ triton_ops.dequantize(fmt, *wo).double().T + residual.double()
    hr = h_ref.to(dtype).double()
    xn = hr * torch.rsqrt(hr.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    gate, up = (xn @ triton_ops.dequantize(fmt, *w13).double().T).chunk(2, dim=-1)
    return (h, y), (h_ref, F.silu(gate) * up)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def poison(*like: tuple) -> None:
    # Fill and free buffers of the output's sizes, so the op's own allocations (the caching allocator hands
    # the same blocks back) start as NaN: any output element the kernel fails to write shows up.
    bufs = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for shape, dtype in like]
    del bufs


# decode attention (batch, query heads, key/value heads, query positions, cache length): 7B and 8B heads at
# the benchmark's 206-slot cache and at 4096 slots
ATTENTION_SHAPES = [(1, 32, 32, 1, 206), (1, 32, 8, 1, 206), (1, 32, 32, 1, 4096), (1, 32, 8, 1, 4096)]


def attention_inputs(b: int, h: int, hkv: int, s: int, t: int, d: int = 128, at_start: bool = False,
                     end: int | None = None):  # fmt: skip
    # bf16 q [B, H, S, D], k/v [B, Hkv, T, D]; a causal bool mask [B, 1, S, T] with the queries at the last slots
    # (at_start: at the first ones, as in a prefill, so that later key ranges hold no key a query may see;
    # end: at the slots before that one, as in a step early in a long cache)
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    end = s if at_start else t if end is None else end
    slots = torch.arange(end - s, end, device="cuda")
    mask = (torch.arange(t, device="cuda")[None, :] <= slots[:, None])[None, None].expand(b, 1, s, t).contiguous()
    return q, k, v, mask


# ----------------------------------------------------------------------------- correctness


def check(formats: list[str], trials: int) -> None:
    gen = torch.Generator().manual_seed(0)
    paths = {  # the code paths, forced, on top of the configured one
        "gemv": lambda: triton_ops.Config(32, 256),
        "gemv_split": lambda: triton_ops.Config(16, 256, split_k=3),
        "gemv_stages": lambda: triton_ops.Config(16, 256, stages=3),  # tiles in flight through shared memory
        "gemv_split_stages": lambda: triton_ops.Config(8, 256, split_k=2, stages=4),
        "dot_m1": lambda: triton_ops.Config(32, 256, dot=True),
        # int4 and int8 only (valid): x read as int64 words, also split K, and wide tiles (past K where K % 1024)
        "gemv_x_words": lambda: triton_ops.Config(32, 256, x_words=True),
        "gemv_split_x_words": lambda: triton_ops.Config(16, 256, split_k=3, x_words=True),
        "gemv_wide_x_words": lambda: triton_ops.Config(8, 1024, x_words=True, num_warps=2),  # K % 1024: a tail
    }
    worst = {}
    for fmt in formats + ["float16", "int4g64"]:
        act = torch.float16 if fmt == "float16" else torch.bfloat16
        for t in range(trials):
            n = 128 * int(torch.randint(1, 64, (1,), generator=gen))
            k = 256 * int(torch.randint(1, 40, (1,), generator=gen))
            m = [1, 1, 2, 5, 16, 24][t % 6]
            weights = make_weights(fmt, n, k, "cuda", act, seed=1000 + t)
            x = torch.randn(m, k, device="cuda", dtype=act)
            ref = x.double() @ triton_ops.dequantize(fmt, *weights).double().T
            runs = {"config": lambda: triton_ops.call(fmt, x, *weights)}
            for name, cfg in paths.items():
                if m == 1 and triton_ops.valid(cfg(), fmt, n, k):
                    runs[name] = lambda cfg=cfg: triton_ops.run_with(fmt, x, weights, cfg())
            for name, run in runs.items():
                poison(((m, n), act), ((m, n), torch.float32))
                y = run()
                torch.cuda.synchronize()
                assert not y.isnan().any(), f"{fmt} {name} M={m} N={n} K={k}: output not fully written"
                err = rel_err(y, ref)
                assert err < BOUND[act], f"{fmt} {name} M={m} N={n} K={k}: relative error {err:.2e}"
                worst[fmt] = max(worst.get(fmt, 0.0), err)
    for fmt, err in worst.items():
        bound = BOUND[torch.float16 if fmt == "float16" else torch.bfloat16]
        print(f"check {fmt:9s} worst relative error {err:.2e} over {trials} random shapes (bound {bound:.0e})")

    # the prefill path's dense int4 weight: the float32 reference rounded once (to nearest) to each dtype
    for group in (32, 64, 128):
        w, sz = make_weights(f"int4g{group}", 4096, 11008, "cuda", seed=4000 + group)[:2]
        ref = triton_ops.dequantize_int4(w, sz, group)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(triton_ops.int4_weight(w, sz, group, dtype), ref.to(dtype)), f"int4_weight g{group} {dtype}"
    print("check int4_weight (prefill's dense int4 weight) equals the reference in bf16, fp16, fp32")

    # the SwiGLU epilogue (FeedForward's w13): silu(first half of the outputs) * second half
    for fmt in formats:
        for m in (1, 3):
            n, k = 256 * int(torch.randint(1, 48, (1,), generator=gen)), 256 * int(torch.randint(1, 24, (1,), generator=gen))
            weights = make_weights(fmt, 2 * n, k, "cuda", seed=2000 + m)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err = rel_err(triton_ops.call(fmt, x, *weights, glu=True), triton_ops.glu_reference(fmt, x, *weights))
            assert err < BOUND[torch.bfloat16], f"{fmt} glu M={m} N={n} K={k}: relative error {err:.2e}"
            worst[fmt + " glu"] = max(worst.get(fmt + " glu", 0.0), err)
        print(f"check {fmt:9s} glu epilogue worst relative error {worst[fmt + ' glu']:.2e}")

    # a matmul adding the residual and preparing the RMSNorm (linear_add_norm), then the matmul finishing it
    # (norm_linear with the SwiGLU): NormFusedBlock's wo or w2, then w13, on the 7B shapes and a random smaller
    # one, all of a dim sharing one scratch as the blocks do, which each split-K call must leave zeroed
    for fmt in formats:
        for dim, hidden in ((4096, 11008), (1024 * int(torch.randint(1, 8, (1,), generator=gen)), 1536)):
            scratch = torch.zeros(triton_ops.scratch_numel(triton_ops.MAX_M, dim), device="cuda", dtype=torch.int32)
            for m, k in itertools.product((1, 3), (dim, hidden)):
                (h, y), (h_ref, y_ref) = norm_pair(fmt, m, dim, hidden, k, "cuda", seed=3000 + m, scratch=scratch)
                err = max(rel_err(h, h_ref), rel_err(y, y_ref))
                # twice the matmul bound: h * g is rounded to bf16 before w13 (as the model rounds its norm's output)
                assert err < 2 * BOUND[torch.bfloat16], f"{fmt} add_norm M={m} {dim}x{k}: relative error {err:.2e}"
                assert not scratch.any(), f"{fmt} add_norm M={m} {dim}x{k} left its scratch dirty"
                worst[fmt + " norm"] = max(worst.get(fmt + " norm", 0.0), err)
        print(f"check {fmt:9s} linear_add_norm + norm_linear worst relative error {worst[fmt + ' norm']:.2e}")

    # decode attention against torch's sdpa in float64, on the benchmark's shapes and a long context
    # and a prefill's queries at the start of the cache, whose later key ranges hold no key they may see
    for (b, h, hkv, s, t), at_start in [(c, False) for c in ATTENTION_SHAPES + [(2, 32, 8, 5, 777)]] + \
            [((1, 32, 8, 6, 256), True), ((2, 32, 32, 1, 777), True)]:  # fmt: skip
        q, k, v, mask = attention_inputs(b, h, hkv, s, t, at_start=at_start)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        y = triton_attention.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
        err = (y.double() - ref).abs().max().item()
        splits = triton_attention.attention_splits(b, hkv, t, q.device)
        where = "first" if at_start else "last"
        print(f"check attention B={b} H={h} Hkv={hkv} S={s} T={t}, queries at the {where} slots ({splits} key "
              f"ranges): max abs error {err:.1e}")  # fmt: skip
        assert err < 2e-2

    # rope_attention (rotary, cache write, attention) against model.Attention's steps: float32 rotary rounded
    # once, index_copy_ into the caches, sdpa in float64
    for b, h, hkv, _, t in ATTENTION_SHAPES + [(2, 32, 8, 1, 777)]:
        _, k_cache, v_cache, mask = attention_inputs(b, h, hkv, 1, t)  # the new position is the last slot
        d = k_cache.shape[3]
        qkv = torch.randn(b, 1, (h + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
        angle = torch.rand(1, d // 2, device="cuda").repeat(1, 2) * 6
        cos, sin, slot = angle.cos().bfloat16(), angle.sin().bfloat16(), torch.tensor([t - 1], device="cuda")
        q, k_ref, v_ref = rope_reference(qkv, cos, sin, slot, k_cache, v_cache, h)
        ref = F.scaled_dot_product_attention(q.double(), k_ref.double(), v_ref.double(), attn_mask=mask, enable_gqa=True)
        splits = triton_attention.attention_splits(b, hkv, t, qkv.device)
        counters = torch.zeros(b * hkv, device="cuda", dtype=torch.int32)
        y = triton_attention.rope_attention(qkv, cos, sin, slot, k_cache, v_cache, mask, h, counters, splits)
        assert not counters.any(), "rope_attention left its counters dirty"
        err = (y.double() - ref).abs().max().item()
        cache_err = (k_cache.float() - k_ref.float()).abs().max().item()
        print(f"check rope_attention B={b} H={h} Hkv={hkv} T={t} ({splits} key ranges): max abs error {err:.1e}, "
              f"key cache {cache_err:.1e}")  # fmt: skip
        assert err < 2e-2 and cache_err <= 2e-2 and torch.equal(v_cache, v_ref)

    check_rope_write()

    # int4 uses tinygemm's formula: the same q, scales and zeros give the same product as _weight_int4pack_mm
    for group in (32, 128):
        w, sz, _ = make_weights(f"int4g{group}", 4096, 4096, "cuda", seed=7)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        stock = int4_stock(w, sz, group)
        err = rel_err(triton_ops.int4_linear(x, w, sz, group), stock(x))
        print(f"check int4g{group} vs torch._weight_int4pack_mm relative difference {err:.2e}")
        assert err < 1e-2

    # captured by torch.compile(fullgraph=True, mode="reduce-overhead") with no graph break
    torch._dynamo.reset()
    for fmt in formats:
        weights = make_weights(fmt, 4096, 4096, "cuda", seed=3)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

        def step(x, weights=weights, fmt=fmt):
            return F.silu(triton_ops.call(fmt, x, *weights)) * 2

        explained = torch._dynamo.explain(step)(x)
        assert explained.graph_break_count == 0, f"{fmt}: {explained.break_reasons}"
        compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            y = compiled(x)
        err = rel_err(y, step(x))
        print(f"check {fmt:9s} compiled (reduce-overhead, fullgraph) vs eager relative difference {err:.2e}")
        assert err < 1e-3

    check_sampling()
    model_check(formats)


def rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """model.Attention's steps for the qkv matmul's output [B, S, (H + 2 Hkv) D] at cache slots [S]: q and k
    rotated in float32 and rounded once to qkv's dtype (as inductor computes it), k and v index_copy_'d into
    copies of the caches -> (q [B, H, S, D], new key cache, new value cache). For rope_attention and rope_write."""
    b, s = qkv.shape[:2]
    hkv, d = k_cache.shape[1], k_cache.shape[3]
    q, k, v = (y.view(b, s, -1, d).transpose(1, 2) for y in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
    q, k = (apply_rotary(y.float(), cos.float(), sin.float()).to(qkv.dtype) for y in (q, k))
    return q, k_cache.clone().index_copy_(2, slots, k), v_cache.clone().index_copy_(2, slots, v)


def check_rope_write() -> None:
    """rope_write (a prefill's or verify step's rotary and cache write) against model.Attention's steps: float32
    rotary rounded once, index_copy_ into the caches; 16 and 5 positions."""
    for b, h, hkv, s, t in ((1, 32, 32, 16, 206), (2, 32, 8, 5, 777)):
        _, k_cache, v_cache, _ = attention_inputs(b, h, hkv, 1, t)
        d = k_cache.shape[3]
        qkv = torch.randn(b, s, (h + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
        angle = torch.rand(s, d // 2, device="cuda").repeat(1, 2) * 6
        cos, sin, slots = angle.cos().bfloat16(), angle.sin().bfloat16(), torch.arange(t - s, t, device="cuda")
        q, k_ref, v_ref = rope_reference(qkv, cos, sin, slots, k_cache, v_cache, h)
        y = triton_attention.rope_write(qkv, cos, sin, slots, k_cache, v_cache, h)
        err = max((y.transpose(1, 2).float() - q.float()).abs().max().item(),
                  (k_cache.float() - k_ref.float()).abs().max().item())  # fmt: skip
        print(f"check rope_write B={b} H={h} Hkv={hkv} S={s} T={t}: max abs error (queries, key cache) {err:.1e}")
        assert err <= 2e-2 and torch.equal(v_cache, v_ref)


def model_check(formats: list[str], device="cuda", cfg=None, kernels: tuple = (None, "cuda"), slots: int = 256,
                bound: float = 5e-2, compiled: bool = True) -> dict[str, float]:  # fmt: skip
    """Whole decoder layers through the kernels that ship (prepare_for_device's default choice, kernels[0]) against
    torch's own paths (kernels[1]: cuBLAS, tinygemm, sdpa) on the same weights of each format: a 6-token prefill
    at the start of a `slots` cache (the later key ranges of the split attention then hold no key its queries may
    see), run eagerly and, for kernels[0], also compiled with dynamic shapes as generate.py --compile_prefill
    does and replayed from a CUDA graph as generate.PrefillGraphs does (capture=False off the GPU); then three
    decode steps, for kernels[0] through torch.compile(mode="reduce-overhead") as generate.py's
    decode step (warm-up, record, replay). compiled=False runs everything eagerly. cfg: default two layers of the
    7B width with grouped key/value heads (8 for 32, as Llama-3-8B) and the 7B feed-forward (K = 11008: masked
    tails). Returns the largest logit difference relative to the largest reference logit, per format."""
    cfg = cfg or ModelArgs(vocab_size=32000, dim=4096, n_layer=2, n_head=32, n_local_heads=8, intermediate_size=11008)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0)).to(device)
    generate.set_inductor_pdl(os.environ.get("FASTGEN_PDL", "1") != "0")  # inductor's kernels as generate.py compiles them
    worst = {}
    for fmt in formats:
        torch._dynamo.reset()  # each format's model compiles afresh (no recompile limit across formats)
        base = random_transformer(cfg, device, torch.float16 if fmt == "float16" else torch.bfloat16)
        if fmt not in ("bfloat16", "float16"):
            quantize.quantize_model(base, fmt if fmt in ("int8", "fp8") else f"int4-g{fmt[5:]}", pack=False)
        logits = []
        for kernel in kernels:
            model = quantize.prepare_for_device(deepcopy(base), kernel)
            model.setup_caches(1, slots)
            prefill = step = model
            if compiled and kernel == kernels[0]:
                prefill = torch.compile(model, fullgraph=True, dynamic=True)  # as generate.py --compile_prefill
                step = torch.compile(model, mode="reduce-overhead", fullgraph=True)  # as its decode step
            with torch.no_grad():
                pos = torch.arange(6, device=device)
                out = [model(tokens[:, :6], pos)[0], prefill(tokens[:, :6], pos)[0]]  # [6, V] each
                if compiled and kernel == kernels[0]:  # as generate.py's prefill of short prompts: a graph replay
                    graphs = generate.PrefillGraphs(capture=torch.device(device).type == "cuda")
                    graphs(model, tokens[:, :6], pos)  # the first call runs eagerly and records the graph
                    out.append(graphs(model, tokens[:, :6], pos)[0].clone())
                else:
                    out.append(model(tokens[:, :6], pos)[0])
                out += [step(tokens[:, i : i + 1], torch.tensor([i], device=device))[0].clone() for i in range(6, 9)]
            logits.append(torch.cat(out).float())  # [21, V]: the prefill's rows (eager, compiled, graph), the steps'
        ours, ref = logits
        for name, y in (("shipped", ours), ("stock", ref)):
            bad = (~torch.isfinite(y)).any(-1).nonzero().flatten().tolist()
            assert not bad, (f"{fmt}: non-finite logits from the {name} kernels in rows {bad} (0-5 eager prefill, "
                             "6-11 compiled prefill, 12-17 prefill graph, 18-20 decode)")  # fmt: skip
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        print(f"check {fmt:9s} model (prefill eager, compiled and replayed, compiled decode) vs torch's kernels: "
              f"relative difference {err:.2e}")  # fmt: skip
        assert err < bound, f"{fmt}: the model's logits differ from torch's kernels' by {err:.2e} (bound {bound:.0e})"
        worst[fmt] = err
    return worst


# ----------------------------------------------------------------------------- tuning


def add_norm_args(m: int, n: int, dtype: torch.dtype) -> tuple:
    # what NormFusedBlock passes linear_add_norm besides x and the weight: residual [m, n], norm weight [n] and
    # the zeroed scratch of split-K calls
    residual = torch.randn(m, n, device="cuda", dtype=dtype)
    scratch = torch.zeros(triton_ops.scratch_numel(m, n), device="cuda", dtype=torch.int32)
    return residual, torch.rand(n, device="cuda", dtype=dtype) + 0.5, scratch


def _compile(work: list[tuple[str, int, triton_ops.Config, str, bool]]) -> int:
    # one worker: launch each config once on a tiny problem with the same Triton specialisation as the real
    # one (dtypes, M == 1 or not, the call: "plain", "glu" or "add_norm", ints divisible by 16), which leaves
    # the binary in Triton's disk cache
    for fmt, m, cfg, call, tail in work:  # tail: the real K ends in a part-tile (_launch's TAIL)
        past = max(128, triton_ops._group(fmt)) if tail else 0  # a part-tile of whole int4 groups
        n, k = max(cfg.block_n, 128) * (2 if call == "glu" else 1), cfg.block_k * cfg.split_k + past
        x = torch.randn(m, k, device="cuda", dtype=triton_ops.act_dtype(fmt))
        fused = add_norm_args(m, n, x.dtype) if call == "add_norm" else None
        triton_ops.run_with(fmt, x, make_weights(fmt, n, k, "cuda"), cfg, call == "glu", fused)
    torch.cuda.synchronize()
    return len(work)


def precompile(work: list[tuple[str, int, triton_ops.Config, str, bool]], jobs: int) -> None:
    """Triton compiles a kernel on its first launch, one at a time: compile them in parallel processes first."""
    work = sorted(set(work), key=str)
    chunks = [work[i::jobs] for i in range(jobs) if work[i::jobs]]
    t = time.time()
    with concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
        done = sum(pool.map(_compile, chunks))
    print(f"compiled {done} kernel variants in {len(chunks)} processes in {time.time() - t:.0f} s")


def weight_copies(fmt: str, n: int, k: int, seed: int = 0) -> list[tuple]:
    """Enough copies of one random weight to overflow the L2 cache when used in turn: each kernel call then
    streams its weight from memory, as a decode step does (every weight is read once per token)."""
    base = make_weights(fmt, n, k, "cuda", seed=seed)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    extra = min(63, math.ceil(3 * l2 / nbytes(base)))
    return [base] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in base) for _ in range(extra)]


def tune_calls(fmt: str, n: int, k: int, m: int, sms: int, call: str) -> list[triton_ops.Config]:
    # the candidates a call can run
    cands = triton_ops.candidates(fmt, n, k, m, sms, tma=torch.cuda.get_device_capability()[0] >= 9)
    return [c for c in cands if triton_ops.call_accepts(c, call == "glu", call == "add_norm")]


def ffn_neighbours(shapes: list[str]) -> dict[tuple[int, int, str], tuple[int, int, str, bool]]:
    """(N, K, call) -> (N', K', call', after) for the feed-forward's two calls: w13's GLU call runs right before
    w2's linear_add_norm in every layer (after: the neighbour runs after the call). Under PDL a kernel's start
    overlaps its predecessor's tail, so such a call is timed next to its neighbour (the table's config for it):
    alone, a whole-K 16 x 512 int8 w2 tile beat the table's split-K one (17.7 against 19.4 µs, 7B) and after the
    GLU took 27 µs, costing 8% of 7B int8 end to end."""
    out = {}
    for s in shapes:
        w = {name: (n, k) for name, n, k in SHAPES[s]}
        (n13, dim), (n2, hidden) = w["w13"], w["w2"]
        out[n13, dim, "glu"] = (n2, hidden, "add_norm", True)
        out[n2, hidden, "add_norm"] = (n13, dim, "glu", False)
    return out


def table_config(fmt: str, m: int, n: int, k: int, device: torch.device, call: str) -> triton_ops.Config:
    # the config the model's call of an [n, k] weight runs now (a GLU call's n counts gate and up)
    return triton_ops.plan(fmt, m, n // (2 if call == "glu" else 1), k, device, call == "glu", call == "add_norm")


def call_runs(fmt: str, x: torch.Tensor, copies: list[tuple], cfg: triton_ops.Config, call: str, fused) -> list:
    # one call per weight copy, as the model makes it ("plain", "glu" or "add_norm" with fused's tensors)
    return [lambda w=w: triton_ops.run_with(fmt, x, w, cfg, call == "glu", fused) for w in copies]


def neighbour_runs(fmt: str, m: int, device: torch.device, neighbour: tuple | None) -> tuple | None:
    # the neighbour call's runs over its own weight copies with the table's config, whether it runs after the
    # tuned call, and its time alone
    if neighbour is None:
        return None
    n, k, call, after = neighbour
    copies = weight_copies(fmt, n, k, seed=1)
    x = torch.randn(m, k, device=device, dtype=triton_ops.act_dtype(fmt))
    fused = add_norm_args(m, n, x.dtype) if call == "add_norm" else None
    runs = call_runs(fmt, x, copies, table_config(fmt, m, n, k, device, call), call, fused)
    return runs, after, graph_time(runs, reps=20, rounds=2)


def pair_runs(runs: list, neighbour: list, after: bool) -> list:
    # the calls in the order a decode step makes them: copy i of the tuned weight, then copy i of the
    # neighbour's (or the neighbour first), so both stream from memory
    return [r for pair in zip(runs, neighbour) for r in (pair if after else pair[::-1])]


def confirm(timed: list[tuple[float, triton_ops.Config]], time_fn, default: triton_ops.Config | None,
            top: int = 4, rounds: int = 2) -> tuple[float, triton_ops.Config]:
    """The best of timed after timing its `top` fastest and the table's default again, interleaved over `rounds`:
    one timing per candidate can pick a config on a lucky run (the tuner once timed the table's 8B fp8 GLU tile
    at 49.2 µs and a second run at 41.6), so the pick is by each finalist's best retimed figure."""
    finalists = [c for _, c in sorted(timed, key=lambda tc: tc[0])[:top]]
    if default is not None and default not in finalists and any(c == default for _, c in timed):
        finalists.append(default)
    again = {i: [] for i in range(len(finalists))}
    for _ in range(rounds):
        for i, cfg in enumerate(finalists):
            again[i].append(time_fn(cfg))
    best = min(again, key=lambda i: min(again[i]))
    return min(again[best]), finalists[best]


def tune(cases: list[tuple[str, int, int, int]], jobs: int, calls: dict[tuple[int, int], tuple[str, ...]],
         neighbours: dict | None = None) -> None:
    """Time triton_ops.candidates(...) for each (fmt, N, K, M) and store the fastest in kernel_configs.json under
    this GPU's name. Each candidate is timed as the benchmark times it: replayed from a CUDA graph (no launch
    overhead: a decode step is one graph) over weight copies that overflow L2. calls[(N, K)] names how the
    model calls that weight: "plain" (stored under the key itself), "glu" (the feed-forward's gate|up weight
    with the SwiGLU, whole-K configs only, stored under ":glu") or "add_norm" (wo and w2 through
    linear_add_norm, whose split-K epilogue counts its programs and finishes the norm: stored under ":add_norm").
    A call in neighbours (ffn_neighbours) is timed next to the call the model makes before or after it, that one
    with the table's config, and its time is the pair's less the neighbour's alone. The fastest few of each call
    are timed again (confirm) before one is stored.
    Run once per GPU model; the kernels never tune at start-up. Check the GLU picks end to end (bench.py
    --configs OLD.json NEW.json) before keeping them: for int4 the fastest here lost 5-14% in the model."""
    device = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if jobs > 1:
        work = [(f, m, c, call, k % c.block_k > 0) for f, n, k, m in cases for call in calls[n, k]
                for c in tune_calls(f, n, k, m, sms, call)]  # fmt: skip
        precompile(work, jobs)
    best = {}
    for fmt, n, k, m in cases:
        copies = weight_copies(fmt, n, k)
        x = torch.randn(m, k, device=device, dtype=triton_ops.act_dtype(fmt))
        key, size = triton_ops.config_key(fmt, n, k, m), nbytes(copies[0])
        product = x.double() @ triton_ops.dequantize(fmt, *copies[0]).double().T
        for call in calls[n, k]:
            ref, fused = product, None
            if call == "glu":
                ref = F.silu(ref[:, : n // 2]) * ref[:, n // 2 :]
            elif call == "add_norm":
                fused = add_norm_args(m, n, x.dtype)
                ref = ref + fused[0].double()
            near = neighbour_runs(fmt, m, device, (neighbours or {}).get((n, k, call)))

            def time_cfg(cfg: triton_ops.Config, reps: int = 10) -> float:
                runs = call_runs(fmt, x, copies, cfg, call, fused)
                if near is None:
                    return graph_time(runs, reps=reps, rounds=2)
                other, after, alone = near  # a pair's graph: twice as many calls, half of them the neighbour's
                return 2 * graph_time(pair_runs(runs, other, after), reps=reps, rounds=2) - alone

            timed = []
            for cfg in tune_calls(fmt, n, k, m, sms, call):
                try:
                    err = rel_err(triton_ops.run_with(fmt, x, copies[0], cfg, call == "glu", fused), ref)
                    assert err < BOUND[x.dtype], f"relative error {err:.2e}"
                    assert fused is None or not fused[2].any(), "the scratch was left dirty"
                    timed.append((time_cfg(cfg), cfg))
                except Exception as e:  # a config this GPU or Triton version cannot build: skip it, and say so
                    print(f"  skip {cfg}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
            name = key + ("" if call == "plain" else ":" + call)
            if not timed:
                print(f"{name}: no candidate worked; the heuristic stays")
                continue
            default = table_config(fmt, m, n, k, device, call)
            t, best[name] = confirm(timed, lambda c: time_cfg(c, reps=20), default)
            if call == "plain" and best[name].split_k > 1:  # GLU calls cannot split K: keep the best whole-K one too
                whole = [tc for tc in timed if tc[1].split_k == 1]
                if whole:
                    best[key + ":k1"] = min(whole, key=lambda t: t[0])[1]
            t_default = next((t for t, c in timed if c == default), float("nan"))
            print(f"{name:32s} {t * 1e6:7.1f} us {size / t / 1e9:6.0f} GB/s (the table's {t_default * 1e6:7.1f} us in "
                  f"the first pass){' after/before its neighbour' if near else ''}  {best[name]}")  # fmt: skip
        del copies
    triton_ops.store_configs(best, device)


# ----------------------------------------------------------------------------- stock paths


def int4_stock(w: torch.Tensor, sz: torch.Tensor, group: int):
    # the same int4 weight for torch's tinygemm: uint8 [N, K/2] (even k in the high nibble) -> its tiled layout
    q = triton_ops.unpack_int4(w, group)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
    sz_t = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/group, N, 2]
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz_t)


def stock_fn(fmt: str, weights: tuple, m: int):
    """The stock path for one weight: what the project uses without these kernels."""
    if fmt == "bfloat16":
        return lambda x: F.linear(x, weights[0])
    if fmt == "int8":  # what runs eagerly; under torch.compile inductor fuses the dequantization instead
        return lambda x: F.linear(x, weights[0].to(x.dtype)) * weights[1]
    if fmt == "fp8":  # row-wise scaled fp8 GEMM; x pre-quantized, rows padded to 16 as cuBLASLt wants
        w, s = weights
        scale_b = s.float()[None, :]

        def fp8(x):
            xp = F.pad(x, (0, 0, 0, (-m) % 16)).to(torch.float8_e4m3fn)
            scale_a = torch.ones(xp.shape[0], 1, device=x.device)
            return torch._scaled_mm(xp, w.t(), scale_a, scale_b, out_dtype=torch.bfloat16)[:m]

        return fp8
    return int4_stock(*weights)


# ----------------------------------------------------------------------------- timing


def graph_time(calls: list, reps: int = 15, rounds: int = 3) -> float:
    """Median seconds per call of calls (one per weight copy), replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: Triton compiles, cuBLAS picks kernels
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (rounds * len(calls)))
    return statistics.median(times)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    # device-to-device copy, counted as read + write (the figure BENCHMARKS.md quotes)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = graph_time([lambda: dst.copy_(src)], reps=10, rounds=2)
    return 2 * nbytes / t / 1e9


def read_gbps(nbytes: int = 1 << 30) -> float:
    # a read-only stream (what a decode step's matmuls do): torch.sum over a bf16 buffer far past the L2. On the
    # H200 this reached 4146 GB/s where the copy above counted 2758, so per-layer figures quote both
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    t = graph_time([lambda: torch.sum(src, 0, dtype=torch.float32, out=out)], reps=10, rounds=2)
    return nbytes / t / 1e9


def nbytes(weights: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in weights if isinstance(t, torch.Tensor))


def bench(formats: list[str], shape_sets: list[str], ms: list[int]) -> None:
    props = torch.cuda.get_device_properties(0)
    copy, read = copy_gbps(), read_gbps()
    print(f"device {props.name}, torch {torch.__version__}, triton {triton_ops.triton.__version__}, "
          f"copy {copy:.0f} GB/s (read + write), read stream {read:.0f} GB/s")  # fmt: skip
    print(json.dumps({"prim": "copy", "gbps": round(copy, 1), "read_gbps": round(read, 1), "device": props.name,
                      "torch": torch.__version__, "triton": triton_ops.triton.__version__}))  # fmt: skip
    header = ("shape", "M", "format", "ours us", "GB/s", "%copy", "stock us", "GB/s")
    print("{:12s} {:>3s} {:9s} {:>8s} {:>6s} {:>6s} {:>9s} {:>6s}".format(*header))
    for set_name in shape_sets:
        totals = {}  # (fmt, m, who) -> [bytes, seconds] over the layer matmuls
        for name, n, k in SHAPES[set_name]:
            for fmt in formats:
                copies = weight_copies(fmt, n, k)
                size = nbytes(copies[0])
                for m in ms:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    ours = graph_time([lambda w=w: triton_ops.call(fmt, x, *w) for w in copies])
                    stocks = [stock_fn(fmt, w, m) for w in copies]
                    theirs = graph_time([lambda s=s: s(x) for s in stocks])
                    del stocks
                    row = {"prim": fmt, "shape": f"{set_name}.{name}", "n": n, "k": k, "m": m, "bytes": size,
                           "ours_us": round(ours * 1e6, 2), "ours_gbps": round(size / ours / 1e9, 1),
                           "stock_us": round(theirs * 1e6, 2), "stock_gbps": round(size / theirs / 1e9, 1)}  # fmt: skip
                    gbps, stock_gbps = size / ours / 1e9, size / theirs / 1e9
                    print(f"{set_name + '.' + name:12s} {m:3d} {fmt:9s} {ours * 1e6:8.1f} {gbps:6.0f} "
                          f"{100 * gbps / copy:5.0f}% {theirs * 1e6:9.1f} {stock_gbps:6.0f}")
                    print(json.dumps(row))
                    if name != "out":
                        for who, t in (("ours", ours), ("stock", theirs)):
                            acc = totals.setdefault((fmt, m, who), [0, 0.0])
                            acc[0] += size
                            acc[1] += t
                del copies
                torch.cuda.empty_cache()
        for (fmt, m, who), (size, t) in sorted(totals.items()):
            cap = 1 / (N_LAYERS[set_name] * t)
            gbps = size / t / 1e9
            print(f"{set_name} per layer {fmt:9s} M={m:<2d} {who:5s}: {gbps:6.0f} GB/s ({100 * gbps / copy:.0f}% of "
                  f"copy, {100 * gbps / read:.0f}% of read stream), layer matmuls cap decode at {cap:.0f} tok/s")
            print(json.dumps({"prim": fmt, "shape": f"{set_name}.layer", "m": m, "who": who,
                              "gbps": round(size / t / 1e9, 1), "cap_tok_s": round(cap, 1)}))  # fmt: skip


def bench_attention(sweep: bool = False) -> None:
    # one decode step's attention, in a CUDA graph, ours (as the model calls it: DecodeAttention, key ranges as
    # attention_splits says) vs torch's sdpa with the same bool mask (what model.py calls without
    # triton_attention.py); per layer, so x 32 layers per token. sweep: also each number of key ranges
    # Also steps early in a long cache (the query at slot 511 of 4096, as in a chat): the kernel reads every
    # slot of its key ranges, visible or not, so they cost what a full cache costs.
    counters = torch.zeros(triton_attention.ATTN_COUNTERS, device="cuda", dtype=torch.int32)
    attn = triton_attention.DecodeAttention(counters)
    for b, h, hkv, s, t, end in [(*shape, None) for shape in ATTENTION_SHAPES] + [(1, 32, 32, 1, 4096, 512),
                                                                                  (1, 32, 8, 1, 4096, 512)]:
        kv_bytes = 2 * b * hkv * t * 128 * 2
        copies = [attention_inputs(b, h, hkv, s, t, end=end) for _ in range(max(1, -(-(96 << 20) // kv_bytes)))]  # past L2
        ours = graph_time([lambda a=a: attn(*a[:3], attn_mask=a[3], enable_gqa=True) for a in copies])
        stock = graph_time([lambda a=a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3], enable_gqa=True)
                            for a in copies])  # fmt: skip
        splits = triton_attention.attention_splits(b, hkv, t, copies[0][0].device)
        at = f" at slot {end - 1}" if end else ""
        print(f"attention B={b} H={h} Hkv={hkv} T={t}{at}: {ours * 1e6:.1f} us ({splits} key ranges; torch sdpa "
              f"{stock * 1e6:.1f} us) per layer")  # fmt: skip
        print(json.dumps({"prim": "attention", "shape": f"H{h}/Hkv{hkv}/T{t}" + (f"/at{end - 1}" if end else ""),
                          "us": round(ours * 1e6, 2), "splits": splits, "sdpa_us": round(stock * 1e6, 2)}))  # fmt: skip
        for p in (1, 2, 4, 8, 16, 32) if sweep else ():
            if p > -(-t // 64):  # split ranges are whole blocks of 64 keys (D = 128): no more ranges than that
                break
            us = graph_time([lambda a=a: triton_attention.attention(*a, attn.counters, p) for a in copies]) * 1e6
            print(json.dumps({"prim": "attention", "shape": f"H{h}/Hkv{hkv}/T{t}", "splits": p, "us": round(us, 2)}))


def sample_reference(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """generate.sample's token [B, 1] int32 for logits [B, V] drawn with this noise (top_k 0: none): what
    triton_sample.sample must return. Also used by tests/test_triton_sample.py."""
    masked = generate.masked_logits(logits, temperature, top_k if top_k > 0 else None)
    return torch.argmax(masked - noise.log(), dim=-1, keepdim=True).to(torch.int32)


def check_sampling() -> None:
    """triton_sample.sample against generate.sample's torch path on the same noise: the same token, for the 7B and
    Llama 3 vocabularies, bf16 and fp32 logits, several top-k (0: none) and rows, through one reused scratch."""
    scratch = torch.zeros(3, triton_sample.SAMPLE_SLOTS, dtype=torch.int64, device="cuda")
    for V, dtype, top_k, B in itertools.product((32000, 128256), (torch.bfloat16, torch.float32), (1, 50, 200, 0), (1, 3)):
        logits = (torch.randn(B, V, device="cuda") * 3).to(dtype)
        noise = torch.empty(B, V, device="cuda").exponential_(1)
        ref = sample_reference(logits, noise, 0.8, top_k)
        got = triton_sample.sample(logits, noise, 0.8, top_k, scratch)
        assert torch.equal(got, ref), f"sample V={V} {dtype} top_k={top_k} B={B}: {got.tolist()} vs {ref.tolist()}"
        assert not scratch.any(), "the scratch was not left zeroed"
    print("check sample: the kernels' tokens equal torch's (V 32000 and 128256, bf16 and fp32, top-k 1/50/200/none)")


def bench_sampling() -> None:
    """One token from [1, V] logits at temperature 0.8, top-k 200 (the benchmark's sampling), replayed from a
    CUDA graph: torch's path as generate.sample runs it (compiled, as in the decode step) against the Sampler."""
    sampler = triton_sample.Sampler(torch.device("cuda"))
    for V in (32000, 128256):
        logits = torch.randn(1, 1, V, device="cuda", dtype=torch.bfloat16)
        torch_path = torch.compile(lambda x: generate.sample(x, temperature=0.8, top_k=200)[0])
        kernel_path = lambda x: sampler(x[:, -1], 0.8, 200)  # noqa: E731
        for name, fn in (("torch (compiled)", torch_path), ("triton_sample.Sampler", kernel_path)):
            us = graph_time([lambda fn=fn: fn(logits)], reps=20, rounds=20) * 1e6
            print(f"sample V={V:6d} top-k 200 {name:18s} {us:6.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness against dequantized references")
    parser.add_argument("--tune", action="store_true", help="tune configs and write kernel_configs.json")
    parser.add_argument("--bench", action="store_true", help="the microbenchmark (the default with no flag)")
    parser.add_argument("--formats", nargs="+", default=FORMATS, help=f"default: {' '.join(FORMATS)}")
    parser.add_argument("--shapes", nargs="+", default=["7b"], choices=sorted(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16], help="rows of x to benchmark")
    parser.add_argument("--tune_m", nargs="+", type=int, default=[1, 4, 16], help="rows of x to tune for")
    parser.add_argument("--calls", nargs="+", choices=["plain", "glu", "add_norm"], default=["plain", "glu", "add_norm"],
                        help="which calls --tune times: plain matmuls, w13 with the SwiGLU, wo and w2 as "
                        "linear_add_norm (default: all)")
    parser.add_argument("--attention", action="store_true", help="only the attention benchmark, with a sweep over "
                        "the number of key ranges")
    parser.add_argument("--sample", action="store_true", help="only the sampling kernel: its check and its timing")
    parser.add_argument("--trials", type=int, default=8, help="random shapes per format in --check")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes (--tune)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_kernels.py needs a CUDA GPU (CPU tests: python -m pytest tests/test_triton_*.py)")
    unknown = [f for f in args.formats if f not in FORMATS + ["float16", "int4g64", "int4g256"]]
    if unknown:
        sys.exit(f"error: unknown format(s) {unknown}; known: {FORMATS + ['float16', 'int4g64', 'int4g256']}")
    formats = [f for f in args.formats if f != "fp8" or triton_ops.fp8_ok(torch.device("cuda"))]
    if len(formats) < len(args.formats):
        print("fp8 skipped: this GPU has no e4m3 support (needs sm_89 or newer)")
    t0 = time.time()
    if args.attention:
        bench_attention(sweep=True)
        return
    if args.sample:
        check_sampling()
        bench_sampling()
        return
    if args.check:
        check(formats, args.trials)
        print(f"check passed in {time.time() - t0:.0f} s")
    if args.tune:
        t1 = time.time()
        calls = {}  # (N, K) -> how the model calls that weight (wo and w2: linear_add_norm; w13: with the SwiGLU)
        for name, n, k in (w for s in args.shapes for w in SHAPES[s]):
            how = {"w13": ("plain", "glu"), "wo": ("plain", "add_norm"), "w2": ("plain", "add_norm")}.get(name, ("plain",))
            calls[n, k] = tuple(c for c in how if c in args.calls)
        cases = [(f, n, k, m) for (n, k), how in calls.items() if how for f in formats for m in args.tune_m]
        tune(cases, args.jobs, calls, ffn_neighbours(args.shapes))
        print(f"tuned {len(cases)} cases in {time.time() - t1:.0f} s -> {triton_ops.CONFIG_FILE}")
    if args.bench or not (args.check or args.tune):
        t1 = time.time()
        bench(formats, args.shapes, args.m)
        bench_attention()
        print(f"benchmark in {time.time() - t1:.0f} s")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
