"""WarmStartedSeq2Seq: config round trip, KV-cache decoding == full forward, warm start from checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from finetune_testlib import BOS, EOS, VOCAB, Pretrained, bert_config, gpt_config

from finetune.decode import beam_search, greedy_decode
from finetune.models import load_finetuned
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.models.warm_start import copy_matching
from pretrain.checkpoint import CheckpointError, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize


def make_model(dec_width: int = 64, seed: int = 0, **gpt_overrides: object) -> WarmStartedSeq2Seq:
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(encoder=bert_config(), decoder=gpt_config(n_embd=dec_width, add_cross_attention=True,
                                                                  **gpt_overrides))
    return WarmStartedSeq2Seq(cfg).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(7, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(src)
    mask[1, 5:] = 0  # a padded source
    src[1, 5:] = 0
    tgt = torch.randint(7, VOCAB, (3, 6), generator=gen)
    tgt[:, 0] = BOS
    return src, mask, tgt


def test_config_round_trips_through_asdict() -> None:
    cfg = make_model(32).config
    assert Seq2SeqConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    assert Seq2SeqConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"Seq2SeqConfig.decoder: unknown key\(s\) \['n_embed'\]"):
        Seq2SeqConfig.from_dict({**dataclasses.asdict(cfg), "decoder": {"n_embed": 3}})
    with pytest.raises(ValueError, match="add_cross_attention"):
        Seq2SeqConfig(encoder=bert_config(), decoder=gpt_config())
    # two released checkpoints, two vocabularies: the decoder's need not be the encoder's
    two = Seq2SeqConfig(encoder=bert_config(), decoder=gpt_config(vocab_size=99, add_cross_attention=True))
    assert WarmStartedSeq2Seq(two).decoder.lm_head.weight.shape[0] == 99


@pytest.mark.parametrize("dec_width", [64, 32])
def test_shapes_and_projection(dec_width: int) -> None:
    model = make_model(dec_width)
    src, mask, tgt = batch()
    assert model.encode(src, mask).shape == (3, 9, dec_width)
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert isinstance(model.enc_to_dec_proj, torch.nn.Linear) == (dec_width != 64)


@pytest.mark.parametrize("dec_width", [64, 32])
def test_cached_decode_steps_equal_full_forward(dec_width: int) -> None:
    model = make_model(dec_width)
    src, mask, tgt = batch()
    with torch.no_grad():
        full = model(src, mask, tgt)  # (B,U,V)
        memory = model.encode(src, mask)
        cache, steps = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(tgt[:, t : t + 1], memory, mask, cache)
            steps.append(logits)
        # two new tokens at once on top of a cache: the offset causal mask
        cache2 = model.decode_step(tgt[:, :3], memory, mask, None)[1]
        last2, _ = model.decode_step(tgt[:, 3:5], memory, mask, cache2)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last2, full[:, 4], atol=1e-5, rtol=1e-5)


def test_cross_attention_keys_are_computed_once() -> None:
    model = make_model()
    src, mask, tgt = batch()
    calls: list[int] = []
    for block in model.decoder.transformer.h:
        block.crossattention.c_attn.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        memory = model.encode(src, mask)
        cache = None
        for t in range(5):
            _, cache = model.decode_step(tgt[:, t : t + 1], memory, mask, cache)
    assert len(calls) == len(model.decoder.transformer.h)  # once per block, at the first step only


def test_reorder_cache_selects_rows() -> None:
    model = make_model()
    src, mask, tgt = batch()
    with torch.no_grad():
        memory = model.encode(src, mask)
        _, cache = model.decode_step(tgt[:, :2], memory, mask, None)
        index = torch.tensor([2, 2, 0])
        picked = model.reorder_cache(cache, index)
        logits, _ = model.decode_step(tgt[index, 2:3], memory[index], mask[index], picked)
        ref, _ = model.decode_step(tgt[index, :3], memory[index], mask[index], None)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_greedy_equals_beam_of_one_on_the_real_model() -> None:
    model = make_model(initializer_range=0.5)  # large random weights: varied, EOS-ending outputs
    src, mask, _ = batch()
    greedy = greedy_decode(model, src, mask, BOS, EOS, max_len=12)
    beams = beam_search(model, src, mask, BOS, EOS, max_len=12, beam_size=1, length_penalty="none")
    assert [b[0].tokens for b in beams] == greedy
    wide = beam_search(model, src, mask, BOS, EOS, max_len=12, beam_size=4, length_penalty="none")
    # a wider beam never finds a worse best hypothesis than greedy here (it contains greedy's path)
    for w, b in zip(wide, beams, strict=True):
        assert w[0].score >= b[0].score - 1e-5


def test_meta_build_then_init() -> None:
    cfg = make_model(32).config
    model = build_on_meta(WarmStartedSeq2Seq, cfg)
    assert next(model.parameters()).device.type == "meta"
    materialize(model, "cpu")
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model.enc_to_dec_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.2)


def expected_new_tensors(n_layer: int, projection: bool) -> set[str]:
    names = {f"decoder.transformer.h.{i}.{mod}.{p}" for i in range(n_layer)
             for mod in ("crossattention.q_attn", "crossattention.c_attn", "crossattention.c_proj", "ln_cross_attn")
             for p in ("weight", "bias")}
    return names | ({"enc_to_dec_proj.weight", "enc_to_dec_proj.bias"} if projection else set())


@pytest.mark.parametrize("fixture", ["pretrained", "pretrained_narrow_decoder"])
def test_from_pretrained_loads_every_tensor_bitwise(fixture: str, request: pytest.FixtureRequest) -> None:
    pre: Pretrained = request.getfixturevalue(fixture)
    model, new = WarmStartedSeq2Seq.from_pretrained(pre.bert_dir, pre.gpt_dir)
    projection = pre.gpt.config.n_embd != pre.bert.config.hidden_size
    assert set(new) == expected_new_tensors(pre.gpt.config.n_layer, projection)
    assert len(new) == len(set(new))
    for name, tensor in pre.bert.bert.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor), name
    gpt_state = pre.gpt.state_dict()
    for name, tensor in model.decoder.state_dict().items():
        if f"decoder.{name}" not in new:
            assert torch.equal(tensor, gpt_state[name]), name
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight
    assert model.config.decoder.add_cross_attention and not pre.gpt.config.add_cross_attention


def test_from_pretrained_refuses_swapped_checkpoints(pretrained: Pretrained) -> None:
    with pytest.raises(CheckpointError, match=r"gpt/config.json: arch is 'gpt', but a 'bert' checkpoint"):
        WarmStartedSeq2Seq.from_pretrained(pretrained.gpt_dir, pretrained.gpt_dir)
    with pytest.raises(CheckpointError, match=r"bert/config.json: arch is 'bert', but a 'gpt' checkpoint"):
        WarmStartedSeq2Seq.from_pretrained(pretrained.bert_dir, pretrained.bert_dir)


def test_from_pretrained_refuses_different_tokenizers(pretrained: Pretrained, tmp_path: Path) -> None:
    other_tok = tmp_path / "tokenizer.json"
    other_tok.write_text(pretrained.tokenizer_file.read_text().replace('"[UNK]"', '"<unk>"'))
    gpt_dir = save_checkpoint(tmp_path / "gpt_other_tok", pretrained.gpt, pretrained.gpt.config, other_tok)
    with pytest.raises(CheckpointError, match="must share one tokenizer"):
        WarmStartedSeq2Seq.from_pretrained(pretrained.bert_dir, gpt_dir)


def test_copy_matching_names_missing_unexpected_and_misshapen_tensors() -> None:
    model = make_model()
    good = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    renamed = {("transformer.wte.weights" if k == "transformer.wte.weight" else k): v for k, v in good.items()}
    with pytest.raises(CheckpointError, match=r"dec: .*missing 1 \(e.g. \['transformer.wte.weight'\]\).*unexpected 1"):
        copy_matching(model.decoder, renamed, "dec", lambda name: False)
    bad_shape = {**good, "transformer.ln_f.weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"transformer.ln_f.weight: checkpoint \(3,\) vs model \(64,\)"):
        copy_matching(model.decoder, bad_shape, "dec", lambda name: False)


def test_fine_tuned_checkpoint_round_trip(pretrained: Pretrained, tmp_path: Path) -> None:
    model, _ = WarmStartedSeq2Seq.from_pretrained(pretrained.bert_dir, pretrained.gpt_dir)
    path = save_checkpoint(tmp_path / "mt", model, model.config, pretrained.tokenizer_file)
    loaded = load_finetuned(path)
    assert loaded.model_config == model.config
    src, mask, tgt = batch()
    model.eval()
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(src, mask, tgt), model(src, mask, tgt), atol=0, rtol=0)

