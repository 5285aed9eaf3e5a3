"""Anomalous fractions of the trained ablation models, from their *effective* geometry.

Measured by the probe (:func:`anomaly.probe.probe`): for the ``rope`` model the geometry
is the pre-RoPE query and key; for a CoCA model it is CoCA's effective query and key
content (:mod:`anomaly.probe.coca`), the vectors whose RoPE rotation gives the per-token
q′/k′ whose dot product is the score (docs/conventions.md §5). Strict CoCA makes every
slice of q′ and k′ a non-negative real number, so its initial angle is 0 everywhere and its
anomalous fraction is exactly 0 (float64 rounding of those zeros is absorbed by the
probe's zero-angle tolerance); slack CoCA's query content depends on the query's absolute
position.

The fraction of a head is the share of causal (m > n) triples (query m, key n, slice j)
in case (d), ``Θ_j(m, n) > π`` (docs/conventions.md §3), counted exactly; the weighted one
weights each triple by ``|q′_{m,j}||k′_{n,j}|``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def anomalous_fractions(model: torch.nn.Module, input_ids: Tensor, variant: str) -> dict:
    """``anomalous_fraction`` and ``weighted_anomalous_fraction``, each ``[layer][query head]``,
    plus their means over heads and layers, for one model on one sequence.

    Args:
        variant: the ablation variant (``rope``, ``coca_slack``, ``coca_strict``); the probe
            must recognise the model as that kind.
    """
    from anomaly.probe import probe

    result = probe(model, input_ids, bins=16)
    if result.kind != variant:
        raise RuntimeError(f"the probe reads the {variant} model as {result.kind}")
    frac, weighted = result.anomalous_fraction, result.weighted_anomalous_fraction  # [L, H]
    return {
        "anomalous_fraction": frac.tolist(),
        "weighted_anomalous_fraction": weighted.tolist(),
        "mean": float(frac.mean()),
        "weighted_mean": float(weighted.mean()),
        "tokens": int(input_ids.shape[-1]),
        "zero_angle_tolerance": result.zero_angle_tolerance,
        "method": "anomaly.probe.probe: exact counts over all causal pairs of the effective q/k contents "
                  "(CoCA: anomaly.probe.coca, via anomaly.coca.coca_qk with rotated=False)",
    }


def slack_spread(model: torch.nn.Module, input_ids: Tensor, train_length: int, max_length: int) -> dict:
    """How far the trained slack model's score departs from a relative one (docs/conventions.md §5).

    :func:`anomaly.probe.slack_geometry.measure` on the model's own q/T contents: the same
    contents at distances 1, T/8 and T/2, scored with the key at every 8th absolute
    position below ``max_length`` (the longest evaluation length).
    """
    from anomaly.probe.core import SLACK_PAIRS
    from anomaly.probe.result import SlackGeometry
    from anomaly.probe.slack_geometry import measure

    distances = sorted({1, max(1, train_length // 8), max(1, train_length // 2)})
    positions = torch.arange(0, max_length, 8)
    layers = measure(model, input_ids, distances=distances, positions=positions, pairs=SLACK_PAIRS)
    return SlackGeometry(layers, distances, f"0..{max_length - 1} step 8", SLACK_PAIRS).to_json()


@torch.no_grad()
def coefficient_sparsity(model: torch.nn.Module, input_ids: Tensor) -> dict:
    """How many of a CoCA model's collinear coefficients the ReLU zeroes.

    CoCA keeps one coefficient ``t_{n,j} = ReLU(mean of slice j of T x_n)`` per key slice
    (docs/conventions.md §5). A zero removes slice ``j`` of key ``n`` from every score; a
    slice that is zero for every token takes no part in attention at all and, the ReLU's
    gradient being 0 there, cannot come back.

    Returns:
        ``zero_fraction`` ``[layer][kv head]``: share of (token, slice) coefficients that
        are 0; ``dead_slices`` ``[layer][kv head]``: slices that are 0 for every token of
        ``input_ids``; ``slices`` per head; their means over heads and layers.
    """
    from anomaly.analytic import collinear_coefficients
    from anomaly.model_surgery import attention_module, decoder_layers

    outputs: list[Tensor] = []
    hooks = [attention_module(layer).k_proj.register_forward_hook(lambda _m, _a, out: outputs.append(out))
             for layer in decoder_layers(model)]
    try:
        model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    head_dim = model.config.head_dim
    zero, dead = [], []
    for t in outputs:  # [1, seq, kv_heads · head_dim]
        coef = collinear_coefficients(t[0].unflatten(-1, (-1, head_dim)), "half")  # [seq, kv_heads, d/2]
        zero.append((coef == 0).float().mean(dim=(0, 2)).tolist())
        dead.append((coef == 0).all(dim=0).sum(-1).tolist())
    return {
        "zero_fraction": zero, "dead_slices": dead, "slices": head_dim // 2,
        "mean_zero_fraction": float(torch.tensor(zero).mean()),
        "mean_dead_slices": float(torch.tensor(dead, dtype=torch.float).mean()),
        "tokens": int(input_ids.shape[-1]),
    }
