"""Evaluate a checkpoint: token perplexity of a text file (lm-eval tasks: see below).

    python eval.py --checkpoint_path DIR/model.pth --perplexity FILE [--context_length L --stride S]
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import generate as gen


@torch.no_grad()
def perplexity(model, ids: list[int], context_length: int, stride: int, progress: bool = True) -> float:
    """Sliding-window perplexity: windows of context_length tokens start every stride tokens; each token
    is scored once, by the first window that predicts it, with up to context_length - stride tokens of
    context before it. The model needs caches for at least context_length positions."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must be in 1..context_length ({context_length}), got {stride}")
    device = model.tok_embeddings.weight.device
    model.kv_valid.fill_(True)
    nll, count, scored_until = 0.0, 0, 1  # token 0 has no context and is never scored
    starts = range(0, max(len(ids) - 1, 1), stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        window = torch.tensor(ids[begin : begin + context_length], device=device)
        logits = model(window[None], torch.arange(len(window), device=device))[0, :-1].float()
        targets = window[1:]
        first = scored_until - begin - 1  # index into targets of the first token not scored yet
        if first >= len(targets):
            continue
        nll += F.cross_entropy(logits[first:], targets[first:].long(), reduction="sum").item()
        count += len(targets) - first
        scored_until = begin + len(window)
        if scored_until >= len(ids):
            break
    return math.exp(nll / count)
