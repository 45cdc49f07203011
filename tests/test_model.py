"""model.py + the HF converter against transformers, per supported family."""
import pytest
import torch
from torch.testing import assert_close

import generate as gen
from generate import generate, sample
from model import ModelArgs, Transformer
from tests.helpers import FAMILIES, load_tiny, make_checkpoint

PROMPT_LEN = 40  # longer than the Mistral window (8): the window must be honoured


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    hf, checkpoint = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, hf, checkpoint


def test_logits_match_transformers(converted):
    family, hf, checkpoint = converted
    model = load_tiny(checkpoint)
    x = torch.randint(0, 128, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    model.setup_caches(2, 64)
    with torch.no_grad():
        ours = model(x, torch.arange(PROMPT_LEN))
        ref = hf(x).logits
    assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_continuation_matches_transformers(converted):
    family, hf, checkpoint = converted
    model = load_tiny(checkpoint)
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    rows, _ = generate(model, [prompt[0].tolist()], 30, temperature=0)
    assert rows[0] == ref


def test_sliding_window_changes_the_result(tmp_path):
    # guard against a window that is silently ignored: without it, logits past the window differ
    hf, checkpoint = make_checkpoint("mistral_window", tmp_path)
    model = load_tiny(checkpoint)
    x = torch.randint(0, 128, (1, PROMPT_LEN))
    with torch.no_grad():
        windowed = model(x, torch.arange(PROMPT_LEN))
        for layer in model.layers:
            layer.sliding = False
        full = model(x, torch.arange(PROMPT_LEN))
    assert_close(windowed[:, :8], full[:, :8])
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3


def test_cached_decode_equals_full_forward(converted):
    family, hf, checkpoint = converted
    model = load_tiny(checkpoint)
    x = torch.randint(0, 128, (1, PROMPT_LEN))
    with torch.no_grad():
        full = model(x, torch.arange(PROMPT_LEN))
        model(x[:, :20], torch.arange(20))  # prefill half, then one token at a time
        steps = [model(x[:, i:i + 1], torch.tensor([i])) for i in range(20, PROMPT_LEN)]
    assert_close(torch.cat(steps, dim=1), full[:, 20:], atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_separate_rows(tmp_path):
    # left padding + kv_valid must give each row the result it gets alone
    _, checkpoint = make_checkpoint("llama_gqa", tmp_path)
    model = load_tiny(checkpoint, batch_size=2)
    prompts = [list(range(3, 20)), list(range(40, 45))]
    rows, _ = generate(model, prompts, 10, temperature=0)
    for prompt, row in zip(prompts, rows):
        alone = load_tiny(checkpoint)
        assert generate(alone, [prompt], 10, temperature=0)[0][0] == row


@pytest.mark.parametrize("family", ["llama_gqa", "mistral_window"])
def test_prompts_padded_for_the_prefill_graph_generate_the_same(family, tmp_path, monkeypatch):
    # On a GPU, PrefillGraphs pads short prompts on the right to 16 positions to replay one CUDA graph: the
    # padding must change neither the prompt's logits nor anything generated after it (ragged rows: left
    # padding too; a sliding window of 8)
    _, checkpoint = make_checkpoint(family, tmp_path)
    model = load_tiny(checkpoint, batch_size=2)
    prompts = [list(range(3, 14)), list(range(40, 45))]
    plain = generate(model, prompts, 12, temperature=0)[0]
    monkeypatch.setattr(gen, "prefill_graphs", gen.PrefillGraphs(capture=False))
    assert generate(model, prompts, 12, temperature=0)[0] == plain


def test_prefill_graph_takes_short_prompts_that_fit_and_matches_the_plain_forward(tmp_path):
    _, checkpoint = make_checkpoint("llama_gqa", tmp_path)
    model = load_tiny(checkpoint, max_seq_length=40)
    padded = gen.PrefillGraphs(capture=False)
    x = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x[:, :20], torch.arange(20))
        plain = model(x[:, 20:25], torch.arange(20, 25))  # a later chunk, as a chat turn prefills
        assert_close(padded(model, x[:, 20:25], torch.arange(20, 25)), plain, atol=1e-5, rtol=1e-5)
    assert padded(model, x[:, :17], torch.arange(17)) is None  # longer than the graph
    assert padded(model, x[:, 25:27], torch.arange(25, 27)) is None  # its padding would run past the cache
    assert gen.PrefillGraphs()(model, x[:, :5], torch.arange(5)) is None  # graphs need a GPU


def test_generation_stops_at_stop_token(tmp_path):
    _, checkpoint = make_checkpoint("llama_gqa", tmp_path)
    model = load_tiny(checkpoint)
    free = generate(model, [[1, 2, 3]], 20, temperature=0)[0][0]
    stop = free[5]
    rows, _ = generate(model, [[1, 2, 3]], 20, temperature=0, stop_ids={stop})
    assert rows[0] == free[: free.index(stop) + 1]


def test_stop_and_callback_looked_at_a_few_steps_late_change_nothing(tmp_path):
    # decode_n_tokens looks at each token `lag` steps after decoding it (on a GPU, so that it never waits for
    # the step just queued): the callback sees the same tokens in the same order, up to the stop, and at most
    # lag tokens more are decoded past it
    _, checkpoint = make_checkpoint("llama_gqa", tmp_path)
    model = load_tiny(checkpoint)
    free = generate(model, [[1, 2, 3]], 20, temperature=0)[0][0]
    stop = free[6]
    first, pos = torch.tensor([[free[0]]]), torch.tensor([3])
    for lag in (0, 1, 3, 30):
        seen = []
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), torch.arange(3))  # the prompt's cache entries again
            out = gen.decode_n_tokens(model, first, pos, 19, {stop}, lambda t: seen.append(int(t[0, 0])), lag=lag,
                                      temperature=0)  # fmt: skip
        out = [int(t[0, 0]) for t in out]
        assert seen == free[1 : free.index(stop) + 1]  # the callback: up to the stop, not past it
        assert out[: len(seen)] == seen and len(seen) <= len(out) <= min(len(seen) + lag, 19)


