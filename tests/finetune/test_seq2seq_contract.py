"""The contract every translation architecture keeps, one test per clause, run on each entry of
finetune.models.TRANSLATION_ARCHES and on the variants that take other code paths through it:

- its config round-trips through a dict, and its checkpoint (weights, ties, config) through disk;
- a meta-device build materialises into the same parameters, tied the same way;
- teacher forcing is causal, and source padding (whatever ids sit under the mask) changes nothing;
- incremental decoding (`encode` / `decode_step` / `reorder_cache`) gives the teacher-forced
  logits, so greedy and beam search with the model's cache equal a search that re-runs the whole
  prefix every step;
- attention maps are distributions over the real source positions; memory keys are projected once;
- trained on 50 digit strings, it learns to reverse them, and beam search, translate_texts and
  BLEU agree.

Arch-specific checks (shapes, config errors, init scales, cache internals) stay in each model's own
test file. A new architecture gets all of this from its registry entry: `tiny_seq2seq` builds it
from the "tiny" preset, and finetune_testlib.REVERSAL_CASES needs one line saying how it learns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from finetune_testlib import (
    BOS,
    EOS,
    N_PAIRS,
    PAD,
    REVERSAL_CASES,
    VOCAB,
    NoCache,
    Trained,
    config_class,
    digit_text,
    exact_match,
    seq2seq_batch,
    tiny_seq2seq,
)
from tokenizers import Tokenizer
from torch import Tensor, nn

from data_pipeline.configlib import from_dict
from finetune.decode import beam_search, greedy_decode, select_rows
from finetune.models import TRANSLATION_ARCHES, load_finetuned
from finetune.translate import evaluate_translation, translate_texts
from pretrain.checkpoint import save_checkpoint
from pretrain.models.meta import build_on_meta, materialize

# Every case of an architecture: two LSTM layers, so that the layer-to-layer state bridge is used.
BASE: dict[str, dict[str, Any]] = {"lstm": dict(num_layers=2), "lstm_attention": dict(num_layers=2)}
# Larger random weights than the default init, where the config has the knob, for the tests that
# need outputs to react to their inputs (search, causality): peaked, input-dependent outputs. Much
# larger weights make a network chaotic, and float32 rounding of different batch shapes alone then
# flips near-ties; at the default init a Luong decoder barely reacts to a changed input. The logit
# comparisons keep the default init, where 1e-5 is a fair tolerance for cache against forward.
SPREAD: dict[str, dict[str, Any]] = {
    "seq2seq_warm": dict(initializer_range=0.5),
    "lstm": dict(init_range=0.5),
    "lstm_attention": dict(init_range=0.5),
}
# Variants that take other code paths through an architecture; one not listed runs its tiny preset.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "seq2seq_warm": {"same_width": {}, "narrow_decoder": dict(n_embd=32)},  # 32 < 64: projection
    "transformer": {
        f"{norm}-{pos}": dict(norm_first=norm == "pre_ln", positions=pos)
        for norm in ("pre_ln", "post_ln")
        for pos in ("sinusoidal", "learned")
    },
    "lstm": {
        "bidirectional": dict(bidirectional=True),
        "unidirectional": dict(bidirectional=False),
    },
    "lstm_attention": {
        f"{att}-{enc}": dict(attention=att, bidirectional=enc == "bidirectional")
        for att in ("bahdanau", "luong_dot", "luong_general")
        for enc in ("bidirectional", "unidirectional")
    },
    "convs2s": {f"kernel_{k}": dict(kernel_size=k) for k in (1, 3, 5)},
}
NO_ATTENTION = {"lstm"}  # cross_attention refuses (test_rnn_seq2seq checks the message)
# The modules that turn the memory into attention keys: decoding calls each once per source.
KEY_PROJECTIONS: dict[str, Callable[[Any], list[nn.Module]]] = {
    "seq2seq_warm": lambda m: [block.crossattention.c_attn for block in m.decoder.transformer.h],
    "transformer": lambda m: [layer.cross_attn.k_proj for layer in m.decoder_layers],
    "lstm_attention": lambda m: [m.decoder.key if hasattr(m.decoder, "key") else m.decoder.score],
}


class Case(NamedTuple):
    arch: str
    overrides: dict[str, Any]


def cases(keep: Callable[[str], bool] = lambda arch: True) -> list[Any]:
    """The cases of every translation architecture that `keep` accepts, as pytest params."""
    return [
        pytest.param(Case(arch, {**BASE.get(arch, {}), **overrides}), id=f"{arch}-{name}")
        for arch in TRANSLATION_ARCHES
        if keep(arch)
        for name, overrides in VARIANTS.get(arch, {"tiny": {}}).items()
    ]


def has_max_positions(arch: str) -> bool:
    return "max_positions" in {f.name for f in dataclasses.fields(config_class(arch))}


@pytest.fixture(params=cases())
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture()
def model(case: Case) -> nn.Module:
    return tiny_seq2seq(case.arch, **case.overrides)


@pytest.fixture()
def spread_model(case: Case) -> nn.Module:
    return tiny_seq2seq(case.arch, **case.overrides, **SPREAD.get(case.arch, {}))


def tied_groups(model: nn.Module) -> set[frozenset[str]]:
    """Names that share one Parameter (a tied embedding and output projection, say)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {frozenset(names) for names in groups.values() if len(names) > 1}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


