"""``probe``: the anomaly measured inside a real model, per layer, head and slice.

Definitions (docs/conventions.md §2–3), for layer ``l``, query head ``h`` (its key head
``g``), slice ``j`` and a causal pair ``m > n`` of the probed sequence:

* ``Θ_j(m, n) = arg q_{m,j} − arg k_{n,j}`` reduced to ``[0, 2π)``, with ``q``/``k`` the
  **pre-RoPE** vectors the layer rotates (:func:`anomaly.probe.capture`). RoPE turns the
  pair's slice to ``Θ_j + (m−n)θ_j``; ``Θ_j`` is what the pair starts from. In a CoCA
  model ``q``/``k`` are CoCA's effective contents (:mod:`anomaly.probe.coca`), and Θ
  within ``zero_angle_tolerance`` of 0 counts as 0.
* ``anomalous_fraction[l][h]``: share of the triples (m, n, j), ``m > n``, ``j < d_rot/2``,
  in case (d), ``Θ_j ∈ (π, 2π)``. Random isotropic phases give exactly 1/2 in expectation.
  A sliding-window layer (window ``W`` shorter than the sequence) counts only the pairs it
  scores, ``m − n < W``, in this and every pair statistic; its ``whole_context`` is over
  ``W`` tokens, its ``mean_logit`` is NaN from distance ``W`` on, and its logit peak is
  sought below ``W``.
* ``weighted_anomalous_fraction[l][h]``: the same with each triple weighted by
  ``|q_{m,j}||k_{n,j}|`` (its weight in the score).
* ``mean_angle[l, h, j]``: angle of ``Σ_{m>n} q_{m,j} k̄_{n,j}``, the magnitude-weighted
  circular mean of Θ; ``concentration`` is that sum's length over ``Σ |q_j||k_j|``
  (1 = every pair has the same Θ). ``tau`` (docs/conventions.md §3, case d) and
  ``whole_context`` (``θ_j·T < 2π − Θ_j``) are evaluated at ``mean_angle``.
* ``mean_logit[l, h, s]``: the layer's real pre-softmax logit (scale, rotary factor and
  unrotated dims included) averaged over all pairs at distance ``s = m − n``, computed by
  FFT cross-correlation of the rotated queries and keys (float32 for float32 models, to a few
  millionths of the largest value; see :func:`mean_logit_by_distance`).
* slack CoCA only, ``slack``: how far the score depends on absolute position
  (:func:`anomaly.probe.slack_geometry.measure_layer` at distances 1, T/8, T/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from anomaly import analytic, variants
from anomaly.model_surgery import config_of, rope_base_of, scaling_record, train_length_of
from anomaly.probe.activations import Capture, LayerCapture, capture, rotated_heads
from anomaly.probe.coca import ZERO_ANGLE_TOL, effective_layer, model_variant
from anomaly.probe.result import ProbeResult, SlackGeometry
from anomaly.probe.slack_geometry import measure_layer
from anomaly.probe.stats import pair_statistics


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


def layer_statistics(layer: LayerCapture, bins: int, zero_angle_tol: float = 0.0) -> dict[str, np.ndarray]:
    """Every per-layer array of :class:`anomaly.probe.result.ProbeResult` for one captured
    layer (names as its fields, without the leading layer axis), on the CPU.

    The pair statistics come from :func:`anomaly.probe.stats.pair_statistics` (the one
    core), the mean logits from :func:`mean_logit_by_distance`.
    """
    t = layer.q.shape[1]
    window = layer.sliding_window
    st = pair_statistics(layer.q, layer.k, layer.layout, bins=bins, zero_angle_tol=zero_angle_tol, window=window)
    seen = min(t, window or t)  # the context one query scores: its window, or all T tokens
    mean_logit = mean_logit_by_distance(layer)
    mean_logit[:, seen:] = math.nan  # distances the window masks have no logit in the model
    freqs = layer.inv_freq.double().to(st.mean_product.device)
    mean_angle = analytic.wrap_angle(torch.angle(st.mean_product))  # [H, J]
    concentration = torch.where(
        st.weight_all > 0, st.mean_product.abs() / st.weight_all.clamp_min(1e-300), torch.zeros_like(st.weight_all)
    )
    out = {
        "count_d": st.count_d,
        "weight_d": st.weight_d,
        "weight_all": st.weight_all,
        "fraction_slice": st.count_d.double() / max(st.pairs, 1),
        "pairs": torch.tensor(st.pairs),
        "theta_hist": st.hist,
        "mean_angle": mean_angle,
        "concentration": concentration,
        "tau": analytic.causal_tau(mean_angle, freqs),
        "whole_context": analytic.anomalous_slices(mean_angle, freqs, seen),
        "q_norm": st.q_norm,
        "k_norm": st.k_norm,
        "mean_logit": mean_logit,
        "inv_freq": freqs,
    }
    return {key: v.detach().cpu().numpy() for key, v in out.items()}


SLACK_PAIRS = 64
"""Content pairs per layer and distance for a slack model's position dependence."""


