"""The probe's CUDA paths against its CPU paths, on the same inputs (``-m gpu``).

On a GPU the pair statistics take the vectorised ``"blocks"`` form, the CPU the compiled
sweep; the mean logit's FFT and the capture run on the device. Each test computes the same
thing on the GPU and on the CPU and compares: exact counts where the inputs are the same
bits, close floats where the device computed its own activations.

Skipped without CUDA. ``ANOMALY_GPU_TESTS_DEVICE=cpu`` runs them with the CPU standing in
for the GPU (``benchmarks/gpu_check.sh --dry-run``), which checks the tests themselves.
Run on a GPU machine by ``bash benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from anomaly.probe import capture, mean_logit_by_distance, probe
from anomaly.probe.stats import pair_statistics

DEVICE = os.environ.get("ANOMALY_GPU_TESTS_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _qk(heads: int, kv: int, tokens: int, d_rot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q/k with the awkward cases: zero slices, and phases crowded into one bucket."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, tokens, d_rot, generator=g)
    k = torch.randn(kv, tokens, d_rot, generator=g)
    q[0, ::7] = 0.0  # whole zero query vectors
    k[:, 3::11, : d_rot // 4] = 0.0  # zero key slices (half layout: first quarter of the dims)
    # one slice whose key phases all lie within 1e-6 rad of each other (a bias-dominated slice)
    j = d_rot // 2 - 1
    k[:, :, j] = 1.0
    k[:, :, d_rot - 1] = 1e-6 * torch.rand(kv, tokens, generator=g)
    return q, k


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("zero_angle_tol", [0.0, 1e-3])
def test_pair_statistics_on_gpu_equal_cpu_sweep(layout, zero_angle_tol):
    q, k = _qk(heads=6, kv=2, tokens=1000, d_rot=32, seed=1)
    cpu = pair_statistics(q, k, layout, bins=32, zero_angle_tol=zero_angle_tol)  # the sweep
    gpu = pair_statistics(
        q.to(DEVICE), k.to(DEVICE), layout, bins=32, zero_angle_tol=zero_angle_tol, method="blocks"
    )
    assert torch.equal(gpu.count_d.cpu(), cpu.count_d)
    assert torch.equal(gpu.hist.cpu(), cpu.hist)
    assert gpu.pairs == cpu.pairs
    for name in ("weight_d", "weight_all", "mean_product", "q_norm", "k_norm"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-9, atol=1e-9)


def test_mean_logit_on_gpu_matches_float64(make_tiny_model):
    model = make_tiny_model("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=2048)
    ids = torch.randint(0, 128, (1024,), generator=torch.Generator().manual_seed(0))
    layer = capture(model, ids).layers[0]
    exact = mean_logit_by_distance(layer.to(torch.float64))
    on_device = mean_logit_by_distance(_to_device(layer, DEVICE)).cpu()
    rel = (on_device - exact).abs().amax(-1) / exact.abs().amax(-1)
    assert float(rel.max()) < 1e-5


def _to_device(layer, device):
    from dataclasses import replace

    return replace(
        layer, positions=layer.positions.to(device), q=layer.q.to(device), k=layer.k.to(device),
        q_pass=layer.q_pass.to(device), k_pass=layer.k_pass.to(device), inv_freq=layer.inv_freq.to(device),
    )


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_probe_on_gpu_matches_cpu(arch, make_tiny_model):
    """The whole probe on the device, float32: activations differ by rounding only, so the
    case-(d) shares agree to a few pairs in a million and the mean logits to float32 noise."""
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    model = make_tiny_model(arch, max_position_embeddings=1024)
    cpu = probe(model, ids)
    gpu = probe(model.to(DEVICE), ids.to(DEVICE))
    np.testing.assert_allclose(gpu.anomalous_fraction, cpu.anomalous_fraction, atol=1e-4)
    np.testing.assert_allclose(gpu.weighted_anomalous_fraction, cpu.weighted_anomalous_fraction, atol=1e-4)
    scale = np.abs(cpu.mean_logit).max()
    np.testing.assert_allclose(gpu.mean_logit, cpu.mean_logit, atol=1e-4 * scale)


def test_probe_bfloat16_model_on_gpu(make_tiny_model):
    """A bf16 model (how a GPU probe runs by default): the capture's check against what the
    attention receives passes at bf16's precision, and the shares stay near float32's."""
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    model = make_tiny_model("llama", max_position_embeddings=1024)
    reference = probe(model, ids)
    half = probe(model.to(DEVICE, torch.bfloat16), ids.to(DEVICE))
    np.testing.assert_allclose(half.anomalous_fraction, reference.anomalous_fraction, atol=0.02)
