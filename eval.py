"""Evaluate a checkpoint: EleutherAI lm-eval tasks, or the token perplexity of a text file.

    python eval.py --checkpoint_path DIR/model.pth --tasks hellaswag winogrande --limit 100 --compile
    python eval.py --include_path tasks --tasks botchan --limit 20       # a local task: no hub needed
    python eval.py --checkpoint_path DIR/model.pth --perplexity data/botchan.txt --context_length 1024 --stride 512
    torchrun --standalone --nproc_per_node=2 eval.py --checkpoint_path DIR/model.pth --tasks ...   # sharded (tp.py)

All three kinds of lm-eval request work: loglikelihood (multiple choice), loglikelihood_rolling
(perplexity tasks) and generate_until (generative tasks: stop sequences and a token budget). Scoring is
batched: windows are sorted by length, right-padded (exact for a causal model: padding only follows the
positions we read), and the KV cache is sized to the batch, since attention reads every cache slot.
Under torchrun every rank runs every request on its shard of the model (tensor parallelism, not data
parallelism: lm-eval sees one rank) and rank 0 alone prints and writes the results.
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import Tensor
from tqdm import tqdm

import generate as gen
import tp
from model import ModelArgs, Transformer

Window = tuple[list[int], int]  # (tokens, n): score the last n tokens, each given every token before it


# ----------------------------------------------------------------------------- scoring


def forward(model: Transformer, x: Tensor, input_pos: Tensor) -> Tensor:
    # x: [B, T] -> logits [B, T, V]; setup_compile() swaps in a compiled version
    return model(x, input_pos)


def rolling_windows(ids: list[int], context_length: int, stride: int) -> list[Window]:
    """Windows of at most context_length inputs that score every token of ids[1:] exactly once (ids[0] has
    no context). The first window scores up to context_length tokens; each later one scores the next
    `stride` tokens, filled up to context_length inputs with the tokens before them, so a token sees at
    least context_length - stride + 1 tokens of context (all of them near the start). With stride ==
    context_length - c + 1 these are lm-eval's rolling windows (get_rolling_token_windows, context_len=c)."""
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must be in 1..context_length ({context_length}), got {stride}")
    windows, done = [], 1  # ids[:done] are scored (or are the unscored first token)
    while done < len(ids):
        end = min(len(ids), done + (context_length if done == 1 else stride))
        windows.append((ids[max(0, end - 1 - context_length) : end], end - done))
        done = end
    return windows


def fit_cache(model: Transformer, rows: int, length: int) -> None:
    # Attention reads every slot of the cache, so a cache much longer than the work wastes time: size it
    # to the batch, rounded up to a power of two so a run of batches rebuilds it (and recompiles) rarely.
    size = max(256, 1 << (length - 1).bit_length())
    if (model.max_batch_size, model.max_seq_length) != (rows, size):
        model.setup_caches(rows, size)


@torch.no_grad()
def score(model: Transformer, windows: list[Window], batch_size: int = 8, progress: bool = False,
          desc: str = "scoring") -> list[tuple[float, bool]]:  # fmt: skip
    """(sum of log-probabilities of the scored tokens, whether greedy decoding gives exactly them) per
    window. Windows with the same inputs share one row (the choices of a multiple-choice question whose
    answers are one token long); rows go in batches of batch_size, longest first, and the model's caches
    are resized to each batch."""
    device = model.tok_embeddings.weight.device
    by_inputs = defaultdict(list)  # inputs (all tokens but the last) -> indices of the windows they serve
    for i, (tokens, n) in enumerate(windows):
        if not 0 < n < len(tokens):
            raise ValueError(f"cannot score {n} of {len(tokens)} tokens: each needs a token before it")
        by_inputs[tuple(tokens[:-1])].append(i)
    inputs = sorted(by_inputs, key=len, reverse=True)
    results: list = [None] * len(windows)
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = inputs[start : start + batch_size]
        T = len(batch[0])
        fit_cache(model, len(batch), T)
        model.kv_valid.fill_(True)  # right padding needs no mask: no real position ever looks at a later one
        x = torch.zeros((len(batch), T), dtype=torch.int)
        for r, row in enumerate(batch):
            x[r, : len(row)] = torch.tensor(row)
        logits = forward(model, x.to(device), torch.arange(T, device=device))  # [B, T, V]
        served, sums, greedy = [], [], []
        for r, row in enumerate(batch):
            longest = max(windows[i][1] for i in by_inputs[row])
            row_logprobs = logits[r, len(row) - longest : len(row)].float().log_softmax(-1)  # [longest, V]
            for i in by_inputs[row]:
                tokens, n = windows[i]
                logprobs, target = row_logprobs[longest - n :], torch.tensor(tokens[-n:], device=device)
                served.append(i)
                sums.append(logprobs.gather(-1, target[:, None]).sum())
                greedy.append((logprobs.argmax(-1) == target).all())
        for i, s, g in zip(served, torch.stack(sums).tolist(), torch.stack(greedy).tolist()):
            results[i] = (s, g)
    return results


