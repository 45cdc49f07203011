"""Sampling in Triton: `sample(logits, noise, temperature, top_k)` draws a decode step's token (generate.sample's
top-k and exponential race) in three kernels for 16-bit logits (a radix select of the k-th largest, 8 bits per
launch, then the race), where torch runs about ten; `Sampler` is the sampler a GPU model carries. The op is
registered and launched like the matmuls (triton_ops._op, programmatic dependent launch on sm_90+).
"""
import torch
from torch import Tensor

# triton_ops first: without a GPU it points Triton at its interpreter before triton is imported
import triton_ops  # isort: skip
from triton_ops import FLOAT_DTYPES, _cdiv, _op, _pdl_wait  # isort: skip
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SAMPLE_SLOTS = 264  # int64 scratch per row of sample(): a 256-bin histogram, then the slots below
_SAMPLE_SLOTS: tl.constexpr = tl.constexpr(SAMPLE_SLOTS)
_RADIX_COUNT: tl.constexpr = tl.constexpr(256)  # programs of a _radix_kernel launch done
_RACE_COUNT: tl.constexpr = tl.constexpr(257)  # programs of the _race_kernel launch done
_PREFIX: tl.constexpr = tl.constexpr(258)  # the digits of the k-th largest key found so far
_NEED: tl.constexpr = tl.constexpr(259)  # its rank among the keys that share them
_BEST: tl.constexpr = tl.constexpr(260)  # the race's packed best score and index


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _ordered(bits, BITS: tl.constexpr):
    # a float's bits as a signed integer of BITS bits (held in a wider type) -> a key in [0, 2^BITS) ordered like
    # the values, -0 counted as +0 (negative values: magnitude bits flipped)
    bits = tl.where(bits == -(2 ** (BITS - 1)), 0, bits)
    return (bits ^ ((bits >> (BITS - 1)) & (2 ** (BITS - 1) - 1))) + 2 ** (BITS - 1)


@triton.jit
def _ordered32(x):
    # float32 -> int64 in [0, 2^32) ordered like the values (_ordered)
    return _ordered(x.to(tl.int32, bitcast=True).to(tl.int64), 32)


@triton.jit
def _sample_key(raw, temperature, KEY_BITS: tl.constexpr):
    # logits -> int64 keys in [0, 2^KEY_BITS) ordered like the values, -0 counted as +0: the bits of 16-bit
    # logits themselves (dividing them by the temperature in float32 keeps them distinct and in order), of
    # logits / temperature for float32 ones (the division may round distinct logits together, as the reference's)
    if KEY_BITS == 16:
        key = _ordered(raw.to(tl.int16, bitcast=True).to(tl.int32), 16).to(tl.int64)
    else:
        key = _ordered32(raw / temperature)
    return key


