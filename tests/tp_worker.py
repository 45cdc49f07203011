"""Run under torchrun by tests/test_tp.py.

    tp_worker.py OUT NAME=CHECKPOINT ...   probe() of each checkpoint, sharded over the ranks -> OUT (rank 0)
    tp_worker.py --stall CHECKPOINT        rank 1 stops answering after one forward: rank 0 must fail, not hang
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tp  # noqa: E402
from generate import generate, load_model  # noqa: E402

STALL_TIMEOUT_S = 8  # the process-group timeout of the --stall run


def probe(model) -> dict:
    """What test_tp.py compares with one process: logits of a 37-token prompt and 20 greedy tokens after
    its first 10, plus what this rank holds of the first attention block."""
    model.setup_caches(1, 64)
    x = torch.arange(3, 40)[None] % model.config.vocab_size  # [1, 37]
    with torch.no_grad():
        logits = model(x, torch.arange(x.shape[1]))  # [1, 37, V]
    rows, _ = generate(model, [x[0, :10].tolist()], 20, temperature=0)
    wqkv = model.layers[0].attention.wqkv
    return {"logits": logits, "tokens": rows[0], "n_head": model.layers[0].attention.n_head,
            "wqkv": (type(wqkv).__name__, str(wqkv.weight.dtype), list(wqkv.weight.shape))}  # fmt: skip


def probe_all(out: Path, named_checkpoints: list[str]) -> None:
    tp.maybe_init_dist("cpu")
    assert tp.world_size() == 2
    results = {}
    for item in named_checkpoints:
        name, checkpoint = item.split("=", 1)
        results[name] = probe(load_model(Path(checkpoint), "cpu", torch.float32))
    if tp.rank() == 0:
        torch.save(results, out)
    tp.teardown()


def stall(checkpoint: Path) -> None:
    tp.maybe_init_dist("cpu", timeout_s=STALL_TIMEOUT_S)
    model = load_model(checkpoint, "cpu", torch.float32)
    model.setup_caches(1, 16)
    x = torch.arange(3, 11)[None]  # [1, 8]
    with torch.no_grad():
        model(x, torch.arange(8))  # both ranks answer
        if tp.rank() == 1:
            time.sleep(120)  # alive but stuck (a deadlock, a stalled device): torchrun cannot tell
        model(x, torch.arange(8))  # rank 0 waits in the first all-reduce until the timeout


if __name__ == "__main__":
    if sys.argv[1] == "--stall":
        stall(Path(sys.argv[2]))
    else:
        probe_all(Path(sys.argv[1]), sys.argv[2:])
