"""The command line: real generation from the packaged model, conversion, and one-line errors on bad input."""
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import generate, load_model
from tests.helpers import keep_inductor_pdl, make_hf_model
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTGEN_CACHE": str(cache or "/nonexistent")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") or ": error:" in last, result.stderr
    assert pattern in last, last
    assert "Traceback" not in result.stderr


def test_default_model_generates_the_reference_text(smollm2_checkpoint):
    prompt = "The capital of France is"
    result = run("generate.py", "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "12", "--num_samples", "1",
                 cache=smollm2_checkpoint.parent.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(smollm2_checkpoint.parent)
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    ids = tokenizer.encode(prompt)
    model.setup_caches(1, len(ids) + 12)
    row = generate(model, [ids], 12, temperature=0, stop_ids=tokenizer.stop_ids)[0][0]
    expected = prompt + tokenizer.decode([t for t in row if t not in tokenizer.stop_ids])
    assert result.stdout.strip() == expected.strip()
    assert "tok/s" in result.stderr and "time to first token" in result.stderr


def test_prompt_file_is_one_batch(smollm2_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time, in a small village,\n")
    result = run("generate.py", "--prompt_file", str(prompts), "--temperature", "0", "--max_new_tokens", "6",
                 "--num_samples", "1", "--checkpoint_path", str(smollm2_checkpoint))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("---") == 2 and "Once upon a time" in result.stdout


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_checkpoint) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer and a 64-token context, converted by the CLI."""
    path = tmp_path_factory.mktemp("tiny_cli")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint.parent / name, path / name)
    result = run("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    return path


def test_converted_tiny_model_generates(tiny_dir):
    result = run("generate.py", "--checkpoint_path", str(tiny_dir / "model.pth"), "--max_new_tokens", "5",
                 "--num_samples", "2", "--seed", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("tok/s") == 2


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--top_p", "1.5"], "--top_p must be in"),
])  # fmt: skip
def test_bad_flags(tiny_dir, flags, message):
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(tiny_dir / "model.pth"), *flags), message)


def test_missing_checkpoint():
    assert_one_line_error(run("generate.py", "--checkpoint_path", "/no/such/model.pth"), "does not exist")


def test_prompt_longer_than_context(tiny_dir):
    prompt = "word " * 100  # > 64 tokens
    result = run("generate.py", "--checkpoint_path", str(tiny_dir / "model.pth"), "--prompt", prompt)
    assert_one_line_error(result, "the model's context is 64")


def test_truncated_checkpoint(tiny_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    data = (tiny_dir / "model.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(tmp_path / "model.pth")), "truncated or corrupt")


def test_checkpoint_without_config(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "model.pth", tmp_path / "model.pth")
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(tmp_path / "model.pth")), "no config.json")


def test_convert_unknown_architecture_writes_nothing(tmp_path):
    make_hf_model("llama_gqa").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    result = run("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(result, "unsupported model_type 'gpt_neox'")
    assert not (tmp_path / "model.pth").exists()


def test_convert_missing_folder_and_corrupt_gguf(tmp_path):
    assert_one_line_error(run("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "nope")), "does not exist")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_one_line_error(run("scripts/convert_hf_checkpoint.py", "--gguf", str(bad)), "cannot read GGUF file")
    assert not (tmp_path / "model.pth").exists()


def test_interactive_chat_keeps_the_conversation_in_the_cache(smollm2_checkpoint):
    questions = ["What is the capital of France?", "And of Germany?"]
    result = subprocess.run(
        [sys.executable, "generate.py", "--interactive", "--temperature", "0", "--max_new_tokens", "30",
         "--checkpoint_path", str(smollm2_checkpoint)],
        cwd=ROOT, input="\n".join(questions) + "\n", capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = [r.split("\n\nuser>")[0].strip() for r in result.stdout.split("assistant> ")[1:]]
    assert len(replies) == 2 and "Paris" in replies[0] and "Berlin" in replies[1]
    # the second answer, computed from scratch over the whole conversation, must be the same
    tokenizer = load_tokenizer(smollm2_checkpoint.parent)
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    messages = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": questions[1]}]  # fmt: skip
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), bos=False)
    model.setup_caches(1, len(ids) + 30)
    row = generate(model, [ids], 30, temperature=0, stop_ids=tokenizer.stop_ids)[0][0]
    assert tokenizer.decode([t for t in row if t not in tokenizer.stop_ids]).strip() == replies[1]


def test_bench_runs_each_configuration(capsys, monkeypatch):
    # the speed benchmark's plumbing on CPU (tiny shape, eager): one JSON line per mode x kernels x PDL setting;
    # PDL is never in use off the GPU
    import bench

    for name in ("FASTGEN_KERNELS", "FASTGEN_PDL", "FASTGEN_PREFILL_GRAPH"):  # bench.py sets these per configuration
        monkeypatch.setenv(name, "")
    keep_inductor_pdl(monkeypatch)
    bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--runs", "1", "--max_new_tokens", "3",
                "--mode", "bf16", "int8", "--pdl", "off", "on"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["mode"], r["pdl"]) for r in rows] == [("bf16", False)] * 2 + [("int8", False)] * 2
    assert all(r["tok_s"] > 0 and len(r["runs_tok_s"]) == 1 and r["device"] == "cpu" for r in rows)
    # the prefill and the decode steps after it make up the whole call: 3 tokens = the prefill's + 2 decoded
    for r in rows:
        assert r["prefill_ms"] > 0 and 0 <= r["first_prefill_s"] <= r["first_call_s"] and r["build_s"] >= 0
        assert 3 / r["tok_s"] == pytest.approx(r["prefill_ms"] / 1e3 + 2 / r["decode_tok_s"], rel=2e-2)
    # --repeat: the list again in the same order, then one summary per configuration
    bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--runs", "1", "--max_new_tokens", "3",
                "--mode", "bf16", "--kernels", "default", "stock", "--repeat", "2"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["kernels"] for r in rows] == ["default", "stock"] * 3 and [r.get("summary") for r in rows[4:]] == [True] * 2
    assert all(len(r["repeats_tok_s"]) == 2 and r["tok_s"] == statistics.median(r["repeats_tok_s"]) for r in rows[4:])


def test_bench_speculative_verify_takes_a_quantization_mode(capsys, monkeypatch):
    # the verify-step benchmark on a quantized target (CPU, eager: the plumbing, not the speed)
    import bench
    import bench_speculative
    from quantize import WeightOnlyInt8Linear

    built, apply_mode = [], bench.apply_mode
    monkeypatch.setattr(bench, "apply_mode", lambda model, mode: built.append(apply_mode(model, mode)) or built[-1])
    bench_speculative.main(["verify", "--shape", "tiny", "--device", "cpu", "--no_compile", "--mode", "int8", "--k",
                            "2", "--iters", "1", "--runs", "1", "--draft_cost", "0", "--acceptance", "0.8"])  # fmt: skip
    row = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert (row["mode"], row["k"]) == ("int8", 2) and row["verify_ms"] > 0 and row["decode_ms"] > 0
    assert any(isinstance(m, WeightOnlyInt8Linear) for m in built[0].modules())


def test_benchmarks_reject_an_unknown_mode_in_one_line(capsys):
    import bench
    import bench_speculative

    for main, argv in ((bench.main, ["--shape", "tiny", "--device", "cpu"]), (bench_speculative.main, ["verify"])):
        with pytest.raises(SystemExit):
            main(argv + ["--mode", "int9"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: --mode int9: unknown quantization mode 'int9'" in err


def test_bench_breakdown_charges_each_kernel_what_it_adds_to_the_step():
    # --breakdown's critical path: a kernel that starts early and waits (programmatic dependent launch) costs
    # only its end past the kernels before it; gaps with nothing running are idle time; the parts add up
    import bench

    kernels = [(0.0, 10.0, "a"), (8.0, 15.0, "b"), (9.0, 12.0, "c"), (20.0, 26.0, "a"), (25.0, 27.0, "b")]
    path, idle = bench.critical_path(list(reversed(kernels)))  # order of start, whatever the input's
    assert path == {"a": (16.0, 2), "b": (6.0, 2), "c": (0.0, 1)} and idle == {"a": [5.0]}  # the GPU waited for a
    assert sum(us for us, _ in path.values()) + sum(map(sum, idle.values())) == 27.0 - 0.0
    assert bench.critical_path([]) == ({}, {})
    assert bench.kernel_kind("_int4_kernel grid=[1, 2, 3]") == "matmul" and bench.kernel_kind("triton_poi_x") == "other"
    assert bench.kernel_key({"name": "_linear_kernel", "args": {"grid": [64, 1, 1]}}) == "_linear_kernel grid=[64, 1, 1]"
    # calls of one kernel and grid keyed apart by the kernel that started before each (wo after the attention,
    # w2 after the SwiGLU matmul)
    calls = [(5.0, 6.0, "mm grid=[8]"), (0.0, 4.0, "attn grid=[2]"), (4.0, 5.0, "mm grid=[8]"), (6.0, 7.0, "mm grid=[4]")]
    assert bench.after_previous(calls) == [(0.0, 4.0, "attn grid=[2] after the first"), (4.0, 5.0, "mm grid=[8] after attn"),
                                           (5.0, 6.0, "mm grid=[8] after mm"), (6.0, 7.0, "mm grid=[4] after mm")]  # fmt: skip


def test_bench_breakdown_reads_a_trace_per_call():
    # --breakdown's trace side: kernels, copies and fills of a chrome trace (other events ignored), two tokens of
    # w13 -> w2 -> qkv -> attention -> wo; w2 and wo share a kernel and grid and are told apart by what precedes
    # them; the kinds ignore that suffix (an "_attention_kernel" after it does not make wo an attention kernel)
    import bench

    def kernel(name, ts, dur, grid, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"grid": grid}}

    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0}]
    for t0 in (0.0, 100.0):
        events += [kernel("_int4_kernel", t0, 20.0, [5504, 1, 1]), kernel("_int4_kernel", t0 + 20.0, 12.0, [512, 1, 1]),
                   kernel("_int4_kernel", t0 + 32.0, 10.0, [3072, 1, 1]), kernel("_attention_kernel", t0 + 40.0, 8.0, [32, 4, 1]),
                   kernel("_int4_kernel", t0 + 47.0, 6.0, [512, 1, 1])]  # fmt: skip
    events.append(kernel("Memcpy DtoD (Device -> Device)", 60.0, 1.0, None, cat="gpu_memcpy"))
    path = bench.trace_path(events, tokens=2)
    wo, w2 = "_int4_kernel grid=[512, 1, 1] after _attention_kernel", "_int4_kernel grid=[512, 1, 1] after _int4_kernel"
    assert path["top"][wo] == [5.0, 1.0] and path["top"][w2] == [12.0, 1.0]  # wo: 5 of its 6 µs past the attention
    # per token: w13 20 + w2 12 + qkv 10 + wo 5 µs of matmuls; the attention 6 past qkv; the copy 1 µs in 2 tokens
    assert path["matmul"] == 47.0 and path["attention"] == 6.0 and path["other"] == 0.5
    assert path["idle"] == (7.0 + 39.0) / 2 and set(path["idle_before"]) == {"Memcpy DtoD (Device -> Device) after _int4_kernel",
                                                                             "_int4_kernel grid=[5504, 1, 1] after Memcpy DtoD (Device -> Device)"}  # fmt: skip
    # the idle time of the timed (unprofiled) runs: their time a token less the profiled busy time (53.5 µs), never
    # below zero; at 10000 tok/s a token takes 100 µs
    assert bench.unprofiled_idle(path, 10000.0) == 46.5 and bench.unprofiled_idle(path, 1e6) == 0.0


def test_choose_keeps_a_candidate_only_where_no_shape_loses():
    # --choose's rule over one or several shapes, margin 0.5%: the best average gain among candidates that gain
    # more than the margin on average and lose no shape by more than it; else the table's entry (0)
    import bench

    assert bench.chosen_trial({"7B": [100.0, 100.3, 102.0]}, 0.005) == 2
    assert bench.chosen_trial({"7B": [100.0, 100.4, 99.0]}, 0.005) == 0  # within the margin, or slower
    both = {"7B": [100.0, 102.3, 101.0, 100.0], "8B": [100.0, 94.0, 101.0, 100.2]}
    assert bench.chosen_trial(both, 0.005) == 2  # 1: +2.3% at 7B but -6% at 8B (int8 wo, nineteenth session)
    assert bench.chosen_trial({"7B": [100.0, 101.5], "8B": [100.0, 99.6]}, 0.005) == 1  # 8B within the margin
    assert bench.chosen_trial({"7B": [100.0, 101.5], "8B": [100.0, 99.4]}, 0.005) == 0


def test_bench_chooses_over_several_shapes(tmp_path, capsys, monkeypatch):
    # --choose_shapes: each trial runs on every shape, each with the trial's table; the JSON line gives each
    # shape's medians
    import bench

    key = "int8:256x128:m1"
    entry = lambda bn: {"block_n": bn, "block_k": 128, "split_k": 1, "num_warps": 4, "num_stages": 2, "dot": False}  # noqa: E731
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({key: [entry(32), entry(64)]}))
    speed = {("tiny", None): 100.0, ("tiny", 32): 103.0, ("tiny", 64): 101.0,
             ("7B", None): 200.0, ("7B", 32): 180.0, ("7B", 64): 201.0}  # fmt: skip
    timed = []

    def fake_run(args, mode, copy_gbs, kernels, pdl, configs, prefill_graph):
        cfg = json.loads(Path(configs).read_text())["cpu"].get(key)
        timed.append((args.shape, cfg and cfg["block_n"]))
        return {"tok_s": speed[timed[-1]]}

    monkeypatch.setattr(bench, "run", fake_run)
    keep_inductor_pdl(monkeypatch)
    out = tmp_path / "chosen.json"
    bench.main(["--device", "cpu", "--no_compile", "--mode", "int8", "--choose", str(variants), "--choose_out", str(out),
                "--choose_shapes", "tiny", "7B", "--repeat", "1"])  # fmt: skip
    row = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith('{"choose"')))
    assert timed == [("tiny", None), ("7B", None), ("tiny", 32), ("7B", 32), ("tiny", 64), ("7B", 64)]
    assert row["tok_s"] == {"tiny": [100.0, 103.0, 101.0], "7B": [200.0, 180.0, 201.0]} and row["kept"] == entry(64)
    assert json.loads(out.read_text())["cpu"][key] == entry(64)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--mode", "int8", "--choose_shapes", "7B"])
    assert "--choose_shapes goes with --choose" in capsys.readouterr().err


def test_bench_compares_tuned_config_files(tmp_path, capsys, monkeypatch):
    # --configs: each file's block sizes are in force for its configuration (interleaved with --repeat), and
    # the shipped table again afterwards; a file that is not JSON is a one-line error
    import bench
    import triton_ops

    monkeypatch.setenv("FASTGEN_KERNELS", "")
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"cpu": {"int8:128x128:m1": {"block_n": 64, "block_k": 128, "split_k": 1,
                                                            "num_warps": 4, "num_stages": 2, "dot": False}}}))  # fmt: skip
    seen, load = [], triton_ops.load_configs  # (file, the int8 128 x 128 tile's block_n in force after it)

    def spy(path=triton_ops.CONFIG_FILE):
        load(path)
        seen.append((str(path), triton_ops.get_config("int8", 128, 128, 1, torch.device("cpu")).block_n))

    monkeypatch.setattr(triton_ops, "load_configs", spy)
    bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--runs", "1", "--max_new_tokens", "3",
                "--mode", "int8", "--configs", str(mine), str(triton_ops.CONFIG_FILE), "--repeat", "2"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["configs"] for r in rows] == [str(mine), str(triton_ops.CONFIG_FILE)] * 3
    heuristic = triton_ops.heuristic("int8", 128, 128, 1, 1).block_n
    assert heuristic != 64 and seen == [(str(mine), 64), (str(triton_ops.CONFIG_FILE), heuristic)] * 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--device", "cpu", "--configs", str(bad)])
    assert "not a readable JSON file" in capsys.readouterr().err


def test_bench_chooses_table_entries_end_to_end(tmp_path, capsys, monkeypatch):
    # --choose: key by key, the table's entry and each candidate run the workload; a candidate replaces the entry
    # only when it beats it by more than the margin, later keys are timed with the entries kept so far, and the
    # table as chosen is written whole to --choose_out while the shipped kernel_configs.json stays as it is
    import bench
    import triton_ops

    shipped = triton_ops.CONFIG_FILE.read_text()
    entry = lambda bn, split=1: {"block_n": bn, "block_k": 128, "split_k": split, "num_warps": 4,  # noqa: E731
                                 "num_stages": 2, "dot": False}  # fmt: skip
    a, b = "int8:256x128:m1", "int8:128x256:m1:glu"
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({a: [entry(32), entry(64)], b: [entry(16)]}))
    speed = {None: 100.0, 32: 100.3, 64: 102.0, 16: 100.2}  # 32: within the 0.5% margin; 64: kept
    timed = []

    def fake_run(args, mode, copy_gbs, kernels, pdl, configs, prefill_graph):
        mine = json.loads(Path(configs).read_text())["cpu"]
        timed.append((mine.get(a, {}).get("block_n"), mine.get(b, {}).get("block_n")))
        cfg = mine.get(b) if len(timed) > 3 * 2 else mine.get(a)  # the first key's 3 trials x 2 rounds, then b's
        return {"tok_s": speed[cfg and cfg["block_n"]]}

    monkeypatch.setattr(bench, "run", fake_run)
    keep_inductor_pdl(monkeypatch)
    out = tmp_path / "chosen.json"
    bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--mode", "int8", "--choose", str(variants),
                "--choose_out", str(out)])  # fmt: skip  (two rounds unless --repeat says otherwise)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["choose"] for r in rows[:2]] == [a, b] and rows[2] == {"chosen": str(out), "changed": [a]}
    assert rows[0]["tok_s"] == {"tiny": [100.0, 100.3, 102.0]} and rows[0]["kept"] == entry(64) and rows[1]["kept"] is None
    # interleaved rounds; b's trials run with a's new entry in force
    assert timed == [(None, None), (32, None), (64, None)] * 2 + [(64, None), (64, 16)] * 2
    chosen = json.loads(out.read_text())
    assert chosen["cpu"][a] == entry(64) and b not in chosen["cpu"]
    assert {k: v for k, v in chosen.items() if k != "cpu"} == {k: v for k, v in json.loads(shipped).items() if k != "cpu"}
    assert triton_ops.CONFIG_FILE.read_text() == shipped
    # bad input: a one-line error and no output file
    out.unlink()
    for bad, message in [({a: [entry(48)]}, "cannot run that call"),  # 256 rows are not whole tiles of 48
                         ({b: [entry(16, split=2)]}, "cannot run that call"),  # a GLU call cannot split K
                         ({"int4g32:256x128:m1": [entry(32)]}, "runs int8 matmuls"),
                         ({a: [{"block_n": 32, "tiles": 2}]}, "not a kernel config"),
                         ({"int8:256x128": [entry(32)]}, "not a table key")]:  # fmt: skip
        variants.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--mode", "int8", "--choose",
                        str(variants), "--choose_out", str(out)])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err and "error: --choose " in err, err
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--mode", "int8", "fp8", "--choose",
                    str(variants)])  # fmt: skip
    assert "one --mode" in capsys.readouterr().err and not out.exists()
    variants.write_text(json.dumps({a: [entry(32)]}))
    with pytest.raises(SystemExit):  # refused before any run, not after them
        bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--mode", "int8", "--choose",
                    str(variants), "--choose_out", str(tmp_path / "missing" / "chosen.json")])  # fmt: skip
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--device", "cpu", "--no_compile", "--mode", "int8", "--choose",
                    str(variants), "--choose_out", str(out), "--repeat", "0"])  # fmt: skip
    assert "--repeat 0: must be at least 1" in capsys.readouterr().err and not out.exists()
