"""CoCA's effective geometry on real weights (docs/conventions.md §5).

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

Command line (the bundled SmolLM2 by default, or an HF folder / ``.gguf`` / CoCA
checkpoint saved with ``save_pretrained``)::

    python -m anomaly.coca.geometry [--model PATH] [--tokens 512] [--distances 1 16 256]

With an unconverted model the key projection stands in for T, which measures the geometry
CoCA would start from when dropped into that model, not that of a trained CoCA model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from anomaly import analytic
from anomaly.coca.attention import coca_qk
from anomaly.errors import UserError
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
    from anomaly.probe.activations import capture

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
    layer, *, distances: Sequence[int], positions: Tensor, pairs: int, generator: torch.Generator
) -> LayerGeometry:
    """Slack geometry of one captured layer (:class:`anomaly.probe.LayerCapture`).

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


OWNER = "anomaly.coca.geometry"
"""Owner of ``--json`` files in their folder's manifest (see :mod:`anomaly.outputs`)."""


def main(argv: Sequence[str] | None = None) -> int | None:
    from anomaly import model_surgery
    from anomaly.cli import ArgumentParser, check_memory, layer_progress, transformers_bars
    from anomaly.corpus import default_document
    from anomaly.io import write_json
    from anomaly.models import BUNDLED, check_rope_config, load_config, load_model, load_tokenizer
    from anomaly.outputs import claim_file

    ap = ArgumentParser(prog="python -m anomaly.coca.geometry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder, .gguf file or CoCA checkpoint (default: bundled SmolLM2)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of Hamlet whose contents are used")
    ap.add_argument("--distances", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--positions", type=int, default=4096, help="absolute key positions 0..N (step 16)")
    ap.add_argument("--pairs", type=int, default=64, help="content pairs per layer and distance")
    ap.add_argument("--json", type=Path, help="write the per-layer results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (ours and transformers' weight loading)")
    args = ap.parse_args(argv)
    # Every check that needs no weights comes first: loading and measuring take minutes.
    if args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    if args.pairs < 1:
        raise UserError(f"--pairs must be at least 1, got {args.pairs}")
    if args.positions < 1:
        raise UserError(f"--positions must be at least 1 (key positions 0..N in steps of 16), got {args.positions}")
    if min(args.distances) < 1 or max(args.distances) >= args.tokens:
        raise UserError("every --distances value must be at least 1 and below --tokens "
                        f"({args.tokens}); raise --tokens or drop the long distances")
    target = claim_file(args.json, OWNER, flag="--json") if args.json else None
    name = args.model or BUNDLED
    config = load_config(name)
    check_rope_config(name, config, args.tokens, "CoCA's geometry is measured on a RoPE model's contents")
    check_memory(spread_bytes(model_surgery.text_config(config), args.pairs, args.positions),
                 f"--pairs {args.pairs} × --positions {args.positions}: the slack scores of one layer",
                 "lower --pairs or --positions")
    with transformers_bars(enabled=not args.quiet):
        tok = load_tokenizer(name)
        text = default_document()
        ids = tok(text.read()[: 20 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
        if ids.shape[1] < args.tokens:
            raise UserError(f"--tokens {args.tokens} exceeds the {ids.shape[1]} tokens of {text.name}; "
                            f"use --tokens {ids.shape[1]} or fewer")
        model = load_model(name, "cpu", "float32", tokenizer=tok).model
    # load_model has re-applied CoCA to a checkpoint saved with save_pretrained.
    variant = getattr(model.config, "coca_variant", None)
    positions = torch.arange(0, args.positions, 16)
    with layer_progress(model_surgery.text_config(config).num_hidden_layers, "layers", enabled=not args.quiet) as progress:
        layers = measure(model, ids, distances=args.distances, positions=positions, pairs=args.pairs,
                         progress=progress)
    summary = summarise(layers)
    # Written before anything is printed: a reader that stops early (| head) costs no file.
    if target is not None:
        with target.writing() as tmp:
            write_json(tmp / args.json.name, {"model": name, "tokens": ids.shape[1], "distances": args.distances,
                                             "layers": layers, **summary})
    source = f"trained CoCA ({variant})" if variant else "unconverted: k_proj stands in for T"
    print(f"Slack CoCA geometry of {name} ({source}), {ids.shape[1]} tokens of Hamlet")
    print("| layer | " + " | ".join(f"spread/|rel| @ s={s} (median, p90)" for s in args.distances) + " | case-(d) share |")
    print("| ---: |" + " ---: |" * (len(args.distances) + 1))
    for r in layers:
        cells = " | ".join(f"{r.relative_spread[s][0]:.2f}, {r.relative_spread[s][1]:.2f}" for s in args.distances)
        print(f"| {r.layer} | {cells} | {sum(r.case_d_fraction) / len(r.case_d_fraction):.3f} |")
    overall, case_d = summary["overall_median_spread"], summary["mean_case_d_share"]
    print("median over layers of the per-layer median spread/|relative|: "
          + ", ".join(f"s={s}: {v:.2f}" for s, v in overall.items())
          + f"; mean slack case-(d) share: {case_d:.3f} (strict: 0)")
    if target is not None:
        print(f"wrote {args.json}")
    return None


if __name__ == "__main__":
    from anomaly.cli import run_main

    raise SystemExit(run_main(main))
