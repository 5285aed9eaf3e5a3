"""What the atlas reads off one probe: case-(d) shares overall, per layer, per layer group
(the layers that share one rotary table and window) and per frequency band, and the mean
angles' τ.

All shares follow :mod:`anomaly.probe.core`: a head's share counts the (query, key, slice)
triples its layer scores (a sliding layer's window only); a group's or the model's share is
the mean of its heads' shares, unweighted and weighted by ``|q_j||k_j|``.

*Fast* slices complete at least one turn over the distances their layer scores in training
(``θ_j·S/2π ≥ 1``, the *span* ``S`` = the training length, or a sliding layer's window where
that is shorter: :meth:`~anomaly.probe.result.ProbeResult.scored_span`); *slow* ones never
do. For a layer that sees its whole context, slow slices lie past the critical dimension
(Liu et al. 2023), where RoPE's angle never wraps in training and an initial angle in case (d)
keeps a slice rising with distance over the whole context. A sliding layer never scores a key
``W`` or more tokens back, so for it a slice that turns once over the training length but not
within ``W`` is as slow as one past the critical dimension (Gemma 3's sliding layers, base 10⁴,
``W`` = 512: 62 of 128 slices fast within the window, 119 over its 32K training length).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from torch import Tensor, nn

from anomaly import analytic
from anomaly.probe.core import probe
from anomaly.probe.result import ProbeResult


@dataclass(frozen=True)
class GroupReadings:
    """The layers of one rotary table (base) in one probe."""

    label: str
    """``"base 1e4"``: the rotary base the group's frequencies follow (from the ratio of
    its first two frequencies, so a linear scaling factor does not change it)."""
    layers: list[int]
    """Decoder layer indices in the group."""
    window: int | None
    """The sliding window that limited the group's pairs at this length, ``None`` if none did."""
    span: int
    """``S``: the distances the group's layers score in training (the training length, or the
    sliding window where shorter); fast and slow slices are split by turns over it."""
    share: float
    """Mean over the group's heads of the unweighted case-(d) share."""
    weighted: float
    """The same, each triple weighted by ``|q_j||k_j|``."""
    fast_slices: int
    """Slices with at least one turn over ``span``."""
    fast_share: float
    """Mean over heads of the case-(d) share among fast slices (NaN without fast slices)."""
    fast_weighted: float
    """The same, weighted."""
    slow_share: float
    """Mean over heads of the case-(d) share among slow slices (NaN without slow slices)."""
    slow_weighted: float
    """The same, weighted."""
    mean_angle_d: float
    """Share of the group's (head, slice) whose mean initial angle Θ̄ lies in case (d)."""
    median_tau: float
    """Median τ = (2π − Θ̄)/θ_j (tokens) over those (NaN if none)."""


