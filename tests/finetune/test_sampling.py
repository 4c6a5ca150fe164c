"""Sampling: top-k / nucleus filtering on hand-made distributions, seeded reproducibility, the temperature -> 0
limit, and GPT generation with the KV cache against an uncached argmax loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from finetune_testlib import BOS, EOS, VOCAB, gpt_config, tiny_seq2seq
from torch import Tensor

from finetune.decode import filter_logits, generate_lm, greedy_decode, sample_decode
from finetune.models.seq2seq import WarmStartedSeq2Seq
from pretrain.models.gpt import GPTLMHeadModel


def kept(logits: Tensor) -> list[list[int]]:
    return [torch.nonzero(row > -torch.inf).flatten().tolist() for row in logits]


def logits_of(*probs: list[float]) -> Tensor:
    return torch.tensor(probs).log()


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = logits_of([0.1, 0.4, 0.3, 0.2], [0.7, 0.1, 0.05, 0.15])
    assert kept(filter_logits(logits, top_k=2)) == [[1, 2], [0, 3]]
    assert kept(filter_logits(logits, top_k=1)) == [[1], [0]]
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # 0 = off
    assert torch.equal(filter_logits(logits, top_k=9), logits)  # more than V = off
    kept_values = filter_logits(logits, top_k=2)[0, [1, 2]]
    assert torch.equal(kept_values, logits[0, [1, 2]])  # survivors keep their logits


@pytest.mark.parametrize(
    ("top_p", "want"),
    [
        (0.3, [0]),
        (0.5, [0]),
        (0.51, [0, 1]),
        (0.8, [0, 1]),
        (0.81, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_nucleus_is_the_smallest_set_reaching_p(top_p: float, want: list[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # the same distribution shuffled: the mask must land on the right ids
    shuffled = [probs[i] for i in order]
    got = kept(filter_logits(logits_of(probs, shuffled), top_p=top_p))
    assert got[0] == want
    assert got[1] == sorted(order.index(i) for i in want)


def test_nucleus_applies_after_top_k_on_the_renormalised_rest() -> None:
    # after top_k=3 the rest renormalises to [0.526, 0.316, 0.158]: 0.526 + 0.316 = 0.842 >= 0.84 already
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(filter_logits(logits, top_p=0.84)) == [[0, 1, 2]]
    assert kept(filter_logits(logits, top_k=3, top_p=0.84)) == [[0, 1]]


class FixedModel:
    """One fixed next-token distribution at the first step, then [EOS]: a sampler's draw is its whole output."""

    def __init__(self, probs: list[float], eos: int) -> None:
        self.first = torch.tensor(probs).log()
        self.eos = eos

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        return torch.zeros(src_ids.size(0), 1, 1)

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        n = tgt_ids.size(0)
        if cache is None:
            return self.first.expand(n, -1).clone(), 1
        logits = torch.full((n, self.first.numel()), -30.0)
        logits[:, self.eos] = 0.0
        return logits, cache + 1

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return cache


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "want"),
    [
        (1.0, 0, 1.0, [0.0, 0.5, 0.3, 0.15, 0.05]),
        (1.0, 2, 1.0, [0.0, 0.625, 0.375, 0.0, 0.0]),
        (1.0, 0, 0.9, [0.0, 0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (
            2.0,
            0,
            1.0,
            [
                0.0,
                *(
                    torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
                    / torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt().sum()
                ).tolist(),
            ],
        ),
    ],
)
def test_draws_follow_the_filtered_tempered_distribution(
    temperature: float, top_k: int, top_p: float, want: list[float]
) -> None:
    model = FixedModel(
        [0.0, 0.5, 0.3, 0.15, 0.05], eos=0
    )  # id 0 is EOS, never drawn first (probability 0)
    n = 20000
    src = torch.ones(n, 2, dtype=torch.long)
    out = sample_decode(
        model,
        src,
        torch.ones_like(src),
        bos_id=9,
        eos_id=0,
        max_len=3,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(len(row) == 1 for row in out)  # one draw, then the forced [EOS]
    freq = torch.bincount(torch.tensor([row[0] for row in out]), minlength=5).float() / n
    assert freq.tolist() == pytest.approx(want, abs=0.015)
    assert all(
        freq[i] == 0 for i, w in enumerate(want) if w == 0
    )  # filtered tokens are never drawn


def warm_model(seed: int = 0) -> WarmStartedSeq2Seq:
    # a wide init gives peaked, varied next-token distributions (the default one is near uniform), so outputs
    # differ between rows and greedy stops at [EOS] on some
    return tiny_seq2seq(
        "seq2seq_warm", seed=seed, initializer_range=0.3, encoder=dict(initializer_range=0.3)
    )


def sources(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(7, VOCAB, (4, 6), generator=gen)
    src[:, -1] = EOS
    mask = torch.ones_like(src)
    src[2, 3:], mask[2, 3:] = 0, 0
    return src, mask


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    model, (src, mask) = warm_model(), sources()

    def draw(seed: int) -> list[list[int]]:
        return sample_decode(
            model,
            src,
            mask,
            BOS,
            EOS,
            max_len=12,
            temperature=1.5,
            generator=torch.Generator().manual_seed(seed),
        )

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    torch.manual_seed(3)  # no generator: the global RNG
    first = sample_decode(model, src, mask, BOS, EOS, max_len=12)
    torch.manual_seed(3)
    assert sample_decode(model, src, mask, BOS, EOS, max_len=12) == first


def test_temperature_to_zero_is_greedy() -> None:
    model, (src, mask) = warm_model(), sources()
    greedy = greedy_decode(model, src, mask, BOS, EOS, max_len=12)
    assert any(
        len(row) < 12 for row in greedy
    )  # some rows stop at [EOS]: the comparison covers stopping too
    assert sample_decode(model, src, mask, BOS, EOS, max_len=12, temperature=0.0) == greedy
    gen = torch.Generator().manual_seed(0)
    assert (
        sample_decode(model, src, mask, BOS, EOS, max_len=12, temperature=1e-4, generator=gen)
        == greedy
    )
    assert sample_decode(model, src, mask, BOS, EOS, max_len=12, top_k=1, generator=gen) == greedy


def gpt(seed: int = 0) -> GPTLMHeadModel:
    torch.manual_seed(seed)
    return GPTLMHeadModel(gpt_config(n_positions=32, initializer_range=0.3)).eval()


def uncached_argmax(model: GPTLMHeadModel, prompt: Tensor, steps: int) -> list[list[int]]:
    ids = prompt
    for _ in range(steps):
        logits, _ = model(ids)  # the whole prefix again, no cache
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.size(1) :].tolist()


def test_cached_generation_equals_an_uncached_argmax_loop() -> None:
    model = gpt()
    prompt = torch.randint(7, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    want = uncached_argmax(model, prompt, 20)
    assert generate_lm(model, prompt, 20, temperature=0.0) == want
    assert (
        generate_lm(model, prompt, 20, temperature=1e-4, generator=torch.Generator().manual_seed(0))
        == want
    )
    # with an eos_id each row stops before its first occurrence of that id
    stop = want[0][3]
    got = generate_lm(model, prompt, 20, eos_id=stop, temperature=0.0)
    assert got == [row[: row.index(stop)] if stop in row else row for row in want]


def test_gpt_sampling_is_seeded_and_respects_the_filters() -> None:
    model = gpt()
    prompt = torch.randint(7, VOCAB, (8, 3), generator=torch.Generator().manual_seed(4))

    def draw(seed: int, **kw: Any) -> list[list[int]]:
        return generate_lm(
            model, prompt, 10, temperature=2.0, generator=torch.Generator().manual_seed(seed), **kw
        )

    assert draw(5) == draw(5) and draw(5) != draw(6)
    logits, _ = model(prompt)
    allowed = logits[:, -1].topk(2, dim=-1).indices.tolist()
    assert all(row[0] in allowed[b] for b, row in enumerate(draw(7, top_k=2)))


def test_bad_arguments_are_rejected() -> None:
    model, (src, mask) = warm_model(), sources()
    for kwargs, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            sample_decode(model, src, mask, BOS, EOS, max_len=4, **kwargs)
    with pytest.raises(ValueError, match="n_positions=32"):
        generate_lm(gpt(), torch.full((1, 30), 7), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_lm(gpt(), torch.full((1, 3), 7), max_new_tokens=0)
