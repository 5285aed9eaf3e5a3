"""benchmarks/compare_tools.py's user-style count, without its extras (nnsight, TransformerLens).

The benchmark checks the tools' shares against the probe's; that check means something only if
its brute-force count (:func:`case_d_counts`: atan2 phases, broadcasting, a causal mask, query
chunks) counts case (d) as tests/reference.py's exact loops do, whatever the chunking.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
from benchmarks.compare_tools import case_d_counts, shares


@pytest.mark.parametrize("heads,kv", [(4, 2), (3, 3), (4, 1)])
def test_counts_equal_the_reference_whatever_the_chunks(heads: int, kv: int) -> None:
    gen = torch.Generator().manual_seed(heads * 10 + kv)
    t, d = 19, 8
    q = torch.randn(heads, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(kv, t, d, generator=gen, dtype=torch.float64)
    expected = ref.pair_statistics(q.numpy(), k.numpy(), "half")["count_d"].sum(-1)
    one_query = t * (d // 2) * 4 / 2**20  # chunk_mib that holds one query a chunk
    for chunk_mib in (one_query, 5 * one_query, 256):  # one query, ragged chunks, everything at once
        assert case_d_counts(q, k, chunk_mib=chunk_mib).tolist() == expected.tolist()


def test_shares_are_counts_over_causal_triples() -> None:
    gen = torch.Generator().manual_seed(0)
    layers = [(torch.randn(2, 7, 4, generator=gen, dtype=torch.float64),
               torch.randn(1, 7, 4, generator=gen, dtype=torch.float64)) for _ in range(3)]
    got = shares(layers, [0, 2], chunk_mib=1)
    for row, index in zip(got, [0, 2]):
        q, k = layers[index]
        frac, _ = ref.anomalous_fractions(q.numpy(), k.numpy(), "half")
        np.testing.assert_allclose(row, frac, rtol=0, atol=1e-15)
