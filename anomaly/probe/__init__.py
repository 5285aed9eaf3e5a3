"""Probe real models: per-head initial angles of the pre-RoPE queries and keys.

* :func:`capture` — the exact vectors each layer rotates, with its frequencies and layout.
* :func:`probe` — the anomaly's statistics over all causal pairs, as a
  :class:`ProbeResult` (the CLI's ``summary.json`` and ``arrays.npz``); CoCA models are
  measured by the contents CoCA scores with (:mod:`anomaly.probe.coca`).

``python -m anomaly.probe --model smollm2-135m`` runs both on the bundled real model.
"""

from anomaly.probe.activations import Capture, LayerCapture, attention_logits, attention_probabilities, capture
from anomaly.probe.core import mean_logit_by_distance, probe
from anomaly.probe.result import CHANCE_FRACTION, ProbeResult

__all__ = [
    "CHANCE_FRACTION",
    "Capture",
    "LayerCapture",
    "ProbeResult",
    "attention_logits",
    "attention_probabilities",
    "capture",
    "mean_logit_by_distance",
    "probe",
]
