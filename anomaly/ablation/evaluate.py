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
the answer, with the key sentence at each of the configured depths. A prompt counts as
retrieved when greedy decoding would reproduce the answer exactly, which is checked in one
teacher-forced forward pass: the answer is retrieved exactly when every answer token is
the arg-max of the model's prediction given the true tokens before it (if all are, greedy
decoding reproduces them one by one; if one is not, greedy decoding departs there). The
same pass gives the *digit loss*, the mean negative log-likelihood of the passkey's digit
tokens (ln 10 ≈ 2.30 nats: guessing), which shows partial retrieval where exact match is
0. Prompts depend only on ``eval_seed``, ``L`` and the depth: every variant, seed and
scaling is asked the same questions.

HF's dynamic NTK keeps the largest length it has seen and only resets below ``T``, so the
rotary module is rebuilt (fresh state) before every forward pass here. With teacher forcing
the whole window of ``L`` tokens is encoded at once, so every position uses the
frequencies dynamic NTK picks for length ``L`` (incremental decoding would instead grow
them with the sequence while cached keys keep theirs).
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
from anomaly.replication import ppl_of
from anomaly.ablation.passkey import PasskeyPrompt, PasskeyTask
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
) -> np.ndarray:
    """Sliding-window negative log-likelihood at window ``length``.

    Returns:
        ``float64[len(segments)]``: each segment's mean NLL (nats per token) over its
        ``stride − 1`` scored tokens. The perplexity is ``exp`` of their mean (every segment
        scores the same number of tokens).
    """
    device = next(model.parameters()).device
    windows = torch.stack([held_out[name][end - length : end] for name, end in segments])  # [n, L]
    per_batch = max(1, batch_tokens // length)
    out = []
    for i in range(0, len(windows), per_batch):
        x = windows[i : i + per_batch].to(device)  # [b, L]
        reset()
        logits = model(input_ids=x, logits_to_keep=stride).logits.float()  # [b, S, V]
        # Logit at position p predicts token p+1: keep the S-1 targets inside the segment.
        targets = x[:, -(stride - 1) :]  # [b, S-1]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # [b, S-1]
        out.append(nll.double().mean(-1).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def passkey_scores(
    model: torch.nn.Module,
    task: PasskeyTask,
    prompts: list[PasskeyPrompt],
    batch_tokens: int,
    reset: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact retrieval and digit loss of each prompt (teacher forcing; module docstring).

    ``prompts`` must share one length. Returns ``bool[n]`` (greedy decoding reproduces the
    answer) and ``float64[n]`` (mean NLL of the passkey's digit tokens, nats).
    """
    device = next(model.parameters()).device
    n_answer = len(prompts[0].answer)
    per_batch = max(1, batch_tokens // (len(prompts[0].prompt) + n_answer))
    exact, digit_nll = [], []
    for i in range(0, len(prompts), per_batch):
        chunk = prompts[i : i + per_batch]
        x = torch.tensor([p.prompt + p.answer for p in chunk], device=device)  # [b, L]
        reset()
        # Positions L−a−1 … L−2 predict the a answer tokens.
        logits = model(input_ids=x, logits_to_keep=n_answer + 1).logits[:, :-1].float()  # [b, a, V]
        answer = x[:, -n_answer:]  # [b, a]
        exact.append((logits.argmax(-1) == answer).all(-1).cpu())
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), answer, reduction="none")  # [b, a]
        digits = task.digit_mask(answer).to(device)  # [b, a]
        digit_nll.append(((nll * digits).sum(-1) / digits.sum(-1)).double().cpu())
    return torch.cat(exact).numpy(), torch.cat(digit_nll).numpy()


def passkey_prompts(task: PasskeyTask, length: int, depth: float, samples: int, seed: int) -> list[PasskeyPrompt]:
    """``samples`` prompts of ``length`` tokens with the key sentence at ``depth``
    (random passkeys; deterministic in ``seed``, ``length`` and ``depth``)."""
    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    return [task.build(length, int(rng.integers(10000, 100000)), depth) for _ in range(samples)]


def validation_prompts(config: AblationConfig, task: PasskeyTask) -> list[PasskeyPrompt]:
    """The validation prompts: ``val_prompts`` at the training length, random depths,
    from ``val_seed`` (never the evaluation prompts' seed)."""
    rng = np.random.default_rng([config.val_seed, config.data.train_length])
    return [task.sample(config.data.train_length, rng) for _ in range(config.train.val_prompts)]


def validator(config: AblationConfig, task: PasskeyTask) -> Callable[[torch.nn.Module], dict]:
    """The validation that training runs every ``val_every`` steps, the same for the ablation
    and the learning-rate sweep: a model → its mean ``exact`` match and ``digit_nll`` on the
    :func:`validation_prompts` (drawn once, here)."""
    prompts = validation_prompts(config, task)

    def validate(model: torch.nn.Module) -> dict:
        exact, digit_nll = passkey_scores(model.eval(), task, prompts, config.eval.batch_tokens)
        return {"digit_nll": float(digit_nll.mean()), "exact": float(exact.mean())}

    return validate


@dataclass
class ScalingResult:
    """One model under one scaling, at every evaluation length."""

    ppl: list[float]
    """Perplexity per evaluation length."""
    nll: list[float]
    """Mean negative log-likelihood (nats per token) per evaluation length."""
    passkey: list[float]
    """Exact passkey retrieval rate per evaluation length (over all depths)."""
    digit_nll: list[float]
    """Mean digit loss (nats) per evaluation length (over all depths)."""
    segment_nll: list[list[float]]
    """``[length][segment]``: each scored segment's mean NLL, for intervals."""
    passkey_exact: list[list[list[bool]]]
    """``[length][depth][prompt]``: whether each prompt was retrieved."""
    passkey_digit_nll: list[list[list[float]]]
    """``[length][depth][prompt]``: each prompt's digit loss."""
    depths: list[float]
    """The depths of the second axis."""
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
    """Perplexity and passkey retrieval of ``model`` under ``scaling`` at every length and
    depth."""
    start = time.perf_counter()
    model.eval()
    ev, lengths = config.eval, config.eval_lengths
    segments = segment_ends(held_out, ev.ppl_segments, max(lengths), config.stride)

    def reset() -> None:
        set_scaling(model, config, scaling)

    res = ScalingResult(ppl=[], nll=[], passkey=[], digit_nll=[], segment_nll=[], passkey_exact=[],
                        passkey_digit_nll=[], depths=list(ev.depths))
    for length in lengths:
        seg = perplexity(model, held_out, segments, length, config.stride, ev.batch_tokens, reset)
        res.segment_nll.append(seg.tolist())
        res.nll.append(float(seg.mean()))
        res.ppl.append(ppl_of(res.nll[-1]))
        exact, digits = [], []
        for depth in ev.depths:
            prompts = passkey_prompts(task, length, depth, ev.passkey_samples, config.eval_seed)
            e, d = passkey_scores(model, task, prompts, ev.batch_tokens, reset)
            exact.append(e.tolist())
            digits.append(d.tolist())
        res.passkey_exact.append(exact)
        res.passkey_digit_nll.append(digits)
        res.passkey.append(float(np.mean(exact)))
        res.digit_nll.append(float(np.mean(digits)))
        log(f"  {scaling:>6} L={length:>5}: ppl {res.ppl[-1]:10.2f}  passkey {res.passkey[-1]:.2f}  "
            f"digit loss {res.digit_nll[-1]:.2f}")
    set_scaling(model, config, "none")
    res.seconds = time.perf_counter() - start
    res.extra = {"segments": [list(s) for s in segments], "passkey_samples": ev.passkey_samples}
    return res
