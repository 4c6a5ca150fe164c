"""Helpers shared by the Hugging Face import and export tests (importable as `pretrain_testlib`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.models.gpt import GPTLMHeadModel

EOS = 6  # kiln_testlib.SPECIALS


def perturbed(model: nn.Module) -> nn.Module:
    """Weights moved away from their init (zero biases, unit LayerNorms), so that a swapped or
    untransposed tensor changes the outputs; in eval mode."""
    with torch.no_grad():
        for p in model.parameters():  # a tied matrix is one Parameter, so the tie survives
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def kiln_greedy(model: GPTLMHeadModel, prompt: Tensor, steps: int) -> list[int]:
    """Greedy continuation with Kiln's KV cache, stopping after [EOS] as HF generate does."""
    out, cache, inp = prompt[0].tolist(), None, prompt
    for _ in range(steps):
        logits, cache = model(inp, past_key_values=cache, use_cache=True)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == EOS:
            break
        inp = torch.tensor([[nxt]])
    return out
