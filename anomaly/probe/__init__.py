"""Probe real models: per-head initial angles of the pre-RoPE queries and keys.

* :func:`capture` — the exact vectors each layer rotates, with its frequencies and layout.
* :func:`probe` — the anomaly's statistics over all causal pairs (the CLI's summary).

``python -m anomaly.probe --model smollm2-135m`` runs both on the bundled real model.
"""

from anomaly.probe.activations import Capture, LayerCapture, attention_logits, attention_probabilities, capture
from anomaly.probe.core import CHANCE_FRACTION, mean_logit_by_distance, probe

__all__ = [
    "CHANCE_FRACTION",
    "Capture",
    "LayerCapture",
    "attention_logits",
    "attention_probabilities",
    "capture",
    "mean_logit_by_distance",
    "probe",
]
