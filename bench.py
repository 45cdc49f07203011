"""Decode-speed benchmark on random weights of a named shape (../shared/BENCHMARKS.md workload).

    python bench.py --shape 7B --mode bf16 int8 int4 fp8 --runs 3
    python bench.py --shape 7B --mode int8 int4 --kernels all stock   # our Triton kernels vs torch's own
    python bench.py --shape 7B --mode int8 --kernels int8 int8,attn int8,attn,glu   # what each kernel adds
    python bench.py --shape 7B --mode int8 fp8 --pdl off on   # programmatic dependent launch off and on
    python bench.py --shape 7B --mode int4 --kernels int8,fp8,int4,attn,glu,norm,rope default   # the sampler's effect
    python bench.py --shape 7B --mode int4 --kernels default all --repeat 2   # interleaved A/B: A B A B
    python bench.py --shape 7B --mode int8 --configs kernel_configs.json old.json --repeat 2   # two tunings
    python bench.py --shape 7B --mode int4 --prefill_graph off on --repeat 2   # prefill as a CUDA graph replay
    python bench.py --shape 7B --mode int4 --choose variants.json   # table entries chosen end to end
    python bench.py --mode int8 --choose wo.json --choose_shapes 7B 8B   # ... for a key both shapes use

Prints one JSON line per configuration: median tok/s over --runs after a first (compiling) call (new tokens
over the whole generate() call, the prompt's prefill included, as gpt-fast counts; prefill_ms and decode_tok_s
split it into the prefill and the decode steps after it), achieved GB/s (non-embedding weight bytes x tok/s),
% of the floor set by the copy bandwidth measured in the same process, first-call time (first_prefill_s: the
part of it until the first token, the prefill's kernels compiled; the rest compiles and captures the decode
step), the time to build the model (build_s: random weights, quantization), peak memory, device and
versions; stderr says how far each configuration got (a run cut off by a time limit). The same configuration
built twice in one process has differed by 11% on the H200 (SPEED_LOG.md), so compare configurations interleaved:
--repeat N runs the list N times in turn and ends with one "summary" line per configuration (its N medians
and their median).

--choose VARIANTS.json picks kernel_configs.json entries end to end, the way the table's entries were chosen
(a tile's time alone, what bench_kernels.py --tune measures, has often ranked tiles differently from the
model): VARIANTS maps table keys (this GPU's, for the one --mode, such as "int4g32:12288x4096:m1" or
"int4g32:22016x4096:m1:glu") to lists of candidate entries. Key by key, in the file's order, the table's entry
and each candidate run the workload in turn (--repeat rounds, interleaved; two unless given: in one round the
same table has run 2% apart within one process on the H100); a candidate replaces the entry
when its median beats the entry's by more than --choose_margin percent, and later keys are timed with the
entries kept so far. --choose_shapes 7B 8B times every trial on each shape (a key such as int8:4096x4096:m1
serves both): a candidate may then lose no shape by more than the margin and must gain more than it on average.
One JSON line per key, then the table as chosen is written whole to --choose_out (the shipped
kernel_configs.json is left as it is; copy it over after bench_kernels.py --check passes with it).
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import generate as gen
import quantize
from model import ModelArgs, Transformer

SHAPES = {  # HF-style configs: the benchmark builds through the same mapping as real checkpoints
    "7B": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}  # fmt: skip


def random_model(shape: str, device, dtype) -> Transformer:
    """Random normal weights (never zeros: they hide bugs and can run faster than real data)."""
    return random_transformer(ModelArgs.from_hf_config(SHAPES[shape]), device, dtype)


def random_transformer(config: ModelArgs, device, dtype) -> Transformer:
    # built on the meta device, then given random weights (norms: ones) where it will run
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.eval()


def apply_mode(model: Transformer, mode: str) -> Transformer:
    # also for bf16: prepare_for_device picks each linear's kernel, as generate.load_model does
    return quantize.prepare_for_device(model) if mode == "bf16" else quantize.quantize_model(model, mode)


def check_mode(parser: argparse.ArgumentParser, mode: str) -> None:
    # a one-line usage error for a --mode that apply_mode would reject only after building the model
    if mode != "bf16":
        try:
            quantize.parse_mode(mode)
        except ValueError as e:
            parser.error(f"--mode {mode}: {e}")


def copy_bandwidth(device) -> float:
    """Device-to-device copy GB/s (bytes read + written), the ceiling a decode step can approach."""
    if torch.device(device).type != "cuda":
        return float("nan")
    n = 1 << 28  # 512 MiB of bf16 per buffer: far past the L2
    a, b = torch.randn(n, device=device, dtype=torch.bfloat16), torch.empty(n, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n * 2 / statistics.median(times) / 1e9


def run(args, mode: str, copy_gbs: float, kernels: str, pdl: str, configs: str | None = None,
        prefill_graph: str = "on") -> dict:  # fmt: skip
    # configs: a kernel_configs.json-style file of block sizes for triton_ops.py, None: the shipped one
    device = args.device
    os.environ["FASTGEN_PREFILL_GRAPH"] = "1" if prefill_graph == "on" else "0"
    gen.prefill_graphs = gen.make_prefill_graphs(args.compile, args.compile_prefill)  # fresh graphs per model
    if configs or quantize.triton_ops:  # the shipped table again after another configuration's
        quantize.load_kernels()
        quantize.triton_ops.load_configs(configs or quantize.triton_ops.CONFIG_FILE)
    os.environ["FASTGEN_KERNELS"] = quantize.TRITON_BY_DEFAULT if kernels == "default" else kernels  # read at prepare
    os.environ["FASTGEN_PDL"] = "1" if pdl == "on" else "0"  # read at each triton_ops.py launch
    gen.set_inductor_pdl(pdl == "on")  # read when the decode step compiles (after the reset below)
    torch._dynamo.reset()
    torch.manual_seed(0)
    print(f"bench: {args.shape} {mode}, kernels {kernels}, PDL {pdl}, prefill graph {prefill_graph}: building",
          file=sys.stderr, flush=True)  # (a run cut off by a time limit still says how far it got)
    t_build = time.perf_counter()
    model = apply_mode(random_model(args.shape, device, torch.bfloat16 if device != "cpu" else torch.float32), mode)
    build_s = time.perf_counter() - t_build  # random weights, quantization, packing
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_length,)).tolist()
    with torch.device(device):
        model.setup_caches(1, args.prompt_length + args.max_new_tokens)
    nbytes = gen.model_bytes(model)
    sampling = dict(temperature=args.temperature, top_k=args.top_k)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    print(f"bench: built in {build_s:.1f} s; first call", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    _, first = gen.generate(model, [prompt], args.max_new_tokens, **sampling)  # first call compiles
    first_call = time.perf_counter() - t0  # first["ttft"]: its prefill, with the kernels that compiles
    print(f"bench: first call {first_call:.1f} s; timed runs", file=sys.stderr, flush=True)
    speeds, prefill, decode = [], [], []
    for _ in range(args.runs):
        rows, stats = gen.generate(model, [prompt], args.max_new_tokens, **sampling)
        assert len(rows[0]) == args.max_new_tokens
        speeds.append(stats["decode_steps"] / stats["time"])  # the workload's figure: prefill included
        prefill.append(stats["ttft"])
        decode.append((stats["decode_steps"] - 1) / (stats["time"] - stats["ttft"]))  # the decode steps alone
    tok_s = statistics.median(speeds)
    breakdown = profile_step(model, prompt, sampling, args.max_new_tokens) if args.breakdown else None
    if breakdown:
        breakdown["critical_path"]["idle_unprofiled"] = unprofiled_idle(breakdown["critical_path"], tok_s)
    gbs = nbytes * tok_s / 1e9
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None
    return {
        "shape": args.shape, "mode": mode, "kernels": kernels, "configs": configs or "default", "pdl": pdl_used(device),
        "prefetch_kib": os.environ.get("FASTGEN_PREFETCH", "0"), "compile": args.compile,
        "preload": [w for w in ("matmul", "attn") if pdl_used(device) and quantize.triton_ops.preloads(torch.device(device), w)],
        "prefill_graph": gen.prefill_graphs is not None and device.startswith("cuda"),
        "tok_s": round(tok_s, 2),
        "runs_tok_s": [round(s, 2) for s in speeds], "prefill_ms": round(1e3 * statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2), "weight_gb": round(nbytes / 1e9, 3), "gb_s": round(gbs, 1),
        "copy_gb_s": round(copy_gbs, 1), "pct_of_floor": round(100 * gbs / copy_gbs, 1),
        "build_s": round(build_s, 1), "first_call_s": round(first_call, 1), "first_prefill_s": round(first["ttft"], 1),
        "peak_mem_gb": peak and round(peak, 2), **versions(),
        **({"per_token_us": breakdown} if breakdown else {}),
    }  # fmt: skip


KERNEL_KINDS = [  # (kind, substrings of GPU kernel names), first match wins
    ("matmul", ("_linear_kernel", "_int4_kernel", "gemv", "gemm", "tinygemm", "int4pack", "nvjet", "cutlass", "sm90_xmma")),
    ("attention", ("flash", "attention", "fmha", "sdpa")),
]


def profile_step(model: Transformer, prompt: list[int], sampling: dict, tokens: int = 200) -> dict:
    """Where a decoded token's GPU time goes, from torch.profiler over one generate() call of `tokens` tokens:
    kernel launches per token; GPU time per token by kind of kernel (matmul / attention / everything else) and
    the twelve largest 'other' kernels (us and launches per token); and the critical path (critical_path): the
    time each kernel adds to the step, which under programmatic dependent launch is what it costs (its own
    GPU time then includes its wait for the kernel before it; trace_path)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(model, [prompt], tokens, **sampling)
    totals, others, launches = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, {}, 0
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0 or e.key.startswith(("ProfilerStep", "cudaGraph")):
            continue
        kind = kernel_kind(e.key)
        totals[kind] += us
        launches += e.count
        if kind == "other":
            us0, n0 = others.get(e.key[:80], (0.0, 0))
            others[e.key[:80]] = (us0 + us, n0 + e.count)
    top = sorted(others.items(), key=lambda kv: -kv[1][0])[:12]
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return {**{k: round(v / tokens, 1) for k, v in totals.items()}, "kernels": round(launches / tokens, 1),
            "top_other": {k: [round(us / tokens, 1), round(n / tokens, 1)] for k, (us, n) in top},
            "critical_path": trace_path(events, tokens)}


