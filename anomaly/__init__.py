"""anomaly: a research toolkit for the RoPE-attention anomaly and Collinear Constrained Attention.

Layers, each importing only from the ones above it:

* maths: :mod:`anomaly.rope` (RoPE conventions), :mod:`anomaly.analytic` (closed forms);
* model code: :mod:`anomaly.coca`, :mod:`anomaly.probe`, :mod:`anomaly.model_surgery`;
* experiments and CLIs: :mod:`anomaly.figures`, :mod:`anomaly.ablation`, ``python -m anomaly.probe``;
* notebooks under ``notebooks/``.
"""

__version__ = "0.1.0"
