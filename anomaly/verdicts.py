"""The pre-registered verdict rule (docs/ablation.md, "Verdicts"): one test of
:mod:`anomaly.replication` (a :class:`~anomaly.replication.Paired` or
:class:`~anomaly.replication.Counts` comparison over replications) in plain words.

A difference is *established* only where both its 95 % interval and its exact test exclude
no difference; otherwise the words say how many replications there were and the smallest
difference the design could have detected at 80 % power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from anomaly.replication import ALPHA, Test


@dataclass(frozen=True)
class Verdict:
    """``word``: "agrees", "contradicts" or "not distinguishable"; ``text``: the word with
    what it rests on."""

    word: str
    text: str


def verdict(test: Test, expected: int, unit: str = "", digits: int = 2) -> Verdict:
    """The pre-registered rule (docs/ablation.md, "Verdicts").

    ``test`` is a :class:`Paired` or :class:`Counts` comparison; ``expected`` the sign of
    its ``estimate`` that the paper claims (+1 or −1), or 0 where the paper claims no
    difference. The difference is *established* only where both the 95 % interval (the
    paired t-interval, or the exact odds-ratio interval for counts) excludes no difference
    and the exact test gives ``p < 0.05``. Then the verdict is "agrees" when its sign is the
    claimed one, else "contradicts" (a claim of no difference is contradicted by any
    established difference). Otherwise it is "not distinguishable with n seeds" with the
    smallest difference the design could have detected at 80 % power, and a note where the
    exact test cannot reach 0.05 with this many seeds at all.
    """
    if _established(test):
        word = "agrees" if expected != 0 and np.sign(test.estimate) == expected else "contradicts"
        return Verdict(word, f"{word} (n = {test.n} seeds, p = {test.p:.3g})")
    return _not_distinguishable(test, unit, digits, "seeds")


def direction(test: Test, below: str, above: str, units: str, unit: str = "", digits: int = 2) -> Verdict:
    """The same rule where no sign is claimed beforehand: ``below`` or ``above`` (the sign of
    an established ``estimate``), else "not distinguishable with n ``units``" with the
    smallest difference detectable at 80 % power (e.g. the atlas's texts)."""
    if _established(test):
        word = below if test.estimate < 0 else above
        return Verdict(word, f"{word} (n = {test.n} {units}, p = {test.p:.3g})")
    return _not_distinguishable(test, unit, digits, units)


def _established(test: Test) -> bool:
    """Both the 95 % interval and the exact test exclude no difference."""
    return bool(test.excludes_null and test.p < ALPHA)


def _not_distinguishable(test: Test, unit: str, digits: int, units: str) -> Verdict:
    if test.n < 2:
        return Verdict("not distinguishable", f"not distinguishable with {test.n} {units.removesuffix('s')} "
                       "(no test is possible)")
    floor = f"the exact test cannot go below p = {test.min_p:.2g} with {test.n} {units}"
    if not math.isfinite(test.mde):
        # Either no outcome can pass (the floor), or none of the size the design allows
        # reaches 80 % power (counts: no rise over the comparator's observed share does).
        why = floor if test.min_p >= ALPHA else f"none reaches 80 % power with {test.n} {units}"
        return Verdict("not distinguishable", f"not distinguishable with {test.n} {units} (no difference is "
                       f"detectable: {why})")
    text = f"not distinguishable with {test.n} {units} (80 % power to detect |Δ| ≥ {test.mde:.{digits}f}{unit}"
    return Verdict("not distinguishable", text + (f"; {floor})" if test.min_p >= ALPHA else ")"))
