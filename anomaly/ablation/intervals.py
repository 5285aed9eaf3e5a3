"""95 % intervals of the ablation's numbers, pooled over seeds (scipy.stats).

Every number of the ablation is a mean over *units*, a unit being one (seed, item) pair:
for perplexity an item is a scored held-out segment, for passkey retrieval a prompt.
The intervals resample or count those units, so they cover both which prompts or
segments were drawn and which seeds were trained; with three seeds, the seeds' own spread
is shown beside them (the ``*_per_seed`` lists) rather than estimated on its own.

* **Passkey** (a share of prompts): Wilson score interval of the pooled count
  (:func:`scipy.stats.binomtest`), exact for 0 and 1 where a normal interval is not.
* **Perplexity**: percentile bootstrap (:func:`scipy.stats.bootstrap`, 2000 resamples,
  fixed seed) of ``exp(mean NLL)`` over the pooled segments; every segment scores the same
  number of tokens, so the mean of segment means is the mean over tokens.
* **Digit loss**: the same bootstrap of the mean over pooled prompts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
"""Coverage of every interval."""
RESAMPLES = 2000
"""Bootstrap resamples."""
BOOTSTRAP_SEED = 0
"""Seed of the bootstrap's resampling, so that intervals are reproducible."""


def proportion_ci(successes: int, trials: int) -> tuple[float, float]:
    """Wilson 95 % interval of ``successes / trials``."""
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean of ``values``."""
    x = np.asarray(values, dtype=float).ravel()
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean())
    if not np.all(np.isfinite(x)):
        return math.nan, math.nan
    res = stats.bootstrap((x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                          method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def ppl_ci(segment_nll: Sequence[Sequence[float]]) -> tuple[float, float]:
    """95 % interval of the perplexity ``exp(mean NLL)`` of ``[seed][segment]`` NLLs."""
    low, high = mean_ci(np.asarray(segment_nll, dtype=float))
    return ppl_of(low), ppl_of(high)


def pooled_ppl(segment_nll: Sequence[Sequence[float]]) -> float:
    """``exp`` of the mean NLL over every seed's segments (the geometric mean over seeds
    of their perplexities, as every seed scores the same segments)."""
    return ppl_of(float(np.mean(np.asarray(segment_nll, dtype=float))))


def ppl_of(nll: float) -> float:
    """Perplexity of a mean NLL in nats (``inf`` past float range)."""
    return math.exp(nll) if nll < 700 else math.inf
