"""Rotary position embedding: the one place the project's RoPE conventions live.

Conventions (docs/conventions.md §1–2):

* A head vector ``x`` of even size ``d`` is read as ``d/2`` complex slices ``z_j``.
  ``layout="half"`` (HF LLaMA/Mistral/Qwen/GPT-NeoX, ``rotate_half``):
  ``z_j = x[j] + i·x[j + d/2]``.  ``layout="interleaved"`` (the paper, RoFormer, GPT-J,
  Meta's LLaMA): ``z_j = x[2j] + i·x[2j + 1]``.
* Slice ``j`` turns at frequency ``θ_j = base^(-2j/d)`` (before any scaling).
* RoPE at position ``p``: ``f(x, p)_j = z_j · e^{i p θ_j}``, optionally times an attention
  scaling factor (YaRN's ``mscale``), which HF folds into cos and sin.

Everything here is a pure function of tensors; nothing touches a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

Layout = Literal["half", "interleaved"]
LAYOUTS: tuple[str, ...] = ("half", "interleaved")
ScalingType = Literal["default", "linear", "ntk", "dynamic", "yarn", "llama3"]
SCALING_TYPES: tuple[str, ...] = ("default", "linear", "ntk", "dynamic", "yarn", "llama3")


def check_layout(layout: str) -> str:
    """Return ``layout`` or raise a one-line ``ValueError`` naming the valid choices."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown RoPE layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return layout


def _check_even(d: int) -> None:
    if d % 2:
        raise ValueError(f"the rotated dimension must be even, got {d}")


# --------------------------------------------------------------------------------------
# Frequencies and scalings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeScaling:
    """A context-extension scaling of the RoPE frequencies, in HF ``rope_parameters`` terms.

    Defaults follow HF transformers (``modeling_rope_utils``) so that
    ``inv_freq(d, base, scaling=s)`` equals HF's own frequencies for the same settings.
    """

    type: ScalingType = "default"
    """``default`` (none), ``linear`` (Position Interpolation), ``ntk`` (static NTK-aware:
    ``base·λ^(d/(d-2))``), ``dynamic`` (HF dynamic NTK, depends on the sequence length),
    ``yarn`` or ``llama3``."""
    factor: float = 1.0
    """Context-extension factor: PI's ``k``, NTK's ``λ``, YaRN's and LLaMA-3's ``factor``."""
    original_max_position_embeddings: int | None = None
    """Training context length. ``dynamic`` rescales only past it; ``yarn`` and ``llama3``
    use it to choose which slices to interpolate."""
    low_freq_factor: float = 1.0
    """LLaMA-3: slices with wavelength above ``original/low_freq_factor`` are divided by
    ``factor``."""
    high_freq_factor: float = 4.0
    """LLaMA-3: slices with wavelength below ``original/high_freq_factor`` are unchanged."""
    beta_fast: float = 32.0
    """YaRN: slices making more than this many rotations over the training length are
    left alone (extrapolated)."""
    beta_slow: float = 1.0
    """YaRN: slices making fewer rotations than this are fully interpolated."""
    mscale: float | None = None
    """YaRN (DeepSeek form): numerator multiplier of ``log(factor)`` in the attention factor."""
    mscale_all_dim: float | None = None
    """YaRN (DeepSeek form): denominator multiplier of ``log(factor)`` in the attention factor."""
    attention_factor: float | None = None
    """YaRN: explicit attention factor; inferred from ``factor`` when ``None``."""
    truncate: bool = True
    """YaRN: round the correction range to whole slices, as HF does by default."""

    def __post_init__(self) -> None:
        if self.type not in SCALING_TYPES:
            raise ValueError(
                f"unknown RoPE scaling {self.type!r}; use one of {', '.join(SCALING_TYPES)}"
            )
        if not self.factor > 0:
            raise ValueError(f"RoPE scaling factor must be positive, got {self.factor}")
        needs_original = self.type in ("dynamic", "yarn", "llama3")
        if needs_original and self.original_max_position_embeddings is None:
            raise ValueError(
                f"RoPE scaling {self.type!r} needs original_max_position_embeddings "
                "(the training context length)"
            )

    @classmethod
    def from_hf(
        cls, params: Mapping[str, Any] | None, max_position_embeddings: int | None = None
    ) -> "RopeScaling":
        """Build from an HF ``rope_parameters`` / ``rope_scaling`` dict.

        ``max_position_embeddings`` fills ``original_max_position_embeddings`` when the dict
        lacks it, as HF does for dynamic NTK.
        """
        if not params:
            return cls()
        kind = params.get("rope_type", params.get("type", "default"))
        kind = {"dynamic_ntk": "dynamic"}.get(kind, kind)
        names = {f.name for f in fields(cls)} - {"type"}
        kwargs = {k: v for k, v in params.items() if k in names and v is not None}
        kwargs.setdefault("original_max_position_embeddings", max_position_embeddings)
        if kind == "default":
            return cls()
        return cls(type=kind, **kwargs)


