"""gptq.py: GPTQ reduces to rounding when inputs are uncorrelated and beats it when they are not, per
weight and over a whole model; its block-at-a-time runner computes what Transformer.forward does."""
import pytest
import torch
from torch.testing import assert_close

import gptq as G
import quantize as Q
from tests.helpers import load_tiny, make_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama (GQA, untied output), converted: its model.pth."""
    return make_checkpoint("llama_gqa", tmp_path_factory.mktemp("llama_gqa"))[1]


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    # with H = I no column's error can be compensated by the others: GPTQ must reduce to plain rounding
    w = torch.randn(48, 128)
    assert all(torch.equal(a, b) for a, b in zip(G.gptq_quantize_weight(w, torch.eye(128), 32), Q.int4_quantize(w, 32)))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rounding_on_correlated_inputs(act_order):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(4096, 128, generator=g)
    w = torch.randn(48, 128, generator=g)
    q, s, z = G.gptq_quantize_weight(w, 2 * X.T @ X / len(X), 32, act_order=act_order)
    gptq_err = (X @ (Q.int4_dequantize(q, s, z) - w).T).pow(2).mean()
    rtn_err = (X @ (Q.int4_dequantize(*Q.int4_quantize(w, 32)) - w).T).pow(2).mean()
    assert gptq_err < 0.5 * rtn_err


@pytest.mark.parametrize("family", ["llama_gqa", "mistral_window", "qwen3"])
def test_block_runner_equals_the_model_forward(family, tmp_path):
    # GPTQ runs one block at a time: its runner must compute exactly what Transformer.forward does
    _, checkpoint = make_checkpoint(family, tmp_path)
    model = load_tiny(checkpoint, batch_size=2)
    tokens = torch.randint(0, 128, (2, 40))  # longer than mistral's window of 8
    runner = G.BlockRunner(model, 40, "cpu", torch.float32)
    with torch.no_grad():
        x = model.tok_embeddings(tokens)
        for layer in model.layers:
            x = runner(layer, x)
        assert_close(model.output(model.norm(x)), model(tokens, torch.arange(40)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_model_has_lower_error_than_rounding_on_calibration_inputs(tiny, act_order):
    tokens = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    float_model = load_tiny(tiny, batch_size=8, max_seq_length=64)
    inputs = {}  # each linear's inputs in the float model, over the calibration tokens
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in Q.quantizable(float_model)]  # fmt: skip
    with torch.no_grad():
        float_logits = float_model(tokens, torch.arange(64))
    for h in hooks:
        h.remove()
    gptq = G.gptq_quantize_model(load_tiny(tiny, 64, 8), tokens, 32, act_order=act_order, progress=False)
    rtn = Q.quantize_model(load_tiny(tiny, 64, 8), "int4", 32, pack=False)
    weights = dict(Q.quantizable(float_model))
    for name, x in inputs.items():  # layer by layer: output error on that layer's calibration inputs
        w = weights[name].weight
        errors = [(x @ (m.get_submodule(name).dequantized_weight() - w).T).pow(2).mean() for m in (gptq, rtn)]
        assert errors[0] < errors[1], name
    with torch.no_grad():  # and end to end
        gptq_err = (Q.prepare_for_device(gptq)(tokens, torch.arange(64)) - float_logits).pow(2).mean()
        rtn_err = (Q.prepare_for_device(rtn)(tokens, torch.arange(64)) - float_logits).pow(2).mean()
    assert gptq_err < rtn_err
