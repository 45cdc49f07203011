"""Tensor parallelism: two gloo processes launched by torchrun equal one process."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from generate import generate, load_model
from model import ModelArgs
from tests.helpers import make_checkpoint
from tp import check_shardable

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def single_process(checkpoint: Path) -> tuple[torch.Tensor, list[int]]:
    model = load_model(checkpoint, "cpu", torch.float32)
    model.setup_caches(1, 64)
    x = torch.arange(3, 40)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(x, torch.arange(x.shape[1]))
    return logits, generate(model, [x[0, :10].tolist()], 20, temperature=0)[0][0]


@pytest.mark.parametrize("family", ["llama_gqa", "llama_tied", "qwen2"])  # GQA split, KV replicated (1 KV head), biases
def test_two_ranks_equal_one(family, tmp_path):
    _, checkpoint = make_checkpoint(family, tmp_path)
    result = torchrun("tests/tp_worker.py", str(checkpoint), str(tmp_path / "tp.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(tmp_path / "tp.pt", weights_only=True)
    logits, tokens = single_process(checkpoint)
    assert got["n_head"] == 2  # each rank really holds half of the 4 heads
    assert_close(got["logits"], logits, atol=1e-5, rtol=1e-5)
    assert got["tokens"] == tokens


def test_impossible_split_is_a_clear_error():
    config = ModelArgs(n_head=6, n_local_heads=2, intermediate_size=96, dim=48)
    with pytest.raises(ValueError, match="cannot split 6 attention heads.*4 ranks"):
        check_shardable(config, 4)
    check_shardable(config, 2)  # 3 query heads and 1 KV head per rank is fine
