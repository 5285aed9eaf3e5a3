"""Evaluation of a trained ablation model: sliding-window perplexity and passkey accuracy.

Both are measured at each evaluation length (multiples of the training length ``T``) and
under each RoPE scaling: none, and HF's dynamic NTK (``rope_type="dynamic"``) with factor
2, 4 and 8 and original length ``T``. Dynamic NTK leaves lengths ≤ ``T`` untouched, so at
1× every scaling gives the same number.

**Perplexity** follows the paper's sliding-window protocol with its stride scaled to our
lengths (the paper: stride 512 at training length 512; here stride ``T``). Each scored
segment is ``stride`` tokens of a held-out play; at length ``L`` it is scored by the window
of ``L`` tokens that ends with it, so its tokens see between ``L − stride`` and ``L`` tokens
of context. The same segments are scored at every length (their ends lie at least the
largest evaluation length into their play), so lengths differ only in the context. The
segment's first token is not scored (at 1× it has no context).

**Passkey** prompts (:mod:`anomaly.ablation.passkey`) have exactly ``L`` tokens including
the answer; the answer's tokens are generated greedily with HF ``generate`` (KV cache) and
the sample counts as correct when they contain the passkey. Prompts depend only on
``eval_seed`` and ``L``: every variant and scaling is asked the same questions.

HF's dynamic NTK keeps the largest length it has seen and only resets below ``T``, so the
rotary module is rebuilt (fresh state) before every forward pass or generation here; during
generation the frequencies grow with the sequence as in HF (cached keys keep theirs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from anomaly.ablation.config import AblationConfig
from anomaly.ablation.data import EOS
from anomaly.ablation.passkey import PasskeyTask
from anomaly.ablation.train import rope_parameters


def set_scaling(model: torch.nn.Module, config: AblationConfig, scaling: str) -> None:
    """Apply ``scaling`` to ``model`` with a freshly built rotary module (fresh dynamic state)."""
    from anomaly.coca import set_rope_parameters

    set_rope_parameters(model, rope_parameters(config, scaling))


def segment_ends(held_out: dict[str, Tensor], n: int, max_length: int, stride: int) -> list[tuple[str, int]]:
    """``n`` scored segments ``(play, end)``, spread evenly over the held-out plays.

    Every end is at least ``max_length`` tokens into its play, so the window of any
    evaluation length fits; segments of one play do not overlap.
    """
    names = sorted(held_out)
    per_doc = math.ceil(n / len(names))
    candidates = []
    for name in names:
        size = len(held_out[name])
        if size < max_length:
            continue
        k = min(per_doc, (size - max_length) // stride + 1)
        ends = np.linspace(max_length, size, k).astype(int) if k > 1 else np.array([max_length])
        ends = max_length + ((ends - max_length) // stride) * stride  # non-overlapping
        candidates.append([(name, int(e)) for e in ends])
    # Round-robin over plays, so a small n still samples several plays.
    out = [c[i] for i in range(per_doc) for c in candidates if i < len(c)][:n]
    if len(out) < n:
        raise ValueError(f"held-out plays hold only {len(out)} segments of {max_length} tokens; need {n}")
    return out


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    held_out: dict[str, Tensor],
    segments: list[tuple[str, int]],
    length: int,
    stride: int,
    batch_tokens: int,
    reset: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """Sliding-window perplexity at window ``length``.

    Returns:
        ``(perplexity, mean negative log-likelihood in nats)`` over the scored tokens.
    """
    device = next(model.parameters()).device
    windows = torch.stack([held_out[name][end - length : end] for name, end in segments])  # [n, L]
    per_batch = max(1, batch_tokens // length)
    total, count = 0.0, 0
    for i in range(0, len(windows), per_batch):
        x = windows[i : i + per_batch].to(device)  # [b, L]
        reset()
        logits = model(input_ids=x, logits_to_keep=stride).logits.float()  # [b, S, V]
        # Logit at position p predicts token p+1: keep the S-1 targets inside the segment.
        targets = x[:, -(stride - 1) :]  # [b, S-1]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += targets.numel()
    mean = total / count
    return math.exp(mean) if mean < 700 else math.inf, mean


@torch.no_grad()
def passkey_accuracy(
    model: torch.nn.Module,
    task: PasskeyTask,
    length: int,
    samples: int,
    seed: int,
    batch_tokens: int,
    reset: Callable[[], None] = lambda: None,
) -> float:
    """Share of ``samples`` passkey prompts of ``length`` tokens answered correctly."""
    device = next(model.parameters()).device
    rng = np.random.default_rng([seed, length])
    prompts = [task.sample(length, rng) for _ in range(samples)]
    per_batch = max(1, batch_tokens // length)
    correct = 0
    for i in range(0, samples, per_batch):
        chunk = prompts[i : i + per_batch]
        x = torch.tensor([p.prompt for p in chunk], device=device)  # [b, L - answer]
        reset()
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=len(chunk[0].answer),
            do_sample=False,
            pad_token_id=EOS,
            eos_token_id=None,
        )
        for p, row in zip(chunk, out[:, x.shape[1] :].tolist()):
            correct += task.is_correct(row, p.passkey)
    return correct / samples


@dataclass
class ScalingResult:
    """One model under one scaling, at every evaluation length."""

    ppl: list[float]
    """Perplexity per evaluation length."""
    nll: list[float]
    """Mean negative log-likelihood (nats per token) per evaluation length."""
    passkey: list[float]
    """Passkey accuracy per evaluation length."""
    seconds: float = 0.0
    """Wall time of this evaluation."""
    extra: dict = field(default_factory=dict)
    """Anything else (segments used, samples)."""


def evaluate_scaling(
    model: torch.nn.Module,
    config: AblationConfig,
    scaling: str,
    held_out: dict[str, Tensor],
    task: PasskeyTask,
    log: Callable[[str], None] = print,
) -> ScalingResult:
    """Perplexity and passkey accuracy of ``model`` under ``scaling`` at every length."""
    start = time.perf_counter()
    model.eval()
    ev, lengths = config.eval, config.eval_lengths
    segments = segment_ends(held_out, ev.ppl_segments, max(lengths), config.stride)

    def reset() -> None:
        set_scaling(model, config, scaling)

    res = ScalingResult(ppl=[], nll=[], passkey=[])
    for length in lengths:
        ppl, nll = perplexity(model, held_out, segments, length, config.stride, ev.batch_tokens, reset)
        acc = passkey_accuracy(model, task, length, ev.passkey_samples, config.eval_seed, ev.batch_tokens, reset)
        res.ppl.append(ppl)
        res.nll.append(nll)
        res.passkey.append(acc)
        log(f"  {scaling:>6} L={length:>5}: ppl {ppl:10.2f}  passkey {acc:.2f}")
    set_scaling(model, config, "none")
    res.seconds = time.perf_counter() - start
    res.extra = {"segments": [list(s) for s in segments], "passkey_samples": ev.passkey_samples}
    return res
