"""RNNSeq2Seq (plain LSTM, Bahdanau, Luong dot/general): config, shapes, padding invariance, cached == uncached
decoding, alignment weights, meta build + checkpoint round trip, and overfitting a 50-pair reversal set."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_testlib import BOS, EOS, PAD, VOCAB, digit_id, make_tokenizer

from finetune.decode import beam_search, greedy_decode
from finetune.models.rnn import LSTMCache, RNNSeq2Seq, RNNSeq2SeqConfig
from finetune.module import translation_loss
from finetune.translate import evaluate_translation
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize

VARIANTS: dict[str, dict[str, Any]] = {
    "lstm": dict(arch="lstm"),
    "bahdanau": dict(arch="lstm_attention", attention="bahdanau"),
    "luong_dot": dict(arch="lstm_attention", attention="luong_dot"),
    "luong_general": dict(arch="lstm_attention", attention="luong_general"),
}
ATTENTION_VARIANTS = [v for v in VARIANTS if v != "lstm"]
REGISTRY = {"lstm": (RNNSeq2SeqConfig, RNNSeq2Seq), "lstm_attention": (RNNSeq2SeqConfig, RNNSeq2Seq)}


def make_config(variant: str, **overrides: Any) -> RNNSeq2SeqConfig:
    base = dict(vocab_size=VOCAB, dropout=0.0, num_layers=2)
    return RNNSeq2SeqConfig.from_preset("tiny", **{**base, **VARIANTS[variant], **overrides})


def make_model(variant: str, seed: int = 0, **overrides: Any) -> RNNSeq2Seq:
    torch.manual_seed(seed)
    return RNNSeq2Seq(make_config(variant, **overrides)).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(7, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0  # a padded source
    src[1, 5:] = PAD
    tgt = torch.randint(7, VOCAB, (3, 6), generator=gen)
    tgt[:, 0] = BOS
    return src, mask, tgt


def test_config_round_trip_presets_and_defaults() -> None:
    for variant in VARIANTS:
        cfg = make_config(variant)
        assert RNNSeq2SeqConfig.from_dict(dataclasses.asdict(cfg)) == cfg
        assert RNNSeq2SeqConfig(**dataclasses.asdict(cfg)) == cfg
    tiny = make_config("lstm")
    assert (tiny.preset, tiny.embedding_dim, tiny.hidden_size) == ("tiny", 64, 64)
    assert RNNSeq2SeqConfig(arch="lstm_attention").attention == "bahdanau"
    assert RNNSeq2SeqConfig.from_preset("small", vocab_size=100).hidden_size == 256


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(arch="gru"), r"arch must be one of \['lstm', 'lstm_attention'\], got 'gru'"),
    (dict(arch="lstm", attention="bahdanau"), r"attention='bahdanau' needs arch 'lstm_attention'"),
    (dict(arch="lstm_attention", attention="concat"), r"attention must be one of .*got 'concat'"),
    (dict(embedding_dim=32), r"tie_embeddings needs embedding_dim == hidden_size, got 32 and 64"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(pad_id=VOCAB), r"pad_id must be in \[0, vocab_size=17\)"),
    (dict(num_layers=0), r"num_layers must be > 0"),
    (dict(init_range=0.0), r"init_range must be > 0"),
])
def test_config_errors_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config("lstm", **overrides)


def test_config_refuses_unknown_presets_and_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        RNNSeq2SeqConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"RNNSeq2SeqConfig: unknown key\(s\) \['hidden'\]"):
        RNNSeq2SeqConfig.from_dict({**dataclasses.asdict(make_config("lstm")), "hidden": 3})


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_bridges_and_tying(variant: str, bidirectional: bool) -> None:
    model = make_model(variant, bidirectional=bidirectional)
    src, mask, tgt = batch()
    states, h0, c0 = model.encode(src, mask)
    assert states.shape == (3, 9, 64) and h0.shape == (3, 2, 64) and c0.shape == (3, 2, 64)
    assert bool((states[1, 5:] == 0).all())
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert isinstance(model.encoder.bridge_h, torch.nn.Linear) == bidirectional
    assert model.out.weight is model.embedding.weight


def test_untied_output_allows_different_sizes() -> None:
    model = make_model("luong_general", embedding_dim=32, tie_embeddings=False)
    src, mask, tgt = batch()
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert model.out.weight.shape == (VOCAB, 64) and model.embedding.weight.shape == (VOCAB, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_never_changes_a_result(variant: str) -> None:
    model = make_model(variant)
    src, mask, tgt = batch()
    with torch.no_grad():
        ref = model(src, mask, tgt)  # (3,6,V)
        # three more padded source columns (holding junk ids, which the mask must hide) and two padded target ones
        junk = torch.full((3, 3), 9)
        wide_src = torch.cat([src.masked_fill(mask == 0, 9), junk], dim=1)
        wide_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.long)], dim=1)
        wide_tgt = torch.cat([tgt, torch.full((3, 2), PAD)], dim=1)
        torch.testing.assert_close(model(wide_src, wide_mask, wide_tgt)[:, :6], ref, atol=1e-5, rtol=1e-5)
        alone = model(src[1:2, :5], mask[1:2, :5], tgt[1:2])  # the padded row without its padding
    torch.testing.assert_close(alone, ref[1:2], atol=1e-5, rtol=1e-5)


def test_masks_must_be_right_padded_and_non_empty() -> None:
    model = make_model("bahdanau")
    src, mask, tgt = batch()
    holey = mask.clone()
    holey[0, 2] = 0
    with pytest.raises(ValueError, match="src_mask must be right-padded"):
        model(src, holey, tgt)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"src_mask has rows without a real token: \[2\]"):
        model.encode(src, empty)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_steps_equal_full_forward(variant: str, bidirectional: bool) -> None:
    model = make_model(variant, bidirectional=bidirectional)
    src, mask, tgt = batch()
    with torch.no_grad():
        full = model(src, mask, tgt)  # (B,U,V)
        memory = model.encode(src, mask)
        cache, steps = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(tgt[:, t : t + 1], memory, mask, cache)
            steps.append(logits)
        # several new tokens at once, on top of a cache
        cache3 = model.decode_step(tgt[:, :3], memory, mask, None)[1]
        last2, _ = model.decode_step(tgt[:, 3:5], memory, mask, cache3)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last2, full[:, 4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reorder_cache_selects_rows(variant: str) -> None:
    model = make_model(variant)
    src, mask, tgt = batch()
    with torch.no_grad():
        memory = model.encode(src, mask)
        _, cache = model.decode_step(tgt[:, :2], memory, mask, None)
        index = torch.tensor([2, 2, 0])
        picked = model.reorder_cache(cache, index)
        picked_memory = tuple(m[index] for m in memory)
        logits, _ = model.decode_step(tgt[index, 2:3], picked_memory, mask[index], picked)
        ref, _ = model.decode_step(tgt[index, :3], picked_memory, mask[index], None)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(picked, LSTMCache) and picked.h.shape == (2, 3, 64)


class Uncached:
    """Decoding with no incremental state: each step re-runs the teacher-forced forward over the whole prefix.

    Its 'memory' is the source itself and its 'cache' the prefix, so the search reorders them like real state."""

    def __init__(self, model: RNNSeq2Seq) -> None:
        self.model = model

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return src_ids

    def decode_step(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
                    cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = tgt_ids if cache is None else torch.cat([cache, tgt_ids], dim=1)
        return self.model(memory, src_mask, prefix)[:, -1], prefix

    def reorder_cache(self, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return cache.index_select(0, index)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_and_beam_search_equal_a_cache_free_reference(variant: str) -> None:
    # larger random weights than the default init: peaked, varied outputs (much larger ones make the network
    # chaotic, and float32 rounding of different batch shapes alone then flips near-ties)
    model = make_model(variant, init_range=0.5)
    src, mask, _ = batch()
    greedy = greedy_decode(model, src, mask, BOS, EOS, max_len=10)
    assert greedy == greedy_decode(Uncached(model), src, mask, BOS, EOS, max_len=10)
    beams = beam_search(model, src, mask, BOS, EOS, max_len=10, beam_size=3, n_best=2)
    ref = beam_search(Uncached(model), src, mask, BOS, EOS, max_len=10, beam_size=3, n_best=2)
    assert [[h.tokens for h in hyps] for hyps in beams] == [[h.tokens for h in hyps] for hyps in ref]
    for hyps, ref_hyps in zip(beams, ref, strict=True):
        for h, r in zip(hyps, ref_hyps, strict=True):
            assert h.score == pytest.approx(r.score, abs=1e-5)
    assert len({tuple(g) for g in greedy}) > 1  # the sources really decode differently


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_alignment_rows_sum_to_one_and_are_zero_at_padding(variant: str) -> None:
    model = make_model(variant, init_range=1.0)
    src, mask, tgt = batch()
    with torch.no_grad():
        weights = model.cross_attention(src, mask, tgt)
    assert weights.shape == (3, 6, 9)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 6))
    assert bool((weights[1, :, 5:] == 0).all())
    assert float(weights.amax()) > 0.5  # not the uniform distribution a broken score would give


def test_plain_lstm_has_no_attention_to_show() -> None:
    src, mask, tgt = batch()
    with pytest.raises(ValueError, match="arch 'lstm' has no attention to show"):
        make_model("lstm").cross_attention(src, mask, tgt)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_the_attention_variants_read_the_encoder_states(variant: str) -> None:
    """The plain decoder sees the source through its initial (h, c) alone: other encoder states change nothing."""
    model = make_model(variant)
    src, mask, tgt = batch()
    with torch.no_grad():
        states, h0, c0 = model.encode(src, mask)
        other = (torch.randn_like(states).masked_fill(mask.unsqueeze(-1) == 0, 0.0), h0, c0)
        logits, _ = model.decode_step(tgt[:, :4], (states, h0, c0), mask, None)
        changed, _ = model.decode_step(tgt[:, :4], other, mask, None)
    assert torch.equal(logits, changed) == (variant == "lstm")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_build_and_checkpoint_round_trip(variant: str, tmp_path: Path) -> None:
    cfg = make_config(variant)
    model = materialize(build_on_meta(RNNSeq2Seq, cfg), "cpu").eval()
    assert model.out.weight is model.embedding.weight  # re-tied after to_empty
    with torch.no_grad():
        assert all(bool((p.abs() <= cfg.init_range).all()) and float(p.std()) > 0 for p in model.parameters())
    loaded = load_checkpoint(save_checkpoint(tmp_path / variant, model, cfg), REGISTRY)
    assert loaded.arch == cfg.arch and loaded.model_config == cfg
    assert loaded.model.out.weight is loaded.model.embedding.weight
    src, mask, tgt = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(src, mask, tgt), model(src, mask, tgt), atol=0, rtol=0)


# --- learning a real (tiny) task: reverse 50 digit strings ---------------------------------------------------------

N_PAIRS = 50
MAX_STEPS = 400  # every variant gets there in 75-200 steps on this data


def digit_strings(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10) for _ in range(rng.randint(3, 6))] for _ in range(n)]


def reversal_batch(strings: list[list[int]]) -> dict[str, torch.Tensor]:
    """Rows as the data pipeline builds them: src `x [EOS]`, tgt_in `[BOS] y`, tgt_out `y [EOS]` (-100 at pad)."""
    shape = (len(strings), max(len(s) for s in strings) + 1)
    b = {"src_ids": torch.full(shape, PAD), "src_mask": torch.zeros(shape, dtype=torch.long),
         "tgt_in": torch.full(shape, PAD), "tgt_out": torch.full(shape, -100)}
    for i, digits in enumerate(strings):
        x = [digit_id(d) for d in digits]
        y = x[::-1]
        b["src_ids"][i, : len(x) + 1] = torch.tensor(x + [EOS])
        b["src_mask"][i, : len(x) + 1] = 1
        b["tgt_in"][i, : len(y) + 1] = torch.tensor([BOS] + y)
        b["tgt_out"][i, : len(y) + 1] = torch.tensor(y + [EOS])
    return b


def exact_match(hyps: list[list[int]], strings: list[list[int]]) -> float:
    return sum(h == [digit_id(d) for d in s[::-1]] for h, s in zip(hyps, strings, strict=True)) / len(strings)


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request: pytest.FixtureRequest) -> tuple[str, RNNSeq2Seq, list[list[int]], list[tuple[int, float]]]:
    model = make_model(request.param, num_layers=1)
    strings = digit_strings(N_PAIRS, seed=0)
    b = reversal_batch(strings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def greedy_match() -> float:
        return exact_match(greedy_decode(model.eval(), b["src_ids"], b["src_mask"], BOS, EOS, max_len=8), strings)

    history = [(0, greedy_match())]
    for step in range(1, MAX_STEPS + 1):
        model.train()
        loss = translation_loss(model(b["src_ids"], b["src_mask"], b["tgt_in"]), b["tgt_out"], 0.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            history.append((step, greedy_match()))
            if history[-1][1] == 1.0:
                break
    return request.param, model.eval(), strings, history


def test_overfits_the_reversal_set(trained: tuple) -> None:
    _, _, _, history = trained
    assert history[0][1] < 0.1  # it really had to learn
    assert history[-1][1] >= 0.9, history


def test_beam_search_and_bleu_on_the_trained_model(trained: tuple) -> None:
    _, model, strings, _ = trained
    b = reversal_batch(strings)
    hyps = beam_search(model, b["src_ids"], b["src_mask"], BOS, EOS, max_len=8, beam_size=4, alpha=0.6)
    assert exact_match([h[0].tokens for h in hyps], strings) >= 0.9
    texts = [" ".join(map(str, s)) for s in strings]
    refs = [" ".join(map(str, s[::-1])) for s in strings]
    scores, _ = evaluate_translation(model, make_tokenizer(), texts, refs, beam_size=3, max_len=8, batch_size=16)
    assert scores["bleu"] > 90.0
    assert scores["copy_source_bleu"] < 50.0  # copying a reversed string gets unigrams, little else


def test_attention_learns_the_reversed_alignment(trained: tuple) -> None:
    """Target token t of a reversal is source token n-1-t: the alignment should put most mass there."""
    variant, model, strings, _ = trained
    if variant == "lstm":
        pytest.skip("no attention")
    b = reversal_batch(strings)
    with torch.no_grad():
        weights = model.cross_attention(b["src_ids"], b["src_mask"], b["tgt_in"])  # (B,U,S)
    mass = [float(weights[i, t, len(s) - 1 - t]) for i, s in enumerate(strings) for t in range(len(s))]
    assert sum(mass) / len(mass) > 0.5, variant
