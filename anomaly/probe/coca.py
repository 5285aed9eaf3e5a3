"""CoCA models in the probe: which variant a model is, and what its layers score with.

A CoCA layer (:func:`anomaly.coca.to_coca`) hands its attention ``q′``/``k′``, CoCA's
per-token transforms of the raw query and T projections (docs/conventions.md §5), not the
rotated projections. The probe therefore measures CoCA's *effective* contents: the vectors
whose RoPE rotation gives ``q′``/``k′`` (:func:`anomaly.coca.coca_qk` with
``rotated=False``). Their initial angles are the ones the score is made of: 0 in every
slice for strict CoCA by construction (both contents real and non-negative; to float64
rounding, hence :data:`ZERO_ANGLE_TOL`), measured for slack CoCA, whose query content also
depends on the query's absolute position.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from anomaly.errors import UserError
from anomaly.probe.activations import LayerCapture

ZERO_ANGLE_TOL = 1e-9
"""Radians. CoCA's contents are computed in float64 by rotating ``q′``/``k′`` back to
position 0, so an exact angle of 0 comes back as ±1e-16 rad; Θ within this of 0 (mod 2π)
is read as 0. A genuine angle that small changes no score."""


def model_variant(model: nn.Module) -> str:
    """The registered variant (:mod:`anomaly.variants`) ``model``'s attention scores with:
    ``"rope"``, ``"coca_strict"`` or ``"coca_slack"``, read from the CoCA form of its layers.

    Raises:
        UserError: the config records a CoCA variant but the layers are plain attention (a
            CoCA checkpoint loaded with ``from_pretrained``: the probe would measure the
            wrong geometry), or the layers mix variants.
    """
    from anomaly import variants
    from anomaly.coca.hf import CONFIG_KEY, coca_layers
    from anomaly.model_surgery import config_of

    declared = getattr(config_of(model), CONFIG_KEY, None)
    forms = {layer.coca_variant for layer in coca_layers(model)}
    if not forms:
        if declared is not None:
            raise UserError(
                f"the model's config says CoCA ({declared}) but its attention layers are plain RoPE "
                "attention; load it with anomaly.coca.load_coca (python -m anomaly.probe does)"
            )
        return variants.of_coca(None).name
    if len(forms) > 1 or (declared is not None and {declared} != forms):
        raise UserError(f"the model mixes CoCA variants ({', '.join(sorted(forms | {declared} - {None}))}); "
                        "convert every layer with anomaly.coca.to_coca(model, variant)")
    return variants.of_coca(forms.pop()).name


def effective_layer(layer: LayerCapture) -> LayerCapture:
    """A CoCA layer's capture with its raw projections replaced by CoCA's effective contents.

    Args:
        layer: a capture with ``coca_variant`` set, whose ``q``/``k`` hold the raw query and
            T projections (``k_proj`` is T), ``[H, T, d]`` and ``[KV, T, d]``.

    Returns:
        A copy whose ``q``/``k`` are the contents (computed in float64, stored in the
        capture's dtype) that :func:`anomaly.probe.activations.rotated_heads` turns into the
        ``q′``/``k′`` the layer's attention multiplies, and ``coca_variant`` ``None``: from
        here on it is read like any RoPE layer.
    """
    from anomaly.coca import coca_qk

    if layer.coca_variant is None:
        raise ValueError(f"layer {layer.index} is not a CoCA layer")
    if layer.q_pass.shape[-1]:
        raise UserError(f"layer {layer.index} rotates only {layer.q.shape[-1]} dims of each head; "
                        "CoCA needs RoPE over the whole head")
    q, t = layer.q, layer.k
    q_eff, k_eff = coca_qk(
        q[None].to(torch.float64), t[None].to(torch.float64), variant=layer.coca_variant,
        inv_freq=layer.inv_freq.to(torch.float64), positions=layer.positions, layout=layer.layout,
        attention_scale=layer.rope_scale, rotated=False,
    )  # [1, H, T, d], [1, KV, T, d]
    return replace(layer, q=q_eff[0].to(q.dtype), k=k_eff[0].to(t.dtype), coca_variant=None)