@dataclass(frozen=True)
class Readings:
    """Everything the atlas keeps of one probe (one model, one text window)."""

    tokens: int
    """``T``: tokens probed."""
    share: float
    """Mean over every probed head of its unweighted case-(d) share."""
    weighted: float
    """The same, weighted by ``|q_j||k_j|``."""
    layer_share: list[float]
    """``[L]``: mean over the layer's heads, unweighted."""
    layer_weighted: list[float]
    """``[L]``: the same, weighted."""
    layers: list[int]
    """``[L]``: decoder layer indices."""
    groups: list[GroupReadings]
    """Per rotary table, in order of the base."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Readings":
        """The inverse of :meth:`to_json` after a JSON round trip: a float written as
        ``null`` (how :func:`anomaly.io.write_json` writes NaN) is NaN again."""
        groups = [GroupReadings(**_nan_back(GroupReadings, g)) for g in data["groups"]]
        return cls(**{**_nan_back(cls, data), "groups": groups})

    def group(self, label: str) -> GroupReadings | None:
        return next((g for g in self.groups if g.label == label), None)


def _nan_back(cls: type, data: dict) -> dict:
    """``data`` with ``None`` turned back into NaN in ``cls``'s float fields (and in its
    lists of floats); ``None`` stays where the field may be ``None`` (a group's window)."""
    out = dict(data)
    for f in fields(cls):
        if f.name not in out:
            continue
        if f.type == "float" and out[f.name] is None:
            out[f.name] = math.nan
        elif f.type == "list[float]":
            out[f.name] = [math.nan if v is None else v for v in out[f.name]]
    return out


def base_label(inv_freq: np.ndarray, rotary_dim: int) -> str:
    """``"base 1e4"`` for a geometric table ``θ_j = base^(−2j/d)`` (from ``θ_0/θ_1``, which a
    uniform scaling leaves alone), rounded to two significant digits."""
    base = float((inv_freq[0] / inv_freq[1]) ** (rotary_dim / 2))
    exponent = math.floor(math.log10(base))
    mantissa = round(base / 10**exponent, 1)
    if mantissa >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"base {mantissa:g}e{exponent}"


def label_base(label: str) -> float:
    """The base a :func:`base_label` names (``"base 1e4"`` -> 10000.0): the order of groups."""
    return float(label.split()[1])


def _band(fraction_slice: np.ndarray, weight_d: np.ndarray, weight_all: np.ndarray,
          mask: np.ndarray) -> tuple[float, float]:
    """Mean over heads of the unweighted and weighted case-(d) shares among the slices
    ``mask`` selects; ``[n, H, J]`` arrays in, NaN when ``mask`` selects none."""
    if not mask.any():
        return math.nan, math.nan
    share = fraction_slice[..., mask].mean(-1)  # [n, H]: every slice has the same pairs
    weighted = weight_d[..., mask].sum(-1) / np.maximum(weight_all[..., mask].sum(-1), 1e-300)
    return float(share.mean()), float(weighted.mean())


def _one_span(result: ProbeResult, rows: np.ndarray, label: str) -> int:
    """The one :meth:`~ProbeResult.scored_span` of a group's layers; a group whose layers
    share a rotary table but score different spans has no single fast/slow split, and the
    atlas refuses it rather than split some layers by the wrong span."""
    spans = {result.scored_span(int(l)) for l in rows}
    if len(spans) != 1:
        raise ValueError(f"the layers of {label} score different spans {sorted(spans)} (sliding windows "
                         "differ within one rotary table); the atlas splits fast and slow slices per table")
    return spans.pop()


def readings(result: ProbeResult) -> Readings:
    """The atlas's readings of one probe (definitions in the module docstring)."""
    labels = [base_label(result.inv_freq[l], result.rotary_dim) for l in range(result.layers)]
    groups = []
    for label in sorted(set(labels), key=label_base):
        rows = np.array([l for l, lab in enumerate(labels) if lab == label])
        span = _one_span(result, rows, label)
        fast = analytic.rotations(result.inv_freq[rows[0]], span).numpy() >= 1.0  # [J]: one table, one span
        frac, wd, wa = (x[rows] for x in (result.fraction_slice, result.weight_d, result.weight_all))
        fast_share, fast_weighted = _band(frac, wd, wa, fast)
        slow_share, slow_weighted = _band(frac, wd, wa, ~fast)
        in_d = result.tau[rows] > 0  # [n, H, J]: τ > 0 exactly where Θ̄ is in case (d)
        windows = {result.sliding_window[l] for l in rows}
        groups.append(GroupReadings(
            label=label,
            layers=[result.layer_indices[l] for l in rows],
            window=windows.pop() if len(windows) == 1 else None,
            span=span,
            share=float(result.anomalous_fraction[rows].mean()),
            weighted=float(result.weighted_anomalous_fraction[rows].mean()),
            fast_slices=int(fast.sum()),
            fast_share=fast_share, fast_weighted=fast_weighted,
            slow_share=slow_share, slow_weighted=slow_weighted,
            mean_angle_d=float(in_d.mean()),
            median_tau=float(np.median(result.tau[rows][in_d])) if in_d.any() else math.nan,
        ))
    return Readings(
        tokens=result.tokens,
        share=float(result.anomalous_fraction.mean()),
        weighted=float(result.weighted_anomalous_fraction.mean()),
        layer_share=result.anomalous_fraction.mean(-1).tolist(),
        layer_weighted=result.weighted_anomalous_fraction.mean(-1).tolist(),
        layers=list(result.layer_indices),
        groups=groups,
    )


def measure(model: nn.Module, input_ids: Tensor, model_name: str) -> Readings:
    """Probe ``model`` on ``input_ids`` (``[T]``) with the atlas's settings, the probe's
    defaults, and read it. Here rather than in the command so that the code hash that keys a
    saved cell (:mod:`anomaly.probe.atlas.cells`) covers every setting of the probe."""
    return readings(probe(model, input_ids, model_name=model_name))