@triton.jit
def _radix_kernel(logits_ptr, scratch_ptr, V, stride_l, temperature, top_k,
                  LEVEL: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    # One digit (8 bits, LEVEL 0 the highest) of the top_k-th largest key of each row (_sample_key), by radix
    # select over KEY_BITS / 8 launches. grid: (programs along V, B); program p counts the keys of its BLOCK that
    # share the digits found so far (scratch PREFIX) by their next digit, and adds the counts into the row's
    # histogram; the last program to arrive picks the largest digit d with at least NEED keys at or above it,
    # appends d to PREFIX, takes the keys above d off NEED (level 0 starts from top_k) and zeroes the histogram
    # and its count. scratch: one row of SAMPLE_SLOTS int64 per batch row (see sample).
    p, b = tl.program_id(0), tl.program_id(1)
    v = p * BLOCK + tl.arange(0, BLOCK)
    ok = v < V
    row = scratch_ptr + b * _SAMPLE_SLOTS
    bins = tl.arange(0, 256)
    SHIFT: tl.constexpr = KEY_BITS - 8 * (LEVEL + 1)
    _pdl_wait(PDL)
    key = _sample_key(tl.load(logits_ptr + b * stride_l + v, mask=ok, other=0.0), temperature, KEY_BITS)
    match = ok
    if LEVEL > 0:
        match = ok & ((key >> (SHIFT + 8)) == tl.load(row + _PREFIX))
    counts = tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=match)
    tl.atomic_add(row + bins, counts.to(tl.int64), mask=counts > 0, sem="relaxed")
    # as in triton_attention._combine_ranges: the barrier and the count's acquire-release order the adds before the count
    tl.debug_barrier()
    if tl.atomic_add(row + _RADIX_COUNT, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        total = tl.load(row + bins, cache_modifier=".cg")  # every program's counts
        need = tl.zeros([], tl.int64) + top_k  # (a top_k of 1 arrives as a constexpr)
        prefix = tl.zeros([], tl.int64)
        if LEVEL > 0:
            need, prefix = tl.load(row + _NEED), tl.load(row + _PREFIX)
        at_least = tl.cumsum(total, 0, reverse=True)  # keys with this digit or a larger one
        d = tl.max(tl.where(at_least >= need, bins, -1), 0)
        tl.store(row + _NEED, need - tl.sum(tl.where(bins > d, total, 0), 0))
        tl.store(row + _PREFIX, prefix * 256 + d)
        tl.store(row + bins, tl.zeros([256], tl.int64))
        tl.store(row + _RADIX_COUNT, 0)


@triton.jit
def _race_kernel(logits_ptr, noise_ptr, out_ptr, scratch_ptr, V, stride_l, temperature,
                 KEY_BITS: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    # The exponential race: out[b] = the index of the largest logits / temperature - log(noise) among the keys
    # >= the top_k-th largest (scratch PREFIX, from _radix_kernel; all keys unless TOP_K), lowest index on ties
    # as torch.argmax. grid: (programs along V, B); each program packs its BLOCK's best (the score's ordered
    # bits above the complement of its index) into one int64 and takes the row's atomic maximum (BEST); the last
    # to arrive writes the index and zeroes the row's scratch for the next call.
    p, b = tl.program_id(0), tl.program_id(1)
    v = p * BLOCK + tl.arange(0, BLOCK)
    ok = v < V
    row = scratch_ptr + b * _SAMPLE_SLOTS
    _pdl_wait(PDL)
    raw = tl.load(logits_ptr + b * stride_l + v, mask=ok, other=0.0)
    keep = ok
    if TOP_K:
        keep = ok & (_sample_key(raw, temperature, KEY_BITS) >= tl.load(row + _PREFIX))
    noise = tl.load(noise_ptr + b * V + v, mask=ok, other=1.0)
    score = tl.where(keep, raw.to(tl.float32) / temperature - tl.log(noise), float("-inf"))
    best, i = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.atomic_max(row + _BEST, (_ordered32(best) << 31) | (2147483647 - (p * BLOCK + i)), sem="relaxed")
    tl.debug_barrier()
    if tl.atomic_add(row + _RACE_COUNT, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        packed = tl.atomic_xchg(row + _BEST, 0, sem="relaxed")
        tl.store(out_ptr + b, (2147483647 - (packed & 2147483647)).to(tl.int32))
        tl.store(row + _PREFIX, 0)
        tl.store(row + _NEED, 0)
        tl.store(row + _RACE_COUNT, 0)


# ----------------------------------------------------------------------------- ops

SAMPLE_ROWS = 64  # batch rows whose scratch a Sampler keeps; more rows get a fresh zeroed scratch per call


def sample_supported(logits: Tensor) -> bool:
    """Whether sample() takes these logits [B, V]: a GPU tensor of a float dtype."""
    return logits.is_cuda and logits.dim() == 2 and logits.dtype in FLOAT_DTYPES


def draw(logits: Tensor, temperature: float, top_k: int | None, scratch: Tensor | None = None) -> Tensor | None:
    """generate.sample's token [B, 1] int32 for logits [B, V] at temperature > 0, from the same exponential noise
    (the same random stream), or None where sample_supported() declines the logits. scratch: as in sample."""
    if not sample_supported(logits):
        return None
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1)
    if scratch is not None and scratch.shape[0] < logits.shape[0]:
        scratch = None
    return sample(logits, noise, max(temperature, 1e-5), top_k or 0, scratch)


class Sampler(torch.nn.Module):
    """draw as a module that holds its scratch: what quantize.prepare_for_device gives a model on a GPU as its
    sampler (generate.next_token), so that the scratch is a (static) buffer, as DecodeAttention's counters."""

    def __init__(self, device: torch.device, rows: int = SAMPLE_ROWS):
        super().__init__()
        self.register_buffer("scratch", torch.zeros(rows, SAMPLE_SLOTS, dtype=torch.int64, device=device), persistent=False)

    def forward(self, logits: Tensor, temperature: float, top_k: int | None) -> Tensor | None:
        return draw(logits, temperature, top_k, self.scratch)


def _sample_block(V: int) -> int:
    # logits per program: about one program per SM for a Llama 3 vocabulary (128256 in 126 blocks), 63 for 32000
    return max(512, triton.next_power_of_2(_cdiv(V, 128)))


def _fake_sample(logits: Tensor, noise: Tensor, temperature: float, top_k: int, scratch: Tensor | None = None) -> Tensor:
    return logits.new_empty(logits.shape[0], 1, dtype=torch.int32)


@_op("sample", _fake_sample, mutates=("scratch",))
def sample(logits: Tensor, noise: Tensor, temperature: float, top_k: int, scratch: Tensor | None = None) -> Tensor:
    """The token [B, 1] int32 that generate.sample draws from logits [B, V] with exponential noise [B, V]
    (float32): argmax of logits / temperature - log(noise) over the top_k largest logits (top_k <= 0 or >= V:
    all of them), ties to the lowest index as torch.argmax. The k-th largest logit is found by radix select,
    8 bits of its key per launch (2 launches for 16-bit logits, 4 for float32), then one launch races; each
    launch spreads the row over up to ~128 programs. scratch: at least B rows of SAMPLE_SLOTS zeroed int64,
    which the call leaves zeroed (one buffer serves every call: Sampler), or None for a fresh one."""
    B, V = logits.shape
    assert noise.shape == (B, V) and noise.dtype == torch.float32, "noise [B, V] float32 expected"
    assert logits.stride(1) == 1 and noise.is_contiguous(), "rows must be contiguous"
    if scratch is None:
        scratch = torch.zeros(B, SAMPLE_SLOTS, dtype=torch.int64, device=logits.device)
    assert scratch.dtype == torch.int64 and scratch.is_contiguous() and scratch.shape[0] >= B \
        and scratch.shape[1] == SAMPLE_SLOTS and scratch.device == logits.device, \
        f"scratch must be [>= {B}, {SAMPLE_SLOTS}] zeroed int64 on the logits' device"  # fmt: skip
    out = torch.empty(B, 1, dtype=torch.int32, device=logits.device)
    block = _sample_block(V)
    grid, key_bits, top_k = (_cdiv(V, block), B), 8 * logits.element_size(), int(top_k)
    pdl = triton_ops._pdl_args(logits.device)
    if 0 < top_k < V:
        for level in range(key_bits // 8):
            _radix_kernel[grid](logits, scratch, V, logits.stride(0), float(temperature), top_k, LEVEL=level,
                                KEY_BITS=key_bits, BLOCK=block, num_warps=4, **pdl)  # fmt: skip
    _race_kernel[grid](logits, noise, out, scratch, V, logits.stride(0), float(temperature), KEY_BITS=key_bits,
                       TOP_K=0 < top_k < V, BLOCK=block, num_warps=4, **pdl)  # fmt: skip
    return out