def trace_path(events: list[dict], tokens: int) -> dict:
    """A chrome trace's events -> the critical path per token (critical_path over its kernels, copies and
    fills): µs by kind of kernel, idle µs, the sixteen costliest kernels by name, grid and the kernel that
    started before each (after_previous; [µs, calls] per token), and the eight kernels the GPU most waited for
    (idle_before: [µs per token, the number of gaps, the longest gap in µs])."""
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), kernel_key(e)) for e in events
               if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]  # fmt: skip
    path, idle_before = critical_path(after_previous(kernels))
    idle = sum(map(sum, idle_before.values()))
    by_kind = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for key, (us, _) in path.items():
        by_kind[kernel_kind(key.split(AFTER)[0])] += us
    costly = sorted(path.items(), key=lambda kv: -kv[1][0])[:16]
    return {**{k: round(v / tokens, 1) for k, v in by_kind.items()}, "idle": round(idle / tokens, 1),
            "top": {k: [round(us / tokens, 2), round(n / tokens, 2)] for k, (us, n) in costly},
            "idle_before": {k: [round(sum(gaps) / tokens, 2), len(gaps), round(max(gaps), 1)]
                            for k, gaps in sorted(idle_before.items(), key=lambda kv: -sum(kv[1]))[:8]}}  # fmt: skip


