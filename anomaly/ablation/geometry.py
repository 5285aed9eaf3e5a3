"""Anomalous fractions of the trained ablation models, from their *effective* geometry.

For the ``rope`` model the geometry is the pre-RoPE query and key. For a CoCA model it is
CoCA's effective query and key content (:func:`anomaly.coca.coca_qk` with
``rotated=False``): the vectors whose RoPE rotation gives the per-token q′/k′ whose dot
product is the score (SPEC §5). Strict CoCA makes every slice of q′ and k′ a non-negative
real number, so its initial angle is 0 everywhere and its anomalous fraction is exactly 0;
slack CoCA's query content depends on the query's absolute position.

The fraction of a head is the share of causal (m > n) triples (query m, key n, slice j)
in case (d), ``Θ_j(m, n) > π`` (SPEC §3); the weighted one weights each triple by
``|q′_{m,j}||k′_{n,j}|``. The count is brute force over all causal pairs, which is cheap at
the ablation's lengths (a few hundred tokens).

Rounding: CoCA's contents are computed in float64 by rotating q′/k′ back to position 0, so
an exact angle of 0 comes back as ±1e-16 rad, and −1e-16 would wrap to just below 2π and
count as case (d). Angles within :data:`ZERO_ANGLE_TOL` of 0 (mod 2π) are therefore read as
0. A genuine angle that small has no effect on the score anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from anomaly.analytic import initial_angle
from anomaly.rope import to_complex

ZERO_ANGLE_TOL = 1e-9
"""Radians; |Θ| (mod 2π) below this is float64 rounding of an exact 0 (see module docstring)."""


def effective_qk(model: torch.nn.Module, input_ids: Tensor, coca_variant: str | None) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the pre-RoPE query and key contents that the scores are made of.

    Returns:
        ``[(q [heads, seq, d], k [kv_heads, seq, d])]`` per layer, float64, half layout.
    """
    from anomaly.probe.activations import capture

    cap = capture(model, input_ids)
    if cap.layout != "half":
        raise ValueError(f"expected HF's half layout, got {cap.layout}")
    out = []
    for layer in cap.layers:
        q, k = layer.q.double(), layer.k.double()  # [h, s, d], [kv, s, d]
        if coca_variant is not None:
            from anomaly.coca import coca_qk

            # The captured "k" of a CoCA layer is the raw T-projection output t.
            q, k = coca_qk(
                q[None], k[None], variant=coca_variant, inv_freq=layer.inv_freq.double(),
                positions=cap.positions, layout=cap.layout, attention_scale=layer.rope_scale,
                rotated=False,
            )
            q, k = q[0], k[0]
        out.append((q, k))
    return out


def case_d_fractions(q: Tensor, k: Tensor) -> tuple[list[float], list[float]]:
    """Unweighted and magnitude-weighted case-(d) shares per query head.

    Args:
        q: ``[heads, seq, d]`` query contents; k: ``[kv_heads, seq, d]`` key contents
            (heads grouped over kv heads as in GQA).

    Returns:
        Two lists of length ``heads``.
    """
    heads, seq, _ = q.shape
    group = heads // k.shape[0]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=q.device), diagonal=-1)  # [m, n], m > n
    frac, weighted = [], []
    for h in range(heads):
        kh = k[h // group]
        theta = initial_angle(q[h][:, None, :], kh[None, :, :], layout="half")  # [m, n, d/2]
        mag = to_complex(q[h], "half").abs()[:, None, :] * to_complex(kh, "half").abs()[None, :, :]  # [m, n, d/2]
        theta = torch.where(torch.minimum(theta, 2 * math.pi - theta) < ZERO_ANGLE_TOL, 0.0, theta)
        in_d = (theta > math.pi) & causal[..., None]
        n_triples = causal.sum() * theta.shape[-1]
        frac.append(float(in_d.sum() / n_triples))
        w_all = (mag * causal[..., None]).sum()
        weighted.append(float((mag * in_d).sum() / w_all) if w_all > 0 else 0.0)
    return frac, weighted


def anomalous_fractions(model: torch.nn.Module, input_ids: Tensor, coca_variant: str | None) -> dict:
    """``anomalous_fraction`` and ``weighted_anomalous_fraction``, each ``[layer][query head]``,
    plus their means over heads and layers, for one model on one sequence."""
    frac, weighted = [], []
    for q, k in effective_qk(model, input_ids, coca_variant):
        f, w = case_d_fractions(q, k)
        frac.append(f)
        weighted.append(w)
    flat = [x for row in frac for x in row]
    flat_w = [x for row in weighted for x in row]
    return {
        "anomalous_fraction": frac,
        "weighted_anomalous_fraction": weighted,
        "mean": sum(flat) / len(flat),
        "weighted_mean": sum(flat_w) / len(flat_w),
        "tokens": int(input_ids.shape[-1]),
        "method": "brute force over causal pairs of the effective q/k contents "
                  "(anomaly.ablation.geometry; CoCA via anomaly.coca.coca_qk, rotated=False)",
    }


def slack_spread(model: torch.nn.Module, input_ids: Tensor, train_length: int, max_length: int) -> dict:
    """How far the trained slack model's score departs from a relative one (SPEC §5).

    :func:`anomaly.coca.geometry.measure` on the model's own q/T contents: the same
    contents at distances 1, T/8 and T/2, scored with the key at every 8th absolute
    position below ``max_length`` (the longest evaluation length).
    """
    from anomaly.coca.geometry import measure, summarise

    distances = sorted({1, max(1, train_length // 8), max(1, train_length // 2)})
    positions = torch.arange(0, max_length, 8)
    layers = measure(model, input_ids, distances=distances, positions=positions, pairs=64)
    return {
        **summarise(layers),
        "per_layer": [{"layer": r.layer, "relative_spread": r.relative_spread,
                       "case_d_fraction": r.case_d_fraction} for r in layers],
        "distances": distances,
        "positions": f"0..{max_length - 1} step 8",
        "definition": "per layer and distance: median (and p90) over heads and 64 real content pairs "
                      "of (max − min over absolute positions of the slack score) / mean |relative part|; "
                      "0 for a relative score (RoPE, strict CoCA)",
    }
