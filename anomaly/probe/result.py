"""``ProbeResult``: what :func:`anomaly.probe.probe` measures, one documented field per quantity.

``to_json()`` is the CLI's ``summary.json`` (plain lists and numbers), ``arrays()`` its
``arrays.npz``; the definitions are in :mod:`anomaly.probe.core` and recorded in the JSON
under ``definitions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from anomaly.analytic import CHANCE_FRACTION
from anomaly.probe.slack_geometry import LayerGeometry, summarise

__all__ = ["CHANCE_FRACTION", "ProbeResult", "SlackGeometry"]


@dataclass
class SlackGeometry:
    """How far a slack CoCA model's score depends on absolute position
    (:func:`anomaly.probe.slack_geometry.measure_layer`, per layer)."""

    layers: list[LayerGeometry]
    """Per layer: relative spread per distance and the position-sampled case-(d) share."""
    distances: list[int]
    """Query–key distances the spread is measured at."""
    positions: str
    """The absolute key positions scored, e.g. ``"0..2047 step 8"``."""
    pairs: int
    """Real (query, key) content pairs drawn per layer and distance."""

    def to_json(self) -> dict:
        return {
            **summarise(self.layers),
            "per_layer": [{"layer": r.layer, "relative_spread": r.relative_spread,
                           "case_d_fraction": r.case_d_fraction} for r in self.layers],
            "distances": self.distances,
            "positions": self.positions,
            "definition": f"per layer and distance: median (and p90) over heads and {self.pairs} real content "
                          "pairs of (max − min over absolute positions of the slack score) / mean |relative "
                          "part|; 0 for a relative score (RoPE, strict CoCA)",
        }


@dataclass
class ProbeResult:
    """The RoPE anomaly of every layer and head of one model on one sequence.

    Shapes: ``L`` layers, ``H`` query heads, ``KV`` key heads, ``J = d_rot/2`` slices,
    ``T`` tokens, ``B`` Θ bins. For a CoCA model every angle is CoCA's *effective* one
    (the contents whose rotation gives the vectors its attention multiplies).
    """

    # ---- what was probed
    model: str
    """The model's name as the user gave it (or its config's ``_name_or_path``)."""
    model_type: str
    """The HF ``config.model_type``."""
    kind: str
    """``"rope"``, ``"coca_strict"`` or ``"coca_slack"``: what the model scores with."""
    layers: int
    """``L``: attention layers probed."""
    layer_indices: list[int]
    """``[L]``: the decoder layer each probed layer is (layers without RoPE are skipped)."""
    heads: int
    """``H``: query heads per layer."""
    kv_heads: int
    """``KV``: key/value heads per layer."""
    head_dim: int
    """Head size, rotated and unrotated dims together."""
    rotary_dim: int
    """``d_rot = 2J``: dims of each head that are rotated."""
    layout: str
    """``"half"`` or ``"interleaved"``: the layout the layers apply their rotation in."""
    input_ids: np.ndarray
    """``[T]`` int64: the probed token ids."""
    rope_base: float
    """The config's rotary base θ."""
    rope_scaling: dict | None
    """The config's rotary scaling record (type and factors), or ``None``."""
    train_length: int
    """Training context used for the critical dimension and the rotation counts."""
    critical_dimension: int
    """Liu et al. 2023: ``2⌈(d_rot/2)·log_base(train_length/2π)⌉``."""
    theta_bins: int
    """``B``: Θ histogram bins over ``[0, 2π)``."""
    zero_angle_tolerance: float
    """Radians; Θ within it of 0 (mod 2π) counted as 0 (CoCA's rounding; 0 for RoPE)."""
    logit_peak_window: int
    """Largest distance searched for each head's logit peak (below a layer's window)."""
    sliding_window: list[int | None]
    """``[L]``: the window ``W`` of a layer that scores only the pairs ``m − n < W``, where
    ``W`` is shorter than the sequence, else ``None``. Its pair statistics count those
    pairs only, its ``whole_context`` is over ``W`` tokens and its ``mean_logit`` is NaN
    from distance ``W`` on (the model computes no such logit)."""
    configured_window: list[int | None]
    """``[L]``: the sliding window ``W`` each layer attends with at any length (``None`` for
    a layer that sees the whole context), whether or not it limits this sequence: what
    :meth:`scored_span` needs to know of a layer probed on fewer than ``W`` tokens."""

    # ---- per layer and head
    anomalous_fraction: np.ndarray
    """``[L, H]``: share of causal triples (query, key, slice) in case (d), exact."""
    weighted_anomalous_fraction: np.ndarray
    """``[L, H]``: the same, each triple weighted by ``|q_j||k_j|``."""
    logit_peak_distance: np.ndarray
    """``[L, H]`` int: argmax of ``mean_logit`` over distances ``1..logit_peak_window``."""

    # ---- per layer, head and slice (arrays.npz)
    count_d: np.ndarray
    """``[L, H, J]`` int64: causal pairs in case (d)."""
    weight_d: np.ndarray
    """``[L, H, J]``: their ``Σ |q_j||k_j|``."""
    weight_all: np.ndarray
    """``[L, H, J]``: ``Σ |q_j||k_j|`` over all causal pairs."""
    fraction_slice: np.ndarray
    """``[L, H, J]``: ``count_d`` over the causal pairs."""
    theta_hist: np.ndarray
    """``[L, H, J, B]`` int64: causal pairs per Θ bin (binned phases, within one bin)."""
    mean_angle: np.ndarray
    """``[L, H, J]``: angle of ``Σ_{m>n} q_{m,j} k̄_{n,j}`` (weighted circular mean of Θ)."""
    concentration: np.ndarray
    """``[L, H, J]``: that sum's length over ``Σ |q_j||k_j|`` (1: every pair the same Θ)."""
    tau: np.ndarray
    """``[L, H, J]``: ``(2π − mean_angle)/θ_j`` tokens where ``mean_angle > π``, else 0."""
    whole_context: np.ndarray
    """``[L, H, J]`` bool: ``θ_j·T < 2π − mean_angle`` (rises over the whole context)."""
    q_norm: np.ndarray
    """``[L, H, J]``: mean ``|q_j|`` over tokens."""
    k_norm: np.ndarray
    """``[L, KV, J]``: mean ``|k_j|`` over tokens."""
    mean_logit: np.ndarray
    """``[L, H, T]``: the real pre-softmax logit averaged over pairs at distance ``s``."""
    inv_freq: np.ndarray
    """``[L, J]``: each layer's slice frequencies θ_j."""
    rotations: np.ndarray
    """``[L, J]``: ``θ_j·train_length/2π``, full turns over the training length."""

    # ---- CoCA
    slack: SlackGeometry | None = None
    """Slack CoCA only: how far the score depends on absolute position."""

    # ---- how it ran (filled by the CLI; ``None`` from :func:`probe`)
    source: str | None = None
    """Where the weights came from (hub id, folder, GGUF file, checkpoint)."""
    note: str | None = None
    """A caveat worth printing beside the results (e.g. quantisation)."""
    text: str | None = None
    """Name of the probed text."""
    device: str | None = None
    """Device the probe ran on."""
    dtype: str | None = None
    """The model's dtype."""
    definitions: dict = field(default_factory=dict)
    """Each quantity's definition in words (written into the JSON)."""

    ARRAYS = ("count_d", "weight_d", "weight_all", "fraction_slice", "theta_hist", "mean_angle",
              "concentration", "tau", "whole_context", "q_norm", "k_norm", "mean_logit", "inv_freq",
              "rotations", "input_ids")
    """The fields written to ``arrays.npz``."""

    @property
    def tokens(self) -> int:
        """``T``: tokens probed."""
        return int(self.input_ids.shape[0])

    @property
    def critical_slice(self) -> int:
        """First slice that never completes a period over the training length."""
        return self.critical_dimension // 2

    @property
    def chance_fraction(self) -> float:
        """:data:`CHANCE_FRACTION`."""
        return CHANCE_FRACTION

    @property
    def whole_context_slices(self) -> np.ndarray:
        """``[L, H]``: slices rising over the whole probed context."""
        return self.whole_context.sum(-1)

    @property
    def peaks_away_from_nearest_key(self) -> np.ndarray:
        """``[L, H]`` bool: the logit peak lies beyond distance 1."""
        return self.logit_peak_distance > 1

    def scored_span(self, layer: int) -> int:
        """The longest distance (in tokens) layer ``layer`` scores within the training
        context: ``min(W, train_length)`` for a sliding layer, ``train_length`` otherwise."""
        window = self.configured_window[layer]
        return self.train_length if window is None else min(window, self.train_length)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays for ``arrays.npz``, by name."""
        return {name: np.asarray(getattr(self, name)) for name in self.ARRAYS}

    def to_json(self) -> dict:
        """The summary as JSON-ready values (every array of :meth:`arrays` left out)."""
        frac, wfrac = self.anomalous_fraction, self.weighted_anomalous_fraction
        whole, crit = self.whole_context, self.critical_slice
        out = {
            "model": self.model,
            "model_type": self.model_type,
            "kind": self.kind,
            "layers": self.layers,
            "layer_indices": self.layer_indices,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "layout": self.layout,
            "tokens": self.tokens,
            "input_ids": self.input_ids.tolist(),
            "rope_base": self.rope_base,
            "rope_scaling": self.rope_scaling,
            "anomalous_fraction": frac.tolist(),
            "weighted_anomalous_fraction": wfrac.tolist(),
            "chance_fraction": CHANCE_FRACTION,
            "anomalous_fraction_minus_chance": (frac - CHANCE_FRACTION).tolist(),
            "mean_anomalous_fraction": float(frac.mean()),
            "mean_weighted_anomalous_fraction": float(wfrac.mean()),
            "zero_angle_tolerance": self.zero_angle_tolerance,
            "train_length": self.train_length,
            "critical_dimension": self.critical_dimension,
            "critical_slice": crit,
            "whole_context_slices": whole.sum(-1).tolist(),
            "whole_context_slices_below_critical": whole[..., :crit].sum(-1).tolist(),
            "whole_context_slices_from_critical": whole[..., crit:].sum(-1).tolist(),
            "logit_peak_distance": self.logit_peak_distance.tolist(),
            "peaks_away_from_nearest_key": self.peaks_away_from_nearest_key.tolist(),
            "logit_peak_window": self.logit_peak_window,
            "sliding_window": self.sliding_window,
            "configured_window": self.configured_window,
            "theta_bins": self.theta_bins,
        }
        if self.slack is not None:
            out["slack_spread"] = self.slack.to_json()
        for name in ("source", "note", "text", "device", "dtype"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["definitions"] = self.definitions
        return out