# ------------------------------------------------------------------ config, weights, checkpoints
def test_config_round_trips_through_a_dict(model: nn.Module) -> None:
    cfg = model.config
    assert from_dict(type(cfg), dataclasses.asdict(cfg)) == cfg
    assert type(cfg)(**dataclasses.asdict(cfg)) == cfg


def test_meta_build_materialises_the_same_parameters(model: nn.Module) -> None:
    meta = build_on_meta(type(model), model.config)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    materialize(meta, "cpu")
    assert shapes(meta) == shapes(model)
    assert tied_groups(meta) == tied_groups(model)  # re-tied after to_empty
    assert all(bool(torch.isfinite(p).all()) for p in meta.parameters())


def test_checkpoint_round_trip(model: nn.Module, tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    path = save_checkpoint(tmp_path / "mt", model, model.config, tmp_path / "tokenizer.json")
    loaded = load_finetuned(path)
    assert loaded.arch == model.config.arch and loaded.model_config == model.config
    assert loaded.model is not None and tied_groups(loaded.model) == tied_groups(model)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        got = loaded.model.eval()(src, mask, tgt)
        torch.testing.assert_close(got, model(src, mask, tgt), atol=0, rtol=0)


# ------------------------------------------------------------------ teacher forcing
def test_changing_a_later_target_token_leaves_earlier_logits_unchanged(
    spread_model: nn.Module,
) -> None:
    model, (src, mask, tgt) = spread_model, seq2seq_batch()
    changed = tgt.clone()
    changed[:, 3] = torch.where(tgt[:, 3] == 7, 8, 7)
    with torch.no_grad():
        a, b = model(src, mask, tgt), model(src, mask, changed)
    assert a.shape == (3, 6, VOCAB)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    assert (a[:, 3:] - b[:, 3:]).abs().amax() > 1e-3


def widen(src: Tensor, mask: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Three more padded source columns and two padded target ones; junk ids under the source
    mask, which must hide them."""
    wide_src = torch.cat([src.masked_fill(mask == 0, 9), torch.full((3, 3), 9)], dim=1)  # (3, 12)
    wide_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    return wide_src, wide_mask, torch.cat([tgt, torch.full((3, 2), PAD)], dim=1)


def test_padding_never_changes_a_result(model: nn.Module) -> None:
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        ref = model(src, mask, tgt)  # (3, 6, V)
        wide = model(*widen(src, mask, tgt))[:, :6]
        alone = model(src[1:2, :5], mask[1:2, :5], tgt[1:2])  # the padded row without its padding
    torch.testing.assert_close(wide, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, ref[1:2], atol=1e-5, rtol=1e-5)


def test_every_trainable_parameter_gets_a_gradient(model: nn.Module) -> None:
    """What DDP without find_unused_parameters (Kiln's RayDDPStrategy) needs: a parameter the loss
    never reaches stops the first backward on 2 workers."""
    src, mask, tgt = seq2seq_batch()
    model(src, mask, tgt).logsumexp(-1).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


# ------------------------------------------------------------------ incremental decoding
def test_cached_decode_steps_equal_full_forward(model: nn.Module) -> None:
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        full = model(src, mask, tgt)  # (B,U,V)
        memory = model.encode(src, mask)
        cache, steps = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(tgt[:, t : t + 1], memory, src_mask=mask, cache=cache)
            steps.append(logits)
        # several new tokens at once on top of a cache (for attention: the offset causal mask)
        cache3 = model.decode_step(tgt[:, :3], memory, src_mask=mask, cache=None)[1]
        last2, _ = model.decode_step(tgt[:, 3:5], memory, src_mask=mask, cache=cache3)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last2, full[:, 4], atol=1e-5, rtol=1e-5)


def test_reorder_cache_selects_rows(model: nn.Module) -> None:
    src, mask, tgt = seq2seq_batch()
    index = torch.tensor([2, 2, 0])
    with torch.no_grad():
        memory = model.encode(src, mask)
        _, cache = model.decode_step(tgt[:, :2], memory, src_mask=mask, cache=None)
        picked = model.reorder_cache(cache, index)
        memory, mask = select_rows(memory, index), mask[index]
        logits, _ = model.decode_step(tgt[index, 2:3], memory, src_mask=mask, cache=picked)
        ref, _ = model.decode_step(tgt[index, :3], memory, src_mask=mask, cache=None)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_greedy_and_beam_search_equal_the_cache_free_loop(spread_model: nn.Module) -> None:
    model, (src, mask, _) = spread_model, seq2seq_batch()
    greedy = greedy_decode(model, src, mask, BOS, EOS, 10)
    assert greedy == greedy_decode(NoCache(model), src, mask, BOS, EOS, 10)
    search = dict(max_len=10, beam_size=4, length_penalty="gnmt", alpha=0.6, n_best=3)
    cached = beam_search(model, src, mask, BOS, EOS, **search)
    free = beam_search(NoCache(model), src, mask, BOS, EOS, **search)
    assert [[h.tokens for h in hs] for hs in cached] == [[h.tokens for h in hs] for hs in free]
    for hs, ref in zip(cached, free, strict=True):
        assert [h.logprob for h in hs] == pytest.approx([h.logprob for h in ref], abs=1e-4)
        assert [h.score for h in hs] == pytest.approx([h.score for h in ref], abs=1e-5)


def test_beam_of_one_is_greedy_and_a_wider_beam_scores_no_worse(spread_model: nn.Module) -> None:
    model, (src, mask, _) = spread_model, seq2seq_batch()
    greedy = greedy_decode(model, src, mask, BOS, EOS, max_len=12)
    beams = beam_search(model, src, mask, BOS, EOS, 12, beam_size=1, length_penalty="none")
    assert [b[0].tokens for b in beams] == greedy
    wide = beam_search(model, src, mask, BOS, EOS, 12, beam_size=4, length_penalty="none")
    for w, b in zip(wide, beams, strict=True):  # on these inputs the wider beam keeps greedy's path
        assert w[0].score >= b[0].score - 1e-5


@pytest.mark.parametrize("case", cases(lambda arch: arch in KEY_PROJECTIONS), indirect=True)
def test_memory_keys_are_projected_once(case: Case, model: nn.Module) -> None:
    src, mask, tgt = seq2seq_batch()
    projections = KEY_PROJECTIONS[case.arch](model)
    calls: list[int] = []
    for module in projections:
        module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        memory = model.encode(src, mask)
        cache = None
        for t in range(5):
            _, cache = model.decode_step(tgt[:, t : t + 1], memory, src_mask=mask, cache=cache)
    assert len(calls) == len(projections)  # once per module, at the first step only


@pytest.mark.parametrize("case", cases(has_max_positions), indirect=True)
def test_max_positions_is_enforced(case: Case) -> None:
    model = tiny_seq2seq(case.arch, **case.overrides, max_positions=8)
    src, mask, _ = seq2seq_batch()  # 9 source positions
    with pytest.raises(ValueError, match="max_positions=8"):
        model.encode(src, mask)


# ------------------------------------------------------------------ attention maps
@pytest.mark.parametrize("case", cases(lambda arch: arch not in NO_ATTENTION), indirect=True)
def test_cross_attention_is_a_distribution_over_the_real_source(model: nn.Module) -> None:
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        attn = model.cross_attention(src, mask, tgt)  # (B,U,S)
        wide = model.cross_attention(*widen(src, mask, tgt))[:, :6]
    assert attn.shape == (3, 6, 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 6), atol=1e-5, rtol=0)
    assert torch.equal(attn > 0, mask.bool().unsqueeze(1).expand_as(attn))  # 0 exactly at padding
    assert not attn[0].allclose(attn[0].mean(dim=-1, keepdim=True))  # not uniform: input-dependent
    torch.testing.assert_close(wide[..., :9], attn, atol=1e-6, rtol=1e-5)
    assert wide[..., 9:].abs().max() == 0


# ------------------------------------------------------------------ learning a real (tiny) task
@pytest.fixture(params=list(REVERSAL_CASES))
def trained(request: pytest.FixtureRequest, reversal_model: Callable[[str], Trained]) -> Trained:
    return reversal_model(request.param)


def test_every_translation_architecture_learns_the_reversal_set() -> None:
    assert {arch for arch, _, _ in REVERSAL_CASES.values()} == set(TRANSLATION_ARCHES)


def test_learns_to_reverse_fifty_strings(trained: Trained) -> None:
    assert trained.history[0][1] < 0.1  # it really had to learn
    assert trained.history[-1][1] >= 0.98, trained.history


def test_beam_search_on_the_trained_model_equals_the_cache_free_loop(trained: Trained) -> None:
    model, b, expected, _ = trained
    args = (b["src_ids"], b["src_mask"], BOS, EOS, 8)
    search = dict(beam_size=4, length_penalty="gnmt", alpha=0.6, n_best=2)
    beams = beam_search(model, *args, **search)
    assert sum(h[0].tokens == y for h, y in zip(beams, expected, strict=True)) >= 0.98 * N_PAIRS
    assert all(h[0].score >= h[1].score for h in beams)
    ref = beam_search(NoCache(model), *args, **search)
    assert [[h.tokens for h in hs] for hs in beams] == [[h.tokens for h in hs] for hs in ref]
    assert exact_match(NoCache(model), b, expected) == exact_match(model, b, expected)


def test_translate_and_evaluate_through_the_tokenizer(
    trained: Trained, tokenizer: Tokenizer
) -> None:
    model, _, expected, _ = trained
    texts = [digit_text(y[::-1]) for y in expected]
    refs = [digit_text(y) for y in expected]
    model.train()  # translate_texts decodes in eval mode and restores the mode it found
    try:
        hyps = translate_texts(
            model,
            tokenizer,
            texts,
            beam_size=3,
            length_penalty="gnmt",
            alpha=1.0,
            max_len=8,
            batch_size=7,
        )
        assert model.training
    finally:
        model.eval()
    assert sum(h == r for h, r in zip(hyps, refs, strict=True)) >= 0.98 * len(refs)
    scores, _ = evaluate_translation(
        model, tokenizer, texts, refs, beam_size=2, max_len=8, batch_size=16
    )
    assert not model.training  # and eval mode stays eval mode
    assert scores["bleu"] > 90.0
    assert scores["copy_source_bleu"] < 50.0  # copying a reversed string gets unigrams, little else


def test_the_trained_model_is_the_same_after_a_checkpoint_round_trip(
    trained: Trained, tmp_path: Path
) -> None:
    model, b, _, _ = trained
    loaded = load_finetuned(save_checkpoint(tmp_path / "mt", model, model.config))
    assert loaded.model_config == model.config and loaded.model is not None
    loaded.model.eval()
    with torch.no_grad():
        want, got = (m(b["src_ids"], b["src_mask"], b["tgt_in"]) for m in (model, loaded.model))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    args = (b["src_ids"], b["src_mask"], BOS, EOS, 8)
    want_hyps = beam_search(model, *args, beam_size=3, length_penalty="gnmt")
    got_hyps = beam_search(loaded.model, *args, beam_size=3, length_penalty="gnmt")
    assert [h[0].tokens for h in got_hyps] == [h[0].tokens for h in want_hyps]
