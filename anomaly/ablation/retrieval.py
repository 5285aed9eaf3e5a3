"""Where a trained model looks when it answers a passkey prompt: its retrieval head.

For each query that predicts a passkey digit (the answer token before digit ``j``), the
attention it pays to the *matching* digit of the key sentence (digit ``j``, in either of
the sentence's two copies) is the signature of copying; the attention it pays to the key
sentence as a whole shows where the head looks. The **retrieval head** of a model is the
(layer, head) whose mean matching-digit attention is largest at the training length, over
prompts with the key sentence at every evaluation depth. Its attention is then followed
across the evaluation lengths, so a reader can see whether RoPE's and CoCA's retrieval
rest on the same mechanism and where it fails past ``T``.

Attention probabilities come from the model's eager attention (``output_attentions``),
one prompt at a time (an ``L × L`` map per head).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from anomaly.ablation.config import AblationConfig
from anomaly.ablation.evaluate import passkey_prompts
from anomaly.ablation.passkey import PasskeyPrompt, PasskeyTask


@torch.no_grad()
def _attention_masses(model: torch.nn.Module, task: PasskeyTask, prompt: PasskeyPrompt,
                      reset: Callable[[], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one prompt: ``[layer, head]`` mean attention of the digit-predicting queries on
    their matching digit and on the key sentence, and ``[layer, head, digit, L]`` rows."""
    device = next(model.parameters()).device
    x = torch.tensor([prompt.prompt + prompt.answer], device=device)  # [1, L]
    reset()
    attn = torch.stack(model(input_ids=x, output_attentions=True).attentions)[:, 0].float()  # [layers, H, L, L]
    L, a = x.shape[1], len(prompt.answer)
    answer = x[0, -a:]
    digit_at = torch.nonzero(task.digit_mask(answer)).flatten().tolist()  # answer indices of the digits
    queries = [L - a - 1 + j for j in digit_at]  # the position before each digit predicts it
    start, end = prompt.key_span
    rows = attn[:, :, queries, :]  # [layers, H, digits, L]
    # The key sentence states the passkey twice: digit i sits at copy_start + i in each copy.
    key_digits = start + torch.nonzero(task.digit_mask(x[0, start:end])).flatten()  # [2 · digits]
    copies = key_digits.view(-1, len(queries))  # [2, digits]
    matching = torch.stack([rows[:, :, i, copies[:, i]].sum(-1) for i in range(len(queries))], -1)  # [layers, H, digits]
    on_key = rows[..., start:end].sum(-1)  # [layers, H, digits]
    return matching.mean(-1).cpu().numpy(), on_key.mean(-1).cpu().numpy(), rows.cpu().numpy()


def retrieval_attention(
    model: torch.nn.Module,
    config: AblationConfig,
    task: PasskeyTask,
    samples: int,
    reset: Callable[[], None] = lambda: None,
) -> dict:
    """The retrieval head of ``model`` and its attention at every evaluation length.

    Args:
        samples: prompts per (length, depth); the prompts are the first ``samples`` of the
            evaluation's (:func:`anomaly.ablation.evaluate.passkey_prompts`).
        reset: called before every forward pass (rebuilds the rotary module).

    Returns:
        JSON-ready dict: ``head`` ``[layer, head]``; ``matching_by_head`` ``[layer][head]``
        at ``T``; per evaluation length the retrieval head's mean attention on the matching
        digit (``matching``) and on the key sentence (``on_key``); and ``example``, the head's
        attention rows of the digit-predicting queries ``[digit][position]`` for one prompt
        at ``T`` (key sentence at the middle depth) with the key sentence's span.
    """
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        per_length = []
        for length in config.eval_lengths:
            prompts = [p for d in config.eval.depths
                       for p in passkey_prompts(task, length, d, samples, config.eval_seed)]
            per_length.append([(p, *_attention_masses(model, task, p, reset)) for p in prompts])
    finally:
        model.set_attn_implementation(impl)
    at_T = np.mean([m for _, m, _, _ in per_length[0]], axis=0)  # [layers, H]
    layer, head = (int(i) for i in np.unravel_index(np.argmax(at_T), at_T.shape))
    # The example: the first prompt at T with the key sentence at the middle depth.
    example_prompt, _, _, rows = per_length[0][len(config.eval.depths) // 2 * samples]
    return {
        "head": [layer, head],
        "matching_by_head": at_T.tolist(),
        "lengths": config.eval_lengths,
        "matching": [float(np.mean([m[layer, head] for _, m, _, _ in r])) for r in per_length],
        "on_key": [float(np.mean([k[layer, head] for _, _, k, _ in r])) for r in per_length],
        "prompts_per_length": len(per_length[0]),
        "example": {"rows": rows[layer, head].tolist(), "key_span": list(example_prompt.key_span),
                    "length": config.eval_lengths[0]},
    }
