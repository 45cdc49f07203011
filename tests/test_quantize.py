"""quantize.py: quantized linears against their dequantized reference, checkpoints that round-trip and
generate, the GPTQ command line, and one-line errors on bad input (GPTQ itself: tests/test_gptq.py)."""
import copy
import shutil

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import generate as gen
import quantize as Q
from model import ModelArgs, Transformer
from tests.helpers import keep_inductor_pdl, load_tiny, make_checkpoint

KERNELS = ["reference", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # int4 paths this machine has


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama (GQA, untied output), converted: its model.pth."""
    return make_checkpoint("llama_gqa", tmp_path_factory.mktemp("llama_gqa"))[1]


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The reference model: every quantized linear replaced by an nn.Linear holding its dequantized weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (Q.WeightOnlyInt8Linear, Q.WeightOnlyInt4Linear)):  # fp8 is an int8 subclass
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantized_weight()[:, : m.in_features].contiguous()
            if m.bias is not None:
                lin.bias.data = m.bias.data.clone()
            Q.set_module(model, name, lin)
    return model


def quantize_cli(*args: str) -> None:
    Q.main([*args])


# ----------------------------------------------------------------------------- the number formats


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 256) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different scale
    q, scales = Q.int8_quantize(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    step = scales.float()[:, None]
    assert ((w - q.float() * step).abs() <= step / 2 * (1 + 1e-6)).all()


def test_fp8_error_is_within_e4m3_rounding():
    w = torch.randn(64, 256) * torch.logspace(-3, 0, 64)[:, None]
    q, scales = Q.fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (64,)
    assert (q.float().abs().amax(dim=1) <= 448).all()
    # 3 mantissa bits: half an ulp is 2^-4 of the value; below 2^-6 (subnormals) a fixed step of 2^-9
    s = scales.float()[:, None]
    assert ((w - q.float() * s).abs() <= w.abs() * 2**-4 + s * 2**-10 + 1e-9).all()


@pytest.mark.parametrize("groupsize", Q.GROUP_SIZES)
def test_int4_error_is_at_most_half_a_step(groupsize):
    w = torch.randn(32, 512) + torch.linspace(-2, 2, 512)  # groups with an offset: the zero point matters
    q, scales, zeros = Q.int4_quantize(w, groupsize)
    assert q.max() <= 15 and scales.shape == zeros.shape == (32, 512 // groupsize)
    step = scales.repeat_interleave(groupsize, dim=1)
    # half a step, plus the bf16 rounding of the zero point (2^-9 relative) that can clip the extremes
    bound = step / 2 + zeros.abs().repeat_interleave(groupsize, dim=1) * 2**-8 + 1e-6
    assert ((w - Q.int4_dequantize(q, scales, zeros)).abs() <= bound).all()


def test_nibbles_pack_even_columns_high():
    # the layout torch >= 2.5's _convert_weight_to_int4pack (CUDA) takes: byte = q[2j] << 4 | q[2j + 1]
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]])
    assert Q.pack_nibbles(q).tolist() == [[0x12, 0xF0], [0x78, 0x3C]]
    assert torch.equal(Q.unpack_nibbles(Q.pack_nibbles(q)), q.to(torch.uint8))


# ----------------------------------------------------------------------------- quantized linears


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("groupsize", [32, 128])
def test_int4_linear_matches_dequantized_reference(kernel, groupsize):
    device = "cuda" if kernel == "cuda" else "cpu"
    dtype = torch.bfloat16 if kernel == "cuda" else torch.float32
    lin = nn.Linear(256, 96, bias=True, device=device, dtype=dtype)
    m = Q.quantize_linear(lin, "int4", groupsize)
    ref_w = m.dequantized_weight().double()
    m.pack(dtype, kernel)
    assert m.kernel == kernel
    x = torch.randn(2, 5, 256, device=device, dtype=dtype)
    ref = x.double() @ ref_w.t() + m.bias.double()
    # bound: float32 accumulation error (1e-5 of the largest output), or bf16 output rounding on CUDA
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (m(x).double() - ref).abs().max() <= tol * ref.abs().max()


def test_int8_linear_matches_dequantized_reference():
    lin = nn.Linear(256, 96, bias=True)
    m = Q.quantize_linear(lin, "int8")
    x = torch.randn(3, 256)
    ref = x.double() @ m.dequantized_weight().double().t() + m.bias.double()
    assert (m(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and the dequantized weight is the original within half a step per row
    assert ((m.dequantized_weight() - lin.weight).abs() <= m.scales.float()[:, None] / 2 + 1e-7).all()


def test_fp8_weight_survives_a_dtype_change():
    # Module.to(dtype) converts float8 tensors too: the module keeps the e4m3 bits as uint8
    m = Q.quantize_linear(nn.Linear(128, 32), "fp8")
    before = m.dequantized_weight()
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.uint8 and torch.equal(m.dequantized_weight(), before)


def module_on_triton_path(mode: str, lin: nn.Linear, monkeypatch) -> tuple[nn.Module, torch.Tensor]:
    # lin as a module of `mode` ("plain" keeps it) with the GPU's kernel choices, its decode-sized inputs
    # widened to CPU tensors (Triton's interpreter); and its reference weight in float64
    import triton_ops

    monkeypatch.setattr(triton_ops, "supported", lambda x, n, k, glu=False: x.numel() // k <= triton_ops.MAX_M)
    m = lin if mode == "plain" else Q.quantize_linear(lin, *Q.parse_mode(mode))
    ref_w = (m.weight if mode == "plain" else m.dequantized_weight()).detach().double()
    return Q.prepare_for_device(m, "triton"), ref_w


@pytest.mark.parametrize("mode", ["plain", "int8", "fp8", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # decode (one row; several, as in a verify step) and prefill
def test_triton_path_of_each_module_matches_its_reference(mode, rows, monkeypatch):
    # On a GPU prepare_for_device() sends decode-sized inputs to triton_ops.py; here the same modules run
    # the same kernels in Triton's interpreter (triton_ops.supported() is widened to CPU tensors)
    import triton_ops

    m, ref_w = module_on_triton_path(mode, nn.Linear(256, 128, bias=True), monkeypatch)
    assert type(m) is Q.TritonLinear if mode == "plain" else getattr(m, "kernel", None) == "triton" or m.triton
    calls = []
    for name in ("linear", "int8_linear", "fp8_linear", "int4_linear"):
        op = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _op=op: calls.append(1) or _op(*a))
    x = torch.randn(rows, 256)
    ref = x.double() @ ref_w.t() + m.bias.double()
    assert (m(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the kernel for decode, the stock path for prefill; unquantized: one row only, a verify step keeps cuBLAS
    assert len(calls) == (rows == 1 if mode == "plain" else rows <= triton_ops.MAX_M)


def test_int4_module_compiles_for_any_row_count(monkeypatch):
    # --compile_prefill traces the modules with a symbolic row count: decode sizes take int4_linear, larger ones
    # int4_weight (the dense weight for one matmul), both custom ops, in one graph without breaks
    m, ref_w = module_on_triton_path("int4-g32", nn.Linear(256, 128, bias=False), monkeypatch)
    torch._dynamo.reset()
    step = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (3, 5, 20, 40):
        x = torch.randn(rows, 256)
        ref = x.double() @ ref_w.t()
        assert (step(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("mode", ["plain", "int8", "fp8", "int4-g32"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_glu_call_of_each_module_is_silu_of_gate_times_up(mode, rows, monkeypatch):
    # module(x, glu=True) (GluFeedForward's w13): the kernel's fused epilogue for decode sizes, else the
    # plain product then silu(gate) * up; the same result either way
    m, ref_w = module_on_triton_path(mode, nn.Linear(256, 512, bias=False), monkeypatch)
    x = torch.randn(rows, 256)
    gate, up = (x.double() @ ref_w.t()).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    assert (m(x, glu=True).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


EVERY = {"bf16", "int8", "fp8", "int4", "attn", "glu", "rope", "norm", "sample"}


@pytest.mark.parametrize("setting,formats", [(None, EVERY), ("all", EVERY),
                                             ("stock", set()), ("int8,int4", {"int8", "int4"})])  # fmt: skip
def test_which_formats_use_the_triton_kernels(setting, formats, monkeypatch):
    # FASTGEN_KERNELS picks the formats (and attention); by default those that beat the stock path end to
    # end (since the ninth session, bf16 too: all of them); never on CPU
    if setting is None:
        monkeypatch.delenv("FASTGEN_KERNELS", raising=False)
    else:
        monkeypatch.setenv("FASTGEN_KERNELS", setting)
    names = ("bf16", "int8", "fp8", "int4", "attn", "glu", "rope", "norm", "sample")
    assert {f for f in names if Q.use_triton(torch.device("cuda"), f)} == formats
    assert not any(Q.use_triton(torch.device("cpu"), f) for f in names)


def kernels_on_cpu(monkeypatch) -> None:
    # the GPU choices of triton_ops.py (matmuls) and triton_attention.py (attention, rope_attention) widened to CPU
    # tensors: Triton's interpreter
    import triton_attention
    import triton_ops

    monkeypatch.setattr(triton_ops, "supported", lambda x, n, k, glu=False: x.numel() // k <= triton_ops.MAX_M
                        and n % (256 if glu else 128) == 0)  # fmt: skip
    monkeypatch.setattr(triton_attention, "attention_supported", triton_attention.attention_shapes_ok)
    monkeypatch.setattr(triton_attention, "rope_attention_supported", triton_attention.rope_attention_shapes_ok)
    monkeypatch.setattr(triton_attention, "rope_write_supported", triton_attention.rope_write_shapes_ok)


@pytest.mark.parametrize("mode", ["plain", "int8", "int4-g32"])
def test_decode_through_every_triton_kernel_matches_the_stock_path(mode, monkeypatch):
    # A whole model with the GPU's kernel choices (Triton matmuls with the SwiGLU epilogue, Triton attention),
    # run here in Triton's interpreter, against the same weights on the stock path: prefill, then decode steps
    import triton_attention
    import triton_ops

    torch.manual_seed(0)
    with torch.device("meta"):
        args = ModelArgs(vocab_size=256, dim=128, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=256)
    stock = Transformer(args).to_empty(device="cpu")
    for p in stock.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    if mode != "plain":
        stock = Q.quantize_model(stock, *Q.parse_mode(mode), pack=False)
    fast = copy.deepcopy(stock)
    kernels_on_cpu(monkeypatch)
    Q.prepare_for_device(fast, "triton")
    Q.prepare_for_device(stock)
    assert all(type(layer.feed_forward) is Q.GluFeedForward for layer in fast.layers)
    counters = fast.layers[0].attention.sdpa.counters  # DecodeAttention's, one buffer for every layer
    assert all(type(layer.attention) is Q.RopeAttention and type(layer.attention.sdpa) is triton_attention.DecodeAttention
               and layer.attention.sdpa.counters is counters for layer in fast.layers)  # fmt: skip
    assert type(fast) is Q.NormFusedTransformer and all(type(layer) is Q.NormFusedBlock for layer in fast.layers)
    launches = []  # (whether the kernel did rotary and the cache write itself, key ranges asked for)
    monkeypatch.setattr(triton_attention, "_attention_launch",
                        lambda *a, _f=triton_attention._attention_launch: launches.append((len(a) > 6, a[5])) or _f(*a))  # fmt: skip
    writes = []  # the prefill's rotary and cache writes: one rope_write kernel per layer
    rope_write = triton_attention.rope_write
    monkeypatch.setattr(triton_attention, "rope_write", lambda *a: writes.append(a[0].shape) or rope_write(*a))
    fused = []  # the norms' halves: linear_add_norm (wo, w2) and norm_linear (wqkv but the first, w13, output)
    for name in ("linear_add_norm", "norm_linear"):
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=getattr(triton_ops, name), _n=name: fused.append(_n) or _f(*a))
    # w2 (K = 256) splits K as on the GPU: its programs add into the blocks' shared scratch, which stays zeroed
    plan = triton_ops.plan
    monkeypatch.setattr(triton_ops, "plan", lambda fmt, m, n, k, device, glu=False, add_norm=False: triton_ops.Config(
        16, 128, split_k=2) if add_norm and k == 256 else plan(fmt, m, n, k, device, glu, add_norm))  # fmt: skip
    # 192 slots over "8 SMs": 3 key ranges per head, which the last program of each head combines
    monkeypatch.setattr(triton_ops, "_sm_count", lambda device: 8)
    for model in (stock, fast):
        model.setup_caches(1, 192)
    tokens = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        for step in range(4):
            pos = torch.arange(6) if step == 0 else torch.tensor([5 + step])
            x = tokens if step == 0 else torch.randint(0, 256, (1, 1))
            assert_close(fast(x, pos), stock(x, pos), atol=1e-4, rtol=1e-4)
    assert launches == [(False, 3)] * args.n_layer + [(True, 3)] * 3 * args.n_layer  # prefill, then three decode steps
    assert writes == [(1, 6, (4 + 2 * 2) * 32)] * args.n_layer
    per_step = 2 * args.n_layer * ["linear_add_norm"] + 2 * args.n_layer * ["norm_linear"]  # (n - 1) + n + 1
    # the prefill (6 rows; unquantized: one-row inputs only, TritonLinear.ours) and the decode steps: one norm
    # kernel each
    assert sorted(fused) == sorted((3 if mode == "plain" else 4) * per_step)
    scratch = fast.layers[0].norm_scratch
    assert all(layer.norm_scratch is scratch for layer in fast.layers) and not scratch.any()
    assert not any("scratch" in name or "counters" in name for name in fast.state_dict()) and not counters.any()
    for fast_layer, stock_layer in zip(fast.layers, stock.layers):  # the caches the kernel wrote
        assert_close(fast_layer.attention.kv_cache.k_cache, stock_layer.attention.kv_cache.k_cache, atol=1e-5, rtol=1e-5)
        assert_close(fast_layer.attention.kv_cache.v_cache, stock_layer.attention.kv_cache.v_cache, atol=1e-5, rtol=1e-5)


def test_norm_fusion_falls_back_where_a_module_does_not_suit_it(monkeypatch):
    # biases (Qwen2's qkv) keep the model's own norms and matmuls; the other blocks' norms still fuse
    torch.manual_seed(0)
    kernels_on_cpu(monkeypatch)
    model = Transformer(ModelArgs(vocab_size=256, dim=128, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=256,
                                  qkv_bias=True))  # fmt: skip
    model.layers[1].attention.wqkv.bias = None
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    stock = copy.deepcopy(model)
    Q.prepare_for_device(model, "triton")
    for m in (model, stock):
        m.setup_caches(1, 16)
    x, pos = torch.randint(0, 256, (1, 1)), torch.tensor([3])
    with torch.no_grad():
        assert_close(model(x, pos), stock(x, pos), atol=1e-4, rtol=1e-4)
    assert not model.layers[0].fusable(model.tok_embeddings(x), across=True)
    assert model.layers[1].fusable(model.tok_embeddings(x), across=True)


def test_compiled_decode_step_writes_the_caches_in_place(monkeypatch):
    # rope_attention mutates the KV cache buffers: under torch.compile (inductor) the op must run on the
    # buffers themselves, not on copies (a clone of every cache per step), and equal the eager step
    from torch._inductor.utils import run_and_get_code

    import triton_ops

    torch.manual_seed(0)
    kernels_on_cpu(monkeypatch)
    monkeypatch.setattr(triton_ops, "_sm_count", lambda device: 8)  # 3 key ranges of the 192 slots per head
    model = Transformer(ModelArgs(vocab_size=256, dim=128, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=256))
    Q.prepare_for_device(model, "triton")
    model.setup_caches(1, 192)
    eager = copy.deepcopy(model)
    x, pos = torch.randint(0, 256, (1, 1)), torch.tensor([7])
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(model, fullgraph=True), x, pos)
        assert_close(out, eager(x, pos), atol=1e-5, rtol=1e-5)
    assert code.count("torch.ops.fastgen.rope_attention.default(") == 2 and "clone" not in code  # nor of the counters
    assert not model.layers[0].attention.sdpa.counters.any()
    # the norms inside the matmuls: wo and w2 prepare them, wqkv (but the first), w13 and the output finish them
    assert code.count("torch.ops.fastgen.linear_add_norm.default(") == code.count("torch.ops.fastgen.norm_linear.default(") == 4
    for layer, ref in zip(model.layers, eager.layers):
        assert torch.equal(layer.attention.kv_cache.k_cache, ref.attention.kv_cache.k_cache)
        assert torch.equal(layer.attention.kv_cache.v_cache, ref.attention.kv_cache.v_cache)
        assert layer.attention.kv_cache.k_cache[0, :, 7].abs().sum() > 0  # slot 7 written


def test_whole_model_gpu_check_runs_here_and_catches_bad_output(monkeypatch):
    # bench_kernels.model_check, the --check run's whole-model comparison on the GPU, on a small model in Triton's
    # interpreter: a prefill at the start of a 256-slot cache (4 key ranges per head, 3 of them with no key the
    # queries may see) and compiled decode steps through the Triton kernels, against the reference paths
    import bench_kernels
    import triton_attention
    import triton_ops

    kernels_on_cpu(monkeypatch)
    monkeypatch.setattr(triton_ops, "_sm_count", lambda device: 8)
    keep_inductor_pdl(monkeypatch)
    cfg = ModelArgs(vocab_size=256, dim=128, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=256)
    assert triton_attention.attention_splits(1, 2, 256, torch.device("cpu")) == 4
    fmt = "int4g32"  # int4 on both matmul paths: tensor cores for the prefill's 6 rows, CUDA cores for decode
    worst = bench_kernels.model_check([fmt], "cpu", cfg, kernels=("triton", "reference"))
    assert 0 < worst[fmt] < 5e-2
    # and it fails where a kernel leaves garbage: here NaN from the attention of the prefill (S > 1)
    attention = triton_attention.attention

    def nan_prefill(q, *args):
        y = attention(q, *args)
        return y.fill_(float("nan")) if q.shape[2] > 1 else y

    monkeypatch.setattr(triton_attention, "attention", nan_prefill)
    with pytest.raises(AssertionError, match=r"non-finite logits from the shipped kernels in rows \[0, 1, 2, 3, 4, 5"):
        bench_kernels.model_check([fmt], "cpu", cfg, kernels=("triton", "reference"), compiled=False)


def test_self_check_passes_on_cpu():
    # the function the lead runs on the GPU (python quantize.py --self_check cuda), here on small CPU shapes,
    # through torch.compile too; kernel="cpu" forces torch's CPU int4 kernel even where it is not the default
    assert Q.self_check("cpu", shapes=[(96, 64), (48, 96)], compile=True, kernel="cpu")
    assert Q.self_check("cpu", shapes=[(40, 64)], compile=False)  # 40 % 16 != 0: reference path


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "llama_tied"])  # untied, biases, tied output
@pytest.mark.parametrize("mode,kernel", [("int8", None), ("fp8", None)] + [("int4", k) for k in KERNELS if k != "cuda"])
def test_quantized_model_matches_its_dequantized_reference(family, mode, kernel, tmp_path):
    _, checkpoint = make_checkpoint(family, tmp_path)
    x = torch.randint(0, 128, (2, 24))
    model = Q.prepare_for_device(Q.quantize_model(load_tiny(checkpoint, batch_size=2), mode, pack=False), kernel)
    reference = dequantized_copy(Q.quantize_model(load_tiny(checkpoint, batch_size=2), mode, pack=False))
    with torch.no_grad():
        assert_close(model(x, torch.arange(24)), reference(x, torch.arange(24)), atol=1e-4, rtol=1e-4)


def test_what_is_quantized(tmp_path):
    # blocks' linears always; the output only when it is not the embedding; the embedding never
    _, untied = make_checkpoint("llama_gqa", tmp_path / "untied")
    _, tied = make_checkpoint("llama_tied", tmp_path / "tied")
    model = Q.quantize_model(load_tiny(untied), "int8")
    assert isinstance(model.output, Q.WeightOnlyInt8Linear)
    assert all(isinstance(m, Q.WeightOnlyInt8Linear) for m in (model.layers[0].attention.wqkv, model.layers[1].feed_forward.w2))
    model = Q.quantize_model(load_tiny(tied), "int4")
    assert type(model.output) is nn.Linear and model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("mode,args,name", [("int8", [], "model_int8.pth"), ("fp8", [], "model_fp8.pth"),
                                            ("int4", ["--groupsize", "32"], "model_int4.g32.pth")])  # fmt: skip
def test_checkpoint_round_trip_gives_identical_outputs(tiny, mode, args, name):
    quantize_cli("--checkpoint_path", str(tiny), "--mode", mode, *args, "--device", "cpu")
    saved = tiny.parent / name
    meta = torch.load(saved, weights_only=True)["_quantization"]
    assert meta["mode"] == mode and meta["format_version"] == Q.FORMAT_VERSION
    loaded = load_tiny(saved)
    in_memory = Q.quantize_model(load_tiny(tiny), mode)
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.arange(20)), in_memory(x, torch.arange(20)))


@pytest.mark.parametrize("mode,name", [("int8", "model_int8.pth"), ("fp8", "model_fp8.pth"), ("int4", "model_int4.g32.pth")])
def test_quantized_checkpoint_generates_like_its_reference(tiny, mode, name):
    quantize_cli("--checkpoint_path", str(tiny), "--mode", mode, "--device", "cpu")
    prompt = list(range(5, 17))
    rows, _ = gen.generate(load_tiny(tiny.parent / name), [prompt], 30, temperature=0)
    reference = dequantized_copy(Q.quantize_model(load_tiny(tiny), mode, pack=False))
    assert rows == gen.generate(reference, [prompt], 30, temperature=0)[0]
    assert len(set(rows[0])) > 1  # not a degenerate repetition


def test_scheme_comes_from_metadata_not_the_file_name(tiny, tmp_path):
    quantize_cli("--checkpoint_path", str(tiny), "--mode", "int4", "--groupsize", "64", "--pad", "--device", "cpu")
    folder = tmp_path / "renamed"
    shutil.copytree(tiny.parent, folder)
    shutil.move(folder / "model_int4.g64.pth", folder / "model_int8.g32.pth")  # a misleading name
    model = load_tiny(folder / "model_int8.g32.pth")
    w2 = model.layers[0].feed_forward.w2
    assert isinstance(w2, Q.WeightOnlyInt4Linear) and w2.groupsize == 64
    assert (w2.in_features, w2.padded_in) == (96, 128)  # 96 inputs zero-padded to two groups of 64


def test_padded_groups_match_their_reference(tiny):
    # --pad: inputs zero-padded to a multiple of the group size, in the weight and at run time
    model = Q.quantize_model(load_tiny(tiny), "int4", 64, pad=True)
    reference = dequantized_copy(Q.quantize_model(load_tiny(tiny), "int4", 64, pad=True, pack=False))
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert_close(model(x, torch.arange(16)), reference(x, torch.arange(16)), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the command line on the real model


@pytest.fixture(scope="module")
def smol_dir(smollm2_checkpoint, tmp_path_factory):
    """A private folder with the converted SmolLM2 (linked) and its config and tokenizer files."""
    folder = tmp_path_factory.mktemp("smol_quant")
    for f in smollm2_checkpoint.parent.iterdir():
        if f.name == "model.pth":
            (folder / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("mode,args,name", [("int8", [], "model_int8.pth"), ("int4", ["--groupsize", "32"], "model_int4.g32.pth")])
def test_real_model_quantizes_generates_and_keeps_its_perplexity(smol_dir, mode, args, name, capsys):
    import eval as ev
    from scripts.fetch_text import fetch
    from tokenizer import load_tokenizer

    quantize_cli("--checkpoint_path", str(smol_dir / "model.pth"), "--mode", mode, *args, "--device", "cpu")
    assert capsys.readouterr().out.strip() == f"wrote {smol_dir / name}"
    gen.main(["--checkpoint_path", str(smol_dir / name), "--prompt", "The capital of France is", "--max_new_tokens", "8",
              "--num_samples", "1", "--temperature", "0", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr()
    assert out.out.startswith("The capital of France is") and len(out.out.strip()) > len("The capital of France is")
    assert "tok/s" in out.err
    ids = load_tokenizer(smol_dir).encode(fetch("lee_background.cor").read_text()[:3000])[:384]
    ppl = {}
    for f in ("model.pth", name):
        model = gen.load_model(smol_dir / f, "cpu", torch.float32)
        model.setup_caches(1, 256)
        ppl[f] = ev.perplexity(model, ids, 256, 128, progress=False)
    # held-out news text; loose bounds (the full table is scripts/quant_quality.py)
    assert abs(ppl[name] / ppl["model.pth"] - 1) < (0.01 if mode == "int8" else 0.05), ppl


def test_gptq_command_line_writes_a_loadable_checkpoint(smol_dir, tmp_path):
    # a tiny random model with the real tokenizer and vocabulary, so the CLI's calibration path runs quickly
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.convert_hf_checkpoint import convert
    from scripts.fetch_text import fetch

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    checkpoint = convert(checkpoint_dir=tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol_dir / f, tmp_path / f)
    quantize_cli("--checkpoint_path", str(checkpoint), "--mode", "int4-gptq", "--groupsize", "32",
                 "--calibration_file", str(fetch("botchan.txt")), "--calibration_samples", "4",
                 "--calibration_seq_length", "32", "--device", "cpu")  # fmt: skip
    saved = tmp_path / "model_int4-gptq.g32.pth"
    meta = torch.load(saved, weights_only=True)["_quantization"]
    assert meta["method"] == "gptq" and meta["calibration_file"] == "botchan.txt" and meta["groupsize"] == 32
    model = gen.load_model(saved, "cpu", torch.float32)
    assert isinstance(model.output, Q.WeightOnlyInt4Linear)
    model.setup_caches(1, 32)
    rows, _ = gen.generate(model, [[1, 2, 3]], 5, temperature=0)
    assert len(rows[0]) == 5


# ----------------------------------------------------------------------------- bad input


def assert_one_line_error(capsys, pattern: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and pattern in err[-1], err


def test_unknown_mode_is_a_clear_error(tiny, capsys):
    with pytest.raises(SystemExit) as e:
        quantize_cli("--checkpoint_path", str(tiny), "--mode", "int3")
    assert e.value.code != 0
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'.*int8, int4, int4-gptq"):
        Q.quantize_model(load_tiny(tiny), "int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        Q.quantize_model(load_tiny(tiny), "int4-g48")


def test_group_size_not_dividing_the_inputs_is_a_clear_error(tiny, capsys):
    target = tiny.parent / "model_int4.g64.pth"
    target.unlink(missing_ok=True)
    with pytest.raises(SystemExit) as e:
        quantize_cli("--checkpoint_path", str(tiny), "--mode", "int4", "--groupsize", "64")
    assert e.value.code == 1
    assert_one_line_error(capsys, "group size 64 does not divide the 96 input features of layers.0.feed_forward.w2")
    assert not target.exists()


@pytest.mark.parametrize("content", ["text", "list"])
def test_non_model_file_is_a_clear_error(tiny, tmp_path, capsys, content):
    shutil.copy(tiny.parent / "config.json", tmp_path / "config.json")
    bad = tmp_path / "model.pth"
    if content == "text":
        bad.write_text("not a checkpoint")
    else:
        torch.save([1, 2, 3], bad)
    with pytest.raises(SystemExit) as e:
        quantize_cli("--checkpoint_path", str(bad), "--mode", "int8")
    assert e.value.code == 1
    assert_one_line_error(capsys, "cannot read checkpoint" if content == "text" else "is not a model state dict")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.pth"]  # nothing written


def test_already_quantized_and_missing_calibration_are_clear_errors(tiny, capsys):
    quantize_cli("--checkpoint_path", str(tiny), "--mode", "int8", "--device", "cpu")
    with pytest.raises(SystemExit):
        quantize_cli("--checkpoint_path", str(tiny.parent / "model_int8.pth"), "--mode", "int4")
    assert_one_line_error(capsys, "is already quantized (int8)")
    with pytest.raises(SystemExit):
        quantize_cli("--checkpoint_path", str(tiny), "--mode", "int4-gptq")
    assert_one_line_error(capsys, "needs --calibration_file")
