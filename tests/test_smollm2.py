"""The real packaged model: our GGUF conversion against transformers reading the same file."""
import torch
from torch.testing import assert_close

from generate import generate, load_model
from tokenizer import load_tokenizer

PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_converted_checkpoint_is_complete(smollm2_checkpoint):
    folder = smollm2_checkpoint.parent
    assert {"model.pth", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_logits_match_transformers(smollm2_checkpoint, smollm2_hf):
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    ids = load_tokenizer(smollm2_checkpoint.parent).encode(PROMPT)
    model.setup_caches(1, 64)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(len(ids)))
        ref = smollm2_hf(torch.tensor([ids])).logits
    # both dequantize the same Q4_1/Q8_0 blocks to float32; the rest is float32 rounding over 30 layers
    assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_greedy_continuation_matches_transformers(smollm2_checkpoint, smollm2_hf):
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tokenizer = load_tokenizer(smollm2_checkpoint.parent)
    ids = tokenizer.encode(PROMPT)
    model.setup_caches(1, len(ids) + 24)
    rows, _ = generate(model, [ids], 24, temperature=0)
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2)
    assert rows[0] == ref[0, len(ids):].tolist()[: len(rows[0])]
    assert "Berlin" in tokenizer.decode(rows[0])


def test_chat_prompt_matches_transformers_and_answers(smollm2_checkpoint, smollm2_hf):
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tokenizer = load_tokenizer(smollm2_checkpoint.parent)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer.encode(text, bos=False)
    model.setup_caches(1, len(ids) + 32)
    rows, _ = generate(model, [ids], 32, temperature=0, stop_ids=tokenizer.stop_ids)
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert rows[0] == ref[0, len(ids):].tolist()
    assert rows[0][-1] == 2 and "Paris" in tokenizer.decode(rows[0])
