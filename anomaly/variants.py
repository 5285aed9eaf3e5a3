"""The attention variants of the ablation, in one place: what each is called, how it is drawn,
how it is made from a LLaMA model, how the probe reads it and what else is measured on it.

A *variant* is the attention a model scores with: ``rope`` (plain RoPE attention),
``coca_slack`` and ``coca_strict`` (CoCA, docs/conventions.md §5). Its name is what the files
say: the ablation's ``results.json`` keys and model folders, and the ``kind`` field of the
probe's ``summary.json``. The ablation (:mod:`anomaly.ablation`), the probe
(:mod:`anomaly.probe`) and their figures read everything else about a variant from
:data:`REGISTRY`, so a new variant is one :class:`Variant` entry plus its conversion: a new
CoCA form names it in ``coca`` (its attention lives in :mod:`anomaly.coca`), any other
attention (NoPE, ALiBi) brings a ``convert`` callable.

This module describes; it builds nothing and imports no model, experiment or plotting code
(colours are names of :data:`anomaly.plotting.style.PALETTE`, resolved where a figure is
drawn), so a figure's provenance (:func:`anomaly.io.code_version`) gains only this file. The
one builder, :func:`anomaly.ablation.train.build_llama`, applies the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from anomaly.errors import UserError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Variant:
    """One attention variant: its names, its look in figures, how it is made, how it is measured."""

    name: str
    """The name on disk: ``results.json`` keys, ``<out>/<name>/seed<s>/`` folders, the probe's
    ``kind``, ``--variants`` and ``train.lr_by_variant``. Never renamed once results exist."""
    label: str
    """In tables, legends and titles (``"CoCA slack"``)."""
    short: str
    """In crowded legends and contrasts (``"slack"``)."""
    colour: str
    """A name in :data:`anomaly.plotting.style.PALETTE` (Okabe & Ito, colour-blind safe)."""
    marker: str
    """Matplotlib marker of its points."""
    coca: str | None = None
    """CoCA's name of the form (``"slack"``, ``"strict"``: the ``variant`` argument of
    :func:`anomaly.coca.to_coca` and ``coca_variant`` of its layers), ``None`` for plain
    attention. How the model is made: a fresh LLaMA converted by ``to_coca(model, coca)``. How
    the probe reads it: a CoCA model's layers say their form, and the probe measures CoCA's
    effective contents instead of the raw projections. The ablation's
    ``model.coca_init_gain`` scales the initial q/T weights of CoCA variants only."""
    convert: Callable[["nn.Module"], "nn.Module"] | None = None
    """The conversion of a variant that is neither plain RoPE nor a CoCA form: freshly
    initialised ``LlamaForCausalLM`` → the variant's model (may convert in place). It must
    keep every parameter, so that every variant of a seed starts from the same weights."""
    probed: bool = True
    """Whether the probe can read the model (its anomalous fractions go into ``geometry.json``)."""
    slack_geometry: bool = False
    """Whether the score moves with the query's absolute position (slack CoCA), so the probe
    and the ablation also measure how far it departs from a relative score."""
    coefficient_sparsity: bool = False
    """Whether the model has CoCA's ReLU'd collinear coefficients, whose zeros the ablation counts."""

    def probe_title(self) -> str:
        """What a probe figure's title adds after the model's name: ``" (CoCA slack, effective
        angles)"``, nothing for plain attention."""
        return f" ({self.label}, effective angles)" if self.coca else ""

    def probe_report(self) -> str:
        """What the probe's closing words add after the model's name."""
        return f" ({self.label}: its effective initial angles)" if self.coca else ""


REGISTRY: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("rope", "RoPE", "RoPE", "vermillion", "o"),
        Variant("coca_slack", "CoCA slack", "slack", "blue", "s", coca="slack", slack_geometry=True,
                coefficient_sparsity=True),
        Variant("coca_strict", "CoCA strict", "strict", "green", "D", coca="strict", coefficient_sparsity=True),
    )
}
"""Every variant by name, in the order they are trained and reported (the ablation's default)."""


def names() -> tuple[str, ...]:
    """The registered variants' names, in :data:`REGISTRY` order."""
    return tuple(REGISTRY)


def variant(name: str) -> Variant:
    """The registered variant called ``name``.

    Raises:
        UserError: no variant has that name (naming the ones there are).
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown variant {name!r}; the variants are {', '.join(REGISTRY)}") from None


def check_names(given: "list[str] | tuple[str, ...]") -> None:
    """Refuse, in one line, names that are not registered variants."""
    unknown = [v for v in given if v not in REGISTRY]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(map(str, unknown))}; choose from {', '.join(REGISTRY)}")


def of_coca(form: str | None) -> Variant:
    """The variant the probe reads a model as, from its CoCA form (``None``: no CoCA layer)."""
    for v in REGISTRY.values():
        if v.probed and v.coca == form and v.convert is None:
            return v
    raise UserError(f"no registered variant is a model with CoCA form {form!r}")
