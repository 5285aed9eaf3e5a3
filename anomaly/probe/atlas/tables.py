"""The atlas's comparison over texts: every reading against chance, models against each
other and the longest length against the shortest, with the text as the unit.

Every statistic is :mod:`anomaly.replication`'s: a reading's mean over texts with its
Student-t 95 % interval and the exact sign-flip test of its difference from chance (1/2 for
a share), or of a paired difference (two models on the same texts, one model at two lengths
of the same texts). A difference is *established* only where the interval and the exact
test both exclude none (:func:`anomaly.verdicts.direction`); otherwise the table gives
the smallest difference the texts could have shown with 80 % power.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import combinations

from anomaly import replication
from anomaly.verdicts import direction
from anomaly.analytic import CHANCE_FRACTION
from anomaly.probe.atlas.readings import Readings, label_base
from anomaly.probe.atlas.texts import Text

ALL = "all layers"
"""The group name of readings over every probed layer."""
SHARES = ("share", "weighted", "fast_share", "fast_weighted", "slow_share", "slow_weighted", "mean_angle_d")
"""Readings whose chance level is 1/2 (isotropic phases put Θ, and Θ̄, in case (d) half the time)."""
READINGS = (*SHARES, "median_tau")
LABELS = {
    "share": "case-(d) share", "weighted": "case-(d) share, weighted",
    "fast_share": "fast slices", "fast_weighted": "fast slices, weighted",
    "slow_share": "slow slices", "slow_weighted": "slow slices, weighted",
    "mean_angle_d": "Θ̄ in case (d)", "median_tau": "median τ (tokens)",
}


@dataclass(frozen=True)
class Cell:
    """One probe of the atlas: a model on the first ``readings.tokens`` tokens of a text."""

    model: str
    text: Text
    readings: Readings

    def value(self, group: str, reading: str) -> float | None:
        """A reading of the whole model (``group == ALL``: share and weighted only) or of one
        layer group; ``None`` where the model has no such group or reading."""
        if group == ALL:
            return getattr(self.readings, reading) if reading in ("share", "weighted") else None
        g = self.readings.group(group)
        return None if g is None else getattr(g, reading)


@dataclass(frozen=True)
class Row:
    """One reading of one model at one length, over texts (all, or one kind)."""

    model: str
    tokens: int
    group: str
    reading: str
    texts: str
    """``"all"``, ``"prose"`` or ``"code"``."""
    values: dict[str, float]
    """Text name → value."""
    mean: float
    low: float
    high: float
    sd: float
    p: float | None
    """Exact sign-flip p of the difference from chance (``None`` for τ)."""
    verdict: str


@dataclass(frozen=True)
class Contrast:
    """A paired difference over texts: two models at one length, or one model at two."""

    what: str
    """E.g. ``"gemma3-270m − smollm2-135m"`` or ``"32768 − 512 tokens"``."""
    model: str
    tokens: int | str
    group: str
    reading: str
    values: dict[str, float]
    """Text name → difference."""
    estimate: float
    low: float
    high: float
    p: float
    mde: float
    verdict: str


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer shares of one model at one length, every text."""

    model: str
    tokens: int
    layers: list[int]
    """``[L]`` decoder layer indices."""
    groups: list[str]
    """``[L]`` each layer's group."""
    share: dict[str, list[float]]
    """Text name → ``[L]`` unweighted shares (mean over the layer's heads)."""
    weighted: dict[str, list[float]]
    """Text name → ``[L]`` weighted shares."""


@dataclass(frozen=True)
class SliceSplit:
    """How one layer group's slices divide into fast and slow (the same at every length)."""

    model: str
    group: str
    span: int
    """Tokens the group's layers score in training (the training length, or a shorter window)."""
    fast_slices: int
    """Slices with at least one turn over ``span``; the rest are slow."""


