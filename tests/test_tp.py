"""Tensor parallelism as a specification: gloo processes launched by torchrun compute what one process
computes (logits, greedy tokens, plain and quantized checkpoints, the generate.py and eval.py command
lines, speculative decoding), and a split that cannot be done or a rank that stops answering ends the
run with a clear message instead of a hang.

Launching torchrun costs seconds, so the models are built once per module and one worker run probes
every checkpoint."""
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import eval as ev
import generate as gen
from model import ModelArgs
from quantize import quantize_checkpoint
from tests.helpers import make_checkpoint, prose, save_tiny_tokenizer
from tests.tp_worker import STALL_TIMEOUT_S, probe
from tp import check_shardable

ROOT = Path(__file__).resolve().parent.parent
GREEDY = ["--prompt", "The cat sat on the", "--temperature", "0", "--max_new_tokens", "24", "--num_samples", "1",
          "--device", "cpu"]  # fmt: skip


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    # OMP_NUM_THREADS set: torchrun would set it anyway, with a banner on stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def stdout_of(main, argv: list[str]) -> str:
    # a script's main() in this process (no torchrun: one rank), its stdout as text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random Llama with GQA (4 query heads, 2 KV heads) and a real BPE tokenizer; the folder holds
    model.pth and its int8 and fp8 quantizations model_int8.pth, model_fp8.pth."""
    folder = tmp_path_factory.mktemp("tiny_tp")
    save_tiny_tokenizer(folder)
    make_checkpoint("llama_gqa", folder)
    quantize_checkpoint(folder / "model.pth", "int8")
    quantize_checkpoint(folder / "model.pth", "fp8")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory) -> dict[str, Path]:
    # the GQA split, the same model int8, KV heads replicated (1 KV head for 2 ranks), biases (qwen2)
    found = {"llama_gqa": tiny / "model.pth", "llama_gqa_int8": tiny / "model_int8.pth", "llama_gqa_fp8": tiny / "model_fp8.pth"}
    for family in ("llama_tied", "qwen2"):
        found[family] = make_checkpoint(family, tmp_path_factory.mktemp(family))[1]
    wide = make_checkpoint("llama_wide_ffn", tmp_path_factory.mktemp("wide"))[1]  # row-parallel splits on group edges
    found["llama_int4"] = quantize_checkpoint(wide, "int4", 32)
    return found


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """probe() of every checkpoint under one 2-process torchrun, as rank 0 saw it."""
    out = tmp_path_factory.mktemp("tp_probe") / "probe.pt"
    result = torchrun("tests/tp_worker.py", str(out), *(f"{name}={path}" for name, path in checkpoints.items()))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name", ["llama_gqa", "llama_gqa_int8", "llama_gqa_fp8", "llama_int4", "llama_tied", "qwen2"])
def test_two_ranks_equal_one(name, checkpoints, two_ranks):
    got, expected = two_ranks[name], probe(gen.load_model(checkpoints[name], "cpu", torch.float32))
    assert got["n_head"] == 2 and expected["n_head"] == 4  # each rank really holds half of the 4 heads
    (cls, dtype, shape), (one_cls, one_dtype, one_shape) = got["wqkv"], expected["wqkv"]
    assert (cls, dtype, shape[1]) == (one_cls, one_dtype, one_shape[1]) and shape[0] < one_shape[0]  # fewer rows, same kind
    assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
    assert got["tokens"] == expected["tokens"]


def test_quantized_checkpoints_stay_quantized(two_ranks):
    assert two_ranks["llama_gqa_int8"]["wqkv"][:2] == ("WeightOnlyInt8Linear", "torch.int8")
    assert two_ranks["llama_gqa_fp8"]["wqkv"][:2] == ("WeightOnlyFp8Linear", "torch.uint8")  # e4m3 bits
    assert two_ranks["llama_int4"]["wqkv"][0] == "WeightOnlyInt4Linear"


# ----------------------------------------------------------------------------- generate.py


@pytest.fixture(scope="module")
def one_process_text(tiny) -> str:
    return stdout_of(gen.main, ["--checkpoint_path", str(tiny / "model.pth"), *GREEDY])


def test_generate_cli_prints_once_and_equals_one_process(tiny, one_process_text):
    result = torchrun("generate.py", "--checkpoint_path", str(tiny / "model.pth"), *GREEDY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert one_process_text.startswith("The cat sat on the") and len(one_process_text) > len("The cat sat on the\n")
    assert result.stdout == one_process_text  # rank 0 only: the text once
    assert result.stderr.count("tok/s") == 1


def test_speculative_cli_equals_one_process_greedy(tiny, one_process_text):
    # the int8 copy of the target as its draft: both sharded; greedy speculation is greedy decoding
    result = torchrun("generate.py", "--checkpoint_path", str(tiny / "model.pth"), "--draft_checkpoint_path",
                      str(tiny / "model_int8.pth"), "--speculate_k", "4", *GREEDY)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == one_process_text
    assert result.stderr.count("proposals accepted") == 1


# ----------------------------------------------------------------------------- eval.py


def test_eval_under_torchrun_equals_one_process(tiny, tmp_path):
    # perplexity and the local botchan tasks (loglikelihood, generate_until, rolling) in one run
    text = tmp_path / "excerpt.txt"
    text.write_text(prose()[:2000])
    args = ["--checkpoint_path", str(tiny / "model.pth"), "--perplexity", str(text), "--context_length", "64",
            "--stride", "32", "--include_path", "tasks", "--tasks", "botchan", "--limit", "3", "--device", "cpu"]  # fmt: skip
    (tmp_path / "tp").mkdir()
    result = torchrun("eval.py", *args, "--output_path", str(tmp_path / "tp" / "results.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("perplexity ") == 1 and result.stdout.count("|botchan_cloze") == 1  # rank 0 only
    assert os.listdir(tmp_path / "tp") == ["results.json"]  # no file, not even a partial one, from rank 1

    (tmp_path / "one").mkdir()
    stdout_of(ev.main, [*args, "--output_path", str(tmp_path / "one" / "results.json")])
    got, expected = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("tp", "one"))
    assert got["fastgen"]["tensor_parallel"] == 2 and expected["fastgen"]["tensor_parallel"] == 1
    assert got["perplexity"]["tokens"] == expected["perplexity"]["tokens"] > 64  # several windows
    assert got["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"]["perplexity"], rel=1e-4)
    for task, metric in [("botchan_cloze", "acc,none"), ("botchan_next_word", "exact_match,first_word"),
                         ("botchan_ppl", "word_perplexity,none")]:  # fmt: skip
        assert got["results"][task][metric] == pytest.approx(expected["results"][task][metric], rel=1e-4)


# ----------------------------------------------------------------------------- failures end the run


@pytest.mark.parametrize("config, world, message", [
    (ModelArgs(n_head=6, n_local_heads=2, intermediate_size=96, dim=48), 4, "cannot split 6 attention heads"),
    (ModelArgs(n_head=12, n_local_heads=4, intermediate_size=96, dim=48), 3, "cannot split 4 key/value heads across 3"),
    (ModelArgs(n_head=4, n_local_heads=4, intermediate_size=90, dim=48), 4, "cannot split feed-forward size 90"),
])  # fmt: skip
def test_impossible_split_is_a_clear_error(config, world, message):
    with pytest.raises(ValueError, match=message):
        check_shardable(config, world)


def test_possible_splits_pass():
    check_shardable(ModelArgs(n_head=6, n_local_heads=2, intermediate_size=96, dim=48), 2)  # 3 query, 1 KV head each
    check_shardable(ModelArgs(n_head=8, n_local_heads=2, intermediate_size=96, dim=48), 4)  # the KV heads replicated


@pytest.mark.parametrize("script", ["generate.py", "eval.py"])
def test_impossible_split_under_torchrun_is_one_line(script, tiny, tmp_path):
    # 3 ranks for 4 query and 2 KV heads: every rank refuses, rank 0 says why, nothing waits
    (tmp_path / "excerpt.txt").write_text(prose()[:200])
    args = GREEDY if script == "generate.py" else ["--perplexity", str(tmp_path / "excerpt.txt"), "--device", "cpu"]
    result = torchrun(script, "--checkpoint_path", str(tiny / "model.pth"), *args, nproc=3)
    assert result.returncode != 0 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "cannot split" in line]
    assert errors == ["error: cannot split 4 attention heads and 2 key/value heads across 3 ranks; "
                      "choose a world size that divides them"]  # fmt: skip


def test_a_stuck_rank_ends_the_run_within_the_timeout(tiny):
    t0 = time.monotonic()
    result = torchrun("tests/tp_worker.py", "--stall", str(tiny / "model.pth"))
    assert result.returncode != 0
    assert time.monotonic() - t0 < 60  # rank 1 sleeps 120 s: the timeout, not rank 1, ended the run
    assert f"another of the 2 ranks crashed (its own error says why) or did not answer within the {STALL_TIMEOUT_S} s timeout" in result.stderr