def _default_inv_freq(dim: int, base: float, dtype: torch.dtype) -> Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # [dim/2]
    return (1.0 / base**exponent).to(dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: RopeScaling | None) -> float:
    """The factor a scaling multiplies into cos and sin (1 except for YaRN).

    Scores between two rotated vectors grow by its square.
    """
    if scaling is None or scaling.type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return _yarn_mscale(scaling.factor)


def inv_freq(
    head_dim: int,
    base: float = 10000.0,
    scaling: RopeScaling | Mapping[str, Any] | None = None,
    *,
    seq_len: int | None = None,
    partial_rotary_factor: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Slice frequencies ``θ_j = base^(-2j/d)``, optionally scaled, ``Tensor[d_rot/2]``.

    Args:
        head_dim: size of one attention head.
        base: RoPE base (``rope_theta``); take it from the model's config.
        scaling: a :class:`RopeScaling` or an HF ``rope_parameters`` dict.
        seq_len: current sequence length, used by ``dynamic`` only (HF's rule: below the
            original length the frequencies are the unscaled ones).
        partial_rotary_factor: fraction of the head that is rotated; ``d_rot =
            int(head_dim · factor)``.
        dtype: result dtype. Computed in float64 and then cast, so float32 results match
            HF's to within its own float32 rounding.
    """
    dim = int(head_dim * partial_rotary_factor)
    _check_even(dim)
    if isinstance(scaling, Mapping):
        scaling = RopeScaling.from_hf(scaling)
    s = scaling or RopeScaling()
    base = float(base)
    if s.type == "default":
        freqs = _default_inv_freq(dim, base, torch.float64)
    elif s.type == "linear":
        freqs = _default_inv_freq(dim, base, torch.float64) / s.factor
    elif s.type == "ntk":
        freqs = _default_inv_freq(dim, base * s.factor ** (dim / (dim - 2)), torch.float64)
    elif s.type == "dynamic":
        original = s.original_max_position_embeddings
        length = max(seq_len if seq_len is not None else original, original)
        grown = base * ((s.factor * length / original) - (s.factor - 1)) ** (dim / (dim - 2))
        freqs = _default_inv_freq(dim, grown, torch.float64)
    elif s.type == "yarn":
        freqs = _yarn_inv_freq(dim, base, s)
    else:  # llama3
        freqs = _llama3_inv_freq(dim, base, s)
    return freqs.to(dtype)


def _yarn_inv_freq(dim: int, base: float, s: RopeScaling) -> Tensor:
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # The slice index that makes `rotations` turns over the training length.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = _default_inv_freq(dim, base, torch.float64)
    interpolated = extrapolated / s.factor
    return interpolated * ramp + extrapolated * (1 - ramp)


def _llama3_inv_freq(dim: int, base: float, s: RopeScaling) -> Tensor:
    freqs = _default_inv_freq(dim, base, torch.float64)
    original = s.original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    out = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, (1 - smooth) * freqs / s.factor + smooth * freqs, out)


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


def to_complex(x: Tensor, layout: Layout = "half") -> Tensor:
    """Read real ``x [..., d]`` as complex slices ``z [..., d/2]`` (docs/conventions.md §1).

    Half-precision inputs are promoted to complex64.
    """
    check_layout(layout)
    d = x.shape[-1]
    _check_even(d)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    real_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(real_dtype)
    if layout == "half":
        return torch.complex(x[..., : d // 2], x[..., d // 2 :])
    pairs = x.reshape(*x.shape[:-1], d // 2, 2)  # [..., d/2, (re, im)]
    return torch.complex(pairs[..., 0], pairs[..., 1])


def from_complex(z: Tensor, layout: Layout = "half") -> Tensor:
    """Inverse of :func:`to_complex`: complex ``[..., d/2]`` to real ``[..., d]``."""
    check_layout(layout)
    if layout == "half":
        return torch.cat([z.real, z.imag], dim=-1)
    pairs = torch.stack([z.real, z.imag], dim=-1)  # [..., d/2, 2]
    return pairs.flatten(-2)  # [..., d]


def duplicate_slices(c: Tensor, layout: Layout = "half") -> Tensor:
    """Write one real value per slice into both members: ``[..., d/2] -> [..., d]``."""
    check_layout(layout)
    if layout == "half":
        return torch.cat([c, c], dim=-1)
    return c.repeat_interleave(2, dim=-1)


def slice_members(x: Tensor, layout: Layout = "half") -> tuple[Tensor, Tensor]:
    """The two real members (re, im) of each slice: ``[..., d] -> 2 × [..., d/2]``."""
    check_layout(layout)
    d = x.shape[-1]
    _check_even(d)
    if layout == "half":
        return x[..., : d // 2], x[..., d // 2 :]
    pairs = x.reshape(*x.shape[:-1], d // 2, 2)  # [..., d/2, 2]
    return pairs[..., 0], pairs[..., 1]


# --------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotation angles ``p·θ_j``: positions ``[...]`` × inv_freq ``[d/2]`` -> ``[..., d/2]``.

    Computed in ``inv_freq``'s dtype (at least float32): pass float64 frequencies for
    float64-exact angles at long positions.
    """
    dtype = torch.promote_types(inv_freq.dtype, torch.float32)
    positions = torch.as_tensor(positions, device=inv_freq.device)
    return positions.to(dtype)[..., None] * inv_freq.to(dtype)


def cos_sin(
    positions: Tensor, inv_freq: Tensor, scale: float = 1.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of the rotation angles, each ``[..., d/2]``, times ``scale``."""
    angles = rope_angles(positions, inv_freq)
    cos, sin = angles.cos() * scale, angles.sin() * scale
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def rotate(
    x: Tensor, cos: Tensor, sin: Tensor, layout: Layout = "half"
) -> Tensor:
    """Rotate ``x [..., seq, d]`` by precomputed ``cos``/``sin`` ``[..., seq, d/2]``.

    Real arithmetic (no complex tensors) so that it runs in bf16, on any device, under
    autograd, and equals HF's ``x·cos + rotate_half(x)·sin`` bit for bit in the half layout.
    """
    re, im = slice_members(x, layout)
    out_re = re * cos - im * sin
    out_im = im * cos + re * sin
    if layout == "half":
        return torch.cat([out_re, out_im], dim=-1)
    return torch.stack([out_re, out_im], dim=-1).flatten(-2)  # [..., seq, d/2, 2] -> [..., seq, d]


def apply_rope(
    x: Tensor,
    positions: Tensor,
    inv_freq: Tensor,
    layout: Layout = "half",
    *,
    scale: float = 1.0,
) -> Tensor:
    """RoPE ``f(x, p)``: rotate slice ``j`` of ``x[..., p, :]`` by ``p·θ_j``.

    Args:
        x: ``[..., seq, d]``, for example ``[batch, heads, seq, head_dim]``.
        positions: ``[seq]``, or any shape broadcastable to ``x.shape[:-1]`` (use
            ``positions[:, None, :]`` for ``[batch, seq]`` ids and ``[batch, heads, seq, d]``).
        inv_freq: ``[d/2]`` slice frequencies from :func:`inv_freq`.
        layout: ``"half"`` or ``"interleaved"``.
        scale: attention factor folded into cos and sin (YaRN), as HF does.

    Returns:
        ``Tensor`` of ``x``'s shape and dtype.
    """
    check_layout(layout)
    if x.shape[-1] != 2 * inv_freq.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} rotated dims but inv_freq has {inv_freq.shape[-1]} slices"
        )
    cos, sin = cos_sin(positions, inv_freq, scale=scale, dtype=x.dtype)
    return rotate(x, cos, sin, layout)


def rotate_complex(z: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Complex RoPE: ``z [..., d/2] · e^{i p θ}`` with positions broadcast over ``[...]``."""
    angles = rope_angles(positions, inv_freq)
    return z * torch.polar(torch.ones_like(angles), angles)
