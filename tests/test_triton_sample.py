"""The sampling kernels of triton_sample.py against generate.sample's torch path (bench_kernels.sample_reference)
on the same noise: the same token.

Without a GPU the kernels run in Triton's interpreter (numpy). bench_kernels.py --sample repeats the comparison on
a GPU at the 7B and 8B vocabularies.
"""
import pytest
import torch

import triton_sample
from bench_kernels import sample_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("top_k", [1, 7, 200, 0, 1000])
def test_sample_kernel_draws_what_generate_sample_draws(dtype, top_k):
    # 3 rows over a vocabulary of 1000 (not a power of two); top_k 0 or the vocabulary: no top-k. The logits sit
    # on a coarse grid, so many tie with the k-th largest (kept, as by masked_logits), and include -0 and +0
    g = torch.Generator().manual_seed(top_k)
    logits = (torch.randn(3, 1000, generator=g) * 4).round() / 2
    logits[1, :300] = 0.0
    logits[1, 300:400] = -0.0
    logits = logits.to(dtype)
    for seed, temperature in ((0, 0.8), (1, 1.0), (2, 1e-5)):
        noise = torch.empty(3, 1000).exponential_(1, generator=torch.Generator().manual_seed(seed))
        token = triton_sample.sample(logits, noise, temperature, top_k)
        assert token.shape == (3, 1) and token.dtype == torch.int32
        assert torch.equal(token, sample_reference(logits, noise, temperature, top_k))
    if top_k == 1:  # only the largest logit may be drawn, whatever the noise
        assert torch.equal(token[:, 0].long(), logits.float().argmax(-1))
    # the k-th largest is 0: the -0 logits tie with it and stay in (a small noise lets index 360 win)
    row = -torch.rand(1, 1000, generator=g) - 1
    row[0, :50], row[0, 50:350], row[0, 350:450] = 1.0, 0.0, -0.0
    noise = torch.ones(1, 1000)
    noise[0, 360] = 1e-30
    assert triton_sample.sample(row.to(dtype), noise, 1.0, 200).item() == 360
    assert triton_sample.sample(row.to(dtype), noise, 1.0, 7).item() != 360  # outside the top 7


def test_sample_kernel_reads_the_last_position_of_a_strided_view():
    # generate.py passes logits[:, -1] of [B, S, V]: rows S * V apart
    logits = torch.randn(2, 3, 1000, dtype=torch.bfloat16)
    noise = torch.empty(2, 1000).exponential_(1, generator=torch.Generator().manual_seed(0))
    last = logits[:, -1]
    assert last.stride(0) == 3000
    assert torch.equal(triton_sample.sample(last, noise, 0.8, 50), sample_reference(last, noise, 0.8, 50))
    assert not triton_sample.sample_supported(last)  # a CPU tensor: generate.py keeps torch's sampling


def test_sample_kernel_spreads_a_row_over_programs_and_leaves_its_scratch_zeroed():
    # 5000 logits in 10 programs of 512: the k-th largest and the race's winner are found across programs, ties
    # to the lowest index wherever they lie; the scratch a Sampler keeps is zeroed again after every call
    assert triton_sample._sample_block(5000) == 512
    scratch = torch.zeros(4, triton_sample.SAMPLE_SLOTS, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    for dtype, top_k, temperature in ((torch.bfloat16, 200, 0.8), (torch.float32, 3000, 1.3), (torch.float16, 1, 0.5)):
        logits = (torch.randn(3, 5000, generator=g) * 3).to(dtype)
        noise = torch.empty(3, 5000).exponential_(1, generator=g)
        ref = sample_reference(logits, noise, temperature, top_k)
        assert torch.equal(triton_sample.sample(logits, noise, temperature, top_k, scratch), ref)
        assert not scratch.any()
    flat, ones = torch.zeros(1, 5000), torch.ones(1, 5000)
    flat[0, :600] = -1.0
    assert triton_sample.sample(flat, ones, 1.0, 0, scratch).item() == 600  # the first of 4400 equal scores
    assert triton_sample.sample(flat, ones, 1.0, 10, scratch).item() == 600
    flat[0, 4999] = 2.0
    assert triton_sample.sample(flat, ones, 1.0, 1, scratch).item() == 4999  # the last program's only key
    assert not scratch.any()


def test_fake_implementation_agrees_with_the_kernels():
    # torch.library.opcheck: the op's fake (what torch.compile plans with) gives the real output's shape, dtype and
    # strides
    logits, noise = torch.randn(2, 300, dtype=torch.bfloat16), torch.rand(2, 300) + 0.1
    torch.library.opcheck(triton_sample.sample.op, (logits, noise, 0.8, 20))
