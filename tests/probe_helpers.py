"""Helpers shared by the probe's test files: token ids, the tiny models' initialisation,
and a model whose activations turn NaN."""

from __future__ import annotations

import torch

# Random tiny models are initialised at 0.1 (not HF's 0.02) so that their attention is far
# from uniform and a wrong rotation shows in the probabilities.
INIT = 0.1


def ids_for(model, t: int, seed: int = 1) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(seed))


def nan_llama(vocab_size: int = 128):
    """A tiny LLaMA whose layer-1 keys are NaN (one poisoned weight)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
    )).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    return model
