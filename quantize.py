"""Weight-only quantization as module swaps: int8 per channel, int4 in groups (round-to-nearest, or GPTQ: gptq.py).

    python quantize.py --checkpoint_path DIR/model.pth --mode int8                  # -> DIR/model_int8.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode int4 --groupsize 32   # -> DIR/model_int4.g32.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode int4-gptq --groupsize 64 \
        --calibration_file data/botchan.txt                                         # -> DIR/model_int4-gptq.g64.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode fp8                   # -> DIR/model_fp8.pth
    python quantize.py --self_check cuda          # packed kernels vs the dequantized reference on a device

What is quantized: every nn.Linear of the transformer blocks (wqkv, wo, w13, w2) and the output projection
when it has its own weight. The embedding stays in high precision, so a tied output (SmolLM2, Llama 3.2)
stays unquantized too. The scheme is saved in the checkpoint as the entry "_quantization" and read back by
prepare_quantized(); file names are only a convention. model.py never sees any of this.

Kernels: on a GPU, decode-sized matmuls (at most triton_ops.MAX_M rows) go to the Triton ops of triton_ops.py;
larger inputs (prefill) take the stock path (cuBLAS on the dequantized or upcast weight, or tinygemm for int4).
prepare_for_device() makes that choice once per module after loading, and also swaps in the decode attention
kernel (Attention.sdpa) and GluFeedForward (the SwiGLU in w13's kernel). What uses the Triton ops is
FASTGEN_KERNELS: by default bf16, int8, fp8 and int4 matmuls, attention, the SwiGLU epilogue, the RMSNorms inside
the matmuls' epilogues (NormFusedBlock, NormFusedTransformer) and the decode step's rotary and KV cache write
inside the attention kernel (RopeAttention), and the decode step's top-k and exponential race in three Triton
kernels where torch runs about ten (triton_sample.Sampler, which prepare_for_device gives the model as its
sampler): "bf16,int8,fp8,int4,attn,glu,norm,rope,sample", what beat or matched the stock paths end to end
(SPEED_LOG.md); "all" names the same set, "stock" turns everything off, or list names ("int8,int4,attn").
"""
import argparse
import itertools
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import generate as gen
from model import Attention, FeedForward, Transformer, TransformerBlock

FORMAT_VERSION = 1
MODES = ("int8", "int4", "int4-gptq", "fp8")
GROUP_SIZES = (32, 64, 128, 256)  # what the packed int4 kernels support


# ----------------------------------------------------------------------------- int8, per output channel


def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    # w: [n, k] -> q int8 [n, k], scales bf16 [n]; symmetric, w ~= q * scale
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)  # rounded to what runs on GPU
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


class WeightOnlyInt8Linear(nn.Module):
    kernel_op, kernel_fmt = "int8_linear", "int8"  # the triton_ops.py op for decode-sized inputs, its format name

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.triton = False  # set by prepare_for_device: decode-sized inputs go to kernels.<kernel_op>

    @classmethod
    def from_quantized(cls, q: Tensor, scales: Tensor, bias: Tensor | None) -> "WeightOnlyInt8Linear":
        # q: [out, in] in the module's number format, scales: [out]
        module = cls(q.shape[1], q.shape[0], bias is not None, device=q.device)
        module.weight, module.scales = q.view(module.weight.dtype), scales
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    def quantized_weight(self) -> Tensor:
        return self.weight  # [out, in] int8

    def dequantized_weight(self) -> Tensor:
        return self.quantized_weight().float() * self.scales.float()[:, None]  # the reference: [out, in] float32

    def kernel_args(self, x: Tensor) -> tuple[str, Tensor, Tensor] | None:
        # (format, weight, scales) with which triton_ops.py's fused ops (linear_add_norm, norm_linear) take x
        return (self.kernel_fmt, self.quantized_weight(), self.scales) if self.triton and self.bias is None else None

    def forward(self, x: Tensor, glu: bool = False) -> Tensor:
        # glu: silu(first half) * second half of the outputs (FeedForward's w13, see GluFeedForward)
        w = self.quantized_weight()
        if self.triton and triton_ops.supported(x, self.out_features, self.in_features, glu and self.bias is None):
            y = getattr(triton_ops, self.kernel_op)(x, w, self.scales, glu).to(x.dtype)
            return y if self.bias is None else y + self.bias  # (no bias when glu)
        # the scale is per output channel, so it multiplies after the matmul
        y = F.linear(x, w.to(x.dtype)) * self.scales.to(x.dtype)
        return apply_glu(y if self.bias is None else y + self.bias, glu)


# ----------------------------------------------------------------------------- fp8 (e4m3), per output channel

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    # w: [n, k] -> q float8_e4m3fn [n, k], scales bf16 [n]; w ~= q * scale, each row's max maps to 448
    w = w.float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales


class WeightOnlyFp8Linear(WeightOnlyInt8Linear):
    """The int8 module with e4m3 weights (3 mantissa bits and a per-element exponent instead of a uniform grid).
    The weight is held as its uint8 bit pattern: Module.to(dtype) converts every floating-point tensor,
    float8 included, and would silently upcast it; the view back to float8 is free."""

    kernel_op, kernel_fmt = "fp8_linear", "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)

    def quantized_weight(self) -> Tensor:
        return self.weight.view(torch.float8_e4m3fn)  # [out, in]


# ----------------------------------------------------------------------------- plain weights on the GPU


class TritonLinear(nn.Linear):
    """nn.Linear whose decode-sized matmuls use triton_ops.linear; swapped in by prepare_for_device for
    unquantized layers when FASTGEN_KERNELS names bf16 (the default: with the norm and SwiGLU epilogues and the
    weight preload it was ahead of cuBLAS end to end on the H100 for 8B, level for 7B). Same parameters, same
    state dict."""

    def ours(self, x: Tensor) -> bool:
        # one row (a batch-1 decode step): where ours was measured end to end (ahead for 8B, level for 7B); a
        # speculative verify step or a batch keeps cuBLAS, whose speed there was measured and ours not
        return x.numel() == x.shape[-1] and x.dtype == self.weight.dtype

    def kernel_args(self, x: Tensor) -> tuple[str, Tensor, None] | None:
        # as WeightOnlyInt8Linear.kernel_args: the weight's dtype names the format
        ok = self.bias is None and self.ours(x)
        return (str(self.weight.dtype).removeprefix("torch."), self.weight, None) if ok else None

    def forward(self, x: Tensor, glu: bool = False) -> Tensor:
        fused = glu and self.bias is None
        if triton_ops.supported(x, self.out_features, self.in_features, fused) and self.ours(x):
            y = triton_ops.linear(x, self.weight, fused).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return apply_glu(F.linear(x, self.weight, self.bias), glu)


def apply_glu(y: Tensor, glu: bool) -> Tensor:
    # [..., 2H] -> silu(gate) * up [..., H] when glu: model.FeedForward's arithmetic
    if not glu:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


class GluFeedForward(FeedForward):
    """FeedForward whose w13 applies silu(gate) * up itself (in the matmul kernel's epilogue on a GPU: one
    kernel and one [H]-wide write instead of a [2H] write and another kernel). Swapped in by
    prepare_for_device where w13 is a module with a glu argument; same parameters, same state dict."""

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.w13(x, glu=True))


