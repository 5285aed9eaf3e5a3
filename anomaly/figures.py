"""Analytic figures: Fig. 3's four scenarios, the anomaly map, scaling and decay (App. D).

``python -m anomaly.figures [--out figures]`` regenerates all of them as PDF + PNG with a
provenance record beside each. Results are plain dataclasses built from
:mod:`anomaly.analytic`; the plotting functions in :mod:`anomaly.plotting.analytic` turn
them into figures, so a notebook can inspect, change or re-plot any step. :data:`FIGURES`
is the registry (the shape of :data:`anomaly.plotting.style.Registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from anomaly import analytic as an
from anomaly.cli import ArgumentParser, UserError, run_main
from anomaly.io import Provenance, code_version
from anomaly.plotting import analytic as plots
from anomaly.plotting.style import Registry, figure_files, save_figures
from anomaly.rope import RopeScaling, inv_freq

PI = math.pi


@dataclass
class CaseCurve:
    """One panel of Fig. 3: a single slice's score versus signed distance."""

    case: str
    """``"a"``..``"d"`` (docs/conventions.md §3)."""
    theta0: float
    """Initial angle Θ in radians."""
    freq: float
    """Slice frequency θ in radians per token."""
    distances: Tensor
    """``[S]`` signed distances ``m − n`` shown (negative for a, c; positive for b, d)."""
    scores: Tensor
    """``[S]`` slice score ``cos(Θ + (m−n)θ)`` for unit magnitudes."""
    tau: float
    """τ in tokens (0 in the expected cases b and c)."""
    first_border: float
    """|distance| of the first rotary border in the panel's direction."""


def fig3_cases(freq: float = 2 * PI / 64, acute: float = 0.6 * PI, max_distance: int = 64) -> list[CaseCurve]:
    """The four Fig. 3 scenarios for one slice: Θ = ``acute`` in (a), (b), ``2π − acute``
    in (c), (d), so the anomalous cases mirror each other with the same τ.
    """
    if not 0 <= acute <= PI:
        raise UserError(f"acute angle must lie in [0, π], got {acute}")
    out = []
    for theta0, sign in ((acute, -1), (acute, 1), (2 * PI - acute, -1), (2 * PI - acute, 1)):
        s = sign * torch.arange(0, max_distance + 1, dtype=torch.float64)  # [S]
        case = an.scenario(theta0, m=1 + (sign > 0), n=1 + (sign < 0))
        # A border in the m < n direction mirrors one at 2π − Θ in the causal direction.
        border = an.first_border(theta0 if sign > 0 else 2 * PI - theta0, freq)
        out.append(
            CaseCurve(
                case=case,
                theta0=theta0,
                freq=freq,
                distances=s,
                scores=an.slice_score(theta0, s, freq),
                tau=float(an.diminished_tokens(theta0, freq, case)),
                first_border=float(border),
            )
        )
    return out


@dataclass
class AnomalyMap:
    """Slice score over (initial angle × signed distance) and where it is rising."""

    theta0: Tensor
    """``[A]`` initial angles, radians, in ``[0, 2π)``."""
    distances: Tensor
    """``[S]`` signed distances ``m − n``."""
    freq: float
    """Slice frequency θ (rad/token)."""
    scores: Tensor
    """``[A, S]`` ``cos(Θ + sθ)``."""
    rising: Tensor
    """``[A, S]`` bool: the score rises as |distance| grows (anywhere in its period)."""
    abnormal: Tensor
    """``[A, S]`` bool: the abnormal area proper, ``0 < |s| < τ`` on the anomalous side —
    keys nearer than the first rotary border that score *below* farther ones."""
    tau: Tensor
    """``[A]`` τ in the causal (d) and anti-causal (a) direction, signed like the distance."""


def anomaly_map(freq: float = 2 * PI / 64, max_distance: int = 64, n_angles: int = 361) -> AnomalyMap:
    theta = torch.linspace(0, 2 * PI, n_angles, dtype=torch.float64)[:-1]  # [A]
    s = torch.arange(-max_distance, max_distance + 1, dtype=torch.float64)  # [S]
    scores = an.slice_score(theta[:, None], s[None, :], freq)
    rising = an.is_rising(theta[:, None], freq, s[None, :]) & (s[None, :] != 0)
    tau = torch.where(
        theta > PI, an.diminished_tokens(theta, freq, "d"), -an.diminished_tokens(theta, freq, "a")
    )
    lo, hi = torch.minimum(tau, torch.zeros_like(tau)), torch.maximum(tau, torch.zeros_like(tau))
    abnormal = (s[None, :] > lo[:, None]) & (s[None, :] < hi[:, None]) & (s[None, :] != 0)
    return AnomalyMap(theta0=theta, distances=s, freq=freq, scores=scores, rising=rising,
                      abnormal=abnormal, tau=tau)


