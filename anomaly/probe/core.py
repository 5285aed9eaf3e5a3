"""``probe``: the anomaly measured inside a real model, per layer, head and slice.

Definitions (``SPEC.md`` §2–3), for layer ``l``, query head ``h`` (its key head ``g``),
slice ``j`` and a causal pair ``m > n`` of the probed sequence:

* ``Θ_j(m, n) = arg q_{m,j} − arg k_{n,j}`` reduced to ``[0, 2π)``, with ``q``/``k`` the
  **pre-RoPE** vectors the layer rotates (:func:`anomaly.probe.capture`). RoPE turns the
  pair's slice to ``Θ_j + (m−n)θ_j``; ``Θ_j`` is what the pair starts from.
* ``anomalous_fraction[l][h]``: share of the triples (m, n, j), ``m > n``, ``j < d_rot/2``,
  in case (d), ``Θ_j ∈ (π, 2π)``. Random isotropic phases give exactly 1/2 in expectation.
* ``weighted_anomalous_fraction[l][h]``: the same with each triple weighted by
  ``|q_{m,j}||k_{n,j}|`` (its weight in the score).
* ``mean_angle[l, h, j]``: angle of ``Σ_{m>n} q_{m,j} k̄_{n,j}``, the magnitude-weighted
  circular mean of Θ; ``concentration`` is that sum's length over ``Σ |q_j||k_j|``
  (1 = every pair has the same Θ). ``tau`` (SPEC §3, case d) and ``whole_context``
  (``θ_j·T < 2π − Θ_j``) are evaluated at ``mean_angle``.
* ``mean_logit[l, h, s]``: the layer's real pre-softmax logit (scale, rotary factor and
  unrotated dims included) averaged over all pairs at distance ``s = m − n``, computed by
  FFT cross-correlation of the rotated queries and keys (float32 for float32 models, to a few
  millionths of the largest value; see :func:`mean_logit_by_distance`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from anomaly import analytic
from anomaly.model_surgery import config_of, rope_base_of, scaling_record, train_length_of
from anomaly.probe.activations import LayerCapture, capture, rotated_heads
from anomaly.probe.stats import PairStats, slice_pair_stats
from anomaly.rope import slice_members

CHANCE_FRACTION = 0.5
"""Expected case-(d) share for isotropic phases: Θ is then uniform on [0, 2π)."""


EXACT_TAIL = 128
"""Distances with the fewest pairs (the last ``EXACT_TAIL``) whose mean logit
:func:`mean_logit_by_distance` sums directly in float64 instead of by FFT."""


def mean_logit_by_distance(layer: LayerCapture, *, exact_tail: int = EXACT_TAIL) -> Tensor:
    """Mean real attention logit at each distance ``s = 0..T−1``, ``[heads, T]`` (float64).

    ``Σ_m logit(m, m−s)`` is the cross-correlation of the rotated query and key sequences
    at lag ``s``, summed over dimensions: one FFT per head and dimension, ``O(T log T)``, in
    the capture's precision (float32 unless the model runs in float64). An FFT's rounding
    error is about ``eps·log₂T·Σ_d ‖q_d‖‖k_d‖`` at *every* lag, while lag ``s`` averages
    only ``T − s`` pairs; so the last ``exact_tail`` lags, where that division would
    magnify it most, are summed pair by pair in float64 (a ``[W, W]`` block per head).
    On SmolLM2-135M at 2048 tokens the result stays within 3.2e-6 of each head's largest
    mean logit at every lag (``python benchmarks/probe_speed.py`` prints this).
    """
    q, k = rotated_heads(layer)
    h, t, d = q.shape
    kv = k.shape[0]
    r = h // kv
    n = 2 * t  # zero padding: circular lags become linear ones
    corr = torch.empty(h, t, dtype=torch.float64, device=q.device)  # [H, T]: Σ_m q_m·k_{m−s}
    for g in range(kv):  # one key head and its r query heads at a time: bounded spectra
        fk = torch.fft.rfft(k[g].T, n=n, dim=-1)  # [D, n/2+1]: FFT along time
        fq = torch.fft.rfft(q[g * r : (g + 1) * r].transpose(1, 2), n=n, dim=-1)  # [r, D, n/2+1]
        spec = (fq * fk.conj()).sum(1)  # Σ over dims before the (linear) inverse FFT
        corr[g * r : (g + 1) * r] = torch.fft.irfft(spec, n=n, dim=-1)[:, :t]
    w = min(exact_tail, t)
    if w > 0:
        # Lags s ≥ T − w pair queries m ≥ T − w with keys n < w: block[i, j] = q_{T−w+i}·k_j
        # sits at lag T − w + i − j, so lag T − w + c is the sum of diagonal i − j = c.
        q_tail, k_head = rotated_heads(
            layer, torch.float64, q_rows=slice(t - w, t), k_rows=slice(0, w)
        )
        block = (q_tail.reshape(kv, r, w, d) @ k_head[:, None].transpose(-1, -2)).reshape(h, w * w)
        i, j = torch.tril_indices(w, w, device=q.device)  # i ≥ j
        tail = torch.zeros(h, w, dtype=torch.float64, device=q.device)
        corr[:, t - w :] = tail.index_add_(1, i - j, block[:, i * w + j])
    counts = torch.arange(t, 0, -1, dtype=torch.float64, device=q.device)  # T − s pairs
    return corr / counts * layer.softmax_scale


def slice_pair_stats_of(layer: LayerCapture, bins: int) -> PairStats:
    """:func:`anomaly.probe.stats.slice_pair_stats` of one captured layer, grouped by
    (key head, slice): entries ``[KV·J, R]`` with ``J`` slices and ``R = H/KV``."""
    q, k = layer.q, layer.k
    h, t, _ = q.shape
    kv = k.shape[0]
    r = h // kv
    q_re, q_im = slice_members(q, layer.layout)  # [H, T, J] each (views)
    k_re, k_im = slice_members(k, layer.layout)  # [KV, T, J]
    j = q_re.shape[-1]

    def queries(x: Tensor) -> Tensor:  # [H, T, J] -> [KV, R, T, J] -> [KV, J, R, T] -> [KV·J, R, T]
        return x.reshape(kv, r, t, j).permute(0, 3, 1, 2).reshape(kv * j, r, t)

    def keys(x: Tensor) -> Tensor:  # [KV, T, J] -> [KV, J, T] -> [KV·J, T]
        return x.permute(0, 2, 1).reshape(kv * j, t)

    return slice_pair_stats(queries(q_re), queries(q_im), keys(k_re), keys(k_im), bins=bins)


def _layer_stats(layer: LayerCapture, bins: int) -> dict[str, Tensor]:
    h, t, d_rot = layer.q.shape
    kv = layer.k.shape[0]
    r, j = h // kv, d_rot // 2
    st = slice_pair_stats_of(layer, bins)

    def per_head(x: Tensor) -> Tensor:  # [KV·J, R, ...] -> [KV, J, R, ...] -> [KV, R, J, ...] -> [H, J, ...]
        x = x.reshape(kv, j, r, *x.shape[2:]).transpose(1, 2)
        return x.reshape(h, j, *x.shape[3:])

    count_d, weight_d, weight_all = per_head(st.count_d), per_head(st.weight_d), per_head(st.weight_all)
    mean_product = per_head(st.mean_product)
    freqs = layer.inv_freq.double().to(layer.q.device)
    mean_angle = analytic.wrap_angle(torch.angle(mean_product))
    nonzero = weight_all > 0
    concentration = torch.where(nonzero, mean_product.abs() / weight_all.clamp_min(1e-300), torch.zeros_like(weight_all))
    return {
        "count_d": count_d,
        "weight_d": weight_d,
        "weight_all": weight_all,
        "fraction_slice": count_d.double() / max(st.pairs, 1),
        "theta_hist": per_head(st.hist),
        "mean_angle": mean_angle,
        "concentration": concentration,
        "tau": analytic.causal_tau(mean_angle, freqs),
        "whole_context": analytic.anomalous_slices(mean_angle, freqs, t),
        "q_norm": per_head(st.q_norm),  # [H, J]
        "k_norm": st.k_norm.reshape(kv, j),  # [KV, J]
        "mean_logit": mean_logit_by_distance(layer),
        "inv_freq": freqs,
        "pairs": torch.tensor(st.pairs),
    }


def probe(
    model: nn.Module,
    input_ids: Tensor,
    *,
    bins: int = 64,
    train_length: int | None = None,
    max_peak_distance: int | None = None,
    model_name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Measure the RoPE anomaly of every layer and head of ``model`` on one sequence.

    Args:
        model: a loaded HF causal LM with RoPE (any device/dtype; statistics in float32/64).
        input_ids: ``[seq]`` or ``[1, seq]`` token ids (``seq ≥ 2``).
        bins: Θ histogram bins over ``[0, 2π)``.
        train_length: training context for the critical dimension and rotation counts
            (default: the config's ``original_max_position_embeddings`` or
            ``max_position_embeddings``).
        max_peak_distance: largest distance searched for each head's logit peak (default
            ``T/2``, so every distance searched averages at least ``T/2`` pairs).
        model_name: recorded as ``summary["model"]``.
        progress: called with each finished layer index.

    Returns:
        The summary dict (JSON-ready lists) with the issue's fixed keys
        (``anomalous_fraction``, ``weighted_anomalous_fraction``, ``model``, ``layers``,
        ``heads``, ``kv_heads``, ``head_dim``, ``layout``, ``tokens``, ``input_ids``) and the
        extra statistics; numpy arrays under ``summary["arrays"]`` (the CLI writes those to
        ``arrays.npz``). See the module docstring for the definitions.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    t = ids.numel()
    if t < 2:
        raise ValueError("probe needs at least two tokens (one causal pair)")
    per_layer: list[dict[str, Tensor]] = []

    def on_layer(layer: LayerCapture) -> None:
        stats = _layer_stats(layer, bins)
        per_layer.append({key: v.detach().cpu() for key, v in stats.items()})
        if progress is not None:
            progress(layer.index)

    cap = capture(model, ids, on_layer=on_layer)
    config = config_of(model)
    arrays = {key: torch.stack([p[key] for p in per_layer]).numpy() for key in per_layer[0] if key != "pairs"}
    j = arrays["inv_freq"].shape[-1]
    pairs = t * (t - 1) // 2
    frac = arrays["count_d"].sum(-1) / (j * pairs)  # [L, H]
    wfrac = arrays["weight_d"].sum(-1) / np.maximum(arrays["weight_all"].sum(-1), 1e-300)
    peak_window = max(1, min(max_peak_distance or t // 2, t - 1))
    peak = 1 + arrays["mean_logit"][:, :, 1 : peak_window + 1].argmax(-1)  # [L, H], distance ≥ 1
    train = int(train_length or train_length_of(config))
    base = rope_base_of(config)
    d_rot = 2 * j
    crit = analytic.critical_dimension(d_rot, base, train)
    arrays["rotations"] = analytic.rotations(torch.from_numpy(arrays["inv_freq"]), train).numpy()
    arrays["input_ids"] = ids.cpu().numpy()
    whole = arrays["whole_context"]  # [L, H, J]
    summary = {
        "model": model_name or getattr(config, "_name_or_path", None) or config.model_type,
        "model_type": config.model_type,
        "layers": len(per_layer),
        "heads": cap.n_heads,
        "kv_heads": cap.n_kv_heads,
        "head_dim": cap.head_dim,
        "rotary_dim": d_rot,
        "layout": cap.layout,
        "tokens": t,
        "input_ids": ids.tolist(),
        "rope_base": base,
        "rope_scaling": scaling_record(config),
        "anomalous_fraction": frac.tolist(),
        "weighted_anomalous_fraction": wfrac.tolist(),
        "chance_fraction": CHANCE_FRACTION,
        "anomalous_fraction_minus_chance": (frac - CHANCE_FRACTION).tolist(),
        "mean_anomalous_fraction": float(frac.mean()),
        "mean_weighted_anomalous_fraction": float(wfrac.mean()),
        "train_length": train,
        "critical_dimension": crit,
        "critical_slice": crit // 2,
        "whole_context_slices": whole.sum(-1).tolist(),
        "whole_context_slices_below_critical": whole[..., : crit // 2].sum(-1).tolist(),
        "whole_context_slices_from_critical": whole[..., crit // 2 :].sum(-1).tolist(),
        "logit_peak_distance": peak.tolist(),
        "peaks_away_from_nearest_key": (peak > 1).tolist(),
        "logit_peak_window": peak_window,
        "theta_bins": bins,
        "definitions": {
            "initial_angle": "Θ_j(m,n) = arg q_{m,j} − arg k_{n,j} mod 2π, pre-RoPE q/k (SPEC §2)",
            "anomalous_fraction": "share of causal (m>n) triples (query, key, slice) with Θ_j in (π, 2π): case (d), SPEC §3; exact count",
            "weighted_anomalous_fraction": "same, each triple weighted by |q_j||k_j|",
            "chance_fraction": "expected fraction for isotropic random phases (Θ uniform)",
            "theta_hist": "[layer, head, slice, bin] causal pairs per Θ bin; a pair goes to bin(arg q) − bin(arg k) mod bins (within one bin of its exact Θ bin)",
            "mean_angle": "[layer, head, slice] angle of Σ_{m>n} q_{m,j} conj(k_{n,j}) (|q||k|-weighted circular mean of Θ)",
            "tau": "[layer, head, slice] (2π − mean_angle)/θ_j in tokens where mean_angle > π (case d), else 0",
            "whole_context": "[layer, head, slice] θ_j·T < 2π − mean_angle: the slice rises with distance over the whole probed context",
            "critical_dimension": "Liu et al. 2023: 2⌈(d_rot/2)·log_base(train_length/2π)⌉; slices j ≥ critical_slice never complete a period in training",
            "rotations": "[layer, slice] θ_j·train_length/2π, full turns over the training length (YaRN's count)",
            "mean_logit": f"[layer, head, distance] mean real pre-softmax logit over pairs at distance s = m − n (FFT in the capture's precision; the last {EXACT_TAIL} distances summed in float64)",
            "logit_peak_distance": "argmax over distances 1..logit_peak_window of mean_logit (the nearest earlier key is at 1)",
        },
        "arrays": arrays,
    }
    return summary

