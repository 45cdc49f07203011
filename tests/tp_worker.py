"""Run under torchrun by tests/test_tp.py: tensor-parallel logits and greedy tokens -> a file (rank 0)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tp  # noqa: E402
from generate import generate, load_model  # noqa: E402

checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
tp.maybe_init_dist("cpu")
assert tp.world_size() == 2
model = load_model(checkpoint, "cpu", torch.float32)
model.setup_caches(1, 64)
x = torch.arange(3, 40)[None] % model.config.vocab_size
with torch.no_grad():
    logits = model(x, torch.arange(x.shape[1]))
rows, _ = generate(model, [x[0, :10].tolist()], 20, temperature=0)
if tp.rank() == 0:
    torch.save({"logits": logits, "tokens": rows[0], "n_head": model.layers[0].attention.n_head}, out)
