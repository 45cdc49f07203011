"""Speculative decoding benchmarks; one JSON line per measurement.

    python bench_speculative.py verify --shape 7B --k 2 3 4 5 6 7 8     # verify cost vs a decode step
    python bench_speculative.py verify --shape 7B --mode int4 --k 4     # the same for a quantized target
    python bench_speculative.py lookup --k 4 8                         # prompt lookup on SmolLM2, real text

verify: random weights of a named shape (bench.py) in bf16 or a quantize.py mode (--mode; the kernels as
bench.py chooses them), compiled with CUDA graphs. Times one decode step and one verify step of k+1 tokens
(target forward + acceptance), and prints the speedup this implies:
with per-token acceptance rate a a step yields (1 - a^(k+1)) / (1 - a) tokens and costs k draft steps
plus the verify, so speedup = tokens per step / (k * c + verify / decode), c = draft step / target step
(--draft_cost; 0 is prompt lookup).
lookup: the packaged SmolLM2-135M-Instruct asked to repeat or lightly edit a passage of
data/lee_background.cor (input-grounded), greedy: tok/s plain vs prompt lookup, the acceptance, and
whether the two outputs are identical.
"""
import argparse
import json
import statistics
import sys
import time

import torch

import bench
import generate as gen
import speculative as spec


def timed(fn, iters: int, device, runs: int = 5) -> float:
    # median seconds per call over `runs` batches of `iters` back-to-back calls, after a warm-up
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        gen.sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        gen.sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


@torch.no_grad()
def verify_cost(args) -> None:
    device, dtype = args.device, torch.float32 if args.device == "cpu" else torch.bfloat16
    model = bench.apply_mode(bench.random_model(args.shape, device, dtype), args.mode)
    V, context = model.config.vocab_size, args.context
    with torch.device(device):
        model.setup_caches(1, context + max(args.k) + 1)
    model(torch.randint(0, V, (1, context), device=device), torch.arange(context, device=device))
    sampling = dict(temperature=args.temperature, top_k=args.top_k)
    decode, verify = gen.decode_one_token, spec.verify
    if args.compile:  # one static graph per k (dynamic=False), so each k is timed at its best
        torch._dynamo.config.recompile_limit = 64
        decode = torch.compile(decode, mode="reduce-overhead", fullgraph=True, dynamic=False)
        verify = torch.compile(verify, mode="reduce-overhead", fullgraph=True, dynamic=False)
    x, pos = torch.randint(0, V, (1, 1), device=device, dtype=torch.int), torch.tensor([context], device=device)
    t_decode = timed(lambda: decode(model, x, pos, **sampling), args.iters, device)
    for k in args.k:
        proposal = torch.randint(0, V, (1, k), device=device, dtype=torch.int)
        q = torch.softmax(torch.randn(1, k, V, device=device), dim=-1)  # a draft's distributions
        input_pos = torch.arange(context, context + k + 1, device=device)
        t0 = time.perf_counter()
        verify(model, x, proposal, q, input_pos, **sampling)
        gen.sync(device)
        first_call = time.perf_counter() - t0
        t_verify = timed(lambda: verify(model, x, proposal, q, input_pos, **sampling), args.iters, device)
        ratio = t_verify / t_decode
        for c in args.draft_cost:
            speedup = {f"{a:.1f}": round((1 - a ** (k + 1)) / (1 - a) / (k * c + ratio), 2) for a in args.acceptance}
            print(json.dumps({"bench": "verify_cost", "shape": args.shape, "mode": args.mode, "k": k,
                              "decode_ms": round(t_decode * 1e3, 3),
                              "verify_ms": round(t_verify * 1e3, 3), "verify_over_decode": round(ratio, 3),
                              "first_call_s": round(first_call, 1), "draft_cost": c, "speedup_at_acceptance": speedup,
                              "compile": args.compile, **bench.versions()}), flush=True)  # fmt: skip


TASKS = {  # input-grounded requests: the answer copies most of its tokens from the prompt
    "repeat": "Repeat the following text exactly, word for word.\n\n{}",
    "edit": "Rewrite the following text, writing NSW instead of New South Wales and changing nothing else.\n\n{}",
}


