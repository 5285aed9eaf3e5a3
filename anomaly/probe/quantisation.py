"""How far the probe's readings could be an artefact of the GGUF's 4-bit quantisation.

The bundled models are quantised GGUFs (docs/resources.md) and no unquantised checkpoint
is available offline, so the error the first quantisation made cannot be undone. What can
be measured is how much the readings move under a perturbation *of the same kind and
size*: the de-quantised weights are perturbed again, the perturbed model is probed on the
same tokens, and the readings are compared (docs/quantisation.md). The assumption, stated
plainly: a second error of the size of the first moves the readings about as much as the
first one did. Every scheme perturbs the tensors of one *scope* (``qk``: the query and key
projections; ``all``: every linear weight of the decoder layers) and nothing else:

* ``file``: re-quantise with each tensor's own GGUF type. The weights already lie on that
  grid, so this mostly returns them unchanged (Q4_1 keeps a block's min and max): a second
  rounding of rounded weights is *not* an independent error, which is why the next two exist.
* ``noise``: add uniform noise of ±½ step of the tensor's own grid (per block: the block's
  range over ``2^bits − 1``), the textbook size and shape of a fresh rounding error,
  without rounding.
* ``dither``: that noise, then the tensor's own quantiser: a fresh rounding of weights
  that are off the grid (its error is the noise's plus a rounding's, about √2 × one rounding).
* ``q4_0``: gguf's Q4_0 (symmetric 4-bit, blocks of 32), a 4-bit grid other than the file's.
* ``q8_0``: gguf's Q8_0, a much milder rounding, for reference.

The quantisers are the ``gguf`` package's own numpy ones (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
It cannot quantise the k-quants; :data:`STAND_INS` maps them to the nearest it can, or to
:func:`round_to_nearest` (Q6_K: symmetric 6-bit in blocks of 16, its block size).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from anomaly.errors import UserError
from anomaly.model_surgery import decoder_layers
from anomaly.probe.atlas.readings import Readings, readings
from anomaly.probe.core import probe
from anomaly.probe.result import ProbeResult

SCHEMES = ("file", "noise", "dither", "q4_0", "q8_0")
"""The perturbations, in the order they are reported (module docstring)."""
RANDOM_SCHEMES = ("noise", "dither")
"""Schemes that draw noise: run once per seed."""
SCOPES = ("qk", "all")
"""``qk``: query and key projections only; ``all``: every ``nn.Linear`` of the decoder layers."""

GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
"""Types ``gguf.quants`` quantises (gguf 0.19; the k-quants raise ``NotImplementedError``)."""
GRIDS: dict[str, tuple[int, int]] = {
    "Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q8_0": (8, 32),
    "Q4_K": (4, 32), "Q5_K": (5, 32), "Q6_K": (6, 16), "RTN6_16": (6, 16),
}
"""Type → (bits, block): the grid whose step sets the noise (k-quants: their sub-blocks)."""
STAND_INS = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q6_K": "RTN6_16"}
"""k-quant → the quantiser used in its place: Q4_K/Q5_K are asymmetric in sub-blocks of 32
like Q4_1/Q5_1 (whose scale and minimum are fp16, not 6-bit codes: a slightly finer grid);
Q6_K is symmetric 6-bit in blocks of 16 (:func:`round_to_nearest`)."""

_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
"""HF projection name → llama.cpp's tensor name (``blk.{layer}.{name}.weight``)."""
_HF_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


# --------------------------------------------------------------------------------------
# Quantisers: [rows, cols] float32 in, the de-quantised [rows, cols] float32 out
# --------------------------------------------------------------------------------------


