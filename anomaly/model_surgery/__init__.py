"""Every architecture-specific attribute path of the toolkit lives in this package.

The rest of the code asks this package *where* a loaded HF causal LM keeps its decoder
layers, attention modules, the modules whose outputs are the pre-RoPE queries and keys,
and its rotary embedding; it never spells ``model.model.layers[i].self_attn.q_proj``
itself (the same design as tuned-lens's ``model_surgery``).

What is read where (docs/conventions.md §1–2):

* The **pre-RoPE query/key** of a layer is the output of the last module that runs before
  the rotation: the q/k normalisation where a model has one (Qwen3, Gemma3, OLMo2, Cohere
  with ``use_qk_norm``), else the q/k projection (bias included), else a fused projection
  that is split the way the model splits it (GPT-NeoX: per head ``[q | k | v]``; Phi-3:
  ``[all q | all k | all v]``; CodeGen: per model-parallel shard ``[q | v | k]``). Whether
  a captured tensor is ``[b, s, h·d]``, ``[b, s, h, d]`` or ``[b, h, s, d]`` is read off its
  shape (:func:`seq_major_candidates`), not off a list of families.
* The **rotation actually applied** is the ``(cos, sin)`` pair the decoder hands each
  attention module as ``position_embeddings`` (:func:`rotation_table`). Its width gives the
  rotated dimension ``d_rot`` (partial rotary rotates the first ``d_rot`` dims of each head,
  as in HF), its magnitude is the rotary attention factor (YaRN), and it identifies which
  of the rotary module's frequency buffers the layer uses (per-layer bases, Gemma3's
  local/global rotary).
* None of this is trusted on its own: :mod:`anomaly.probe.activations` checks, on every
  capture, that the captured q/k rotated this way *are* the q/k the layer hands its
  attention function, and refuses (:class:`Unsupported`) where they are not.

One job per module: :mod:`~anomaly.model_surgery.refusals` (why a model is refused),
:mod:`~anomaly.model_surgery.config` (config readers), :mod:`~anomaly.model_surgery.modules`
(where the layers, attention and rotary modules are), :mod:`~anomaly.model_surgery.sites`
(the pre-RoPE q/k of every layer), :mod:`~anomaly.model_surgery.splits` (reading those outputs
as heads) and :mod:`~anomaly.model_surgery.rotation` (the rotation a layer receives). Every
public name is importable from ``anomaly.model_surgery`` itself.
"""

from __future__ import annotations

from anomaly.model_surgery.config import (
    ROTARY_FIELDS, config_of, declares_rotary, has_rope, max_positions_of, rope_base_of, scaling_record,
    text_config, train_length_of,
)
from anomaly.model_surgery.modules import attention_module, decoder_layers, frequency_buffers, rotary_modules
from anomaly.model_surgery.refusals import REFUSALS, Unsupported
from anomaly.model_surgery.rotation import (
    KERNEL_DEVIATION, ROTATES_INSIDE, FrequencyMatch, RotationTable, match_frequencies, position_embeddings_of,
    rotation_table,
)
from anomaly.model_surgery.sites import AttentionSite, Sites, attention_sites
from anomaly.model_surgery.splits import seq_major_candidates

__all__ = [
    "KERNEL_DEVIATION", "REFUSALS", "ROTARY_FIELDS", "ROTATES_INSIDE", "AttentionSite", "FrequencyMatch",
    "RotationTable", "Sites", "Unsupported", "attention_module", "attention_sites", "config_of", "decoder_layers",
    "declares_rotary", "frequency_buffers", "has_rope", "match_frequencies", "max_positions_of",
    "position_embeddings_of", "rope_base_of", "rotary_modules", "rotation_table", "scaling_record",
    "seq_major_candidates", "text_config", "train_length_of",
]
