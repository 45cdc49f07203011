"""Tensor parallelism for a built model, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 generate.py --compile --checkpoint_path DIR/model.pth

Attention is split by heads and the feed-forward by hidden units (Megatron style): wqkv and w13 are
column-parallel (each rank keeps some output rows), wo and w2 are row-parallel (each rank keeps the
matching input columns) and their partial outputs are summed by one all-reduce each. Embedding, norms
and the output layer are replicated, so every rank computes the same logits and samples the same token.
Sharding slices every tensor a linear module holds (plain or quantized: quantize.py keeps output
features on dim 0 and input features, possibly packed or grouped, on dim 1), so model.py and quantize.py
need no parallel code.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

_WORLD = 1
_RANK = 0
_TIMEOUT_S = 0


def rank() -> int:
    return _RANK


def world_size() -> int:
    return _WORLD


def maybe_init_dist(device_type: str, timeout_s: int = 300) -> int | None:
    """Join the torchrun process group if launched by torchrun; returns this rank's local rank, or None.
    A rank that dies makes torchrun stop the others; a collective that waits longer than timeout_s for a
    rank that is alive but stuck fails (see _all_reduce_hook), so a broken run ends instead of hanging."""
    global _WORLD, _RANK, _TIMEOUT_S
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    # before the group exists: dynamo (which the first functional all-reduce imports anyway) loads
    # torch.distributed.nn.functional, whose default arguments would hold group.WORLD if loaded after it,
    # and then destroy_process_group (teardown) could neither free the group nor join its worker threads
    import torch._dynamo  # noqa: F401

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _WORLD, _RANK, _TIMEOUT_S = dist.get_world_size(), dist.get_rank(), timeout_s
    return local_rank


def setup(device: str) -> str:
    """For a script's main(): under torchrun join the process group, silence every rank but rank 0 (each
    script's __main__ restores stderr on a crash) and return this rank's device (cuda:LOCAL_RANK); else
    return device unchanged. The script's __main__ calls teardown() after main() returns."""
    local_rank = maybe_init_dist(torch.device(device).type)
    if local_rank is None:
        return device
    if _RANK != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return f"cuda:{local_rank}" if device.startswith("cuda") else device