def perplexity(model, ids: list[int], context_length: int, stride: int, progress: bool = True,
               batch_size: int = 8) -> float:  # fmt: skip
    """Token perplexity of ids over rolling_windows(ids, context_length, stride): every token but the first
    is scored once. Sets up the model's caches itself (see score)."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    scores = score(model, rolling_windows(ids, context_length, stride), batch_size, progress, desc="perplexity")
    return math.exp(-sum(s for s, _ in scores) / (len(ids) - 1))


# ----------------------------------------------------------------------------- lm-eval model


class _AllStopped(Exception):
    """Raised by the generate_until callback once every row has met a stop sequence."""


@register_model("fastgen")
class FastGenLM(TemplateLM):
    """A loaded Transformer + tokenizer as an lm-eval model. Tokenization, truncation, the bos/prefix token
    and the stop rules follow lm-eval's own HF backend, so results are comparable with `--model hf`.
    Usable as `lm_eval --model fastgen --model_args checkpoint_path=...` once this module is imported."""

    def __init__(self, checkpoint_path: str | None = None, device: str | None = None, precision: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, compile: bool = False,
                 model: Transformer | None = None, tokenizer=None, max_batch_size: int | None = None):  # fmt: skip
        super().__init__()
        if model is None:
            from tokenizer import load_tokenizer

            path = Path(checkpoint_path) if checkpoint_path else gen.default_checkpoint()
            device = device or gen.default_device()
            dtype = gen.PRECISIONS[precision] if precision else torch.float32 if device == "cpu" else torch.bfloat16
            model, tokenizer = gen.load_model(path, device, dtype), load_tokenizer(path.parent)
        if tokenizer.bos_id is None and tokenizer.eos_id is None:
            raise ValueError("lm-eval conditions the first token on bos or eos; this tokenizer has neither")
        self.model, self.tokenizer = model, tokenizer
        self._device = model.tok_embeddings.weight.device
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.block_size)
        if compile:
            setup_compile()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context and the first rolling window condition on: bos, else eos (as lm-eval's HF)
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:  # fmt: skip
        # None: the tokenizer's own bos rule, unless the text already starts with the prefix token
        bos = None if add_special_tokens is None or add_special_tokens else False
        prefix = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and prefix and string.startswith(prefix):
            bos = False
        ids = self.tokenizer.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        special = set(self.tokenizer.special.values()) if skip_special_tokens else ()
        return self.tokenizer.decode([t for t in tokens if t not in special])

    def _score(self, windows: list[Window], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        return score(self.model, windows, self.batch_size, not disable_tqdm, desc)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests: [((context, continuation), context ids, continuation ids)], tokenized by TemplateLM
        windows = []
        for _, context, continuation in requests:
            if not 0 < len(continuation) <= self._max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation)} tokens in {self._max_length}")
            # too long: keep the last max_length inputs, as lm-eval's HF backend does
            windows.append(((context + continuation)[-(self._max_length + 1) :], len(continuation)))
        results = self._score(windows, "loglikelihood", disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # perplexity()'s windows with stride = max_length: every token once, after the prefix token
        windows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            doc = rolling_windows([self.prefix_token_id] + self.tok_encode(text), self._max_length, self._max_length)
            windows += doc
            owner += [k] * len(doc)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[k] += logprob
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        groups = defaultdict(list)  # one batch stream per distinct set of generation kwargs
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        pbar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        eos_text = self.tokenizer.decode([self.eot_token_id])
        for idxs in groups.values():
            kwargs = normalize_gen_kwargs(requests[idxs[0]].args[1], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos_text) if s]
            budget = kwargs.pop("max_gen_toks")
            sampling = self._sampling(kwargs)
            if budget >= self._max_length:
                raise ValueError(f"max_gen_toks {budget} leaves no room for a prompt in max_length {self._max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self._max_length - budget) or
                       [self.prefix_token_id] for i in idxs}  # fmt: skip
            order = sorted(idxs, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([prompts[i] for i in chunk], budget, until, sampling)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(len(chunk))
        pbar.close()
        return results

    def _generate(self, prompts: list[list[int]], budget: int, until: list[str], sampling: dict) -> list[str]:
        stop_ids = self.tokenizer.stop_ids
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)

        def watch(token: Tensor) -> None:  # token: [B, 1], the newest token of every row
            for r, t in enumerate(token[:, 0].tolist()):
                if not done[r]:
                    rows[r].append(t)
                    done[r] = t in stop_ids or any(s in self.tok_decode(rows[r]) for s in until)
            if all(done):
                raise _AllStopped

        fit_cache(self.model, len(prompts), max(len(p) for p in prompts) + budget)
        try:
            gen.generate(self.model, prompts, budget, stop_ids=stop_ids, callback=watch,
                         pad_id=self.tokenizer.eos_id or 0, **sampling)  # fmt: skip
        except _AllStopped:
            pass
        texts = []
        for row in rows:
            row = row[:-1] if row and row[-1] in stop_ids else row
            # special tokens dropped and the text cut at the first stop sequence, as lm-eval's HF backend does
            texts.append(postprocess_generated_text(self.tok_decode(row), until, None))
        return texts

    @staticmethod
    def _sampling(kwargs: dict) -> dict:
        do_sample, temperature = kwargs.pop("do_sample", False), kwargs.pop("temperature", None)
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            print(f"warning: generation arguments {sorted(kwargs)} are not supported and are ignored", file=sys.stderr)
        if not do_sample or temperature is not None and float(temperature) <= 0:
            return {"temperature": 0.0}
        return {"temperature": 1.0 if temperature is None else float(temperature),
                "top_k": int(top_k) if top_k else None, "top_p": float(top_p) if top_p is not None else None}  # fmt: skip


_compiled = False


def setup_compile(backend: str = "inductor") -> None:
    """Compile the scoring forward and generate.py's decode step. Windows vary in length and caches are
    resized to each batch, so shapes are dynamic, cache buffers included (else every size recompiles)."""
    global forward, _compiled
    if _compiled:
        return
    import torch._dynamo.config as dynamo_config

    dynamo_config.force_parameter_static_shapes = False
    dynamo_config.recompile_limit = 64  # one graph per cache length; a batch of one row or a window as long
    # as the cache may specialize once more (model.max_seq_length is a Python int, so it is a constant)
    gen.setup_compile(compile_decode=True, compile_prefill=False)
    forward = torch.compile(forward, backend=backend, dynamic=True, fullgraph=True)
    _compiled = True


# ----------------------------------------------------------------------------- tasks

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' loaders of local files


def tasks_are_local(names: list[str], include_path: Path | None) -> bool:
    """Whether every name is a task or tag of include_path's YAMLs whose data are local files. Read before
    lm-eval (and with it datasets and huggingface_hub) is imported, so offline mode can still be set."""
    import yaml

    class Loader(yaml.SafeLoader):  # task YAMLs may hold `!function module.name` tags
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    local: dict[str, bool] = {}
    for path in sorted(include_path.rglob("*.yaml")) if include_path else []:
        try:
            cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
            continue  # groups are not followed
        tags = cfg.get("tag") or []
        is_local = cfg.get("dataset_path") in LOCAL_BUILDERS or Path(str(cfg.get("dataset_path"))).is_dir()
        for name in [cfg["task"], *([tags] if isinstance(tags, str) else tags)]:
            local[name] = local.get(name, True) and is_local
    return all(local.get(name, False) for name in names)


def evaluate_tasks(lm: FastGenLM, args, task_manager) -> dict:
    from lm_eval import evaluator

    try:
        results = evaluator.simple_evaluate(
            model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=task_manager,
            log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )  # fmt: skip
    except ConnectionError as e:  # datasets could not fetch a hub dataset
        raise gen.UserError(f"{e}; with no network, run local tasks (--include_path, see tasks/README.md)") from e
    if results is None:  # under torchrun lm-eval returns the results on LOCAL_RANK 0 only
        return {}
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return results


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint with lm-eval tasks or text perplexity.")
    p.add_argument("--checkpoint_path", type=Path, default=None, help="model.pth (default: the packaged SmolLM2)")
    p.add_argument("--tasks", nargs="+", help="lm-eval task, group or tag names")
    p.add_argument("--include_path", type=Path, help="a folder of extra task YAMLs (e.g. tasks/)")
    p.add_argument("--limit", type=float, help="examples per task (a fraction if below 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward (long windows: lower it)")
    p.add_argument("--max_length", type=int, default=None, help="context for scoring (default: the model's)")
    p.add_argument("--log_samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--perplexity", type=Path, help="a text file: report its token perplexity")
    p.add_argument("--context_length", type=int, default=None, help="perplexity window (default: min(model, 2048))")
    p.add_argument("--stride", type=int, default=None, help="new tokens per window (default: context_length // 2)")
    p.add_argument("--compile", action="store_true", help="compile the scoring forward and the decode step")
    p.add_argument("--output_path", type=Path, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", type=str, default=gen.default_device())
    p.add_argument("--precision", type=str, default=None, choices=sorted(gen.PRECISIONS),
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.tasks and args.perplexity is None:
        p.error("give --tasks and/or --perplexity")
    if args.limit is not None:
        if args.limit <= 0:
            p.error("--limit must be positive")
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    for name in ("batch_size", "max_length", "context_length", "stride"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.stride and args.context_length and args.stride > args.context_length:
        p.error("--stride must not exceed --context_length")
    return args


def environment(device: torch.device) -> dict:
    from importlib.metadata import version

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {"python": platform.python_version(), "torch": torch.__version__, "lm_eval": version("lm_eval"),
            "cuda": torch.version.cuda, "device_name": name}  # fmt: skip


def write_json(path: Path, data: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> None:
    args = parse_args(argv)
    args.device = tp.setup(args.device)  # torchrun: the same requests on every rank, output from rank 0
    # check every input before the (slow) model load
    if args.include_path is not None and not args.include_path.is_dir():
        raise gen.UserError(f"--include_path {args.include_path} is not a folder")
    if args.perplexity is not None and not args.perplexity.is_file():
        raise gen.UserError(f"text file {args.perplexity} does not exist")
    if args.output_path is not None and (args.output_path.is_dir() or not args.output_path.parent.is_dir()):
        raise gen.UserError(f"--output_path {args.output_path} must be a file in an existing folder")
    task_manager = None
    if args.tasks:
        local = tasks_are_local(args.tasks, args.include_path)
        if local:  # nothing to fetch: never wait on the hub (the user's own settings win)
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from lm_eval.tasks import TaskManager

        include = str(args.include_path) if args.include_path else None
        task_manager = TaskManager(include_path=include, include_defaults=not local)  # the full index takes ~20 s
        unknown = [t for t in args.tasks if t not in task_manager.all_tasks]
        if unknown:
            where = f" or in {args.include_path}" if args.include_path else " (local tasks: --include_path DIR)"
            raise gen.UserError(f"unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")

    checkpoint_path = args.checkpoint_path or gen.default_checkpoint()
    t0 = time.perf_counter()
    lm = FastGenLM(checkpoint_path=str(checkpoint_path), device=args.device, precision=args.precision,
                   batch_size=args.batch_size, max_length=args.max_length, compile=args.compile)  # fmt: skip
    print(f"loaded {checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    out = {}
    if args.tasks:
        out = evaluate_tasks(lm, args, task_manager)
    if args.perplexity is not None:
        ids = lm.tokenizer.encode(args.perplexity.read_text(encoding="utf-8"))
        L = args.context_length or min(lm.max_length, 2048)
        stride = args.stride or max(1, L // 2)
        if stride > L:
            raise gen.UserError(f"--stride {stride} exceeds --context_length {L}")
        if len(ids) < 2:
            raise gen.UserError(f"{args.perplexity} has fewer than two tokens")
        t0 = time.perf_counter()
        ppl = perplexity(lm.model, ids, L, stride, batch_size=args.batch_size)
        print(f"perplexity {ppl:.4f} over {len(ids) - 1} tokens of {args.perplexity} "
              f"(context {L}, stride {stride}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        out["perplexity"] = {"file": str(args.perplexity), "perplexity": ppl, "tokens": len(ids) - 1,
                             "context_length": L, "stride": stride}  # fmt: skip
    if args.output_path is not None:
        config = ModelArgs.from_hf_config(gen.read_config(checkpoint_path))  # whole: a rank's model holds a shard
        out["fastgen"] = {"model": "fastgen", "checkpoint": str(checkpoint_path), "config": vars(config),
                          "device": str(lm.device), "dtype": str(lm.model.tok_embeddings.weight.dtype),
                          "batch_size": args.batch_size, "max_length": lm.max_length, "compile": args.compile,
                          "tensor_parallel": tp.world_size(),  # ranks the model was sharded over
                          "versions": environment(lm.device)}  # fmt: skip
        if tp.rank() == 0:
            write_json(args.output_path, out)
            print(f"wrote {args.output_path}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
        tp.teardown()  # torchrun: every rank, after a run that ended well (see tp.teardown)
    except (gen.UserError, ValueError, FileNotFoundError, KeyError) as e:  # every rank: the same bad input
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        sys.stderr = sys.__stderr__  # a crash on any rank (torch prefixes the traceback with [rankN])
        raise