def _slack_setup(tokens: int, train_length: int) -> tuple[list[int], torch.Tensor, str]:
    """Distances, absolute key positions and their description for a slack model's
    position dependence: distances 1, T/8 and T/2; positions over the longer of the probed
    context and the training length, at most 256 of them."""
    distances = sorted({s for s in (1, tokens // 8, tokens // 2) if 1 <= s < tokens})
    span = max(tokens, train_length)
    step = max(1, span // 256)
    return distances, torch.arange(0, span, step), f"0..{span - 1} step {step}"


@dataclass
class _LayerCollector:
    """What :func:`probe` keeps of each layer as the forward reaches it: ``capture``'s
    ``on_layer``, so a layer's q/k are reduced to statistics and freed before the next."""

    variant: variants.Variant
    tokens: int  # T, the probed sequence's length
    bins: int
    train_length: int
    progress: Callable[[int], None] | None
    per_layer: list[dict[str, np.ndarray]] = field(default_factory=list)  # [L] layer_statistics
    indices: list[int] = field(default_factory=list)  # [L] the model's layer index
    windows: list[int | None] = field(default_factory=list)  # [L] a window shorter than T, else None
    configured: list[int | None] = field(default_factory=list)  # [L] the layer's window at any T, else None
    slack_layers: list = field(default_factory=list)  # [L] slack models' position dependence

    def __post_init__(self) -> None:
        if self.variant.slack_geometry:
            self.distances, self.positions, self.described = _slack_setup(self.tokens, self.train_length)
            self.generator = torch.Generator().manual_seed(0)

    @property
    def zero_angle_tol(self) -> float:
        return ZERO_ANGLE_TOL if self.variant.coca else 0.0

    def __call__(self, layer: LayerCapture) -> None:
        coca = self.variant.coca  # CoCA's form of the layers; None: plain attention, read as captured
        if layer.coca_variant != coca:  # the capture and the model disagree: never guess
            raise RuntimeError(f"layer {layer.index} was captured as {layer.coca_variant or 'RoPE'}, "
                               f"but the model is {self.variant.name}")
        if self.variant.slack_geometry:  # from the raw projections
            self.slack_layers.append(measure_layer(layer, distances=self.distances, positions=self.positions,
                                                   pairs=SLACK_PAIRS, generator=self.generator))
        if coca is not None:
            layer = effective_layer(layer)
        self.per_layer.append(layer_statistics(layer, self.bins, self.zero_angle_tol))
        self.indices.append(layer.index)
        w = layer.sliding_window
        self.windows.append(w if w is not None and w < self.tokens else None)
        self.configured.append(layer.configured_window)
        if self.progress is not None:
            self.progress(layer.index)

    def slack(self) -> SlackGeometry | None:
        if not self.variant.slack_geometry:
            return None
        return SlackGeometry(self.slack_layers, self.distances, self.described, SLACK_PAIRS)


def probe(
    model: nn.Module,
    input_ids: Tensor,
    *,
    bins: int = 64,
    train_length: int | None = None,
    max_peak_distance: int | None = None,
    model_name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ProbeResult:
    """Measure the RoPE anomaly of every layer and head of ``model`` on one sequence.

    Layers are measured as the forward pass reaches them and their q/k freed, so memory
    above the forward's own is one layer's.

    Args:
        model: a loaded HF causal LM with RoPE (any device/dtype; statistics in float32/64),
            or a CoCA model (:func:`anomaly.coca.to_coca`, :func:`anomaly.coca.load_coca`),
            whose *effective* initial angles are measured (:mod:`anomaly.probe.coca`).
        input_ids: ``[seq]`` or ``[1, seq]`` token ids (``seq ≥ 2``).
        bins: Θ histogram bins over ``[0, 2π)``.
        train_length: training context for the critical dimension and rotation counts
            (default: the config's ``original_max_position_embeddings`` or
            ``max_position_embeddings``).
        max_peak_distance: largest distance searched for each head's logit peak (default
            ``T/2``, so every distance searched averages at least ``T/2`` pairs).
        model_name: recorded as ``result.model``.
        progress: called with each finished layer index.

    Returns:
        :class:`anomaly.probe.result.ProbeResult` (definitions in the module docstring).

    Raises:
        UserError: a model the probe cannot measure exactly (see :func:`capture`), or a
            CoCA checkpoint loaded without its CoCA layers.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("probe needs at least two tokens (one causal pair)")
    config = config_of(model)
    collector = _LayerCollector(variants.variant(model_variant(model)), ids.numel(), bins,
                                int(train_length or train_length_of(config)), progress)
    cap = capture(model, ids, on_layer=collector)
    return _result(collector, cap, config, ids, max_peak_distance,
                   model_name or getattr(config, "_name_or_path", None) or config.model_type)


def _result(collector: _LayerCollector, cap: Capture, config, ids: Tensor, max_peak_distance: int | None,
            model_name: str) -> ProbeResult:
    """The :class:`ProbeResult` of a finished capture: per-layer arrays stacked, summaries derived."""
    t = collector.tokens
    arrays = {key: np.stack([p[key] for p in collector.per_layer]) for key in collector.per_layer[0]}
    j = arrays["inv_freq"].shape[-1]
    pairs = arrays.pop("pairs")  # [L]: pairs per slice each layer scores
    peak_window = max(1, min(max_peak_distance or t // 2, t - 1))
    # A sliding layer's peak is sought among the distances it scores.
    peak_windows = [max(1, min(peak_window, w - 1)) if w else peak_window for w in collector.windows]
    d_rot = 2 * j
    base = rope_base_of(config)
    train = collector.train_length
    return ProbeResult(
        model=model_name,
        model_type=config.model_type,
        kind=collector.variant.name,
        layers=len(collector.per_layer),
        layer_indices=collector.indices,
        heads=cap.n_heads,
        kv_heads=cap.n_kv_heads,
        head_dim=cap.head_dim,
        rotary_dim=d_rot,
        layout=cap.layout,
        input_ids=ids.cpu().numpy(),
        rope_base=base,
        rope_scaling=scaling_record(config),
        train_length=train,
        critical_dimension=analytic.critical_dimension(d_rot, base, train),
        theta_bins=collector.bins,
        zero_angle_tolerance=collector.zero_angle_tol,
        logit_peak_window=peak_window,
        sliding_window=collector.windows,
        configured_window=collector.configured,
        anomalous_fraction=arrays["count_d"].sum(-1) / (j * pairs[:, None]),
        weighted_anomalous_fraction=arrays["weight_d"].sum(-1) / np.maximum(arrays["weight_all"].sum(-1), 1e-300),
        logit_peak_distance=np.stack([1 + arrays["mean_logit"][l, :, 1 : w + 1].argmax(-1)
                                      for l, w in enumerate(peak_windows)]),
        rotations=analytic.rotations(torch.from_numpy(arrays["inv_freq"]), train).numpy(),
        slack=collector.slack(),
        definitions=definitions(collector.variant.name),
        **arrays,
    )


def definitions(variant: str) -> dict[str, str]:
    """Each summary quantity in words, for ``summary.json`` of a model of ``variant``."""
    angle = "Θ_j(m,n) = arg q_{m,j} − arg k_{n,j} mod 2π, pre-RoPE q/k (docs/conventions.md §2)"
    if variants.variant(variant).coca is not None:
        angle = ("Θ_j(m,n) of CoCA's effective contents, the vectors whose rotation gives the q′/k′ its "
                 "attention multiplies (anomaly.coca.coca_qk, rotated=False; docs/conventions.md §5)")
    return {
        "initial_angle": angle,
        "kind": "rope, coca_strict or coca_slack: what the model's attention scores with",
        "anomalous_fraction": "share of causal (m>n) triples (query, key, slice) with Θ_j in (π, 2π): "
                              "case (d), docs/conventions.md §3; exact count; a sliding layer's pairs within "
                              "its window only",
        "weighted_anomalous_fraction": "same, each triple weighted by |q_j||k_j|",
        "zero_angle_tolerance": "Θ within this many radians of 0 (mod 2π) counts as 0 (float64 rounding "
                                "of CoCA's exact zeros; 0 for RoPE models)",
        "chance_fraction": "expected fraction for isotropic random phases (Θ uniform)",
        "theta_hist": "[layer, head, slice, bin] causal pairs per Θ bin; a pair goes to bin(arg q) − bin(arg k) "
                      "mod bins (within one bin of its exact Θ bin)",
        "mean_angle": "[layer, head, slice] angle of Σ_{m>n} q_{m,j} conj(k_{n,j}) (|q||k|-weighted circular mean of Θ)",
        "tau": "[layer, head, slice] (2π − mean_angle)/θ_j in tokens where mean_angle > π (case d), else 0",
        "whole_context": "[layer, head, slice] θ_j·T < 2π − mean_angle: the slice rises with distance over the "
                         "whole probed context",
        "critical_dimension": "Liu et al. 2023: 2⌈(d_rot/2)·log_base(train_length/2π)⌉; slices j ≥ critical_slice "
                              "never complete a period in training",
        "rotations": "[layer, slice] θ_j·train_length/2π, full turns over the training length (YaRN's count)",
        "mean_logit": "[layer, head, distance] mean real pre-softmax logit over pairs at distance s = m − n (FFT "
                      f"in the capture's precision; the last {EXACT_TAIL} distances summed in float64)",
        "sliding_window": "[layer] the window W of a layer that scores only pairs with m − n < W (W shorter than "
                          "the sequence), else null: such a layer's pair statistics count only those pairs, its "
                          "whole_context is over W tokens, its mean_logit is NaN from distance W on",
        "configured_window": "[layer] the sliding window W the layer attends with at any length (null for a layer "
                             "that attends to the whole context); it limits this probe's pairs only where W < T",
        "logit_peak_distance": "argmax over distances 1..min(logit_peak_window, W − 1) of mean_logit (the nearest earlier key "
                               "is at 1)",
    }
