from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.configlib import from_preset
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel, KVCache, reorder_cache
from pretrain.objectives import clm_loss
from pretrain.optim import OptimConfig, build_optimizer

V = 50


def tiny(**overrides: object) -> GPTLMHeadModel:
    torch.manual_seed(0)
    return GPTLMHeadModel(from_preset(GPTConfig, "tiny", vocab_size=V, **overrides)).eval()


def test_shapes_and_hf_key_names() -> None:
    model = tiny(add_cross_attention=True)
    logits, presents = model(torch.randint(0, V, (3, 7)))
    assert logits.shape == (3, 7, V) and presents is None
    block = [
        "ln_1",
        "attn.c_attn",
        "attn.c_proj",
        "ln_2",
        "mlp.c_fc",
        "mlp.c_proj",
        "crossattention.q_attn",
        "crossattention.c_attn",
        "crossattention.c_proj",
        "ln_cross_attn",
    ]
    expected = {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    }
    expected |= {
        f"transformer.h.{i}.{m}.{p}" for i in range(2) for m in block for p in ("weight", "bias")
    }
    assert set(model.state_dict()) == expected
    plain = tiny()
    assert not any("cross" in k for k in plain.state_dict())
    assert plain.transformer.h[0].attn.c_attn.weight.shape == (
        3 * 64,
        64,
    )  # nn.Linear (out, in), not Conv1D


def test_causal_mask_future_tokens_do_not_leak() -> None:
    model = tiny()
    ids = torch.randint(0, V, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def incremental_logits(
    model: GPTLMHeadModel, ids: torch.Tensor, chunks: list[int], **cross: torch.Tensor
) -> torch.Tensor:
    """Feed `ids` in chunks of the given sizes through the KV cache; concatenate the logits."""
    out, cache, start = [], None, 0
    for size in chunks:
        logits, cache = model(
            ids[:, start : start + size], past_key_values=cache, use_cache=True, **cross
        )
        out.append(logits)
        start += size
    assert start == ids.size(1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 1, 3], [2, 5, 2]])
def test_kv_cache_matches_full_forward(chunks: list[int]) -> None:
    model = tiny()
    ids = torch.randint(0, V, (2, 9))
    full, _ = model(ids)
    torch.testing.assert_close(incremental_logits(model, ids, chunks), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2]])
def test_kv_cache_with_cross_attention_matches_full_forward(chunks: list[int]) -> None:
    model = tiny(add_cross_attention=True)
    ids = torch.randint(0, V, (2, 6))
    memory = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    full, _ = model(ids, encoder_hidden_states=memory, encoder_attention_mask=mask)
    # Only the first call sees the encoder states; later steps must reuse the cached cross keys/values.
    first, cache = model(
        ids[:, : chunks[0]],
        encoder_hidden_states=memory,
        encoder_attention_mask=mask,
        use_cache=True,
    )
    assert (
        cache is not None
        and cache[0].cross_k is not None
        and cache[0].cross_k.shape == (2, 2, 5, 32)
    )
    out, start = [first], chunks[0]
    for size in chunks[1:]:
        logits, cache = model(
            ids[:, start : start + size],
            past_key_values=cache,
            encoder_attention_mask=mask,
            use_cache=True,
        )
        out.append(logits)
        start += size
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_respects_encoder_padding() -> None:
    model = tiny(add_cross_attention=True)
    ids = torch.randint(0, V, (1, 4))
    memory = torch.randn(1, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    a, _ = model(ids, encoder_hidden_states=memory, encoder_attention_mask=mask)
    noisy = memory.clone()
    noisy[:, 3:] = torch.randn(1, 2, 64) * 10
    b, _ = model(ids, encoder_hidden_states=noisy, encoder_attention_mask=mask)
    torch.testing.assert_close(a, b)
    c, _ = model(ids, encoder_hidden_states=memory[:, :3])
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_reorder_cache_selects_batch_rows() -> None:
    model = tiny(add_cross_attention=True)
    ids = torch.randint(0, V, (3, 4))
    memory = torch.randn(3, 2, 64)
    _, cache = model(ids, encoder_hidden_states=memory, use_cache=True)
    order = torch.tensor([2, 2, 0])
    reordered = reorder_cache(cache, order)
    for old, new in zip(cache, reordered, strict=True):
        assert isinstance(new, KVCache)
        torch.testing.assert_close(new.k, old.k[order])
        torch.testing.assert_close(new.cross_v, old.cross_v[order])
    nxt = torch.randint(0, V, (3, 1))
    step_reordered, _ = model(nxt, past_key_values=reordered)
    full, _ = model(torch.cat([ids[order], nxt], dim=1), encoder_hidden_states=memory[order])
    torch.testing.assert_close(step_reordered[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_length_beyond_n_positions_is_refused() -> None:
    model = tiny(n_positions=8)
    _, cache = model(torch.randint(0, V, (1, 6)), use_cache=True)
    with pytest.raises(ValueError, match="n_positions=8"):
        model(torch.randint(0, V, (1, 3)), past_key_values=cache)
    with pytest.raises(ValueError, match="n_positions=8"):
        model(torch.randint(0, V, (1, 9)))
    with pytest.raises(ValueError, match="add_cross_attention"):
        model(torch.randint(0, V, (1, 2)), encoder_hidden_states=torch.randn(1, 2, 64))


def test_tied_head_and_gpt2_init() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, n_embd=256, n_layer=8, n_head=4, n_positions=64)
    model = GPTLMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1
    block = model.transformer.h[3]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * 8)  # residual projections, GPT-2's 1/sqrt(2 * n_layer)
    assert abs(block.attn.c_proj.weight.std().item() - scaled) < 0.0005
    assert abs(block.mlp.c_proj.weight.std().item() - scaled) < 0.0005
    assert torch.all(block.mlp.c_fc.bias == 0) and torch.all(block.ln_1.weight == 1)


def test_clm_loss_falls_within_100_steps() -> None:
    """Sequences count upwards mod 20 from a random start: every next token is predictable after one."""
    torch.manual_seed(0)
    model = GPTLMHeadModel(
        from_preset(
            GPTConfig, "tiny", vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    )
    opt, sched = build_optimizer(model, OptimConfig(lr=3e-3, warmup_steps=10), total_steps=100)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        block = (
            torch.randint(0, 20, (16, 1), generator=gen) + torch.arange(17)
        ) % 20 + 7  # (16, T+1)
        logits, _ = model(block[:, :-1])
        metrics = clm_loss(logits, block[:, 1:])
        opt.zero_grad()
        metrics["loss"].backward()
        opt.step()
        sched.step()
        losses.append(metrics["loss"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 3.0  # ~ln(50) at init
    assert last < 0.3 * first, (first, last)
    assert metrics["acc"].item() > 0.8
