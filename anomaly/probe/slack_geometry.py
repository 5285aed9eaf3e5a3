"""CoCA's effective geometry on real weights (docs/conventions.md §5): the slack-geometry
measurement of a model, which the probe runs on slack CoCA models and
``python -m anomaly.coca.geometry`` (:mod:`anomaly.coca.geometry`) runs on any RoPE model.

Two measurements on the query and T contents a model actually produces:

* how far the **slack** score departs from a purely relative one: the same contents at
  the same distance, evaluated at many absolute positions (closed form:
  :func:`anomaly.analytic.slack_position_variation`); reported as the spread over
  positions divided by the mean magnitude of the relative part (0 for strict CoCA and for
  RoPE);
* slack's **effective initial angles**: slack's key content is ``t̃_n``, the coefficient
  ``t_{n,j} ≥ 0`` written into both members of the slice (angle π/4 whatever ``t``), and
  its query content at position ``m`` is ``f(f(q, m) ⊙ q, −m)``; the share of slices whose
  angle from the key's lies in ``(π, 2π)`` is the share of causal triples in case (d).
  Strict's is 0 by construction (both contents real and non-negative).

It lives with the probe because it measures models (it reads their contents with
:func:`anomaly.probe.capture`); :mod:`anomaly.coca` holds only the attention and the HF
drop-in, and imports neither the probe nor :mod:`anomaly.models`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from anomaly import analytic
from anomaly.coca.attention import coca_qk
from anomaly.errors import UserError
from anomaly.probe.activations import LayerCapture, capture
from anomaly.rope import Layout


def slack_relative_spread(
    q: Tensor, t: Tensor, inv_freq: Tensor, *, distance: int, positions: Tensor,
    layout: Layout = "half",
) -> Tensor:
    """Spread of the slack score over absolute positions at a fixed distance, relative to
    the mean magnitude of its relative part.

    Args:
        q, t: ``[..., d]`` query and raw T contents, paired elementwise.
        positions: ``[P]`` key positions ``n`` (the query sits at ``n + distance``).

    Returns:
        ``[...]``.
    """
    var = analytic.slack_position_variation(q, t, distance, positions, inv_freq, layout)
    return var.relative_spread


def slack_case_d_fraction(
    q: Tensor, inv_freq: Tensor, positions: Tensor, layout: Layout = "half"
) -> Tensor:
    """Share of slices of slack's effective query content with initial angle in ``(π, 2π)``.

    Args:
        q: ``[heads, tokens, d]`` pre-RoPE query contents.
        positions: ``[P]`` absolute positions at which the query content is evaluated.

    Returns:
        ``[heads]``: over tokens, positions and slices. Slices whose content is exactly 0
        count as angle 0.
    """
    heads, tokens, d = q.shape
    q_at = q[:, :, None, :].expand(heads, tokens, len(positions), d)  # [heads, tokens, P, d]
    # coca_qk takes [batch, heads, seq, d]: heads play batch, tokens play heads, P is seq.
    ones = torch.ones_like(q_at[:, :1])  # raw t of ones: coefficient 1, key content (1, 1) at angle π/4
    qc, kc = coca_qk(q_at, ones, variant="slack", inv_freq=inv_freq, positions=positions,
                     layout=layout, rotated=False)
    angles = analytic.initial_angle(qc, kc, layout)  # [heads, tokens, P, d/2]
    return (angles > math.pi).double().mean(dim=(1, 2, 3))


@dataclass
class LayerGeometry:
    """Slack CoCA geometry of one layer's real contents."""

    layer: int
    """Layer index."""
    relative_spread: dict[int, list[float]]
    """Per distance: ``[median, 90th percentile]`` over heads and content pairs."""
    case_d_fraction: list[float]
    """Per query head: slack's effective case-(d) share (strict: 0)."""


def measure(
    model, input_ids: Tensor, *, distances: Sequence[int], positions: Tensor, pairs: int = 64,
    seed: int = 0, progress: Callable[[int], None] | None = None,
) -> list[LayerGeometry]:
    """Slack geometry of every layer of ``model`` on ``input_ids [1, seq]``.

    The contents are read with :func:`anomaly.probe.capture`, so the frequencies are the
    ones each layer actually uses (rope scaling included); each layer is measured by
    :func:`measure_layer` (a CoCA model's raw T output, or ``k_proj`` standing in for T).
    ``progress(layer)`` is called after each layer is measured.
    """
    if pairs < 1 or len(positions) == 0:
        raise ValueError("measure needs at least one content pair and one position")
    seq = input_ids.shape[-1]
    if max(distances) >= seq:
        raise ValueError(f"distance {max(distances)} needs more than {seq} tokens of contents")
    cap = capture(model, input_ids)
    if cap.rotary_dim != cap.head_dim:
        raise UserError("CoCA rotates the whole head and this model uses partial rotary "
                        f"({cap.rotary_dim} of {cap.head_dim} dims); pick a model that rotates whole heads")
    g = torch.Generator().manual_seed(seed)
    results = []
    for layer in cap.layers:
        results.append(measure_layer(layer, distances=distances, positions=positions, pairs=pairs, generator=g))
        if progress is not None:
            progress(layer.index)
    return results


def measure_layer(
    layer: LayerCapture, *, distances: Sequence[int], positions: Tensor, pairs: int, generator: torch.Generator
) -> LayerGeometry:
    """Slack geometry of one captured layer (:class:`~anomaly.probe.activations.LayerCapture`).

    Reads the raw query and T projections ``layer.q``/``layer.k`` (in an unconverted model
    ``k_proj`` stands in for T). ``pairs`` random (query, key) content pairs per distance,
    drawn from ``generator``.
    """
    q, t = layer.q.double().cpu(), layer.k.double().cpu()  # [heads, seq, d], [kv, seq, d]
    freqs = layer.inv_freq.double().cpu()
    t = t.repeat_interleave(q.shape[0] // t.shape[0], dim=0)  # [heads, seq, d]
    seq = q.shape[1]
    spread = {}
    for s in distances:
        i = torch.randint(s, seq, (pairs,), generator=generator)  # query tokens
        j = i - s  # their keys' tokens
        rs = slack_relative_spread(q[:, i], t[:, j], freqs, distance=s, positions=positions, layout=layer.layout)
        spread[s] = [rs.median().item(), rs.quantile(0.9).item()]
    tokens = torch.randint(0, seq, (min(pairs, seq),), generator=generator)
    case_d = slack_case_d_fraction(q[:, tokens], freqs, positions[:: max(1, len(positions) // 16)],
                                   layout=layer.layout)
    return LayerGeometry(layer.index, spread, case_d.tolist())


def summarise(layers: list[LayerGeometry]) -> dict:
    """Model-level numbers: per distance, the median over layers of each layer's median
    spread/|relative|, and the mean slack case-(d) share over layers and heads."""
    distances = list(layers[0].relative_spread)
    return {
        "overall_median_spread": {
            s: torch.tensor([r.relative_spread[s][0] for r in layers]).median().item() for s in distances
        },
        "mean_case_d_share": torch.tensor([f for r in layers for f in r.case_d_fraction]).mean().item(),
    }


def spread_bytes(config, pairs: int, positions: int) -> int:
    """Peak memory of :func:`slack_relative_spread` on one layer of a model with this
    (text) config: float64 ``[heads, pairs, ⌈positions/16⌉, head_dim]`` arrays, about four
    of them alive at once (measured), counted as six. ``0`` when the config does not say
    its shape."""
    try:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return heads * pairs * -(-positions // 16) * head_dim * 8 * 6
