"""Speculative decoding: a cheap proposer guesses k tokens, the target checks all of them in one forward.

    python generate.py --draft_checkpoint_path SMALL/model.pth --speculate_k 5 --compile ...
    python generate.py --prompt_lookup 3 --speculate_k 8 --compile ...   # proposals copied from the context

Decoding one token reads all the target's weights; a forward over k+1 tokens reads them once too, so it
costs about the same on a GPU. The proposals come from a small draft model (k decode steps of the draft)
or from prompt lookup (the tokens that followed the latest earlier occurrence of the context's last
n-gram: free, and strong when the output copies the input). The rejection sampling of Leviathan et al.
(2023) / Chen et al. (2023) keeps the target's distribution exactly; with temperature 0 the output is
the target's greedy output token for token. Batch size 1.

Cache bookkeeping: both models hold keys and values for every accepted token but the last one (`cur`,
not fed yet). A step writes slots pos..pos+k; slots past the accepted ones hold rejected tokens, but a
query at slot i only sees slots <= i and the next step rewrites those slots before any query reaches
them, so rewinding after a rejection costs nothing.
"""
import time

import torch
import torch.nn.functional as F
from torch import Tensor

import generate as gen  # sampling helpers (generate.py imports this module lazily, in main)
from model import Transformer


# ----------------------------------------------------------------------------- proposals


def draft_step(draft: Transformer, x: Tensor, input_pos: Tensor, **sampling) -> tuple[Tensor, Tensor]:
    # x: [B, 1] at slot input_pos [1] -> (token [B, 1], probs [B, V]). The draft's own copy of
    # generate.decode_one_token, so the two compile and cache separately.
    return gen.sample(draft(x, input_pos), **sampling)


def propose_with_draft(draft: Transformer, cur: Tensor, pos: int, k: int, **sampling) -> tuple[Tensor, Tensor]:
    # cur: [B, 1] at slot pos -> draft tokens [B, k] and the draft's distributions they were drawn from [B, k, V]
    tokens, probs, x = [], [], cur
    input_pos = torch.tensor([pos], device=cur.device)
    for i in range(k):
        x, q = draft_step(draft, x, input_pos + i, **sampling)
        x, q = x.clone(), q.clone()  # a CUDA graph overwrites its outputs on the next replay
        tokens.append(x)
        probs.append(q)
    return torch.cat(tokens, dim=1), torch.stack(probs, dim=1)


class NgramIndex:
    """Where each n-gram (n = 1..max_n) of a growing token list last occurred, for prompt lookup."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.continuation = {}  # n-gram tuple -> index of the token that followed its latest occurrence
        self.indexed = 0  # n-grams ending before this index are in the table

    def propose(self, seq: list[int], k: int) -> list[int]:
        # seq only grows, so index just the n-grams ending at the new positions; never the one ending at
        # the last token: it is the query and has no continuation yet
        for end in range(self.indexed, len(seq) - 1):
            for n in range(1, min(self.max_n, end + 1) + 1):
                self.continuation[tuple(seq[end - n + 1 : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(seq) - 1)
        for n in range(min(self.max_n, len(seq)), 0, -1):  # the longest match predicts best
            start = self.continuation.get(tuple(seq[-n:]))
            if start is not None:
                guess = seq[start : start + k]
                return guess + guess[-1:] * (k - len(guess))  # pad to the fixed verify shape
        return seq[-1:] * k  # no match: a guess that costs nothing extra (the shape stays fixed)


# ----------------------------------------------------------------------------- verification


def accept(logits: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The target's logits at the k+1 verified slots [B, k+1, V], the k proposals [B, k] and the
    distributions they were drawn from [B, k, V] (None: point masses, as in prompt lookup) -> the number
    of proposals accepted [B] and the token that follows them [B, 1]."""
    B, S, V = logits.shape
    k = S - 1
    idx = draft_tokens.long()
    if temperature <= 0:  # greedy: each distribution is a point mass on its argmax
        p = F.one_hot(logits.argmax(-1), V).float()  # [B, k+1, V]
        q = F.one_hot(idx, V).float()
    else:
        p = gen.logits_to_probs(logits.reshape(B * S, V), temperature, top_k, top_p).view(B, S, V)
        q = F.one_hot(idx, V).float() if draft_probs is None else draft_probs.float()  # [B, k, V]
    p_d = p[:, :k].gather(-1, idx[..., None])[..., 0]  # [B, k]: target's probability of each proposal
    q_d = q.gather(-1, idx[..., None])[..., 0]  # [B, k]: proposer's
    # accept proposal i with probability min(1, p/q), written u * q < p (q > 0: the proposer chose it)
    ok = torch.rand_like(p_d) * q_d < p_d
    n = ok.int().cumprod(dim=-1).sum(dim=-1)  # [B]: proposals accepted before the first rejection
    # After a rejection at slot n the next token comes from the residual max(p - q, 0), renormalised: the
    # mass the proposer under-covers. If all k were accepted, q is zero at the bonus slot, so it is p.
    residual = (p - F.pad(q, (0, 0, 0, 1))).clamp(min=0)  # [B, k+1, V]
    rows = torch.arange(B, device=logits.device)
    residual, p_n = residual[rows, n], p[rows, n]  # [B, V]
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total, p_n)  # total == 0 only by rounding when p == q
    if temperature <= 0:
        return n, residual.argmax(-1, keepdim=True).to(torch.int)
    return n, gen.multinomial_sample_one(residual)


