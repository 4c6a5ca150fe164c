"""WarmStartedSeq2Seq: config errors, shapes and the projection, its init, and the warm start from
two checkpoints. Decoding, padding, attention maps, checkpoints and learning:
test_seq2seq_contract.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from finetune_testlib import VOCAB, Pretrained, bert_config, gpt_config, seq2seq_batch, tiny_seq2seq

from data_pipeline.configlib import from_dict
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.models.warm_start import copy_matching
from pretrain.checkpoint import CheckpointError, save_checkpoint
from pretrain.models.meta import build_on_meta, materialize


def make_model(dec_width: int = 64) -> WarmStartedSeq2Seq:
    return tiny_seq2seq("seq2seq_warm", n_embd=dec_width)


def test_config_errors_and_two_vocabularies() -> None:
    cfg = make_model(32).config
    with pytest.raises(ValueError, match=r"Seq2SeqConfig.decoder: unknown key\(s\) \['n_embed'\]"):
        from_dict(Seq2SeqConfig, {**dataclasses.asdict(cfg), "decoder": {"n_embed": 3}})
    with pytest.raises(ValueError, match="add_cross_attention"):
        Seq2SeqConfig(encoder=bert_config(), decoder=gpt_config())
    # two released checkpoints, two vocabularies: the decoder's need not be the encoder's
    two = Seq2SeqConfig(
        encoder=bert_config(), decoder=gpt_config(vocab_size=99, add_cross_attention=True)
    )
    assert WarmStartedSeq2Seq(two).decoder.lm_head.weight.shape[0] == 99


@pytest.mark.parametrize("dec_width", [64, 32])
def test_shapes_and_projection(dec_width: int) -> None:
    model = make_model(dec_width)
    src, mask, tgt = seq2seq_batch()
    assert model.encode(src, mask).shape == (3, 9, dec_width)
    assert model(src, mask, tgt).shape == (3, 6, VOCAB)
    assert isinstance(model.enc_to_dec_proj, torch.nn.Linear) == (dec_width != 64)


def test_meta_init_ties_the_head_and_draws_the_projection_like_gpt() -> None:
    model = materialize(build_on_meta(WarmStartedSeq2Seq, make_model(32).config), "cpu")
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight
    assert float(model.enc_to_dec_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.2)


def expected_new_tensors(n_layer: int, projection: bool) -> set[str]:
    names = {
        f"decoder.transformer.h.{i}.{mod}.{p}"
        for i in range(n_layer)
        for mod in (
            "crossattention.q_attn",
            "crossattention.c_attn",
            "crossattention.c_proj",
            "ln_cross_attn",
        )
        for p in ("weight", "bias")
    }
    return names | ({"enc_to_dec_proj.weight", "enc_to_dec_proj.bias"} if projection else set())


@pytest.mark.parametrize("fixture", ["pretrained", "pretrained_narrow_decoder"])
def test_from_pretrained_loads_every_tensor_bitwise(
    fixture: str, request: pytest.FixtureRequest
) -> None:
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
    with pytest.raises(
        CheckpointError, match=r"gpt/config.json: arch is 'gpt', but a 'bert' checkpoint"
    ):
        WarmStartedSeq2Seq.from_pretrained(pretrained.gpt_dir, pretrained.gpt_dir)
    with pytest.raises(
        CheckpointError, match=r"bert/config.json: arch is 'bert', but a 'gpt' checkpoint"
    ):
        WarmStartedSeq2Seq.from_pretrained(pretrained.bert_dir, pretrained.bert_dir)


def test_from_pretrained_refuses_different_tokenizers(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    other_tok = tmp_path / "tokenizer.json"
    other_tok.write_text(pretrained.tokenizer_file.read_text().replace('"[UNK]"', '"<unk>"'))
    gpt_dir = save_checkpoint(
        tmp_path / "gpt_other_tok", pretrained.gpt, pretrained.gpt.config, other_tok
    )
    with pytest.raises(CheckpointError, match="must share one tokenizer"):
        WarmStartedSeq2Seq.from_pretrained(pretrained.bert_dir, gpt_dir)


def test_copy_matching_names_missing_unexpected_and_misshapen_tensors() -> None:
    model = make_model()
    good = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    renamed = {
        ("transformer.wte.weights" if k == "transformer.wte.weight" else k): v
        for k, v in good.items()
    }
    with pytest.raises(
        CheckpointError,
        match=r"dec: .*missing 1 \(e.g. \['transformer.wte.weight'\]\).*unexpected 1",
    ):
        copy_matching(model.decoder, renamed, "dec", lambda name: False)
    bad_shape = {**good, "transformer.ln_f.weight": torch.ones(3)}
    with pytest.raises(
        CheckpointError, match=r"transformer.ln_f.weight: checkpoint \(3,\) vs model \(64,\)"
    ):
        copy_matching(model.decoder, bad_shape, "dec", lambda name: False)
