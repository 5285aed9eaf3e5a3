"""How a layer's captured outputs are read as ``(q [b, s, h, d], k [b, s, kv, d])``: from
their shape, and for fused projections the way each family splits them."""

from __future__ import annotations

from torch import Tensor


def seq_major_candidates(x: Tensor, heads: int, head_dim: int, seq: int) -> list[Tensor]:
    """The readings of ``x`` as ``[b, s, h, d]``, from its shape.

    ``[b, s, h·d]`` is reshaped; a 4-d tensor is ``[b, s, h, d]`` or ``[b, h, s, d]``
    depending on which of its dims is the sequence. Where ``s = h`` both readings fit
    and both are returned (the capture keeps the one the attention confirms).
    """
    b = x.shape[0]
    if x.ndim == 3 and x.shape[1] == seq and x.shape[2] == heads * head_dim:
        return [x.reshape(b, seq, heads, head_dim)]
    out = []
    if x.ndim == 4 and tuple(x.shape[1:]) == (seq, heads, head_dim):
        out.append(x)
    if x.ndim == 4 and tuple(x.shape[1:]) == (heads, seq, head_dim):
        out.append(x.transpose(1, 2))
    return out


def _pairs(qs: list[Tensor], ks: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [(q, k) for q in qs for k in ks]


def _separate(n_heads: int, n_kv: int, head_dim: int):
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        q, k = outs
        return _pairs(seq_major_candidates(q, n_heads, head_dim, seq), seq_major_candidates(k, n_kv, head_dim, seq))

    return split


def _neox_split(n_heads: int, head_dim: int):
    # GPT-NeoX views its fused output as [b, s, heads, 3·d] and chunks each head into q|k|v.
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        per_head = qkv.reshape(qkv.shape[0], seq, n_heads, 3 * head_dim)  # [b, s, h, 3d]
        return [(per_head[..., :head_dim], per_head[..., head_dim : 2 * head_dim])]

    return split


def _falcon_split(n_heads: int, n_kv: int, head_dim: int, grouped: bool):
    # Falcon's fused projection, as FalconAttention._split_heads reads it: grouped
    # (new_decoder_architecture) per key head [its queries | k | v]; multi-query
    # [all queries | k | v]; otherwise per head [q | k | v].
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        b = qkv.shape[0]
        if grouped:
            per_kv = qkv.reshape(b, seq, n_kv, n_heads // n_kv + 2, head_dim)  # [b, s, kv, group+2, d]
            return [(per_kv[..., :-2, :].reshape(b, seq, n_heads, head_dim), per_kv[..., -2, :])]
        if n_kv == 1:
            heads = qkv.reshape(b, seq, n_heads + 2, head_dim)  # [b, s, h+2, d]
            return [(heads[:, :, :-2], heads[:, :, -2:-1])]
        per_head = qkv.reshape(b, seq, n_heads, 3, head_dim)  # [b, s, h, 3, d]
        return [(per_head[..., 0, :], per_head[..., 1, :])]

    return split


def _concat_split(n_heads: int, n_kv: int, head_dim: int, clip: float | None = None):
    # Phi-3 and DBRX concatenate all queries, then all keys, then all values; DBRX clamps the
    # whole projection to [-clip, clip] first.
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        if clip is not None:
            qkv = qkv.clamp(-clip, clip)
        nq = n_heads * head_dim
        q = qkv[..., :nq]
        k = qkv[..., nq : nq + n_kv * head_dim]
        return _pairs(seq_major_candidates(q, n_heads, head_dim, seq), seq_major_candidates(k, n_kv, head_dim, seq))

    return split


def _codegen_split(n_heads: int, head_dim: int, shards: int):
    # CodeGen's fused projection is laid out per model-parallel shard: [b, s, shards, 3·E/shards],
    # each shard holding its heads' queries, then values, then keys.
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        local = qkv.shape[-1] // (3 * shards)
        per_shard = qkv.reshape(qkv.shape[0], seq, shards, 3 * local)  # [b, s, shards, 3·local]
        q, k = per_shard[..., :local], per_shard[..., 2 * local :]
        shape = (qkv.shape[0], seq, n_heads, head_dim)
        return [(q.reshape(shape), k.reshape(shape))]

    return split