class RopeAttention(Attention):
    """Attention whose decode steps (one new position, on a GPU) take triton_attention.rope_attention: rotary, the
    KV cache write and attention in one kernel after the qkv matmul, where model.Attention runs three or four
    (rotary and cache writes, then attention). Prefill and verify steps take triton_attention.rope_write (rotary
    and the cache write in one kernel, where model.Attention runs about twelve small ones), then sdpa.
    Swapped in by prepare_for_device for attention without q/k norms; same parameters, same state dict."""

    def attend(self, qkv: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        cache = self.kv_cache
        if triton_attention.rope_attention_supported(qkv, cache.k_cache, mask, self.n_head):
            splits = triton_attention.attention_splits(qkv.shape[0], self.n_local_heads, cache.k_cache.shape[2], qkv.device)
            counters = getattr(self.sdpa, "counters", None)  # DecodeAttention's, shared by the layers
            y = triton_attention.rope_attention(qkv, cos, sin, input_pos, cache.k_cache, cache.v_cache, mask,
                                                self.n_head, counters, splits)  # [B, H, 1, D]  # fmt: skip
            return y.view(qkv.shape[0], 1, self.n_head * self.head_dim)
        if not triton_attention.rope_write_supported(qkv, cache.k_cache, self.n_head):
            return super().attend(qkv, input_pos, cos, sin, mask)
        q = triton_attention.rope_write(qkv, cos, sin, input_pos, cache.k_cache, cache.v_cache, self.n_head)
        y = self.sdpa(q.transpose(1, 2), cache.k_cache, cache.v_cache, attn_mask=mask,
                      enable_gqa=self.n_head != self.n_local_heads)  # [B, H, S, D]  # fmt: skip
        return y.transpose(1, 2).contiguous().view(qkv.shape[0], qkv.shape[1], self.n_head * self.head_dim)


def kernel_weights(m: nn.Module, x: Tensor) -> tuple[str, Tensor, Tensor | None] | None:
    """The format, weight and scales with which module m sends x to triton_ops.py's ops (linear_add_norm,
    norm_linear), or None where m's matmul takes another path (a module without kernel_args, stock kernels,
    a bias, zero-padded int4 inputs)."""
    kernel_args = getattr(m, "kernel_args", None)
    return kernel_args(x) if kernel_args is not None else None


def linear_add_norm(m: nn.Module, x: Tensor, residual: Tensor, norm_weight: Tensor,
                    scratch: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    # module m's matmul through triton_ops.linear_add_norm: h = residual + m(x), h * norm_weight, h's sums of squares
    fmt, w, aux = kernel_weights(m, x)
    return triton_ops.linear_add_norm(fmt, x, w, aux, residual, norm_weight, scratch)


def norm_linear(m: nn.Module, x: Tensor, ss: Tensor, eps: float, glu: bool = False) -> Tensor:
    # module m applied to the RMSNorm that linear_add_norm prepared (x = h * g, ss), in x's dtype
    fmt, w, aux = kernel_weights(m, x)
    return triton_ops.norm_linear(fmt, x, w, aux, ss, eps, glu).to(x.dtype)


class NormFusedBlock(TransformerBlock):
    """TransformerBlock whose norms cost no kernels of their own in decode steps on a GPU. Within the block
    (forward): wo's kernel adds the residual and writes h * g with h's partial sums of squares
    (triton_ops.linear_add_norm), and w13's kernel scales its sums by the norm's rsqrt before the SwiGLU
    (triton_ops.norm_linear). Across blocks (fused, called by NormFusedTransformer): w2's kernel does the same
    for the next block's attention norm, which that block's wqkv kernel finishes. Where the modules or the
    input do not suit the kernels it runs TransformerBlock's forward. Swapped in by prepare_for_device
    (FASTGEN_KERNELS name "norm"), which also gives it norm_scratch, the zeroed int32 buffer (not in the state
    dict; shared by the blocks) that wo's and w2's split-K calls add into and leave zeroed."""

    norm_scratch: Tensor

    def fusable(self, x: Tensor, across: bool = False) -> bool:
        # wo and w13 (and wqkv and w2 too, across blocks) take the fused ops for the block's input x
        attn, ffn = self.attention, self.feed_forward
        mods = (attn.wo, ffn.w13) + ((attn.wqkv, ffn.w2) if across else ())
        tiles = all(m.out_features % 128 == 0 and m.in_features % 128 == 0 for m in mods)  # what the kernels tile
        tiles = tiles and ffn.w13.out_features % 256 == 0
        dim = x.shape[-1]
        return triton_ops.supported(x, dim, dim) and tiles and all(kernel_weights(m, x) is not None for m in mods)

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        if not self.fusable(x):
            return super().forward(x, input_pos, cos, sin, mask)
        qkv = self.attention.wqkv(self.attention_norm(x))
        h, hn, ss = self.attention_then_norm(x, qkv, input_pos, cos, sin, mask)
        return h + self.feed_forward.w2(norm_linear(self.feed_forward.w13, hn, ss, self.ffn_norm.eps, glu=True))

    def fused(self, x: Tensor, xn: Tensor, ss: Tensor | None, next_norm: nn.Module, input_pos: Tensor, cos: Tensor,
              sin: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # x: the block's input [B, S, dim]; xn, ss: its attention norm as linear_add_norm left it (ss None: xn is
        # the norm's output) -> the same three for the next block, whose norm (or the final one) is next_norm
        attn = self.attention
        qkv = attn.wqkv(xn) if ss is None else norm_linear(attn.wqkv, xn, ss, self.attention_norm.eps)
        h, hn, ss = self.attention_then_norm(x, qkv, input_pos, cos, sin, mask)
        a = norm_linear(self.feed_forward.w13, hn, ss, self.ffn_norm.eps, glu=True)  # silu(gate) * up
        return linear_add_norm(self.feed_forward.w2, a, h, next_norm.weight, self.norm_scratch)

    def attention_then_norm(self, x: Tensor, qkv: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor,
                            mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # h = x + wo(attention), with the feed-forward norm's h * g and sums of squares
        y = self.attention.attend(qkv.to(x.dtype), input_pos, cos, sin, mask)  # [B, S, H * D]
        return linear_add_norm(self.attention.wo, y, x, self.ffn_norm.weight, self.norm_scratch)


class NormFusedTransformer(Transformer):
    """Transformer whose decode steps on a GPU run one norm kernel (the first block's) where it ran two per
    block and a final one: each NormFusedBlock's w2 kernel prepares the next block's attention norm, and the
    last one the final norm, which the output projection's kernel finishes (triton_ops.norm_linear). Where a
    module or the input does not suit the kernels, the blocks run their own forward. Swapped in by
    prepare_for_device with NormFusedBlock; same parameters, same state dict."""

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        x, cos, sin, full_mask, window_mask = self.embed(idx, input_pos)
        out = self.output
        across = triton_ops.supported(x, out.out_features, x.shape[-1]) and kernel_weights(out, x) is not None
        if not (across and all(isinstance(b, NormFusedBlock) and b.fusable(x, across=True) for b in self.layers)):
            for layer in self.layers:
                x = layer(x, input_pos, cos, sin, window_mask if layer.sliding else full_mask)
            return self.output(self.norm(x))
        xn, ss = self.layers[0].attention_norm(x), None
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
            mask = window_mask if layer.sliding else full_mask
            x, xn, ss = layer.fused(x, xn, ss, next_norm, input_pos, cos, sin, mask)
        return norm_linear(self.output, xn, ss, self.norm.eps)


# ----------------------------------------------------------------------------- int4, asymmetric groups


def int4_qparams(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    # w: [n, k] -> scales, zeros [n, k / groupsize] (float32 holding bf16 values: what the kernels read).
    # Each group maps [min, max] onto 0..15; the kernels compute w = (q - 8) * scale + zero.
    groups = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    zeros = (lo + 8 * scales).to(torch.bfloat16).float()
    return scales, zeros


def int4_round(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    # w, scales, zeros broadcastable -> q in 0..15 (as float); the inverse of (q - 8) * scale + zero
    return ((w - zeros) / scales + 8).round().clamp(0, 15)


def int4_quantize(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor, Tensor]:
    # round to nearest: w [n, k] -> q [n, k] uint8 (0..15), scales, zeros [n, k / groupsize]
    scales, zeros = int4_qparams(w, groupsize)
    groups = w.float().reshape(w.shape[0], -1, groupsize)
    q = int4_round(groups, scales[..., None], zeros[..., None])
    return q.reshape(w.shape).to(torch.uint8), scales, zeros


def int4_dequantize(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    # q: [n, k] values 0..15, scales/zeros: [n, G] -> w [n, k] float32
    groups = q.float().reshape(q.shape[0], scales.shape[1], -1)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(q.shape)


def pack_nibbles(q: Tensor) -> Tensor:
    # q: [n, k] values 0..15 -> [n, k / 2] uint8, even column in the high nibble: the layout that
    # aten._convert_weight_to_int4pack takes on CUDA since torch 2.5 (it took int32 [n, k] before)
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: Tensor) -> Tensor:
    # [n, k / 2] uint8 -> [n, k] uint8 values 0..15
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


class WeightOnlyInt4Linear(nn.Module):
    """int4 weights in groups of `groupsize` input features, one bf16 scale and zero per group.

    The checkpoint holds a portable layout, output features on dim 0 and input features on dim 1 (what
    tp.py slices): weight [out, in / 2] uint8 nibble pairs and scales_and_zeros [out, in / groupsize, 2].
    pack() turns it into the layout of the device's kernel after loading; until then forward dequantizes
    (the reference path: any device, any dtype).
    When in_features is not a multiple of groupsize (only with pad=True) it is zero-padded to one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, groupsize: int = 32,
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in = math.ceil(in_features / groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8, device=device))
        sz_shape = (out_features, self.padded_in // groupsize, 2)
        self.register_buffer("scales_and_zeros", torch.empty(sz_shape, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel = "reference"  # or "cuda" / "cpu" once pack() has rearranged the weight

    @classmethod
    def from_quantized(cls, q: Tensor, scales: Tensor, zeros: Tensor, in_features: int, bias: Tensor | None):
        # q: [out, padded_in] 0..15, scales/zeros: [out, padded_in / groupsize]
        module = cls(in_features, q.shape[0], bias is not None, q.shape[1] // scales.shape[1], device=q.device)
        module.weight = pack_nibbles(q)
        module.scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    def dequantized_weight(self) -> Tensor:
        # the reference: [out, padded_in] float32 (portable layout only)
        assert self.kernel == "reference", "dequantized_weight() needs the portable layout (before pack())"
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # [out, G] each
        return int4_dequantize(unpack_nibbles(self.weight), scales, zeros)

    @torch.no_grad()
    def pack(self, dtype: torch.dtype | None = None, kernel: str | None = None) -> None:
        """Rearrange the weight for the fast kernel of the device it now lives on (call after the last .to()).
        dtype: that of the activations, if known (the CPU kernel wants scales of the same dtype).
        kernel: "triton" | "cuda" | "cpu" | "reference" to force a choice (tests); default: what suits the device."""
        if self.kernel != "reference":
            return
        self.padded_in = self.weight.shape[1] * 2  # tp.py may have sliced the input features
        if self.padded_in != math.ceil(self.in_features / self.groupsize) * self.groupsize:
            raise ValueError(f"int4 weight holds {self.padded_in} input features for {self.in_features}: "
                             "a zero-padded (--pad) layer cannot be split across ranks")  # fmt: skip
        kernel = kernel or default_int4_kernel(self.weight.device, self.out_features, self.padded_in)
        if kernel == "triton":  # triton_ops.py's layout: int32 [out, in / 8] and scales_and_zeros as saved
            load_kernels()
            self.weight = triton_ops.pack_int4(unpack_nibbles(self.weight), self.groupsize)
            self.kernel = kernel
            return
        # both torch kernels (tinygemm's layout) read scales and zeros as [in / groupsize, out, 2]
        sz = self.scales_and_zeros.transpose(0, 1).contiguous()
        if kernel == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if self.padded_in % (16 * t) == 0)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
            self.scales_and_zeros = sz.to(torch.bfloat16)  # the kernel reads bf16 only
        elif kernel == "cpu":
            q = unpack_nibbles(self.weight).to(torch.int32)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            self.scales_and_zeros = sz.to(dtype or sz.dtype)  # inductor cannot lower the kernel with a cast feeding it
        self.kernel = kernel

    def kernel_args(self, x: Tensor) -> tuple[str, Tensor, Tensor] | None:
        # as WeightOnlyInt8Linear.kernel_args; zero-padded inputs (--pad) are not for the fused ops
        ok = self.kernel == "triton" and self.padded_in == self.in_features and self.bias is None
        return (f"int4g{self.groupsize}", self.weight, self.scales_and_zeros) if ok else None

    def forward(self, x: Tensor, glu: bool = False) -> Tensor:
        # x: [..., in_features] -> [..., out_features] (glu: [..., out_features / 2], as in the int8 module)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        if self.kernel == "triton":  # decode: the Triton kernel; prefill: cuBLAS on the dequantized weight
            if triton_ops.supported(x, self.out_features, self.padded_in, glu and self.bias is None):
                y = triton_ops.int4_linear(x, self.weight, self.scales_and_zeros, self.groupsize, glu).to(x.dtype)
                return y if self.bias is None else y + self.bias  # (no bias when glu)
            else:
                y = F.linear(x, triton_ops.int4_weight(self.weight, self.scales_and_zeros, self.groupsize, x.dtype))
        elif self.kernel == "cuda":  # tinygemm: bf16 activations, [M, K] contiguous
            x2 = x.reshape(-1, self.padded_in).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.groupsize, self.scales_and_zeros)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        elif self.kernel == "cpu":
            x2 = x.reshape(-1, self.padded_in).contiguous()
            sz = self.scales_and_zeros
            sz = sz if sz.dtype == x.dtype else sz.to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.groupsize, sz)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized_weight().to(x.dtype))
        return apply_glu(y if self.bias is None else y + self.bias, glu)


def default_int4_kernel(device: torch.device, out_features: int, in_features: int) -> str:
    if use_triton(device, "int4") and out_features % 128 == 0 and in_features % 128 == 0:
        return "triton"
    if device.type == "cuda" and out_features % 8 == 0:  # tinygemm tiles n by 8
        return "cuda"
    # torch's CPU int4 kernel is written for AVX-512: on an AVX2 machine (torch 2.13) it was 2x faster than
    # dequantize + matmul for one row but 20x slower for 64 rows, so there the reference path is used
    avx512 = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
    if device.type == "cpu" and avx512 and out_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    return "reference"


# ----------------------------------------------------------------------------- choosing and swapping modules


def parse_mode(mode: str, groupsize: int | None = None) -> tuple[str, int | None]:
    """'int8' | 'fp8' | 'int4' | 'int4-g128' | 'int4-gptq' (+ groupsize) -> (mode, groupsize); bench.py uses -gN names."""
    base, _, suffix = mode.partition("-g")
    if base == "int4" and suffix.isdigit():
        mode, groupsize = "int4", int(suffix)
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; supported: {', '.join(MODES)} (and int4-gN for bench)")
    if mode in ("int8", "fp8"):
        return mode, None
    groupsize = groupsize or 32
    if groupsize not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES} (what the kernels support), got {groupsize}")
    return mode, groupsize


def quantizable(model: Transformer) -> list[tuple[str, nn.Linear]]:
    """The linears quantize.py replaces: all of the blocks', and the output unless it is tied to the embedding."""
    found = [(f"layers.{name}", m) for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    if not model.config.tie_word_embeddings:
        found.append(("output", model.output))
    return found


def check_groupsize(model: Transformer, groupsize: int, pad: bool) -> None:
    bad = [(name, m.in_features) for name, m in quantizable(model) if m.in_features % groupsize]
    if bad and not pad:
        name, k = bad[0]
        ok = [g for g in GROUP_SIZES if all(f % g == 0 for _, f in bad)]
        raise ValueError(f"group size {groupsize} does not divide the {k} input features of {name} "
                         f"({len(bad)} layers like it); use --groupsize {' or '.join(map(str, ok)) or '32'}, "
                         f"or --pad to zero-pad those layers to a multiple of {groupsize}")  # fmt: skip


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prepare_quantized(model: Transformer, meta: dict) -> None:
    """Swap empty quantized modules into a (meta-device) model so load_state_dict(assign=True) can fill them."""
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported quantization metadata {meta!r}; this quantize.py writes format {FORMAT_VERSION}")
    mode, groupsize = meta.get("mode"), meta.get("groupsize")
    if mode not in ("int8", "int4", "fp8"):
        raise ValueError(f"checkpoint says quantization mode {mode!r}; supported: int8, int4, fp8")
    for name, lin in quantizable(model):
        with torch.device(lin.weight.device):
            if mode in ("int8", "fp8"):
                cls = WeightOnlyInt8Linear if mode == "int8" else WeightOnlyFp8Linear
                new = cls(lin.in_features, lin.out_features, lin.bias is not None)
            else:
                new = WeightOnlyInt4Linear(lin.in_features, lin.out_features, lin.bias is not None, groupsize)
        set_module(model, name, new)


# the Triton modules, imported by load_kernels() once a module wants them (they need triton)
triton_ops = triton_attention = triton_sample = None


def load_kernels() -> None:
    global triton_ops, triton_attention, triton_sample
    if triton_ops is None:
        import triton_attention as a
        import triton_ops as k
        import triton_sample as s

        triton_ops, triton_attention, triton_sample = k, a, s


TRITON_BY_DEFAULT = "bf16,int8,fp8,int4,attn,glu,norm,rope,sample"
# on the H100 and the H200; "sample" since the seventh session (+1.6% to +4.9% end to end on the H100, SPEED_LOG.md);
# "bf16" since the ninth (H100: 8B +6% and +12%, steadier; 7B level, +2.9% on one machine and -2.2% on another;
# H200 not measured)


def use_triton(device: torch.device, fmt: str) -> bool:
    """Whether modules of format fmt ("bf16", "int8", "fp8", "int4"; "attn" for attention, "glu" for the
    SwiGLU fused into w13's kernel, "rope" for rotary and the cache write in attention's, with "attn") on
    `device` call the Triton kernels: on CUDA, for what FASTGEN_KERNELS names ("all", "stock", or a list;
    default TRITON_BY_DEFAULT)."""
    chosen = os.environ.get("FASTGEN_KERNELS", TRITON_BY_DEFAULT)
    chosen = {"all": "bf16,int8,fp8,int4,attn,glu,rope,norm,sample", "stock": ""}.get(chosen, chosen).split(",")
    if torch.device(device).type != "cuda" or fmt not in chosen:
        return False
    load_kernels()
    return True


def prepare_for_device(model: nn.Module, kernel: str | None = None) -> nn.Module:
    """Choose each linear module's kernel for the device it now lives on. Call after the model's final .to().
    int4 modules get the layout of their kernel; on a GPU, modules of the formats use_triton() names call
    the Triton ops for decode-sized inputs (unquantized linears become TritonLinear). kernel: force (tests):
    "triton" (the Triton path wherever triton_ops.supported() says so), or "cuda" / "cpu" / "reference" for int4."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)  # the compute dtype
    for m in model.modules():
        if not isinstance(m, (nn.Linear, WeightOnlyInt8Linear, WeightOnlyInt4Linear)):
            continue
        fmt = "int4" if isinstance(m, WeightOnlyInt4Linear) else "fp8" if isinstance(m, WeightOnlyFp8Linear) \
            else "int8" if isinstance(m, WeightOnlyInt8Linear) else "bf16"  # fmt: skip
        triton = kernel == "triton" if kernel else use_triton(m.weight.device, fmt)
        if triton:
            load_kernels()
        if isinstance(m, WeightOnlyInt4Linear):
            m.pack(dtype, kernel)
        elif isinstance(m, WeightOnlyFp8Linear):
            m.triton = triton and (kernel == "triton" or triton_ops.fp8_ok(m.weight.device))
        elif isinstance(m, WeightOnlyInt8Linear):
            m.triton = triton
        elif type(m) is nn.Linear and triton:
            m.__class__ = TritonLinear  # same parameters and state dict: only forward changes
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    if device.type == "cuda":
        load_kernels()
        triton_ops.register_inductor_fallbacks()  # before any decode step compiles (see there)
    names = ("attn", "glu", "rope", "norm", "sample")
    attention, glu, rope, norm, sampler = (kernel == "triton",) * 5 if kernel else (use_triton(device, name) for name in names)
    if sampler and isinstance(model, Transformer):
        model.sampler = triton_sample.Sampler(device)  # generate.next_token: the top-k and the race in Triton kernels
    scratch = {}  # dim -> the blocks' shared norm_scratch
    counters = None  # the attention layers' shared DecodeAttention counters
    for m in model.modules():
        if type(m) is TransformerBlock and norm and not (m.attention._forward_hooks or m.feed_forward._forward_hooks):
            m.__class__ = NormFusedBlock  # (tp.py's all-reduce hooks need the unfused forward)
            dim = m.attention.wo.out_features
            if dim not in scratch:
                scratch[dim] = torch.zeros(triton_ops.scratch_numel(triton_ops.MAX_M, dim), dtype=torch.int32, device=device)
            m.register_buffer("norm_scratch", scratch[dim], persistent=False)
        elif type(m) is Transformer and norm:
            m.__class__ = NormFusedTransformer
        if type(m) is FeedForward and glu and isinstance(m.w13, (TritonLinear, WeightOnlyInt8Linear, WeightOnlyInt4Linear)):
            m.__class__ = GluFeedForward  # w13 applies the SwiGLU itself (in the Triton kernel's epilogue)
        elif isinstance(m, Attention) and attention:
            if counters is None:
                counters = torch.zeros(triton_attention.ATTN_COUNTERS, dtype=torch.int32, device=device)
            m.sdpa = triton_attention.DecodeAttention(counters)  # a submodule: its counters are a (static) buffer
            if rope and type(m) is Attention and isinstance(m.q_norm, nn.Identity):
                m.__class__ = RopeAttention
    return model


@torch.no_grad()
def quantize_linear(lin: nn.Linear, mode: str, groupsize: int | None = None, device=None) -> nn.Module:
    """Round to nearest: a quantized copy of `lin` (portable layout), computed on `device`, kept on lin's device."""
    home = lin.weight.device
    w = lin.weight.detach().to(device or home)
    if mode in ("int8", "fp8"):
        q, scales = int8_quantize(w) if mode == "int8" else fp8_quantize(w)
        cls = WeightOnlyInt8Linear if mode == "int8" else WeightOnlyFp8Linear
        return cls.from_quantized(q.to(home), scales.to(home), lin.bias)
    q, scales, zeros = int4_quantize(F.pad(w, (0, -w.shape[1] % groupsize)), groupsize)
    return WeightOnlyInt4Linear.from_quantized(q.to(home), scales.to(home), zeros.to(home), lin.in_features, lin.bias)


@torch.no_grad()
def quantize_model(model: Transformer, mode: str, groupsize: int | None = None, pad: bool = False, device=None,
                   pack: bool = True, progress: bool = False) -> Transformer:  # fmt: skip
    """Round-to-nearest int8, fp8 or int4 in place ('int4-g128' names work too). Each weight is quantized on
    `device` (default: where it is). pack=False keeps the portable layout, to save it."""
    mode, groupsize = parse_mode(mode, groupsize)
    if mode == "int4-gptq":
        raise ValueError("int4-gptq needs calibration data: use gptq.gptq_quantize_model() or the command line")
    if mode == "int4":
        check_groupsize(model, groupsize, pad)
    for name, lin in tqdm(quantizable(model), desc=f"quantizing {mode}", unit="layer", disable=not progress):
        set_module(model, name, quantize_linear(lin, mode, groupsize, device))
    return prepare_for_device(model) if pack else model


# ----------------------------------------------------------------------------- command line


def output_name(mode: str, groupsize: int | None) -> str:
    return f"model_{mode}.pth" if groupsize is None else f"model_{mode}.g{groupsize}.pth"  # gpt-fast's names


def quantize_checkpoint(checkpoint_path: Path, mode: str, groupsize: int | None = None, pad: bool = False,
                        calibration_file: Path | None = None, calibration_samples: int = 128,
                        calibration_seq_length: int = 512, act_order: bool = True, device=None,
                        batch_size: int = 8) -> Path:  # fmt: skip
    """Quantize DIR/model.pth into DIR/<gpt-fast name>, written atomically; returns its path."""
    from scripts.convert_hf_checkpoint import atomic_write

    mode, groupsize = parse_mode(mode, groupsize)
    checkpoint_path = Path(checkpoint_path)
    state_dict = gen.load_checkpoint(checkpoint_path)
    if not isinstance(state_dict, dict) or not any(isinstance(v, Tensor) for v in state_dict.values()):
        raise gen.UserError(f"{checkpoint_path} is not a model state dict (write one with scripts/convert_hf_checkpoint.py)")
    if "_quantization" in state_dict:
        raise gen.UserError(f"{checkpoint_path} is already quantized ({state_dict['_quantization'].get('mode')}); "
                            "quantize the original model.pth")  # fmt: skip
    if mode == "int4-gptq" and calibration_file is None:
        raise gen.UserError("--mode int4-gptq needs --calibration_file (a text file, not the evaluation text)")
    dtype = next(v.dtype for v in state_dict.values() if isinstance(v, Tensor) and v.is_floating_point())
    del state_dict
    model = gen.load_model(checkpoint_path, "cpu", dtype)  # mmap: weights are read as they are quantized
    meta = {"format_version": FORMAT_VERSION, "mode": "int4" if mode.startswith("int4") else mode}
    if mode == "int4-gptq":
        import gptq
        from tokenizer import load_tokenizer

        check_groupsize(model, groupsize, pad)  # before the slow part
        tokens = gptq.calibration_tokens(load_tokenizer(checkpoint_path.parent), calibration_file,
                                    calibration_samples, calibration_seq_length)  # fmt: skip
        gptq.gptq_quantize_model(model, tokens, groupsize, pad, device, batch_size, act_order)
        meta.update(method="gptq", calibration_file=Path(calibration_file).name, calibration_samples=calibration_samples,
                    calibration_seq_length=calibration_seq_length, act_order=int(act_order))  # fmt: skip
    else:
        quantize_model(model, mode, groupsize, pad, device, pack=False, progress=True)
        meta["method"] = "rtn"
    if groupsize is not None:
        meta["groupsize"] = groupsize
    out = model.state_dict()
    if model.config.tie_word_embeddings:
        out.pop("output.weight", None)  # the embedding, saved once (as the converter does)
    out["_quantization"] = meta
    target = checkpoint_path.parent / output_name(mode, groupsize)
    atomic_write(target, lambda tmp: torch.save(out, tmp))
    return target


@torch.no_grad()
def self_check(device: str, shapes: list[tuple[int, int]] | None = None, compile: bool = True,
               kernel: str | None = None) -> bool:  # fmt: skip
    """Every linear module on `device` (with its device's kernels: Triton on a GPU) against the dequantized
    reference in float64, eager and compiled, for decode (1, 7 rows) and prefill (40 rows) inputs, and the
    saved (portable) layout loaded onto the CPU. Prints one line per case; returns whether all are in bounds."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # of max |reference|; bf16 rounds outputs to 2^-8
    shapes = shapes or [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (200, 576)]  # (out, in); 200 % 8 != 0
    cuda = torch.device(device).type == "cuda"
    if cuda:
        load_kernels()
    fp8 = not cuda or triton_ops.fp8_ok(torch.device(device))
    # kernel choices: forced by the caller, else on a GPU the default path and the Triton kernel of each format
    choices = [kernel] if kernel else [None, "triton"] if cuda else [None]
    int4_choices = [kernel] if kernel else ["cuda", "triton"] if cuda else [None]
    ok = True
    for out_f, in_f in shapes:
        cases = [(mode, None, c) for mode in ("plain", "int8") + ("fp8",) * fp8 for c in choices]
        cases += [("int4", g, c) for g in GROUP_SIZES if in_f % g == 0 for c in int4_choices]
        for mode, g, forced in cases:
            if forced == "triton" and (out_f % 128 or in_f % 128):  # shapes triton_ops.py does not tile
                continue
            lin = nn.Linear(in_f, out_f, bias=True, device=device, dtype=dtype)
            m = lin if mode == "plain" else quantize_linear(lin, mode, g)
            ref_w = (m.weight if mode == "plain" else m.dequantized_weight()).double()
            ref_b = m.bias.double()
            portable = {k: v.cpu() for k, v in m.state_dict().items()}
            on_cpu = nn.Linear(in_f, out_f) if mode == "plain" else type(m)(in_f, out_f, True, *([g] if g else []))
            on_cpu.load_state_dict(portable)
            prepare_for_device(m, forced)
            prepare_for_device(on_cpu, forced if forced in ("cpu", "reference") else None)
            if compile:
                torch._dynamo.reset()
            compiled = torch.compile(m, fullgraph=True) if compile else None
            label = getattr(m, "kernel", None) or ("triton" if getattr(m, "triton", type(m) is TritonLinear) else "stock")
            for rows in (1, 7, 40):
                x = torch.randn(rows, in_f, device=device, dtype=dtype)
                ref = x.double() @ ref_w.t() + ref_b
                scale = ref.abs().max().item()
                errs = {"eager": (m(x).double() - ref).abs().max().item() / scale}
                if compiled is not None:
                    errs["compiled"] = (compiled(x).double() - ref).abs().max().item() / scale
                errs["cpu-after-load"] = (on_cpu(x.cpu().float()).double() - ref.cpu()).abs().max().item() / scale
                good = all(e < tol for e in errs.values())
                ok &= good
                print(f"{'ok  ' if good else 'FAIL'} {mode:5} g{g or '-':<4} {out_f:>5}x{in_f:<5} M={rows:<2} {dtype} "
                      f"kernel={label:9} rel err " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
                      + f" (bound {tol:.0e})")  # fmt: skip
    return ok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, help="DIR/model.pth (config.json beside it)")
    p.add_argument("--mode", choices=MODES, default="int8")
    p.add_argument("--groupsize", type=int, default=32, choices=GROUP_SIZES, help="int4 input features per scale")
    p.add_argument("--pad", action="store_true", help="zero-pad layers whose input features the group size does not divide")
    p.add_argument("--calibration_file", type=Path, help="GPTQ: a text file (never the evaluation text)")
    p.add_argument("--calibration_samples", type=int, default=128, help="GPTQ: number of token windows")
    p.add_argument("--calibration_seq_length", type=int, default=512, help="GPTQ: tokens per window")
    p.add_argument("--calibration_batch_size", type=int, default=8, help="GPTQ: windows per forward")
    p.add_argument("--act_order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing input energy (static groups; no run-time cost)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu)")
    p.add_argument("--self_check", metavar="DEVICE", help="check the packed kernels on DEVICE against the reference")
    args = p.parse_args(argv)
    if args.self_check:
        sys.exit(0 if self_check(args.self_check) else 1)
    if args.checkpoint_path is None:
        p.error("--checkpoint_path is required")
    for name in ("calibration_samples", "calibration_seq_length", "calibration_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    try:
        target = quantize_checkpoint(args.checkpoint_path, args.mode, args.groupsize, args.pad, args.calibration_file,
                                     args.calibration_samples, args.calibration_seq_length, args.act_order,
                                     args.device or gen.default_device(), args.calibration_batch_size)  # fmt: skip
    except (gen.UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