def teardown() -> None:
    """For a script's __main__ once main() has returned, on every rank (not on errors: a rank that crashed
    never meets the others): wait for the others, then destroy the process group, which joins gloo's worker
    threads. A worker still dropping its last all-reduce when the interpreter shuts down must take the GIL to
    free the output tensor's Python object; Python ends the thread there, inside a C++ destructor, so
    std::terminate aborts the rank ("terminate called without an active exception") and torchrun fails after
    the run succeeded."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_shardable(config, world: int) -> None:
    """Raise ValueError for splits that cannot be done evenly."""
    problems = []
    if config.n_head % world:
        problems.append(f"{config.n_head} attention heads")
    if config.intermediate_size % world:
        problems.append(f"feed-forward size {config.intermediate_size}")
    kv = config.n_local_heads
    if kv % world and world % kv:
        problems.append(f"{kv} key/value heads")
    elif kv < world and (config.n_head // world) > (config.n_head // kv):
        problems.append(f"{kv} key/value heads for {config.n_head} query heads")
    if problems:
        raise ValueError(f"cannot split {' and '.join(problems)} across {world} ranks; choose a world size that divides them")


def _slice_rows(module: nn.Module, rows: torch.Tensor) -> None:
    # column-parallel: keep these output features of every tensor the module holds (weight, bias, scales)
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is not None and t.ndim >= 1:
            _set(module, name, t.index_select(0, rows.to(t.device)))


def _slice_cols(module: nn.Module, start: int, end: int, in_features: int, keep_bias: bool) -> None:
    # row-parallel: keep input features [start, end) of every 2-D tensor (scaled for packed or grouped
    # layouts); 1-D tensors are per output feature and stay; the bias is added on one rank only
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is None:
            continue
        if t.ndim >= 2 and t.shape[1] > 1:
            if (start * t.shape[1]) % in_features or (end * t.shape[1]) % in_features:
                raise ValueError(f"{name} of shape {tuple(t.shape)} cannot be split at input feature {start}; use a smaller group size")
            a, b = start * t.shape[1] // in_features, end * t.shape[1] // in_features
            _set(module, name, t[:, a:b])
        elif name == "bias" and not keep_bias:
            _set(module, name, torch.zeros_like(t))


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    value = value.contiguous()
    if isinstance(getattr(module, name), nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, name, value)


def apply_tp(model: nn.Module, rank: int | None = None, world: int | None = None) -> None:
    """Shard a built model in place for this rank (before it moves to the device, so each rank copies
    only its own slices of the memory-mapped checkpoint) and add the all-reduces."""
    rank, world = _RANK if rank is None else rank, _WORLD if world is None else world
    cfg = model.config
    try:
        check_shardable(cfg, world)
    except ValueError:
        # every rank fails here; meet first, else a rank that got here sooner may exit and make torchrun stop
        # rank 0 (the one that prints the error) while it is still loading
        if dist.is_initialized():
            dist.barrier()
        raise
    hd, n_head, n_kv = cfg.head_dim, cfg.n_head, cfg.n_local_heads
    q_per = n_head // world
    kv_per = max(n_kv // world, 1)
    kv_first = rank * kv_per if n_kv >= world else (rank * q_per) // (n_head // n_kv)  # replicated when n_kv < world
    q_rows = torch.arange(rank * q_per * hd, (rank + 1) * q_per * hd)
    k_rows = n_head * hd + torch.arange(kv_first * hd, (kv_first + kv_per) * hd)
    v_rows = k_rows + n_kv * hd
    hidden = cfg.intermediate_size
    h_per = hidden // world
    gate_rows = torch.arange(rank * h_per, (rank + 1) * h_per)
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        _slice_rows(attn.wqkv, torch.cat([q_rows, k_rows, v_rows]))
        _slice_cols(attn.wo, rank * q_per * hd, (rank + 1) * q_per * hd, n_head * hd, keep_bias=rank == 0)
        _slice_rows(ffn.w13, torch.cat([gate_rows, gate_rows + hidden]))
        _slice_cols(ffn.w2, rank * h_per, (rank + 1) * h_per, hidden, keep_bias=rank == 0)
        for lin, out_f, in_f in ((attn.wqkv, (q_per + 2 * kv_per) * hd, cfg.dim), (attn.wo, cfg.dim, q_per * hd),
                                 (ffn.w13, 2 * h_per, cfg.dim), (ffn.w2, cfg.dim, h_per)):  # fmt: skip
            lin.out_features, lin.in_features = out_f, in_f
        attn.n_head, attn.n_local_heads = q_per, kv_per
        if world > 1:
            attn.register_forward_hook(_all_reduce_hook)
            ffn.register_forward_hook(_all_reduce_hook)
    cfg.n_head, cfg.n_local_heads, cfg.intermediate_size = q_per, kv_per, h_per  # the KV cache is per rank


def _all_reduce_hook(module, inputs, output):
    import torch.distributed._functional_collectives as funcol

    # functional collective: traceable by dynamo, so it sits inside the compiled (CUDA-graphed) step
    total = funcol.all_reduce(output, "sum", dist.group.WORLD)
    if torch.compiler.is_compiling():
        return total
    try:  # eager: wait here (the next op needs the sum anyway) so a failure is reported as what it is
        return total.wait()
    except RuntimeError as e:
        raise RuntimeError(f"rank {_RANK}: tensor-parallel all-reduce failed: another of the {_WORLD} ranks crashed (its "
                           f"own error says why) or did not answer within the {_TIMEOUT_S} s timeout: {e}") from e