def test_compiled_equals_eager(tmp_path):
    _, checkpoint = make_checkpoint("qwen3", tmp_path)
    model = load_tiny(checkpoint)
    x = torch.randint(0, 128, (1, 1))
    pos = torch.tensor([7])
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 7)), torch.arange(7))
        eager = model(x, pos)
        compiled = torch.compile(model, fullgraph=True)(x, pos)
    assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_decode_step_has_no_graph_breaks(tmp_path):
    import generate as gen

    _, checkpoint = make_checkpoint("mistral_window", tmp_path)
    model = load_tiny(checkpoint)
    explanation = torch._dynamo.explain(gen.decode_one_token)(
        model, torch.tensor([[3]], dtype=torch.int), torch.tensor([4]), temperature=0.8, top_k=50, top_p=0.9
    )
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'.*llama, mistral, qwen2, qwen3"):
        ModelArgs.from_hf_config({"model_type": "gpt_neox"})


def test_meta_build_has_no_real_storage():
    with torch.device("meta"):
        model = Transformer(ModelArgs(n_layer=2, dim=256, n_head=4, intermediate_size=512))
    assert all(p.is_meta for p in model.parameters())


def test_prefill_compiles_once_for_all_prompt_lengths_and_decode_once_for_all_steps(tmp_path):
    import generate as gen
    from torch._dynamo.testing import CompileCounter

    _, checkpoint = make_checkpoint("llama_gqa", tmp_path)
    model = load_tiny(checkpoint)
    prefill_counter, decode_counter = CompileCounter(), CompileCounter()
    prefill = torch.compile(gen.prefill, backend=prefill_counter, dynamic=True, fullgraph=True)
    decode = torch.compile(gen.decode_one_token, backend=decode_counter, fullgraph=True)
    with torch.no_grad():
        for length in (5, 9, 17, 33):
            token = prefill(model, torch.randint(0, 128, (1, length)), torch.arange(length), temperature=0.8, top_k=20)
            for pos in range(length, length + 4):
                token = decode(model, token, torch.tensor([pos]), temperature=0.8, top_k=20)
    assert prefill_counter.frame_count == 1
    assert decode_counter.frame_count == 1


