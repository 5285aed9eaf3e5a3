"""Why the probe refuses a model: :data:`REFUSALS` and the error that carries one."""

from __future__ import annotations

from anomaly.errors import UserError

REFUSALS = {
    "no_rope": "has no rotary position embedding (RoPE) in its text decoder, so there is no initial angle to probe",
    "mla": "uses multi-head latent attention with a decoupled RoPE part: its scores add a rotated "
    "low-rank part to an unrotated one, which is not the RoPE geometry the probe measures",
    "norm_after_rotation": "normalises q/k after the rotary rotation, so no pre-rotation angle "
    "exists to probe",
    "not_text_only": "is not a text-only decoder (its forward needs inputs other than token ids)",
    "routed_queries": "routes each token's queries through attention experts chosen per token (a "
    "mixture of attention heads), so a query head is a different projection from one token to the "
    "next and has no fixed per-head geometry to probe",
    "reused_layers": "runs the same attention layer more than once per forward pass (weights shared "
    "across depth, or a looped stack), so a layer has no single query/key to probe",
    "unread_layout": "computes its query and key in a way the probe does not read (a fused "
    "projection of an unknown layout)",
    "sparse_rounded_keys": "lets each query attend to a top-k selection of keys chosen by an indexer "
    "and rounds the rotated keys to a 4-bit format (NVFP4) before scoring, so the key a query meets "
    "is not the rotation of a pre-RoPE key and most causal pairs are never scored",
    "unverified": "hands its attention q/k that the captured pre-RoPE q/k, rotated, do not reproduce",
}
"""Why the probe refuses a model: category → the reason, as a user reads it."""


class Unsupported(UserError):
    """A model the probe refuses, for one of the reasons in :data:`REFUSALS`."""

    def __init__(self, family: str, category: str, detail: str = ""):
        self.family = family
        """The model type (``config.model_type``)."""
        self.category = category
        """A key of :data:`REFUSALS`."""
        hint = "; the probe supports the families listed in docs/families.md"
        super().__init__(f"{family} {REFUSALS[category]}{' (' + detail + ')' if detail else ''}{hint}")