def passage(chars: int) -> str:
    from scripts.fetch_text import fetch

    text = fetch("lee_background.cor").read_text().splitlines()[0]
    return text[: text.rfind(". ", 0, chars) + 1]  # whole sentences of the first article


@torch.no_grad()
def lookup_speedup(args) -> None:
    from tokenizer import load_tokenizer

    device = args.device
    precision = gen.PRECISIONS[args.precision] if args.precision else torch.float32 if device == "cpu" else torch.bfloat16
    checkpoint = gen.default_checkpoint()
    model = gen.load_model(checkpoint, device, precision)
    tokenizer = load_tokenizer(checkpoint.parent)
    if args.compile:
        gen.setup_compile(True, False)
        spec.setup_compile()
    text = passage(args.passage_chars)
    for task in args.task:
        chat = [{"role": "user", "content": TASKS[task].format(text)}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(chat), bos=False)
        with torch.device(device):
            model.setup_caches(1, len(ids) + args.max_new_tokens + max(args.k))
        common = dict(stop_ids=tokenizer.stop_ids, temperature=0)
        plain_row, plain = None, []
        for run in range(args.runs + 1):  # the first call compiles
            rows, stats = gen.generate(model, [ids], args.max_new_tokens, **common)
            plain_row = rows[0]
            plain.append(stats["decode_steps"] / stats["time"]) if run else None
        plain_tok_s = statistics.median(plain)
        print(json.dumps({"bench": "prompt_lookup", "task": task, "mode": "plain", "prompt_tokens": len(ids),
                          "new_tokens": len(plain_row), "tok_s": round(plain_tok_s, 2), "runs_tok_s": [round(s, 2) for s in plain],
                          "compile": args.compile, **bench.versions()}), flush=True)  # fmt: skip
        for k in args.k:
            speeds = []
            for run in range(args.runs + 1):
                rows, stats = spec.speculative_generate(model, ids, args.max_new_tokens, lookup=args.ngram, k=k, **common)
                speeds.append(stats["decode_steps"] / stats["time"]) if run else None
            tok_s = statistics.median(speeds)
            print(json.dumps({"bench": "prompt_lookup", "task": task, "mode": "lookup", "ngram": args.ngram, "k": k,
                              "new_tokens": len(rows[0]), "tok_s": round(tok_s, 2), "runs_tok_s": [round(s, 2) for s in speeds],
                              "speedup": round(tok_s / plain_tok_s, 2), "identical_to_plain": rows[0] == plain_row,
                              "mean_accepted": round(stats["mean_accepted"], 2), "accepted": stats["accepted"],
                              "precision": str(precision).removeprefix("torch."),
                              "compile": args.compile, **bench.versions()}), flush=True)  # fmt: skip
        if args.show:
            print(tokenizer.decode(plain_row), file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["verify", "lookup"])
    p.add_argument("--k", type=int, nargs="+", default=None, help="proposals per step (verify: 2..8, lookup: 4 8)")
    p.add_argument("--device", default=gen.default_device())
    p.add_argument("--no_compile", dest="compile", action="store_false")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the first (compiling) one")
    # verify
    p.add_argument("--shape", choices=sorted(bench.SHAPES), default="7B")
    p.add_argument("--mode", default="bf16", help="bf16 or a quantize.py mode (int8, int4, fp8, ...)")
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    p.add_argument("--iters", type=int, default=50, help="back-to-back calls per timing")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--draft_cost", type=float, nargs="+", default=[0.0, 0.05, 0.1], help="draft step / target step")
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    # lookup
    p.add_argument("--task", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    p.add_argument("--ngram", type=int, default=3, help="longest n-gram looked up")
    p.add_argument("--max_new_tokens", type=int, default=400)
    p.add_argument("--passage_chars", type=int, default=1500)
    p.add_argument("--precision", choices=sorted(gen.PRECISIONS), default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--show", action="store_true", help="print the plain output to stderr")
    args = p.parse_args(argv)
    bench.check_mode(p, args.mode)
    if args.bench == "verify":
        args.k = args.k or list(range(2, 9))
        verify_cost(args)
    else:
        args.k = args.k or [4, 8]
        lookup_speedup(args)


if __name__ == "__main__":
    main()