def verify(model: Transformer, cur: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None, input_pos: Tensor,
           **sampling) -> tuple[Tensor, Tensor]:  # fmt: skip
    # cur: [B, 1] last accepted token, draft_tokens: [B, k], input_pos: [k+1] slots pos..pos+k
    # -> (accepted count [B], next token [B, 1]). A fixed shape for a given k: compiled once.
    logits = model(torch.cat([cur, draft_tokens], dim=1), input_pos)  # [B, k+1, V]
    return accept(logits, draft_tokens, draft_probs, **sampling)


def setup_compile(**options) -> None:
    """Compile the verify step and the draft step (CUDA graphs on CUDA); tests pass other options."""
    global verify, draft_step
    options = options or dict(mode="reduce-overhead", fullgraph=True)
    verify = torch.compile(verify, **options)
    draft_step = torch.compile(draft_step, **options)


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, draft: Transformer | None = None,
                         lookup: int = 0, k: int = 5, stop_ids: set[int] | None = None, callback=None,
                         **sampling) -> tuple[list[list[int]], dict]:  # fmt: skip
    """Like generate.generate for one prompt, proposing with `draft` or, if lookup > 0, from n-grams of
    up to `lookup` tokens. Caches need room for prompt + max_new_tokens + k. stats["accepted"][n] counts
    the verify steps that accepted n proposals."""
    if (draft is None) == (lookup <= 0):
        raise ValueError("speculation needs either a draft model or lookup > 0 (not both)")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    need = len(prompt) + max_new_tokens + k
    for m in (model, draft) if draft is not None else (model,):
        if m.max_batch_size < 1 or m.max_seq_length < need:
            raise ValueError(f"speculation needs caches of {need} slots (prompt + new tokens + k), got {m.max_seq_length}")
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's ({model.config.vocab_size})")
    device = model.tok_embeddings.weight.device
    t0 = time.perf_counter()
    ids, input_pos = torch.tensor([prompt], dtype=torch.int, device=device), torch.arange(len(prompt), device=device)
    for m in (model, draft) if draft is not None else (model,):
        m.kv_valid.fill_(True)
    cur = gen.prefill(model, ids, input_pos, **sampling)  # [1, 1]
    if draft is not None:
        draft(ids, input_pos)  # fills the draft's cache; its prediction is not needed
    seq, new = prompt + [int(cur)], [int(cur)]
    if callback is not None:
        callback(cur)
    gen.sync(device)
    ttft = time.perf_counter() - t0
    accepted_counts, index = [0] * (k + 1), NgramIndex(lookup) if lookup > 0 else None
    stopped = bool(stop_ids) and new[0] in stop_ids
    while len(new) < max_new_tokens and not stopped:
        pos = len(seq) - 1  # slot of cur
        if draft is not None:
            proposal, q = propose_with_draft(draft, cur, pos, k, **sampling)
        else:
            proposal, q = torch.tensor([index.propose(seq, k)], dtype=torch.int, device=device), None
        n, nxt = verify(model, cur, proposal, q, torch.arange(pos, pos + k + 1, device=device), **sampling)
        n = int(n[0])  # the one host sync per step
        if draft is not None and n == k:  # the draft never saw its last proposal: feed it so its cache is whole
            # a fresh [1, 1] tensor: dynamo guards on strides, and the slice's stride (k) would recompile
            last = proposal[:, -1:].clone(memory_format=torch.contiguous_format)
            draft_step(draft, last, torch.tensor([pos + k], device=device), **sampling)
        accepted_counts[n] += 1
        cur = nxt.clone()
        for t in proposal[0, :n].tolist() + [int(nxt)]:
            seq.append(t)
            new.append(t)
            if callback is not None:
                callback(torch.tensor([[t]]))
            stopped = bool(stop_ids) and t in stop_ids
            if stopped or len(new) == max_new_tokens:
                break
    gen.sync(device)
    steps = sum(accepted_counts)
    stats = {"ttft": ttft, "time": time.perf_counter() - t0, "decode_steps": len(new), "verify_steps": steps,
             "accepted": accepted_counts, "mean_accepted": sum(i * c for i, c in enumerate(accepted_counts)) / max(steps, 1)}  # fmt: skip
    return [new], stats


def same_vocabulary(target_tokenizer, draft_tokenizer) -> bool:
    # equal tokenizers spell every id the same way; decoding them all at once is one cheap call
    if target_tokenizer.vocab_size != draft_tokenizer.vocab_size:
        return False
    every_id = list(range(target_tokenizer.vocab_size))
    return target_tokenizer.decode(every_id) == draft_tokenizer.decode(every_id)


def acceptance_line(stats: dict, k: int) -> str:
    return (f"speculation: {stats['mean_accepted']:.2f} of {k} proposals accepted per verify step on average "
            f"({stats['mean_accepted'] + 1:.2f} tokens per step over {stats['verify_steps']} "
            f"steps); steps accepting 0..{k}: {stats['accepted']}")  # fmt: skip