@dataclass
class Atlas:
    """The comparison: :class:`Row` per (model, length, group, reading, texts), the paired
    :class:`Contrast` rows, the per-layer :class:`LayerProfile` and each group's
    :class:`SliceSplit`."""

    rows: list[Row] = field(default_factory=list)
    models: list[Contrast] = field(default_factory=list)
    lengths: list[Contrast] = field(default_factory=list)
    profiles: list[LayerProfile] = field(default_factory=list)
    splits: list[SliceSplit] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "models": [asdict(c) for c in self.models],
                "lengths": [asdict(c) for c in self.lengths], "profiles": [asdict(p) for p in self.profiles],
                "splits": [asdict(s) for s in self.splits]}

    def row(self, model: str, tokens: int, group: str, reading: str, texts: str = "all") -> Row | None:
        return next((r for r in self.rows if (r.model, r.tokens, r.group, r.reading, r.texts)
                     == (model, tokens, group, reading, texts)), None)


def _groups(cells: list[Cell]) -> list[str]:
    labels = {g.label for c in cells for g in c.readings.groups}
    return [ALL, *sorted(labels, key=label_base)]


def _values(cells: list[Cell], group: str, reading: str) -> dict[str, float]:
    out = {}
    for c in cells:
        v = c.value(group, reading)
        if v is not None and math.isfinite(v):
            out[c.text.name] = v
    return out


def _row(model: str, tokens: int, group: str, reading: str, texts: str, values: dict[str, float]) -> Row:
    idx = {name: i for i, name in enumerate(sorted(values))}  # replication pairs by integer unit
    per = {idx[n]: v for n, v in values.items()}
    m = replication.seed_mean(per)
    if reading in SHARES:
        test = replication.paired(per, {i: CHANCE_FRACTION for i in per})
        word = direction(test, "below chance", "above chance", "texts", digits=3).text
        p = test.p
    else:
        word, p = "", None
    return Row(model, tokens, group, reading, texts, dict(sorted(values.items())), m.mean, m.low, m.high, m.sd,
               p, word)


def _contrast(what: str, model: str, tokens: int | str, group: str, reading: str,
              a: dict[str, float], b: dict[str, float], below: str, above: str) -> Contrast | None:
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    idx = {n: i for i, n in enumerate(common)}
    test = replication.paired({idx[n]: a[n] for n in common}, {idx[n]: b[n] for n in common})
    word = direction(test, below, above, "texts", digits=3).text
    return Contrast(what, model, tokens, group, reading, {n: a[n] - b[n] for n in common}, test.estimate,
                    test.low, test.high, test.p, test.mde, word)


def load_cells(record: dict) -> list[Cell]:
    """The cells of a written ``atlas.json`` (its parsed ``record``), texts checked against
    the corpus: ``compare(load_cells(record))`` gives its comparison again, for a notebook
    or a new figure, without probing."""
    texts = {t["name"]: Text.from_json(t) for t in record["texts"]}
    skip = ("model", "text", "kind")
    return [Cell(c["model"], texts[c["text"]], Readings.from_json({k: v for k, v in c.items() if k not in skip}))
            for c in record["cells"]]


def _splits(model: str, cells: list[Cell]) -> list[SliceSplit]:
    """Each group's fast/slow split, which must be one over every cell of ``model``."""
    found = {(g.label, g.span, g.fast_slices) for c in cells for g in c.readings.groups}
    labels = [label for label, _, _ in found]
    if len(labels) != len(set(labels)):
        raise ValueError(f"{model}'s cells split a layer group's slices in different ways: {sorted(found)}")
    return [SliceSplit(model, label, span, fast) for label, span, fast in
            sorted(found, key=lambda x: label_base(x[0]))]


