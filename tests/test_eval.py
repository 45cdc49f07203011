"""eval.py as a specification: our lm-eval model scores and generates exactly as lm-eval's own HF backend
does on the same weights, rolling loglikelihood is the perplexity code, and the CLI runs the shipped
local task end to end with no hub access."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows

import eval as ev
import generate as gen
from generate import load_model
from tests.helpers import botchan, make_checkpoint, prose, save_tiny_tokenizer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BOTCHAN = botchan()
TEXT = prose()


def run_eval(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ----------------------------------------------------------------------------- a tiny random model with a real tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """An HF folder (random Llama, GQA) that is also our checkpoint folder: model.pth beside the HF files."""
    folder = tmp_path_factory.mktemp("tiny_eval")
    save_tiny_tokenizer(folder)
    make_checkpoint("llama_gqa", folder)
    return folder


def our_lm(folder: Path, batch_size: int = 3) -> ev.FastGenLM:
    model = load_model(folder / "model.pth", "cpu", torch.float32)
    return ev.FastGenLM(model=model, tokenizer=load_tokenizer(folder), batch_size=batch_size)


@pytest.fixture(scope="module")
def lm(tiny) -> ev.FastGenLM:
    return our_lm(tiny)


@pytest.fixture(scope="module")
def hf_lm(tiny) -> HFLM:
    return HFLM(pretrained=str(tiny), dtype="float32", batch_size=1, device="cpu")


LOGLIKELIHOOD = [
    ("", "The"),  # empty context: conditioned on the prefix (bos) token
    ("I said ", "no."),  # the trailing space moves into the continuation
    ("The cat sat on the", " mat"),
    (TEXT[:300], TEXT[300:400]),  # a long continuation
    (TEXT[:2000], " and so on"),  # longer than the context (256): truncated from the left
    (TEXT[500:520], TEXT[520:526]),
    (TEXT[900:1000], TEXT[1000:1010]),
]


def test_example_task_data_are_what_the_script_builds_from_the_novel():
    from scripts.make_example_task import OUT, make_items

    shipped = [json.loads(line) for line in OUT.read_text(encoding="utf-8").splitlines()]
    assert shipped == make_items(BOTCHAN)
    for item in shipped:
        assert item["choices"][item["label"]] == item["answer"] and len(set(item["choices"])) == 4
        assert f"{item['context']} {item['answer']}." in " ".join(BOTCHAN.split())


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("context_length", [1, 2, 5, 8])
def test_rolling_windows_are_lm_eval_rolling_windows(context_length):
    for n in range(0, 30):
        tokens = list(range(100, 100 + n))
        for context_len in range(1, context_length + 1):
            stride = context_length - context_len + 1
            ours = [(w[:-1], w[-k:]) for w, k in ev.rolling_windows([7] + tokens, context_length, stride)]
            theirs = list(get_rolling_token_windows(tokens, 7, context_length, context_len))
            assert ours == theirs
            assert sorted(t for _, preds in ours for t in preds) == tokens  # each token scored once
            assert all(len(inputs) <= context_length for inputs, _ in ours)


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride"):
        ev.rolling_windows([1, 2, 3], 4, 5)


# ----------------------------------------------------------------------------- the lm-eval model


def test_loglikelihood_is_the_sum_of_the_models_token_logprobs(lm):
    # a known continuation, scored by hand from one full forward
    context, continuation = lm.tok_encode("The cat sat on the"), lm.tok_encode(" mat and the dog", add_special_tokens=False)
    ids = torch.tensor([context + continuation])
    lm.model.setup_caches(1, 64)
    with torch.no_grad():
        logprobs = lm.model(ids[:, :-1], torch.arange(ids.shape[1] - 1)).log_softmax(-1)[0]
    expected = sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
    [(logprob, greedy)] = lm._loglikelihood_tokens([(None, context, continuation)], disable_tqdm=True)
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert not greedy


def test_greedy_continuation_is_flagged_greedy(lm):
    context = lm.tok_encode(TEXT[:40])
    lm.model.setup_caches(1, 64)
    greedy_ids = gen.generate(lm.model, [context], 6, temperature=0)[0][0]
    other = greedy_ids[:-1] + [(greedy_ids[-1] + 1) % 128]
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, context, greedy_ids), (None, context, other)], disable_tqdm=True
    )
    assert is_greedy and not not_greedy


def test_loglikelihood_matches_lm_eval_hf_backend(lm, hf_lm):
    reqs = requests("loglikelihood", *LOGLIKELIHOOD)
    ours, theirs = lm.loglikelihood(reqs, disable_tqdm=True), hf_lm.loglikelihood(reqs, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert abs(a - b) < 1e-3 and greedy_a == greedy_b


def test_batched_scoring_equals_one_request_at_a_time(tiny, lm):
    # 7 requests in batches of 3 (right-padded, a short last batch) against batches of 1
    reqs = requests("loglikelihood", *LOGLIKELIHOOD)
    batched, single = lm.loglikelihood(reqs, disable_tqdm=True), our_lm(tiny, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_rolling_loglikelihood_is_the_perplexity_code_and_matches_hf_backend(lm, hf_lm):
    # "" too: with a tokenizer that adds bos, lm-eval scores that bos after the prefix token, and so do we
    reqs = requests("loglikelihood_rolling", (TEXT[:3000],), ("A short one.",), ("",))
    ours = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    ids = [lm.prefix_token_id] + lm.tok_encode(TEXT[:3000])
    assert len(ids) > 3 * lm.max_length  # several windows
    ppl = ev.perplexity(lm.model, ids, lm.max_length, lm.max_length, progress=False, batch_size=2)
    assert ours[0] == pytest.approx(-(len(ids) - 1) * math.log(ppl), rel=1e-6)
    for a, b in zip(ours, hf_lm.loglikelihood_rolling(reqs, disable_tqdm=True)):
        assert abs(a - b) < 1e-3


def test_perplexity_stride_gives_more_context(lm):
    # the same tokens scored with more context (smaller stride) on real text: both finite, and different
    ids = lm.tok_encode(TEXT[:2000])
    coarse, fine = (ev.perplexity(lm.model, ids, 64, s, progress=False) for s in (64, 16))
    assert math.isfinite(coarse) and math.isfinite(fine) and coarse != pytest.approx(fine, rel=1e-4)


def test_generate_until_matches_hf_backend(lm, hf_lm):
    reqs = requests(
        "generate_until",
        ("The cat", {"until": ["e"], "max_gen_toks": 20}),
        (TEXT[:100], {"until": ["\n\n", "xyz"], "max_gen_toks": 12}),
        (TEXT[200:260], {"until": ["e"], "max_gen_toks": 20}),
        ("Hello", {"until": ["q"], "max_gen_toks": 3, "do_sample": False}),
    )
    assert lm.generate_until(reqs, disable_tqdm=True) == hf_lm.generate_until(reqs, disable_tqdm=True)


def test_generate_until_honours_stop_sequences_and_stops_early(lm, monkeypatch):
    prompt = TEXT[:60]
    ev.fit_cache(lm.model, 1, 128)
    ids = gen.generate(lm.model, [lm.tok_encode(prompt)], 40, temperature=0, stop_ids=lm.tokenizer.stop_ids)[0][0]
    free = lm.tok_decode(ids)  # the greedy continuation with no stop sequence
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    needed = next(k for k in range(1, len(ids) + 1) if stop in lm.tok_decode(ids[:k]))  # tokens until it shows

    steps = []
    real_step = gen.decode_one_token
    monkeypatch.setattr(gen, "decode_one_token", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    [cut] = lm.generate_until(requests("generate_until", (prompt, {"until": [stop], "max_gen_toks": 40})), disable_tqdm=True)
    assert cut == free.split(stop)[0] and len(cut) < len(free)
    assert len(steps) == needed - 1  # prefill gives the first token; no decode step after the stop sequence

    [short] = lm.generate_until(requests("generate_until", (prompt, {"until": [], "max_gen_toks": 5})), disable_tqdm=True)
    assert short == lm.tok_decode(ids[:5])


def test_registered_as_an_lm_eval_model(tiny):
    from lm_eval.api.registry import get_model

    assert get_model("fastgen") is ev.FastGenLM
    lm = get_model("fastgen").create_from_arg_string(f"checkpoint_path={tiny / 'model.pth'},batch_size=2", {"device": "cpu"})
    assert lm.batch_size == 2 and lm.max_length == 256 and lm.device.type == "cpu"


# ----------------------------------------------------------------------------- the CLI


def test_local_task_end_to_end(tiny, tmp_path):
    out = tmp_path / "results.json"
    r = run_eval("--checkpoint_path", str(tiny / "model.pth"), "--include_path", "tasks", "--tasks", "botchan",
                 "--limit", "4", "--batch_size", "4", "--device", "cpu", "--output_path", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    for task, metric in [("botchan_cloze", "acc,none"), ("botchan_next_word", "exact_match,first_word"),
                         ("botchan_ppl", "word_perplexity,none")]:  # fmt: skip
        assert 0 <= results["results"][task][metric] < math.inf
        assert f"|{task}" in r.stdout.replace(" ", "")  # lm-eval's table
    assert all(n["effective"] == 4 for n in results["n-samples"].values())
    assert results["fastgen"]["checkpoint"] == str(tiny / "model.pth")
    assert {"torch", "lm_eval", "python"} <= set(results["fastgen"]["versions"])


def test_perplexity_of_a_real_text_file_matches_transformers(smollm2_checkpoint, smollm2_hf, tmp_path, capsys):
    text = tmp_path / "botchan_excerpt.txt"
    text.write_text(TEXT[:1000])
    out = tmp_path / "ppl.json"
    ev.main(["--checkpoint_path", str(smollm2_checkpoint), "--perplexity", str(text), "--context_length", "512",
             "--device", "cpu", "--output_path", str(out)])  # fmt: skip
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(out.read_text())["perplexity"]
    # one window holds the whole excerpt: transformers' own loss over the same tokens is the reference
    ids = load_tokenizer(smollm2_checkpoint.parent).encode(text.read_text())
    assert result["tokens"] == len(ids) - 1 < 512
    with torch.no_grad():
        loss = smollm2_hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert result["perplexity"] < 100  # English prose, not noise


def test_task_accuracy_matches_hf_backend_on_smollm2(smollm2_checkpoint, smollm2_hf):
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tasks = TaskManager(include_path=str(ROOT / "tasks"), include_defaults=False)
    # transformers reading the tokenizer files our converter wrote (test_tokenizer.py shows they tokenize
    # as transformers' own GGUF reader does, which takes 13 s more to load)
    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint.parent)
    models = {
        "ours": ev.FastGenLM(checkpoint_path=str(smollm2_checkpoint), device="cpu", batch_size=8),
        "hf": HFLM(pretrained=smollm2_hf, tokenizer=hf_tokenizer, batch_size=8),
    }
    results = {
        name: evaluator.simple_evaluate(model=model, tasks=["botchan_cloze"], limit=4, task_manager=tasks, log_samples=True)
        for name, model in models.items()
    }  # fmt: skip
    ours, theirs = (results[k]["results"]["botchan_cloze"] for k in ("ours", "hf"))
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]
    assert ours["acc,none"] >= 0.5  # a real model does pick the word that ends the sentence
    for a, b in zip(*(results[k]["samples"]["botchan_cloze"] for k in ("ours", "hf"))):
        for (ll_a, _), (ll_b, _) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert abs(ll_a - ll_b) < 1e-3


def test_unknown_task_is_a_clear_error():
    with pytest.raises(gen.UserError, match="unknown task.*botchan_typo"):
        ev.main(["--include_path", "tasks", "--tasks", "botchan_typo", "--limit", "1"])


def test_missing_files_are_clear_errors(tiny, tmp_path):
    with pytest.raises(gen.UserError, match="does not exist"):
        ev.main(["--checkpoint_path", str(tiny / "model.pth"), "--perplexity", str(tmp_path / "nope.txt")])
    with pytest.raises(gen.UserError, match="not a folder"):
        ev.main(["--include_path", str(tmp_path / "no_tasks"), "--tasks", "botchan"])
    # a local task whose data file is missing: one line on stderr, exit 1, and no results file
    (tmp_path / "t").mkdir()
    yaml = (ROOT / "tasks/botchan/botchan_cloze.yaml").read_text().replace("tasks/botchan/botchan.jsonl", "missing.jsonl")
    (tmp_path / "t" / "broken.yaml").write_text(yaml.replace("task: botchan_cloze", "task: broken"))
    out = tmp_path / "results.json"
    r = run_eval("--checkpoint_path", str(tiny / "model.pth"), "--include_path", str(tmp_path / "t"), "--tasks", "broken",
                 "--device", "cpu", "--output_path", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.jsonl" in r.stderr
    assert not out.exists() and list(tmp_path.glob(".results.json*")) == []


def test_compiled_scoring_equals_eager_without_recompiling_per_length(lm, monkeypatch):
    # aot_eager traces what inductor would compile (one full graph, dynamic shapes) in a fraction of the
    # CPU time; two batches of windows of different lengths must share that one graph
    for name in ("forward", "_compiled"):
        monkeypatch.setattr(ev, name, getattr(ev, name))
    for name in ("decode_one_token", "prefill", "prefill_graphs"):  # what gen.setup_compile sets
        monkeypatch.setattr(gen, name, getattr(gen, name))
    reqs = requests("loglikelihood", *[(TEXT[:k], TEXT[k : k + 9]) for k in (30, 60, 90, 150, 200, 250)])
    eager = lm.loglikelihood(reqs, disable_tqdm=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ev.setup_compile(backend="aot_eager")
    compiled = lm.loglikelihood(reqs, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(eager, compiled):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
