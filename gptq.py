"""GPTQ int4 (Frantar et al. 2023): `python quantize.py --mode int4-gptq` calls gptq_quantize_model.

Round-to-nearest quantizes each weight on its own; GPTQ quantizes one input column at a time and spreads
each column's rounding error over the columns not yet quantized, weighted by the Hessian of the layer's
inputs on calibration text, so the layer's outputs move less. The model is run one block at a time
(BlockRunner) with blocks already quantized feeding the next, and the result is the same
WeightOnlyInt4Linear that round-to-nearest gives: only how q, scales and zeros are chosen differs.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import generate as gen
from model import KVCache, Transformer, rope_cos_sin
from quantize import WeightOnlyInt4Linear, check_groupsize, int4_qparams, int4_round, set_module


@torch.no_grad()
def gptq_quantize_weight(w: Tensor, H: Tensor, groupsize: int, act_order: bool = False, damp: float = 0.01,
                         blocksize: int = 128) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """GPTQ (Frantar et al. 2023) for one weight. w: [n, k] (k a multiple of groupsize), H: [k, k] the
    Hessian 2/N X^T X of the layer's inputs. Columns are quantized one at a time; each one's rounding
    error, divided by the pivot of the inverse Hessian's Cholesky factor, is spread over the columns not
    yet quantized, so the layer's output on the calibration inputs moves as little as possible.
    Returns q [n, k] uint8, scales and zeros [n, k / groupsize] in the format of int4_quantize."""
    W, H = w.float().clone(), H.float().clone()
    n, k = W.shape
    dead = H.diagonal() == 0  # inputs that are always zero (padding): their weights do not matter
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    scales = torch.zeros(n, k // groupsize, device=W.device)
    zeros = torch.zeros_like(scales)
    order = torch.arange(k, device=W.device)
    if act_order:  # columns with the largest input energy first; groups then stay fixed (static groups),
        scales, zeros = int4_qparams(W, groupsize)  # computed before any error feedback, so the
        order = torch.argsort(H.diagonal(), descending=True)  # kernels' contiguous groups still apply
        W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(damp * H.diagonal().mean())  # dampening keeps the Cholesky factorisation stable
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    group_of = (order // groupsize).tolist()  # group of each (permuted) column
    Q = torch.zeros_like(W)
    blocksize = max(blocksize, groupsize)  # a multiple of groupsize, so a group never straddles two blocks
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, g = i1 + i, group_of[i1 + i]
            if not act_order and col % groupsize == 0:  # group parameters from the already-updated weights
                scales[:, g : g + 1], zeros[:, g : g + 1] = int4_qparams(W1[:, i : i + groupsize], groupsize)
            w = W1[:, i]
            q = int4_round(w, scales[:, g], zeros[:, g])
            Q[:, col] = q
            err = (w - ((q - 8) * scales[:, g] + zeros[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after this block
    if act_order:
        Q = Q[:, torch.argsort(order)]
    return Q.to(torch.uint8), scales, zeros


def calibration_tokens(tokenizer, path: Path, samples: int, seq_length: int, seed: int = 0) -> Tensor:
    """`samples` windows of `seq_length` tokens at random places of a text file -> [samples, seq_length]."""
    if not Path(path).is_file():
        raise gen.UserError(f"calibration file {path} does not exist")
    ids = tokenizer.encode(Path(path).read_text(errors="replace"))
    if len(ids) < seq_length:
        raise gen.UserError(f"{path} has {len(ids)} tokens, fewer than --calibration_seq_length {seq_length}")
    starts = torch.randint(0, len(ids) - seq_length + 1, (samples,), generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor(ids)
    return torch.stack([ids[s : s + seq_length] for s in starts.tolist()])


class BlockRunner:
    """Runs one transformer block at a time over full (unpadded) sequences from position 0: what
    Transformer.forward does per layer, without caches for the whole model (tests check it matches)."""

    def __init__(self, model: Transformer, seq_length: int, device, dtype):
        cfg = model.config
        cos, sin = rope_cos_sin(cfg, seq_length, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.pos = torch.arange(seq_length, device=device)
        self.causal = self.pos[None, :] <= self.pos[:, None]  # [S, S]
        self.window = self.causal & (self.pos[:, None] - self.pos[None, :] < (cfg.sliding_window or seq_length))
        self.kv_shape = (cfg.n_local_heads, seq_length, cfg.head_dim)  # per sequence
        self.device, self.dtype = device, dtype

    def __call__(self, layer: nn.Module, x: Tensor) -> Tensor:
        # x: [B, S, dim] -> [B, S, dim]; a fresh cache per call, so batches may differ in size
        H, S, D = self.kv_shape
        if x.shape[1] != S:
            raise ValueError(f"BlockRunner was built for sequences of {S} tokens, got {x.shape[1]}")
        kept, layer.attention.kv_cache = layer.attention.kv_cache, KVCache(x.shape[0], H, S, D, self.dtype).to(self.device)
        try:
            return layer(x, self.pos, self.cos, self.sin, self.window if layer.sliding else self.causal)
        finally:
            layer.attention.kv_cache = kept


@torch.no_grad()
def gptq_quantize_model(model: Transformer, tokens: Tensor, groupsize: int, pad: bool = False, device=None,
                        batch_size: int = 8, act_order: bool = True, damp: float = 0.01,
                        progress: bool = True) -> Transformer:  # fmt: skip
    """GPTQ int4 in place, one block at a time: only the current block and the calibration activations
    [samples, seq_length, dim] live on `device`, so a 7B model fits one GPU. The inputs of block i come from
    blocks 0..i-1 already quantized, so each block also corrects the error of those before it.
    tokens: [samples, seq_length]. Leaves the portable layout (call prepare_for_device to run fast)."""
    check_groupsize(model, groupsize, pad)
    home = model.tok_embeddings.weight.device
    device = torch.device(device or home)
    runner = BlockRunner(model, tokens.shape[1], device, model.tok_embeddings.weight.dtype)
    xs = [model.tok_embeddings(t.to(home)).to(device) for t in tokens.split(batch_size)]  # [b, S, dim] each
    for i, layer in enumerate(tqdm(model.layers, desc=f"GPTQ int4 g{groupsize}", unit="block", disable=not progress)):
        layer.to(device)
        targets = {f"layers.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {name: Hessian(m) for name, m in targets.items()}
        for x in xs:
            runner(layer, x)
        for name, lin in targets.items():
            set_module(model, name, gptq_linear(lin, hessians.pop(name).done(), groupsize, act_order, damp))
        xs = [runner(layer, x) for x in xs]  # through the quantized block: the next block's inputs
        layer.to(home)
    if not model.config.tie_word_embeddings:  # the output projection, fed by the final norm
        norm, lin = model.norm.to(device), model.output.to(device)
        H = Hessian(None, lin.in_features, device)
        for x in xs:
            H.add(norm(x))
        model.output = gptq_linear(lin, H.done(), groupsize, act_order, damp).to(home)
        model.norm.to(home)
    return model


class Hessian:
    """Accumulates H = 2/N sum_x x x^T over the inputs x of a linear layer (through a forward pre-hook)."""

    def __init__(self, lin: nn.Linear | None, in_features: int = 0, device=None):
        k = lin.in_features if lin is not None else in_features
        self.H = torch.zeros(k, k, device=device or lin.weight.device)
        self.n = 0
        self.handle = lin.register_forward_pre_hook(lambda m, args: self.add(args[0])) if lin is not None else None

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, self.H.shape[0]).float()
        self.H.addmm_(x.t(), x)
        self.n += x.shape[0]

    def done(self) -> Tensor:
        if self.handle is not None:
            self.handle.remove()
        return self.H * (2 / self.n)


def gptq_linear(lin: nn.Linear, H: Tensor, groupsize: int, act_order: bool, damp: float) -> WeightOnlyInt4Linear:
    pad = -lin.in_features % groupsize  # zero columns of W and zero rows/columns of H (dead inputs)
    q, scales, zeros = gptq_quantize_weight(F.pad(lin.weight, (0, pad)), F.pad(H, (0, pad, 0, pad)), groupsize, act_order, damp)
    return WeightOnlyInt4Linear.from_quantized(q, scales, zeros, lin.in_features, lin.bias)