def test_sampling_draws_from_the_top_k_softmax():
    # the exponential race on logits (Gumbel-max) draws token i with probability softmax(logits / T) over the
    # top k, and returns that distribution; nothing outside the top k is ever drawn
    torch.manual_seed(0)
    V, N, k, T = 12, 40_000, 5, 0.7
    logits = torch.randn(V) * 2
    top = logits.topk(k).indices
    expected = torch.zeros(V).index_copy(0, top, torch.softmax(logits[top] / T, -1))
    tokens, probs = sample(logits.expand(N, 1, V), temperature=T, top_k=k)
    assert set(tokens.unique().tolist()) <= set(top.tolist())
    freq = torch.bincount(tokens[:, 0], minlength=V) / N
    assert 0.5 * (freq - expected).abs().sum() < 0.02  # total variation; ~0.005 expected for a correct sampler
    assert_close(probs[0], expected)


def test_a_sampler_kernel_draws_the_tokens_torch_draws_from_the_same_seed(tmp_path, monkeypatch):
    # On a GPU, prepare_for_device gives the model a triton_sample.Sampler (Triton kernels for the top-k and the
    # exponential race). Here the same kernels run in Triton's interpreter on the CPU: generate() with them
    # must draw the very tokens torch's sampling draws from the same seed, prompt and decode steps alike
    import triton_ops
    import triton_sample

    _, checkpoint = make_checkpoint("llama_gqa", tmp_path)
    model = load_tiny(checkpoint, batch_size=2)
    prompts = [list(range(3, 14)), list(range(40, 45))]
    sampling = dict(temperature=0.8, top_k=20)
    torch.manual_seed(5)
    plain = generate(model, prompts, 12, **sampling)[0]
    model.sampler = triton_sample.draw  # on a CPU model it declines the CPU logits: torch's own sampling
    torch.manual_seed(5)
    assert generate(model, prompts, 12, **sampling)[0] == plain
    monkeypatch.setattr(triton_sample, "sample_supported", lambda logits: True)  # the kernel on CPU logits too
    calls = []

    def draw(logits, temperature, top_k):  # triton_sample.draw, counting its calls
        calls.append(logits.shape)
        return triton_sample.draw(logits, temperature, top_k)

    model.sampler = draw
    torch.manual_seed(5)
    assert generate(model, prompts, 12, **sampling)[0] == plain
    assert len(calls) == 12 and calls[0] == (2, 128)  # the prompt's token, then each step's
    torch.manual_seed(5)  # greedy and top-p keep torch's own sampling
    generate(model, prompts, 4, temperature=0)
    generate(model, prompts, 4, temperature=0.8, top_p=0.9)
    assert len(calls) == 12
    # compiled with fullgraph, the decode step takes the kernel as a custom op (no graph break), same token
    import generate as gen

    model.sampler = triton_sample.Sampler(torch.device("cpu"))  # what prepare_for_device gives: its scratch a buffer
    triton_ops.register_inductor_fallbacks()  # as prepare_for_device does on a GPU
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's random stream when compiled
    x, pos = torch.tensor([[3], [4]], dtype=torch.int), torch.tensor([20])
    torch.manual_seed(7)
    eager = gen.decode_one_token(model, x, pos, **sampling)
    torch._dynamo.reset()
    torch.manual_seed(7)
    compiled = torch.compile(gen.decode_one_token, fullgraph=True)(model, x, pos, **sampling)
    assert torch.equal(compiled, eager) and compiled.dtype == torch.int32
    assert not model.sampler.scratch.any()  # left zeroed for the next step
