"""Speculative decoding: exact under greedy, the target's distribution under sampling, consistent caches,
compiled once."""
import math

import pytest
import torch
from torch.testing import assert_close

import generate as gen
import speculative as spec
from model import ModelArgs, Transformer
from tests.helpers import load_tiny, make_checkpoint
from tokenizer import load_tokenizer

PROMPT = [5, 17, 99, 3, 42, 8, 77, 21, 60, 11, 5, 17, 99]


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    # a tiny model's ops take microseconds: extra threads only add synchronisation (5x slower on 2 cores)
    if "smollm2_checkpoint" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random target, and drafts: another random model, a slightly perturbed copy, an exact copy."""
    _, target_path = make_checkpoint("llama_gqa", tmp_path_factory.mktemp("target"), seed=0)
    _, other_path = make_checkpoint("llama_gqa", tmp_path_factory.mktemp("other"), seed=1)
    return target_path, other_path


def load_draft(tiny, kind: str) -> Transformer:
    target_path, other_path = tiny
    if kind == "other":  # same vocabulary, unrelated weights: almost everything is rejected
        return load_tiny(other_path, 128)
    draft = load_tiny(target_path, 128)
    if kind == "noisy":  # noise on the output layer: agrees often but not always
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            draft.output.weight.add_(torch.randn(draft.output.weight.shape, generator=g) * 0.01)
    return draft


def plain_greedy(model: Transformer, prompt: list[int], n: int, stop_ids=None) -> list[int]:
    return gen.generate(model, [prompt], n, temperature=0, stop_ids=stop_ids)[0][0]


# ----------------------------------------------------------------------------- greedy: token-for-token


@pytest.mark.parametrize("kind", ["other", "noisy", "itself"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_draft_speculation_equals_plain_greedy(tiny, kind, k):
    target = load_tiny(tiny[0], 128)
    expected = plain_greedy(target, PROMPT, 40)
    rows, stats = spec.speculative_generate(target, PROMPT, 40, draft=load_draft(tiny, kind), k=k, temperature=0)
    assert rows[0] == expected
    accepted = stats["accepted"]
    if kind == "itself":  # the draft is the target: every proposal is accepted
        assert accepted[:k] == [0] * k and accepted[k] > 0
    else:  # rejections happened, so the rewinding was exercised
        assert accepted[0] > 0
    if kind == "noisy":  # and full acceptances, so the draft's catch-up step too
        assert accepted[k] > 0


def test_greedy_prompt_lookup_equals_plain_greedy(tiny):
    target = load_tiny(tiny[0], 128)
    prompt = PROMPT * 3  # repetitive: lookup finds matches
    expected = plain_greedy(target, prompt, 40)
    rows, stats = spec.speculative_generate(target, prompt, 40, lookup=3, k=5, temperature=0)
    assert rows[0] == expected
    assert stats["mean_accepted"] > 0.5 and stats["accepted"][0] > 0  # accepted guesses, and rejected ones


def test_stop_token_inside_an_accepted_run_ends_generation_there(tiny):
    target = load_tiny(tiny[0], 128)
    free = plain_greedy(target, PROMPT, 30)
    stop = free[6]  # with the target as its own draft, this lands inside a run of accepted proposals
    rows, _ = spec.speculative_generate(target, PROMPT, 30, draft=load_draft(tiny, "itself"), k=4, temperature=0,
                                        stop_ids={stop})  # fmt: skip
    assert rows[0] == free[: free.index(stop) + 1] == plain_greedy(target, PROMPT, 30, stop_ids={stop})


def test_max_new_tokens_is_exact(tiny):
    target = load_tiny(tiny[0], 128)
    for n in (1, 2, 7):  # an accepted run may overshoot; the output is cut
        rows, _ = spec.speculative_generate(target, PROMPT, n, draft=load_draft(tiny, "itself"), k=4, temperature=0)
        assert rows[0] == plain_greedy(target, PROMPT, n)


# ----------------------------------------------------------------------------- caches after rejections


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_caches_hold_exactly_the_accepted_sequence(tiny, proposer, temperature):
    torch.manual_seed(0)
    target = load_tiny(tiny[0], 128)
    draft = load_draft(tiny, "noisy") if proposer == "draft" else None
    prompt = PROMPT * 2
    rows, stats = spec.speculative_generate(target, prompt, 40, draft=draft, lookup=3 if draft is None else 0, k=4,
                                            temperature=temperature)  # fmt: skip
    assert stats["accepted"][0] > 0 and stats["accepted"][4] < stats["verify_steps"]  # there were rejections
    seq = prompt + rows[0]
    for model in (target, draft) if draft is not None else (target,):
        with torch.no_grad():  # only the last token is new to the cache; the rest must be the accepted tokens
            cached = model(torch.tensor([seq[-1:]]), torch.tensor([len(seq) - 1]))[0, -1]
            model.setup_caches(1, 128)  # fresh, empty caches
            fresh = model(torch.tensor([seq]), torch.arange(len(seq)))[0, -1]
        assert_close(cached, fresh, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- sampling: the target's law

V, K, N = 16, 3, 20_000  # tiny vocabulary, proposals per step, samples (one batch row each)
STAT_PROMPT, CUR = [3, 1, 4, 1, 5, 9], 2  # the prompt is in both caches; CUR is the last accepted token
SAMPLING = dict(temperature=0.9, top_k=12)  # top-k: the target gives some proposals probability zero
# Bretagnolle-Huber-Carol: P(sum |p_hat - p| >= eps) <= 2^V exp(-N eps^2 / 2). With false-alarm
# probability 1e-6 the empirical total variation stays below this for a correct sampler:
TV_BOUND = 0.5 * math.sqrt(2 * (V * math.log(2) + math.log(1e6)) / N)  # 0.025


def random_tiny(seed: int, like: Transformer | None = None) -> Transformer:
    # weights large enough for peaked, distinct distributions (HF's 0.02 init gives near-uniform ones)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(vocab_size=V, dim=32, n_layer=1, n_head=2, n_local_heads=1, intermediate_size=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
                if like is not None:  # a draft resembling the target, so long accepted runs happen too
                    p.mul_(0.5).add_(like.get_parameter(name))
    return model.eval()


def next_token_probs(model: Transformer, prefixes: list[list[int]]) -> torch.Tensor:
    # the target's exact next-token distribution after each prefix (all of one length): [R, V]
    model.setup_caches(len(prefixes), 16)
    with torch.no_grad():
        logits = model(torch.tensor(prefixes), torch.arange(len(prefixes[0])))[:, -1]
    return gen.logits_to_probs(logits, **SAMPLING)


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
@torch.no_grad()
def test_sampled_tokens_follow_the_targets_distribution(proposer):
    target = random_tiny(0)
    draft = random_tiny(1, like=target)
    # exact laws of the first two tokens after STAT_PROMPT + [CUR]
    p1 = next_token_probs(target, [STAT_PROMPT + [CUR]])[0]
    p2_given = next_token_probs(target, [STAT_PROMPT + [CUR, a] for a in range(V)])  # [V, V]
    p2 = p1 @ p2_given
    q1 = next_token_probs(draft, [STAT_PROMPT + [CUR]])[0]
    guess = torch.tensor([int(p1.argmax()), int(p2_given[p1.argmax()].argmax()), 0])  # a fixed "lookup" proposal

    # The test can fail: the exact law of the first token under two plausible bugs is far outside the bound.
    # Resampling from p instead of the residual after a rejection gives min(p, q) + (1 - sum min(p, q)) p;
    # for a point-mass proposal at d that is p(d) delta_d + (1 - p(d)) p.
    q = q1 if proposer == "draft" else torch.nn.functional.one_hot(guess[0], V).float()
    overlap = torch.minimum(p1, q)
    resample_from_p = overlap + (1 - overlap.sum()) * p1
    assert 0.5 * (resample_from_p - p1).abs().sum() > 2 * TV_BOUND
    assert 0.5 * (q - p1).abs().sum() > 2 * TV_BOUND  # accepting every proposal gives q

    # N independent speculative steps, one per batch row, all from the same cache state
    torch.manual_seed(0)
    for model in (target, draft):
        model.setup_caches(N, 16)
        model(torch.tensor([STAT_PROMPT] * N), torch.arange(len(STAT_PROMPT)))

    def step(cur: torch.Tensor, pos: int):  # cur: [N, 1] -> tokens emitted [N, K+1] (first n + 1 valid), n [N]
        if proposer == "draft":
            proposal, q = spec.propose_with_draft(draft, cur, pos, K, **SAMPLING)
        else:
            proposal, q = guess.to(torch.int).expand(N, K), None
        n, nxt = spec.verify(target, cur, proposal, q, torch.arange(pos, pos + K + 1), **SAMPLING)
        emitted = torch.cat([proposal, proposal[:, :1]], dim=1).scatter(1, n[:, None].long(), nxt)
        return emitted, n

    emitted, n = step(torch.full((N, 1), CUR, dtype=torch.int), len(STAT_PROMPT))
    first = emitted[:, 0]
    # rows that emitted one token get their second from a next step, on caches rewound past the rejection
    emitted2, _ = step(first[:, None].clone(), len(STAT_PROMPT) + 1)
    second = torch.where(n >= 1, emitted[:, 1], emitted2[:, 0])

    counts = torch.bincount(n, minlength=K + 1)
    assert (counts > 100).all()  # every outcome, from rejection at once to the bonus token, was exercised
    assert tv(torch.bincount(first.long(), minlength=V).float(), p1) < TV_BOUND
    assert tv(torch.bincount(second.long(), minlength=V).float(), p2) < TV_BOUND


# ----------------------------------------------------------------------------- compile


def test_compiled_steps_compile_once_without_graph_breaks(tiny, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    for name in ("verify", "draft_step"):  # restore the eager functions afterwards
        monkeypatch.setattr(spec, name, getattr(spec, name))
    counter = CompileCounterWithBackend("aot_eager")
    spec.setup_compile(backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    target, draft = load_tiny(tiny[0], 128), load_draft(tiny, "noisy")
    expected = plain_greedy(target, PROMPT, 30)

    rows, stats = spec.speculative_generate(target, PROMPT, 30, draft=draft, k=4, temperature=0)
    assert rows[0] == expected
    assert stats["accepted"][0] > 0 and stats["accepted"][4] > 0  # both the rewind and the extra draft step ran
    assert counter.frame_count == 2  # one verify graph, one draft-step graph
    spec.speculative_generate(target, PROMPT[:5], 30, draft=draft, k=4, temperature=0)  # other positions
    assert counter.frame_count == 2

    rows, _ = spec.speculative_generate(target, PROMPT, 30, lookup=2, k=4, temperature=0)
    assert rows[0] == expected
    assert counter.frame_count == 2  # greedy verify never reads the draft's distributions: same graph

    sampling = dict(temperature=0.8, top_k=50)  # new constants: one new graph each, then none
    for prompt in (PROMPT, PROMPT[:5]):
        spec.speculative_generate(target, prompt, 30, draft=draft, k=4, **sampling)
        assert counter.frame_count == 4
    for prompt in (PROMPT, PROMPT[:5]):
        spec.speculative_generate(target, prompt, 30, lookup=2, k=4, **sampling)
        assert counter.frame_count == 5  # sampling verify with point-mass proposals
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the real packaged model

REPEAT_REQUEST = (
    "Repeat the following text exactly.\n\n"
    "The Australian Government says it will not be pressured into changing its policy on asylum seekers. "
    "The Prime Minister says the Government's position is firm and it will continue to process claims offshore."
)


def smollm2_chat_ids(checkpoint, text: str) -> tuple[list[int], set[int]]:
    tokenizer = load_tokenizer(checkpoint.parent)
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), bos=False), tokenizer.stop_ids


def test_smollm2_greedy_with_itself_as_draft_equals_plain(smollm2_checkpoint):
    ids, stop_ids = smollm2_chat_ids(smollm2_checkpoint, "What is the capital of France?")
    target, draft = (gen.load_model(smollm2_checkpoint, "cpu", torch.float32) for _ in range(2))
    for m in (target, draft):
        m.setup_caches(1, len(ids) + 24 + 4)
    expected = gen.generate(target, [ids], 24, temperature=0, stop_ids=stop_ids)[0][0]
    rows, stats = spec.speculative_generate(target, ids, 24, draft=draft, k=4, temperature=0, stop_ids=stop_ids)
    assert rows[0] == expected
    assert stats["mean_accepted"] > 3  # a draft equal to the target is accepted (up to float rounding)


def test_smollm2_greedy_prompt_lookup_equals_plain_and_accepts_copied_text(smollm2_checkpoint):
    ids, stop_ids = smollm2_chat_ids(smollm2_checkpoint, REPEAT_REQUEST)
    model = gen.load_model(smollm2_checkpoint, "cpu", torch.float32)
    model.setup_caches(1, len(ids) + 32 + 6)
    expected = gen.generate(model, [ids], 32, temperature=0, stop_ids=stop_ids)[0][0]
    rows, stats = spec.speculative_generate(model, ids, 32, lookup=3, k=6, temperature=0, stop_ids=stop_ids)
    assert rows[0] == expected
    assert stats["mean_accepted"] > 2  # copying the input: most guesses are right


def test_smollm2_greedy_with_its_int8_copy_as_draft_equals_plain(smollm2_checkpoint):
    import quantize

    ids, stop_ids = smollm2_chat_ids(smollm2_checkpoint, "What is the capital of France?")
    target = gen.load_model(smollm2_checkpoint, "cpu", torch.float32)
    draft = quantize.quantize_model(gen.load_model(smollm2_checkpoint, "cpu", torch.float32), "int8")
    for m in (target, draft):
        m.setup_caches(1, len(ids) + 24 + 4)
    expected = gen.generate(target, [ids], 24, temperature=0, stop_ids=stop_ids)[0][0]
    rows, stats = spec.speculative_generate(target, ids, 24, draft=draft, k=4, temperature=0, stop_ids=stop_ids)
    assert rows[0] == expected
    assert stats["mean_accepted"] > 1  # int8 weights rarely change the argmax


# ----------------------------------------------------------------------------- command line


def test_cli_prompt_lookup_prints_the_plain_greedy_text_and_acceptance(smollm2_checkpoint, capsys):
    argv = ["--checkpoint_path", str(smollm2_checkpoint), "--prompt", "One, two, three, four, one, two, three,",
            "--temperature", "0", "--max_new_tokens", "8", "--num_samples", "1", "--device", "cpu"]  # fmt: skip
    gen.main(argv)
    plain = capsys.readouterr()
    gen.main(argv + ["--prompt_lookup", "3", "--speculate_k", "4"])
    speculative = capsys.readouterr()
    assert speculative.out == plain.out
    assert "speculation:" in speculative.err and "proposals accepted per verify step" in speculative.err


def test_cli_rejects_a_draft_with_another_vocabulary(smollm2_checkpoint, tiny):
    argv = ["--checkpoint_path", str(smollm2_checkpoint), "--draft_checkpoint_path", str(tiny[0]), "--device", "cpu"]
    with pytest.raises(gen.UserError, match="vocabulary .* differs"):
        gen.main(argv)


def test_cli_speculation_is_one_prompt_at_a_time(smollm2_checkpoint, tmp_path, capsys):
    for flags in (["--batch_size", "2"], ["--interactive"], ["--draft_checkpoint_path", "d/model.pth"]):
        with pytest.raises(SystemExit):
            gen.parse_args(["--prompt_lookup", "2", *flags])
    assert "one prompt at a time" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    argv = ["--checkpoint_path", str(smollm2_checkpoint), "--prompt_file", str(prompts), "--prompt_lookup", "2"]
    with pytest.raises(gen.UserError, match="one prompt at a time"):
        gen.main(argv + ["--device", "cpu"])