def round_to_nearest(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Symmetric round-to-nearest in blocks of ``block`` along the last axis: each block
    on the grid ``d·{−(2^(b−1)−1) … 2^(b−1)−1}`` with ``d = max|w| / (2^(b−1)−1)``; all-zero
    blocks stay zero. ``w``: ``[..., cols]`` with ``cols`` a multiple of ``block``."""
    top = 2 ** (bits - 1) - 1
    x = w.astype(np.float64).reshape(*w.shape[:-1], -1, block)
    d = np.abs(x).max(-1, keepdims=True) / top
    q = np.clip(np.round(x / np.where(d > 0, d, 1.0)), -top, top)
    return (q * d).reshape(w.shape).astype(np.float32)


def grid(kind: str) -> tuple[str, int, int]:
    """The quantiser used for GGUF type ``kind`` (itself, or its :data:`STAND_INS`), its bits
    and block; a type with none is refused in one line."""
    used = STAND_INS.get(kind, kind)
    if used not in GRIDS:
        raise UserError(f"cannot re-quantise GGUF type {kind}: supported are "
                        f"{', '.join(GGUF_TYPES + tuple(STAND_INS))}")
    return (used, *GRIDS[used])


def quantise(w: np.ndarray, kind: str) -> np.ndarray:
    """``w`` (``[rows, cols]``, cols a multiple of the block) through the quantiser of
    GGUF type ``kind`` and back (a k-quant through its :data:`STAND_INS`)."""
    import gguf

    kind, bits, block = grid(kind)
    if w.shape[-1] % block:
        raise UserError(f"rows of {w.shape[-1]} values do not split into {kind}'s blocks of {block}")
    if kind == "RTN6_16":
        return round_to_nearest(w, bits, block)
    qtype = gguf.GGMLQuantizationType[kind]
    w = np.ascontiguousarray(w, dtype=np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def grid_noise(w: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise in ±½ step of ``kind``'s grid, per block: step = (max − min) of the
    block over ``2^bits − 1`` (the rounding error of a fresh quantisation, in size and shape,
    under the usual model). Same shape as ``w``."""
    _, bits, block = grid(kind)
    x = w.reshape(*w.shape[:-1], -1, block)
    step = (x.max(-1, keepdims=True) - x.min(-1, keepdims=True)) / (2**bits - 1)
    return (rng.uniform(-0.5, 0.5, x.shape) * step).reshape(w.shape).astype(np.float32)


def perturbed(w: np.ndarray, scheme: str, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``w`` under ``scheme`` (:data:`SCHEMES`), ``kind`` being the tensor's GGUF type."""
    if scheme == "file":
        return quantise(w, kind)
    if scheme == "noise":
        return w + grid_noise(w, kind, rng)
    if scheme == "dither":
        return quantise(w + grid_noise(w, kind, rng), kind)
    if scheme in ("q4_0", "q8_0"):
        return quantise(w, scheme.upper())
    raise ValueError(f"unknown scheme {scheme!r}")


# --------------------------------------------------------------------------------------
# Which weights, and their types in the file
# --------------------------------------------------------------------------------------


def scope_weights(model: nn.Module, scope: str) -> dict[str, nn.Parameter]:
    """The weights ``scope`` perturbs, by parameter name: ``qk`` the ``q_proj``/``k_proj``
    weights, ``all`` every ``nn.Linear`` weight inside the decoder layers (the output head
    and the embedding are not: the probe's q/k do not depend on the head)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for layer in decoder_layers(model):
        for sub_name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if scope == "all" or sub_name.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):
                found[names[id(module.weight)]] = module.weight
    if not found:
        raise UserError(f"the model has no {'q_proj/k_proj' if scope == 'qk' else 'linear'} weights in its "
                        "decoder layers to perturb (a fused query_key_value is not supported)")
    return found


def gguf_types(path: str, names: Sequence[str]) -> dict[str, str]:
    """The GGUF type of each HF parameter in ``names``, read from the file's tensor table."""
    import gguf

    table = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    out = {}
    for name in names:
        m = _HF_NAME.search(name)
        key = m and m.group(2) in _PROJECTIONS and f"blk.{m.group(1)}.{_PROJECTIONS[m.group(2)]}.weight"
        if not key or key not in table:
            raise UserError(f"cannot find the GGUF tensor of {name} in {path}")
        out[name] = table[key]
    return out


# --------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightError:
    """How far a perturbation moved the weights of its scope."""

    relative: float
    """``‖W′ − W‖ / ‖W‖`` (Frobenius, over all tensors of the scope together)."""
    max_tensor: float
    """The largest of the same ratio per tensor."""
    tensors: int
    """Tensors perturbed."""


@dataclass(frozen=True)
class Comparison:
    """One perturbed model's readings against the original's, same tokens."""

    scheme: str
    scope: str
    seed: int | None
    """The noise seed (``None`` for deterministic schemes)."""
    weights: WeightError
    readings: Readings
    """The perturbed model's readings (:mod:`anomaly.probe.atlas.readings`)."""
    max_layer_share: float
    """Largest ``|Δ|`` over layers of the layer's unweighted case-(d) share."""
    max_layer_weighted: float
    """Largest ``|Δ|`` over layers of the layer's weighted share."""
    max_head_weighted: float
    """Largest ``|Δ|`` over (layer, head) of the head's weighted share."""
    flips: float
    """Share of (layer, head, slice) whose mean initial angle Θ̄ entered or left case (d)."""


@dataclass
class QuantisationResult:
    """The readings of a quantised model against those of its perturbed copies."""

    model: str
    source: str
    note: str
    text: str
    tokens: int
    file_types: dict[str, dict[str, int]]
    """GGUF tensor kind (``attn_q``, ``ffn_down``, …) → type → tensors, over ``all``."""
    baseline: Readings
    comparisons: list[Comparison] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "definitions": DEFINITIONS}


DEFINITIONS = {
    "schemes": "file: re-quantised with each tensor's own GGUF type; noise: + uniform ±½ step of that type's "
               "grid per block; dither: that noise, then the tensor's own quantiser; q4_0 / q8_0: gguf's Q4_0 "
               "/ Q8_0 (k-quants re-quantised by a stand-in: Q4_K→Q4_1, Q5_K→Q5_1, Q6_K→symmetric 6-bit RTN, "
               "blocks of 16)",
    "scopes": "qk: q_proj and k_proj weights; all: every nn.Linear weight of the decoder layers",
    "readings": "anomaly.probe.atlas.readings on the same tokens: share (mean over heads of the case-(d) share), "
                "weighted (|q_j||k_j|-weighted), per layer and per rotary-base group (median tau over the "
                "(head, slice) whose mean angle is in case (d))",
    "flips": "share of (layer, head, slice) whose mean initial angle entered or left case (d)",
    "assumption": "a perturbation of the size of the file's own quantisation error moves the readings about "
                  "as much as that error did; a second rounding of rounded weights is not independent of the "
                  "first (scheme file), so noise and dither draw a fresh error of the grid's size",
}


def weight_error(before: dict[str, torch.Tensor], after: dict[str, np.ndarray]) -> WeightError:
    """:class:`WeightError` of ``after`` against ``before`` (same names and shapes)."""
    num = den = 0.0
    worst = 0.0
    for name, w in before.items():
        w64 = w.double().numpy()
        d2, n2 = float(((after[name] - w64) ** 2).sum()), float((w64**2).sum())
        num, den = num + d2, den + n2
        worst = max(worst, math.sqrt(d2 / n2) if n2 > 0 else 0.0)
    return WeightError(math.sqrt(num / den) if den > 0 else 0.0, worst, len(before))


def compare(base: ProbeResult, other: ProbeResult) -> dict[str, float]:
    """The :class:`Comparison` differences of ``other``'s readings from ``base``'s (same tokens)."""
    if not np.array_equal(base.input_ids, other.input_ids):
        raise ValueError("the two probes read different tokens")
    wfrac = np.abs(other.weighted_anomalous_fraction - base.weighted_anomalous_fraction)  # [L, H]
    layer = lambda a, b: float(np.abs(a.mean(-1) - b.mean(-1)).max())  # noqa: E731 [L] means
    return {
        "max_layer_share": layer(other.anomalous_fraction, base.anomalous_fraction),
        "max_layer_weighted": layer(other.weighted_anomalous_fraction, base.weighted_anomalous_fraction),
        "max_head_weighted": float(wfrac.max()) if wfrac.size else 0.0,
        "flips": float(((other.tau > 0) != (base.tau > 0)).mean()),
    }


def runs(schemes: Sequence[str], scopes: Sequence[str], seeds: int) -> Iterator[tuple[str, str, int | None]]:
    """(scheme, scope, seed) in report order: per scope, per scheme, per seed."""
    for scope in scopes:
        for scheme in schemes:
            for seed in (range(seeds) if scheme in RANDOM_SCHEMES else [None]):
                yield scheme, scope, seed


def measure(model: nn.Module, input_ids: torch.Tensor, types: dict[str, str], *,
            schemes: Sequence[str] = SCHEMES, scopes: Sequence[str] = SCOPES, seeds: int = 2,
            model_name: str | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[Readings, list[Comparison]]:
    """Probe ``model`` and each of its perturbed copies on ``input_ids``; the baseline's
    readings and one :class:`Comparison` per (scheme, scope, seed).

    ``types``: parameter name → GGUF type for every weight of scope ``all`` (the quantiser
    ``file``, ``noise`` and ``dither`` follow). The model is perturbed in place and put back
    exactly (the original weights are held as copies), also when a probe fails.
    """
    for kind in set(types.values()):
        grid(kind)  # refused before the first probe, not after
    base = probe(model, input_ids, model_name=model_name)
    base_readings = readings(base)
    out = []
    for scheme, scope, seed in runs(schemes, scopes, seeds):
        params = scope_weights(model, scope)
        original = {n: p.detach().to("cpu", torch.float32).clone() for n, p in params.items()}
        rng = np.random.default_rng(seed)
        new = {n: perturbed(w.numpy(), scheme, types[n], rng) for n, w in original.items()}
        if all(np.array_equal(new[n], w.numpy()) for n, w in original.items()):
            # The same weights give the same probe, bit for bit: no need to run it again
            # (``file`` on weights already on the file's grid).
            out.append(Comparison(scheme, scope, seed, weight_error(original, new), base_readings,
                                  **compare(base, base)))
        else:
            out.append(_probe_perturbed(model, input_ids, params, original, new, base, model_name,
                                        scheme, scope, seed))
        if progress is not None:
            progress(f"{scheme}/{scope}" + (f"/seed {seed}" if seed is not None else ""))
    return base_readings, out


def _probe_perturbed(model: nn.Module, input_ids: torch.Tensor, params: dict[str, nn.Parameter],
                     original: dict[str, torch.Tensor], new: dict[str, np.ndarray], base: ProbeResult,
                     model_name: str | None, scheme: str, scope: str, seed: int | None) -> Comparison:
    """Probe ``model`` with ``new`` in place of ``params`` and put ``original`` back, also
    when the probe fails."""
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(torch.from_numpy(new[n]))
        result = probe(model, input_ids, model_name=model_name)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
    return Comparison(scheme, scope, seed, weight_error(original, new), readings(result), **compare(base, result))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _tau(r: Readings) -> str:
    return ", ".join(f"{g.label}: {g.median_tau:.0f}" if not math.isnan(g.median_tau) else f"{g.label}: –"
                     for g in r.groups)


def to_markdown(result: QuantisationResult) -> str:
    """``quantisation.md``: the summary table, then the per-layer weighted shares."""
    b = result.baseline
    types = "; ".join(f"{k} " + ", ".join(f"{t}×{n}" for t, n in sorted(v.items()))
                      for k, v in sorted(result.file_types.items()))
    lines = [
        f"# Quantisation sensitivity: {result.model}, {result.tokens} tokens of {result.text}",
        "",
        f"Source: {result.source}. {result.note}.",
        f"GGUF types of the decoder's linear weights: {types}.",
        "",
        f"Original (de-quantised) model: case-(d) share {b.share:.4f}, weighted {b.weighted:.4f} "
        f"(chance 0.5); median τ of Θ̄ in case (d) per rotary base: {_tau(b)}.",
        "",
        "| scheme | scope | seed | rel. weight error (max tensor) | share (Δ) | weighted (Δ) "
        "| max layer \\|Δ\\| share / weighted | max head \\|Δ\\| weighted | Θ̄ case-(d) flips | median τ |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in result.comparisons:
        r, w = c.readings, c.weights
        lines.append(
            f"| {c.scheme} | {c.scope} | {'' if c.seed is None else c.seed} | {w.relative:.4f} ({w.max_tensor:.4f}) "
            f"| {r.share:.4f} ({r.share - b.share:+.4f}) | {r.weighted:.4f} ({r.weighted - b.weighted:+.4f}) "
            f"| {c.max_layer_share:.4f} / {c.max_layer_weighted:.4f} | {c.max_head_weighted:.4f} "
            f"| {c.flips:.4f} | {_tau(r)} |")
    scope = "all" if any(c.scope == "all" for c in result.comparisons) else "qk"
    shown = [c for c in result.comparisons if c.scope == scope and c.seed in (None, 0)]
    lines += ["", "Weighted case-(d) share per layer: the original, and its change under each scheme "
              f"(scope {scope}, seed 0).", "",
              "| layer | original | " + " | ".join(f"Δ {c.scheme}" for c in shown) + " |",
              "| ---: | ---: |" + " ---: |" * len(shown)]
    for i, layer in enumerate(b.layers):
        cells = " | ".join(f"{c.readings.layer_weighted[i] - b.layer_weighted[i]:+.4f}" for c in shown)
        lines.append(f"| {layer} | {b.layer_weighted[i]:.4f} | {cells} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Command: python -m anomaly.probe.quantisation
# --------------------------------------------------------------------------------------

OWNER = "anomaly.probe.quantisation"
"""Owner of the command's files in an output folder's manifest (:mod:`anomaly.outputs`)."""
OUTPUTS = ("quantisation.json", "quantisation.md")


def _gguf_path(model: str) -> str:
    """The GGUF file of a bundled short name or a ``.gguf`` path; refuses anything else."""
    from anomaly.bundled import BUNDLED_MODELS
    from anomaly.models import gguf_location

    found = gguf_location(model)
    if found is None:
        raise UserError(f"--model {model}: give a bundled GGUF model ({', '.join(BUNDLED_MODELS)}) or an "
                        "existing .gguf file; only a quantised model has a quantisation to measure")
    folder, name = found
    return str(folder / name)


def _parser():
    from pathlib import Path

    from anomaly.cli import ArgumentParser, positive_int

    p = ArgumentParser(prog="python -m anomaly.probe.quantisation",
                       description="How far the probe's readings move when the GGUF's de-quantised "
                                   "weights are quantised or perturbed again (docs/quantisation.md).")
    p.add_argument("--model", default="smollm2-135m", help="bundled GGUF short name or .gguf file")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of Hamlet probed (default 2048)")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--seeds", type=positive_int, default=2, help="noise draws of noise and dither (default 2)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import time
    from collections import Counter

    from anomaly.corpus import default_document
    from anomaly.io import Provenance, write_json, write_text
    from anomaly.models import check_rope_config, load_config, load_model, load_tokenizer
    from anomaly.outputs import claim

    args = _parser().parse_args(argv)
    if args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    path = _gguf_path(args.model)
    target = claim(args.out, OWNER, OUTPUTS, replace_own=True)
    check_rope_config(args.model, load_config(args.model), args.tokens, "the probe measures RoPE's initial angles")
    tokenizer = load_tokenizer(args.model)
    doc = default_document()
    ids = tokenizer(doc.read(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < args.tokens:
        raise UserError(f"--tokens {args.tokens} exceeds the {ids.numel()} tokens of {doc.name}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model, "cpu", torch.float32, tokenizer=tokenizer)
    types = gguf_types(path, list(scope_weights(loaded.model, "all")))
    kinds: dict[str, Counter] = {}
    for name, kind in types.items():
        kinds.setdefault(_PROJECTIONS[_HF_NAME.search(name).group(2)], Counter())[kind] += 1
    with torch.no_grad():
        baseline, comparisons = measure(loaded.model, ids[: args.tokens], types, schemes=args.schemes,
                                        scopes=args.scopes, seeds=args.seeds, model_name=args.model,
                                        progress=lambda what: print(f"{what} done at {time.perf_counter() - t0:.0f} s",
                                                                    flush=True))
    result = QuantisationResult(args.model, loaded.source, loaded.note, doc.name, args.tokens,
                                {k: dict(v) for k, v in kinds.items()}, baseline, comparisons)
    prov = Provenance.from_argv(model=args.model, seed=list(range(args.seeds)),
                                extra={"tokens": args.tokens, "text": doc.name, "device": "cpu", "dtype": "float32"})
    markdown = to_markdown(result)
    with target.writing() as tmp:
        write_json(tmp / OUTPUTS[0], {**result.to_json(), "provenance": prov})
        write_text(tmp / OUTPUTS[1], markdown)
    print(markdown, end="")
    print(f"wrote {args.out / OUTPUTS[0]} and {args.out / OUTPUTS[1]}")
    return 0


if __name__ == "__main__":
    from anomaly.cli import run_main

    raise SystemExit(run_main(main))
