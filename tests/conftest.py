"""Shared fixtures: tiny random HF decoders of every RoPE family we support, and the
ablation's smoke run (:func:`smoke_run`).

Tiny models are for unit tests only; real-model tests use the bundled SmolLM2.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# Architectures whose tiny configs the suite builds. Each entry: (config class path,
# extra config kwargs). Partial rotary (GPT-NeoX) and q/k norm (Qwen3) are the two
# layouts of attention that differ from LLaMA's.
TINY_ARCHS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},  # RMSNorm on q and k before RoPE
    "gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},
}


def tiny_config(arch: str, **overrides):
    """A small random config of family ``arch``, eager attention, float32."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    if arch != "gpt_neox":
        common.update(num_key_value_heads=2, head_dim=16)
    common.update(TINY_ARCHS[arch])
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A randomly initialised ``AutoModelForCausalLM`` of family ``arch`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


@pytest.fixture(params=sorted(TINY_ARCHS))
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture
def make_tiny_model():
    return tiny_model


@pytest.fixture(scope="session")
def smollm2():
    """The bundled real SmolLM2-135M-Instruct (LLaMA, GGUF Q4_1), float32, eval mode.

    Loaded once per test session (de-quantising takes ~30 s on 2 cores): every real-model
    test shares this fixture and must not modify it (deep-copy before converting).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anomaly.models import bundled_gguf

    folder, name = bundled_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    model.eval()
    model.tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    return model


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block: on a few cores shared with other work, two
    threads that wait for each other are about twice as slow as one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """``python -m anomaly.ablation --preset smoke --out DIR`` (probe and figures included),
    run in-process once per test session; returns DIR.

    Shared by every ablation test file: tests may read it and rerun the same command in
    it, but must leave it as they found it (remove any file they add).
    """
    from anomaly.ablation.__main__ import main as ablation_main
    from anomaly.cli import run_main

    out = tmp_path_factory.mktemp("ablation") / "smoke"
    with one_torch_thread():
        assert run_main(ablation_main, ["--preset", "smoke", "--out", str(out)]) == 0
    return out