@dataclass
class ScalingStudy:
    """τ per slice for one initial angle under several frequency scalings (App. D.2)."""

    head_dim: int
    """Head dimension d."""
    base: float
    """RoPE base."""
    theta0: float
    """Initial angle used for every slice (> π, so the causal slice is anomalous)."""
    train_length: int
    """Training context length T (for YaRN and LLaMA-3 ramps, and the rotation count)."""
    names: list[str]
    """Scaling labels, ``"none"`` first."""
    effects: dict[str, an.InterpolationEffect] = field(default_factory=dict)
    """Per scaling: τ, integer positions, exact and paper growth ratios per slice."""


def scaling_study(
    head_dim: int = 128, base: float = 1e4, theta0: float = 1.5 * PI, factor: float = 4.0, train_length: int = 2048
) -> ScalingStudy:
    """PI (``k = factor``), NTK-aware (``λ = factor``), YaRN and LLaMA-3 (``factor``)."""
    scalings = {
        "none": RopeScaling(),
        f"PI (k={factor:g})": RopeScaling(type="linear", factor=factor),
        f"NTK (λ={factor:g})": RopeScaling(type="ntk", factor=factor),
        f"YaRN (s={factor:g})": RopeScaling(type="yarn", factor=factor, original_max_position_embeddings=train_length),
        f"LLaMA-3 (s={factor:g})": RopeScaling(
            type="llama3", factor=factor, original_max_position_embeddings=train_length
        ),
    }
    theta = torch.full((head_dim // 2,), theta0, dtype=torch.float64)
    effects = {name: an.interpolation_effect(theta, head_dim, base, s) for name, s in scalings.items()}
    return ScalingStudy(head_dim, base, theta0, train_length, list(scalings), effects)


@dataclass
class DecayStudy:
    """Content-free long-term decay terms of Su's and the CoCA bound (App. D.1)."""

    distances: Tensor
    """``[S]`` distances."""
    su: Tensor
    """``[S]`` ``(1/(d/2)) Σ_j |S_{j+1}|`` (RoPE)."""
    coca: Tensor
    """``[S]`` ``(1/(d/2)) Σ_j |C_{j+1}|`` (CoCA)."""
    head_dim: int
    base: float


def decay_study(head_dim: int = 128, base: float = 1e4, max_distance: int = 4096) -> DecayStudy:
    s = torch.unique(torch.logspace(0, math.log10(max_distance), 400, dtype=torch.float64).round())
    f = inv_freq(head_dim, base)
    half = head_dim // 2
    return DecayStudy(s, an.su_decay(s, f) / half, an.coca_decay(s, f) / half, head_dim, base)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

FIGURES: Registry = {
    "fig3_cases": lambda: plots.plot_fig3_cases(fig3_cases()),
    "fig3_map": lambda: plots.plot_anomaly_map(anomaly_map()),
    "scaling_borders": lambda: plots.plot_scaling(scaling_study()),
    "decay_bounds": lambda: plots.plot_decay(decay_study()),
}
"""Figure name → its drawing from the default study (no inputs)."""
OWNER = "anomaly.figures"
"""Owner of these figures in an output folder's manifest (see :mod:`anomaly.outputs`)."""


def make_all(out: str | Path, only: Sequence[str] | None = None, command: str | None = None) -> list[Path]:
    """Regenerate the analytic figures ``only`` (default: all of :data:`FIGURES`) into the
    folder ``out``; returns the files written.

    Files in ``out`` other than these figures' are left alone; an existing file of the same
    name that this command did not write is refused (:func:`anomaly.outputs.claim`).
    """
    from anomaly.outputs import claim

    only = list(FIGURES) if only is None else list(only)
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        raise UserError(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    target = claim(out, OWNER, figure_files(only))
    code = code_version("anomaly.figures")  # the same record from the CLI, a test or a notebook
    prov = Provenance.from_argv(code=code) if command is None else Provenance(command=command, code=code)
    with target.writing() as tmp:
        save_figures({name: FIGURES[name] for name in only}, tmp, prov)
    return list(target.written)


def main(argv: Sequence[str] | None = None) -> int:
    from anomaly.plotting.style import use_file_backend

    parser = ArgumentParser(prog="python -m anomaly.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures", help="output directory (default: figures)")
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES), help="figures to make")
    args = parser.parse_args(argv)
    use_file_backend()
    # The record names the command in one form however it was typed (the default --out
    # spelled out or not), so both regenerate the same bytes.
    only = "" if list(args.only) == list(FIGURES) else " --only " + " ".join(args.only)
    command = f"python -m anomaly.figures --out {Path(args.out).as_posix()}{only}"
    for path in make_all(args.out, args.only, command=command):
        if path.suffix == ".pdf":
            print(f"wrote {path.with_suffix('')}.{{pdf,png,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
