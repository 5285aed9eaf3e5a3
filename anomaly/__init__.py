"""anomaly: a research toolkit for the RoPE-attention anomaly and Collinear Constrained Attention.

Layers, each importing only from the ones above it (docs/architecture.md; checked by
``tests/test_layers.py``):

* plumbing: errors, command-line helpers, atomic writes and provenance, output folders,
  :mod:`anomaly.plotting`, real texts;
* maths: :mod:`anomaly.rope` (RoPE conventions), :mod:`anomaly.analytic` (closed forms);
* model code: :mod:`anomaly.model_surgery`, :mod:`anomaly.coca`, :mod:`anomaly.models`,
  :mod:`anomaly.variants`, :mod:`anomaly.probe`, :mod:`anomaly.ablation`;
* commands (``python -m``): :mod:`anomaly.figures`, ``anomaly.probe``, ``anomaly.coca.geometry``,
  ``anomaly.ablation``;
* notebooks under ``notebooks/``.
"""

__version__ = "0.1.0"