def unprofiled_idle(path: dict, tok_s: float) -> float:
    # µs a token the GPU sat idle in the timed runs: their time a token less the busy time on the profiled
    # critical path (trace_path). The profiler's own host work per launch widens the gaps it sees ("idle"), so
    # a step the host only just keeps up with looks starved under it and is not without it.
    busy = path["matmul"] + path["attention"] + path["other"]
    return round(max(0.0, 1e6 / tok_s - busy), 1)


def kernel_kind(name: str) -> str:
    return next((k for k, keys in KERNEL_KINDS if any(s in name for s in keys)), "other")


AFTER = " after "


def after_previous(kernels: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(start, end, key) of kernels -> the same in order of start, each key followed by AFTER and the name of the
    kernel that started before it: calls of one kernel with one grid (a layer's wo and w2, say) then tell apart
    by what precedes them (the attention, the SwiGLU matmul)."""
    out, prev = [], "the first"
    for start, end, key in sorted(kernels):
        out.append((start, end, key + AFTER + prev))
        prev = key.split(" grid=")[0][:40]
    return out


def kernel_key(event: dict) -> str:
    # a profiler trace's kernel event -> its name (cut) and grid: the matmuls of one kernel differ by grid
    grid = event.get("args", {}).get("grid")
    return event["name"][:60] + (f" grid={grid}" if grid else "")


def critical_path(kernels: list[tuple[float, float, str]]) -> tuple[dict[str, tuple[float, int]], dict[str, list[float]]]:
    """kernels: (start, end, key) of every kernel on one GPU -> ({key: (time added to the busy span, count)},
    {key: the idle gaps just before that kernel started}). Taken in order of start, a kernel adds what it
    extends the busy span by: overlapped by an earlier kernel (programmatic dependent launch lets it start and
    wait early) it adds only its end past theirs. The added times plus the idle gaps make the span from the
    first start to the last end."""
    path: dict[str, tuple[float, int]] = {}
    idle: dict[str, list[float]] = {}
    frontier = None
    for start, end, key in sorted(kernels):
        if frontier is None or start > frontier:
            if frontier is not None:
                idle.setdefault(key, []).append(start - frontier)
            frontier = start
        added = max(0.0, end - frontier)
        frontier = max(frontier, end)
        us, n = path.get(key, (0.0, 0))
        path[key] = (us + added, n + 1)
    return path, idle


def pdl_used(device: str) -> bool:
    # what triton_ops.py decided under the FASTGEN_PDL that run() set (it needs sm_90+)
    if not device.startswith("cuda"):
        return False
    quantize.load_kernels()
    return quantize.triton_ops.uses_pdl(torch.device(device))


def table_format(mode: str) -> str:
    # the format name of the table keys a quantize.py mode's matmuls use ("int4-g64" -> "int4g64")
    if mode == "bf16":
        return "bfloat16"
    base, groupsize = quantize.parse_mode(mode)
    return f"int4g{groupsize}" if base.startswith("int4") else base


def read_variants(path: str, mode: str) -> dict[str, list[dict]]:
    """--choose's file: {table key: [candidate entries]}, each a triton_ops.Config its key's call can run
    (triton_ops.entry_ok), the keys in the format --mode uses. ValueError: what is wrong."""
    quantize.load_kernels()
    t = quantize.triton_ops
    try:
        variants = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__})") from e
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{path}: expected an object of table keys to lists of candidate entries")
    fmt = table_format(mode)
    for key, cands in variants.items():
        try:
            key_fmt = t.parse_key(key)[0]
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if key_fmt != fmt:
            raise ValueError(f"{path}: {key!r} is a {key_fmt} key, but --mode {mode} runs {fmt} matmuls")
        if not isinstance(cands, list) or not cands or not all(isinstance(c, dict) for c in cands):
            raise ValueError(f"{path}: {key!r} needs a non-empty list of entries")
        for c in cands:
            try:
                cfg = t.Config(**c)
            except TypeError as e:
                raise ValueError(f"{path}: {key!r}: {c} is not a kernel config ({e})") from e
            if not t.entry_ok(key, cfg):
                raise ValueError(f"{path}: {key!r}: {c} cannot run that call")
    return variants


def choose(args, mode: str, copy_gbs: float, variants: dict[str, list[dict]], out: Path, margin: float) -> list[str]:
    """--choose (see the module's docstring): returns the keys whose entry changed."""
    import tempfile

    quantize.load_kernels()
    table = json.loads(quantize.triton_ops.CONFIG_FILE.read_text())
    mine = table.setdefault(quantize.triton_ops._device_name(torch.device(args.device)), {})

    def put(key: str, entry: dict | None) -> None:  # None: no entry (the key's fallbacks, then the heuristic)
        mine.pop(key, None)
        if entry is not None:
            mine[key] = entry

    changed = []
    shapes = args.choose_shapes or [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        for key, cands in variants.items():
            trials = [mine.get(key)] + cands
            speeds = {s: [[] for _ in trials] for s in shapes}  # shape -> tok/s of each trial, a round each
            for _ in range(args.repeat):
                for i, entry in enumerate(trials):
                    put(key, entry)
                    path = Path(tmp) / f"trial{i}.json"
                    path.write_text(json.dumps(table))
                    for shape in shapes:
                        print(f"bench: --choose {key} ({shape}): {'the table' if i == 0 else 'candidate'} {entry}",
                              file=sys.stderr)  # fmt: skip
                        row = run(argparse.Namespace(**{**vars(args), "shape": shape}), mode, copy_gbs, "default",
                                  args.pdl[0], str(path), args.prefill_graph[0])  # fmt: skip
                        speeds[shape][i].append(row["tok_s"])
            medians = {s: [statistics.median(v) for v in speeds[s]] for s in shapes}
            keep = chosen_trial(medians, margin)
            put(key, trials[keep])
            if keep:
                changed.append(key)
            print(json.dumps({"choose": key, "entries": trials, "tok_s": medians, "runs_tok_s": speeds,
                              "kept": trials[keep], "changed": keep > 0}), flush=True)  # fmt: skip
    quantize.triton_ops.write_table(table, out)
    return changed


def chosen_trial(medians: dict[str, list[float]], margin: float) -> int:
    """--choose's rule: medians {shape: tok/s of each trial}, trial 0 the table's entry -> the trial to keep. A
    candidate qualifies when it loses by no more than the margin in any shape and gains more than the margin on
    average over the shapes (one shape: when it beats the entry by more than the margin); the best average
    gain among those is kept, else the entry (0)."""
    per_shape = list(medians.values())
    gains = [statistics.mean(m[i] / m[0] - 1 for m in per_shape) for i in range(len(per_shape[0]))]
    ok = [i for i in range(1, len(gains)) if gains[i] > margin and all(m[i] >= m[0] * (1 - margin) for m in per_shape)]
    return max(ok, key=gains.__getitem__, default=0)


def versions() -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton_v}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7B")
    p.add_argument("--mode", nargs="+", default=["bf16"], help="bf16 and/or quantize.py modes (int8, int4, ...)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the first (compiling) call")
    p.add_argument("--prompt_length", type=int, default=6)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--no_compile", dest="compile", action="store_false")
    p.add_argument("--compile_prefill", action="store_true")
    p.add_argument("--kernels", nargs="+", default=["default"],
                   help="what uses the Triton kernels (FASTGEN_KERNELS): default (int8,fp8,int4,attn,glu,norm,rope,sample), all, stock "
                        "(torch's own: cuBLAS, tinygemm, inductor, sdpa), or a list of bf16 int8 fp8 int4 attn glu rope "
                        "norm sample such as int8,attn")
    p.add_argument("--repeat", type=int, help="run the list of configurations this many times, interleaved "
                   "(default 1; 2 with --choose)")
    p.add_argument("--pdl", nargs="+", choices=["on", "off"], default=["on"],
                   help="programmatic dependent launch between the decode step's kernels (sm_90+; FASTGEN_PDL)")
    p.add_argument("--prefill_graph", nargs="+", choices=["on", "off"], default=["on"],
                   help="short prompts' prefill as a CUDA graph replay (generate.PrefillGraphs; needs the compiled decode)")
    p.add_argument("--configs", nargs="+", default=[None], metavar="JSON",
                   help="files of tuned block sizes to compare (kernel_configs.json's format; default: that file)")
    p.add_argument("--choose", metavar="JSON", help="choose table entries end to end among these candidates "
                   "(see above); one --mode")
    p.add_argument("--choose_out", default="chosen_configs.json", help="where --choose writes the table it chose")
    p.add_argument("--choose_shapes", nargs="+", choices=sorted(SHAPES), metavar="SHAPE",
                   help="--choose over several shapes (keys such as 4096x4096 serve 7B and 8B alike): a candidate may "
                   "lose no shape more than the margin and must gain more than it on average (default: --shape)")
    p.add_argument("--choose_margin", type=float, default=0.5,
                   help="percent a candidate must beat the table's entry by to replace it (default 0.5)")
    p.add_argument("--breakdown", action="store_true", help="also profile GPU time per token by kind of kernel")
    p.add_argument("--device", default=gen.default_device())
    args = p.parse_args(argv)
    for mode in args.mode:
        check_mode(p, mode)
    if args.choose_shapes and not args.choose:
        p.error("--choose_shapes goes with --choose")
    if args.repeat is None:
        args.repeat = 2 if args.choose else 1
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: must be at least 1")
    if args.breakdown and not args.device.startswith("cuda"):
        p.error("--breakdown profiles GPU kernels: it needs --device cuda")
    for path in filter(None, args.configs):
        try:
            json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--configs {path}: not a readable JSON file ({type(e).__name__})")
    variants = None
    if args.choose:
        if len(args.mode) != 1 or args.configs != [None] or args.kernels != ["default"] or len(args.pdl) > 1 \
                or len(args.prefill_graph) > 1:  # fmt: skip
            p.error("--choose takes one --mode, one --pdl and --prefill_graph setting, the default kernels and no --configs")
        try:
            variants = read_variants(args.choose, args.mode[0])
        except ValueError as e:
            p.error(f"--choose {e}")
        if not Path(args.choose_out).resolve().parent.is_dir():
            p.error(f"--choose_out {args.choose_out}: no such directory")
    gen.setup_compile(args.compile, args.compile_prefill)
    copy_gbs = copy_bandwidth(args.device)
    if variants is not None:
        changed = choose(args, args.mode[0], copy_gbs, variants, Path(args.choose_out), args.choose_margin / 100)
        print(json.dumps({"chosen": args.choose_out, "changed": changed}), flush=True)
        return
    medians: dict[tuple, list[float]] = {}  # (mode, kernels, pdl, configs, prefill graph) -> tok/s of each repeat
    for mode in args.mode:
        for _ in range(args.repeat):
            for config in itertools.product(args.kernels, args.pdl, args.configs, args.prefill_graph):
                row = run(args, mode, copy_gbs, *config)
                medians.setdefault((mode, *config), []).append(row["tok_s"])
                print(json.dumps(row), flush=True)
    if args.repeat > 1:
        for (mode, kernels, pdl, configs, graph), speeds in medians.items():
            summary = {"summary": True, "mode": mode, "kernels": kernels, "pdl": pdl, "configs": configs or "default",
                       "prefill_graph": graph, "tok_s": statistics.median(speeds)}  # fmt: skip
            print(json.dumps({**summary, "repeats_tok_s": speeds}), flush=True)


if __name__ == "__main__":
    main()