def compare(cells: list[Cell]) -> Atlas:
    """The atlas of ``cells`` (every model × length × text probed)."""
    atlas = Atlas()
    models = list(dict.fromkeys(c.model for c in cells))
    for model in models:
        mine = [c for c in cells if c.model == model]
        lengths = sorted({c.readings.tokens for c in mine})
        groups = _groups(mine)
        atlas.splits += _splits(model, mine)
        for tokens in lengths:
            at = [c for c in mine if c.readings.tokens == tokens]
            first = at[0].readings
            group_of = {layer: g.label for g in first.groups for layer in g.layers}
            atlas.profiles.append(LayerProfile(
                model, tokens, first.layers, [group_of[layer] for layer in first.layers],
                {c.text.name: c.readings.layer_share for c in at}, {c.text.name: c.readings.layer_weighted for c in at}))
            for group in groups:
                for reading in READINGS:
                    for texts in ("all", "prose", "code"):
                        subset = at if texts == "all" else [c for c in at if c.text.kind == texts]
                        values = _values(subset, group, reading)
                        if values:
                            atlas.rows.append(_row(model, tokens, group, reading, texts, values))
        if len(lengths) > 1:  # the longest length against the shortest, text by text
            lo, hi = lengths[0], lengths[-1]
            for group in groups:
                for reading in READINGS:
                    a = _values([c for c in mine if c.readings.tokens == hi], group, reading)
                    b = _values([c for c in mine if c.readings.tokens == lo], group, reading)
                    c = _contrast(f"{hi} − {lo} tokens", model, f"{hi} vs {lo}", group, reading, a, b,
                                  "lower at the longer length", "higher at the longer length")
                    if c is not None:
                        atlas.lengths.append(c)
    for first, second in combinations(models, 2):
        shared = sorted({c.readings.tokens for c in cells if c.model == first}
                        & {c.readings.tokens for c in cells if c.model == second})
        for tokens in shared:
            for reading in ("share", "weighted"):
                a = _values([c for c in cells if c.model == second and c.readings.tokens == tokens], ALL, reading)
                b = _values([c for c in cells if c.model == first and c.readings.tokens == tokens], ALL, reading)
                c = _contrast(f"{second} − {first}", f"{second} vs {first}", tokens, ALL, reading, a, b,
                              f"lower in {second}", f"higher in {second}")
                if c is not None:
                    atlas.models.append(c)
    return atlas


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(atlas: Atlas, readings: tuple[str, ...] = ("share", "weighted", "fast_weighted", "slow_weighted",
                                                        "mean_angle_d", "median_tau")) -> str:
    """The atlas as markdown tables: each group's fast/slow split, readings against chance
    (all texts), then by text kind, then the paired contrasts."""
    out = ["## Fast and slow slices", "",
           "*Fast* slices turn at least once over the distances their layers score in training (the span: "
           "the training length, or the sliding window where shorter); *slow* ones never do.", "",
           "| model | layers | span (tokens) | fast slices |", "| --- | --- | ---: | ---: |",
           *(f"| {s.model} | {s.group} | {s.span} | {s.fast_slices} |" for s in atlas.splits), "",
           "## Readings over texts (mean, 95 % t-interval over texts; chance = 0.5 for shares)", "",
           "| model | tokens | layers | reading | n | mean | 95 % interval | p vs chance | verdict |",
           "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | --- |"]
    for r in atlas.rows:
        if r.texts == "all" and r.reading in readings:
            digits = 0 if r.reading == "median_tau" else 3
            out.append(f"| {r.model} | {r.tokens} | {r.group} | {LABELS[r.reading]} | {len(r.values)} | "
                       f"{_fmt(r.mean, digits)} | [{_fmt(r.low, digits)}, {_fmt(r.high, digits)}] | "
                       f"{_fmt(r.p, 3)} | {r.verdict} |")
    out += ["", "## By text kind (weighted share)", "",
            "| model | tokens | layers | texts | n | mean | 95 % interval | per text |",
            "| --- | ---: | --- | --- | ---: | ---: | --- | --- |"]
    for r in atlas.rows:
        if r.texts != "all" and r.reading == "weighted":
            per = ", ".join(f"{v:.3f}" for v in r.values.values())
            out.append(f"| {r.model} | {r.tokens} | {r.group} | {r.texts} | {len(r.values)} | {_fmt(r.mean)} | "
                       f"[{_fmt(r.low)}, {_fmt(r.high)}] | {per} |")
    for title, rows in (("Models compared on the same texts", atlas.models),
                        ("Longest against shortest length, text by text", atlas.lengths)):
        out += ["", f"## {title} (paired over texts)", "",
                "| difference | model | tokens | layers | reading | n | mean Δ | 95 % interval | p | verdict |",
                "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
        for c in rows:
            if c.reading in readings:
                digits = 0 if c.reading == "median_tau" else 3
                out.append(f"| {c.what} | {c.model} | {c.tokens} | {c.group} | {LABELS[c.reading]} | "
                           f"{len(c.values)} | {_fmt(c.estimate, digits)} | [{_fmt(c.low, digits)}, "
                           f"{_fmt(c.high, digits)}] | {_fmt(c.p)} | {c.verdict} |")
    return "\n".join(out) + "\n"
