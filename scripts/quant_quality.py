"""Perplexity of the packaged SmolLM2-135M-Instruct under each quantization scheme, on held-out real prose.

    python scripts/quant_quality.py                                   # CPU, float32 compute
    python scripts/quant_quality.py --device cuda --precision bfloat16

Evaluated on the first --tokens tokens of data/lee_background.cor (news articles); GPTQ is calibrated on
data/botchan.txt (a novel), so no row is scored on its own calibration text. The quantized checkpoints are
written by quantize.py's own command-line path into a temporary folder and loaded by generate.load_model,
exactly as a user would. Prints a markdown table and the issue's bars.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402
import generate as gen  # noqa: E402
import quantize as Q  # noqa: E402
from scripts.fetch_text import fetch  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# label -> (mode, group size) ; None: the unquantized checkpoint
SCHEMES = {
    "float32": None, "bf16": None, "int8": ("int8", None), "fp8": ("fp8", None),
    "int4 g32 RTN": ("int4", 32), "int4 g64 RTN": ("int4", 64), "int4 g128 RTN": ("int4", 128),
    "int4 g64 GPTQ": ("int4-gptq", 64), "int4 g128 GPTQ": ("int4-gptq", 128),
}  # fmt: skip


def measure(args) -> dict[str, dict]:
    source = Path(args.checkpoint_path) if args.checkpoint_path else gen.default_checkpoint()
    precision = gen.PRECISIONS[args.precision]
    tokenizer = load_tokenizer(source.parent)
    ids = tokenizer.encode(fetch("lee_background.cor").read_text())[: args.tokens]
    calibration = fetch("botchan.txt")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)  # quantized files go here, beside links to the source checkpoint and its files
        for f in source.parent.iterdir():
            if f.is_file() and not f.name.startswith("model"):
                (work / f.name).symlink_to(f.resolve())
        (work / "model.pth").symlink_to(source.resolve())
        for label in args.schemes:
            scheme = SCHEMES[label]
            t0 = time.perf_counter()
            path = work / "model.pth"
            if scheme is not None:
                mode, groupsize = scheme
                path = Q.quantize_checkpoint(path, mode, groupsize, pad=True, calibration_file=calibration,
                                             calibration_samples=args.calibration_samples,
                                             calibration_seq_length=args.calibration_seq_length,
                                             act_order=args.act_order, device=args.device)  # fmt: skip
            quantize_s = time.perf_counter() - t0
            if label == "bf16":  # weights rounded to bf16, then computed in the chosen precision
                model = gen.load_model(path, args.device, torch.bfloat16).to(precision)
            else:
                model = gen.load_model(path, args.device, torch.float32 if label == "float32" else precision)
            model.setup_caches(1, args.context_length)
            t0 = time.perf_counter()
            ppl = ev.perplexity(model, ids, args.context_length, args.stride, progress=False)
            results[label] = {"ppl": ppl, "weight_mb": gen.model_bytes(model) / 1e6, "quantize_s": quantize_s,
                              "eval_s": time.perf_counter() - t0}  # fmt: skip
            print(f"{label}: perplexity {ppl:.4f} ({results[label]['eval_s']:.0f} s)", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, dict], args) -> bool:
    base = results.get("bf16", results[next(iter(results))])["ppl"]
    print(f"\nSmolLM2-135M-Instruct (packaged Q4_1 GGUF, converted), perplexity on the first {args.tokens} tokens of "
          f"lee_background.cor, context {args.context_length}, stride {args.stride}, {args.device}, compute "
          f"{args.precision} (bf16 row: weights rounded to bf16). GPTQ: botchan.txt, {args.calibration_samples} x "
          f"{args.calibration_seq_length} tokens, act_order={args.act_order}.\n")  # fmt: skip
    print("| scheme | perplexity | vs bf16 | weights as loaded, per token (MB) | quantize time (s) |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% | {r['weight_mb']:.1f} | "
              f"{r['quantize_s']:.0f} |")  # fmt: skip
    ppl = {k: r["ppl"] for k, r in results.items()}
    bars = {  # bar -> (rows it needs, test)
        "int8 within 0.5% of bf16": (("bf16", "int8"), lambda: abs(ppl["int8"] / base - 1) <= 0.005),
        "int4 g32 within 5% of bf16": (("bf16", "int4 g32 RTN"), lambda: abs(ppl["int4 g32 RTN"] / base - 1) <= 0.05),
        "GPTQ g64 better than RTN g64": (("int4 g64 GPTQ", "int4 g64 RTN"), lambda: ppl["int4 g64 GPTQ"] < ppl["int4 g64 RTN"]),
        "GPTQ g128 better than RTN g128": (("int4 g128 GPTQ", "int4 g128 RTN"), lambda: ppl["int4 g128 GPTQ"] < ppl["int4 g128 RTN"]),
    }  # fmt: skip
    print()
    ok = True
    for bar, (rows, test) in bars.items():
        if all(r in ppl for r in rows):
            passed = test()
            ok &= passed
            print(f"- {'pass' if passed else 'FAIL'}: {bar}")
    return ok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, help="default: the packaged SmolLM2, converted once")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens from the start of the text")
    p.add_argument("--context_length", type=int, default=512)
    p.add_argument("--stride", type=int, default=256, help="each scored token has at least context - stride before it")
    p.add_argument("--calibration_samples", type=int, default=32)
    p.add_argument("--calibration_seq_length", type=int, default=512)
    p.add_argument("--act_order", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="float32", choices=sorted(gen.PRECISIONS))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES), metavar="LABEL",
                   help=f"rows to measure (default all): {', '.join(SCHEMES)}")
    args = p.parse_args(argv)
    sys.exit(0 if report(measure(args), args) else 1)


if __name__ == "__main__":
    main()
