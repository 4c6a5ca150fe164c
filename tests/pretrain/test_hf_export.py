"""Parity of `kiln export --format hf` with `transformers` (litgpt-style: tiny CPU configs, real converter).

Every model's weights are perturbed away from their init (zero biases, unit LayerNorms) so that a swapped
or untransposed tensor changes the logits. No network: everything is built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kiln_testlib import SPECIALS, word_tokenizer
from pretrain_testlib import kiln_greedy, perturbed
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from torch import nn

from data_pipeline.configlib import from_preset
from finetune.decode import greedy_decode
from finetune.models.classifier import ClassifierConfig, EncoderClassifier
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from pretrain.checkpoint import CheckpointError, save_checkpoint
from pretrain.hf_export import export_hf, hf_to_kiln_state_dict, kiln_to_hf_state_dict
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PAD, CLS, SEP, BOS, EOS = 0, 2, 3, 5, 6
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "und", "die", "katze"]
VOCAB = len(SPECIALS) + len(WORDS)  # 20
TOL = dict(atol=1e-5, rtol=1e-5)


def make_tokenizer(post_processor: bool = True) -> Tokenizer:
    tok = word_tokenizer(WORDS)
    if post_processor:  # as a BERT tokenizer: encode() wraps the text in [CLS] ... [SEP]
        tok.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
        )
    return tok


def bert_config() -> BertConfig:
    return from_preset(BertConfig, "tiny", vocab_size=VOCAB, max_position_embeddings=32)


def gpt_config(width: int = 64, cross: bool = False) -> GPTConfig:
    return from_preset(
        GPTConfig, "tiny", vocab_size=VOCAB, n_embd=width, n_positions=32, add_cross_attention=cross
    )


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    make_tokenizer().save(str(file))
    return file


def save(root: Path, model: nn.Module, config: object, tokenizer_file: Path | None) -> Path:
    return save_checkpoint(root / "ckpt", model, config, tokenizer_file)


def export(root: Path, model: nn.Module, config: object, tokenizer_file: Path) -> Path:
    return export_hf(save(root, model, config, tokenizer_file), root / "hf")


def batch(seed: int = 1, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        ids[1, 6:], mask[1, 6:] = PAD, 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, types, mask


def assert_loads_cleanly(cls: type, out: Path) -> nn.Module:
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert (
        not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ), info
    return model.eval()


def test_bert_matches_hf_bert_for_pretraining(tmp_path: Path, tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    kiln = perturbed(BertForPreTraining(bert_config()))
    out = export(tmp_path, kiln, kiln.config, tokenizer_file)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ids, types, mask = batch()
    with torch.no_grad():
        want = kiln(ids, token_type_ids=types, attention_mask=mask)
        want_seq, want_pooled = kiln.bert(ids, token_type_ids=types, attention_mask=mask)
        hf = assert_loads_cleanly(transformers.BertForPreTraining, out)
        got = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(got.prediction_logits, want.mlm_logits, **TOL)
        torch.testing.assert_close(got.seq_relationship_logits, want.nsp_logits, **TOL)
        base = transformers.AutoModel.from_pretrained(out).eval()
        assert type(base) is transformers.BertModel
        got_base = base(input_ids=ids, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(got_base.last_hidden_state, want_seq, **TOL)
        torch.testing.assert_close(got_base.pooler_output, want_pooled, **TOL)
        mlm = transformers.BertForMaskedLM.from_pretrained(out).eval()
        torch.testing.assert_close(
            mlm(input_ids=ids, token_type_ids=types, attention_mask=mask).logits,
            want.mlm_logits,
            **TOL,
        )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["hidden_act"] == "gelu"
    # Tied as HF saves it: the decoder matrix is the word-embedding matrix, stored once.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "cls.predictions.decoder.weight" not in f.keys() and f.metadata() == {"format": "pt"}
    assert (
        hf.cls.predictions.decoder.weight.data_ptr()
        == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    )


def test_gpt_matches_hf_gpt2_logits_and_greedy_generation(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    torch.manual_seed(0)
    kiln = perturbed(GPTLMHeadModel(gpt_config()))
    out = export(tmp_path, kiln, kiln.config, tokenizer_file)
    ids, _, _ = batch(pad=False)
    hf = assert_loads_cleanly(transformers.GPT2LMHeadModel, out)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu_new"
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, kiln(ids)[0], **TOL)
        for row in range(3):
            prompt = ids[row : row + 1, :4]
            got = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
            )
            assert got[0].tolist() == kiln_greedy(kiln, prompt, 8)
    assert hf.generation_config.eos_token_id == EOS and hf.generation_config.pad_token_id == PAD


def test_classifier_matches_hf_sequence_classification(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    torch.manual_seed(0)
    config = ClassifierConfig(
        encoder=bert_config(), num_labels=3, label_names=["neg", "neu", "pos"]
    )
    kiln = perturbed(EncoderClassifier(config))
    out = export(tmp_path, kiln, config, tokenizer_file)
    ids, _, mask = batch()
    hf = assert_loads_cleanly(transformers.BertForSequenceClassification, out)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids, attention_mask=mask).logits, kiln(ids, mask), **TOL
        )
    assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and hf.config.num_labels == 3


@pytest.mark.parametrize("dec_width", [64, 32], ids=["same-width", "projection"])
def test_seq2seq_matches_hf_encoder_decoder(
    tmp_path: Path, tokenizer_file: Path, dec_width: int
) -> None:
    torch.manual_seed(0)
    config = Seq2SeqConfig(encoder=bert_config(), decoder=gpt_config(dec_width, cross=True))
    kiln = perturbed(WarmStartedSeq2Seq(config))
    out = export(tmp_path, kiln, config, tokenizer_file)
    src, _, src_mask = batch()
    tgt_in = torch.cat([torch.full((3, 1), BOS), batch(seed=2, pad=False)[0][:, :5]], dim=1)
    hf = assert_loads_cleanly(transformers.EncoderDecoderModel, out)
    assert hasattr(hf, "enc_to_dec_proj") == (dec_width != 64)
    with torch.no_grad():
        got = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits
        torch.testing.assert_close(got, kiln(src, src_mask, tgt_in), **TOL)
        # Generation from decoder_start_token_id=[BOS] until [EOS]: the same ids as Kiln's greedy search.
        hf_ids = hf.generate(src, attention_mask=src_mask, max_new_tokens=6, do_sample=False)
    kiln_ids = greedy_decode(kiln, src, src_mask, BOS, EOS, max_len=6)
    for row, want in zip(hf_ids.tolist(), kiln_ids, strict=True):
        assert row[0] == BOS
        generated = [t for t in row[1:] if t != PAD]  # HF pads rows that stopped early
        assert generated[: len(want)] == want and generated[len(want) :] in ([], [EOS])


def test_auto_tokenizer_encodes_like_the_kiln_tokenizer(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    torch.manual_seed(0)
    out = export(tmp_path, BertForPreTraining(bert_config()), bert_config(), tokenizer_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    kiln_tok = Tokenizer.from_file(str(tokenizer_file))
    for text in ["the cat sat on the mat", "a dog ran far away zebra", "die katze [MASK] mat"]:
        want = kiln_tok.encode(text).ids
        assert hf_tok(text)["input_ids"] == want
        assert hf_tok.decode(want, skip_special_tokens=True) == kiln_tok.decode(want)
    pair = kiln_tok.encode("the cat", "sat on")
    got = hf_tok("the cat", "sat on")
    assert (
        got["input_ids"] == pair.ids and got["token_type_ids"] == pair.type_ids
    )  # NSP-style segments
    specials = [
        hf_tok.pad_token_id,
        hf_tok.unk_token_id,
        hf_tok.cls_token_id,
        hf_tok.sep_token_id,
        hf_tok.mask_token_id,
        hf_tok.bos_token_id,
        hf_tok.eos_token_id,
    ]
    assert specials == list(range(7)) and hf_tok.model_max_length == 32
    padded = hf_tok(["the cat", "a dog ran far"], padding=True)["input_ids"]
    assert padded[0][-2:] == [PAD, PAD]


def test_gpt_tokenizer_returns_no_token_types(tmp_path: Path, tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    out = export(tmp_path, GPTLMHeadModel(gpt_config()), gpt_config(), tokenizer_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    encoded = hf_tok("the cat", return_tensors="pt")
    assert set(encoded) == {
        "input_ids",
        "attention_mask",
    }  # so `model(**encoded)` works on GPT2LMHeadModel
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model(**encoded).logits.shape == (1, 4, VOCAB)


def test_reverse_key_map_round_trips_through_hf(tmp_path: Path, tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    kiln = perturbed(GPTLMHeadModel(gpt_config()))
    out = export(tmp_path, kiln, kiln.config, tokenizer_file)
    hf_state = transformers.GPT2LMHeadModel.from_pretrained(
        out
    ).state_dict()  # includes the tied lm_head
    back = GPTLMHeadModel(gpt_config())
    back.load_state_dict(hf_to_kiln_state_dict("gpt", gpt_config(), hf_state), strict=True)
    for name, tensor in kiln.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (
        back.lm_head.weight is back.transformer.wte.weight
    )  # the alias is the source tensor: tie preserved
    bert = perturbed(BertForPreTraining(bert_config()))
    hf_bert = kiln_to_hf_state_dict("bert", bert.config, bert.state_dict())
    restored = hf_to_kiln_state_dict("bert", bert.config, hf_bert)
    assert restored.keys() == bert.state_dict().keys()
    assert all(torch.equal(restored[k], v) for k, v in bert.state_dict().items())


def test_conv1d_weights_are_transposed(tmp_path: Path, tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    kiln = GPTLMHeadModel(gpt_config())
    hf = kiln_to_hf_state_dict("gpt", kiln.config, kiln.state_dict())
    assert torch.equal(
        hf["transformer.h.1.attn.c_attn.weight"], kiln.transformer.h[1].attn.c_attn.weight.T
    )
    assert hf["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)  # Conv1D: (in, out)
    assert torch.equal(
        hf["transformer.wte.weight"], kiln.transformer.wte.weight
    )  # embeddings are not


def test_bf16_checkpoint_exports_in_bf16(tmp_path: Path, tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    kiln = perturbed(GPTLMHeadModel(gpt_config())).to(torch.bfloat16)
    out = export(tmp_path, kiln, kiln.config, tokenizer_file)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, dtype="auto")
    assert hf.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(
        hf.transformer.h[0].mlp.c_proj.weight, kiln.transformer.h[0].mlp.c_proj.weight.T
    )


def test_refuses_non_empty_out_and_accepts_empty_dir(tmp_path: Path, tokenizer_file: Path) -> None:
    torch.manual_seed(0)
    ckpt = save(tmp_path, GPTLMHeadModel(gpt_config()), gpt_config(), tokenizer_file)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=f"{busy}: directory is not empty"):
        export_hf(ckpt, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        export_hf(ckpt, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_hf(ckpt, empty) == empty and (empty / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory was renamed, not left behind


def test_refuses_checkpoints_it_cannot_export_faithfully(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    torch.manual_seed(0)
    model, config = GPTLMHeadModel(gpt_config()), gpt_config()
    no_tok = save_checkpoint(tmp_path / "no_tok", model, config)
    with pytest.raises(CheckpointError, match=r"tokenizer.json: missing"):
        export_hf(no_tok, tmp_path / "out1")
    bad_tok_file = tmp_path / "bad_tokenizer.json"
    no_eos = [t for t in SPECIALS if t != "[EOS]"]
    Tokenizer(
        WordLevel({t: i for i, t in enumerate(["[UNK]", *no_eos[2:], "[PAD]"])}, unk_token="[UNK]")
    ).save(str(bad_tok_file))
    bad_tok = save_checkpoint(tmp_path / "bad_tok", model, config, bad_tok_file)
    with pytest.raises(
        CheckpointError, match=r"bad_tok/tokenizer.json: lacks the special token\(s\) \[EOS\]"
    ):
        export_hf(bad_tok, tmp_path / "out2")
    partial = {k: v for k, v in model.state_dict().items() if "h.1.mlp.c_fc" not in k}
    missing = save_checkpoint(
        tmp_path / "missing", model, config, tokenizer_file, state_dict=partial
    )
    with pytest.raises(CheckpointError, match=r"model.safetensors: Kiln tensor names .* missing 2"):
        export_hf(missing, tmp_path / "out3")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out3").exists()
    with pytest.raises(CheckpointError, match=r"arch 'llama' has no Hugging Face export"):
        kiln_to_hf_state_dict("llama", config, model.state_dict())


def test_refuses_a_mean_pooling_classifier(tmp_path: Path, tokenizer_file: Path) -> None:
    config = ClassifierConfig(encoder=bert_config(), num_labels=2, pooling="mean")
    ckpt = save_checkpoint(tmp_path / "clf", EncoderClassifier(config), config, tokenizer_file)
    with pytest.raises(
        CheckpointError, match=r"key 'pooling' is 'mean'; HF BertForSequenceClassification"
    ):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
