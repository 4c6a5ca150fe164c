"""Export a Kiln checkpoint as a Hugging Face `transformers` model directory (`kiln export --format hf`).

    OUT/
      config.json              HF config of the family (architectures, model_type, sizes, activations, eps)
      generation_config.json   bos/eos/pad (and decoder_start) ids; generative families only
      model.safetensors        HF state-dict names; tied matrices stored once, as HF's save_pretrained does
      tokenizer.json           the checkpoint's tokenizer, copied (a translation model's: the source side's)
      tokenizer_config.json    PreTrainedTokenizerFast + the Kiln special tokens (docs/design.md)
      decoder_tokenizer/       a translation model trained with a target tokenizer of its own (a GPT-2 release's):
                               its tokenizer.json and tokenizer_config.json, bos/eos/pad named as the decoder uses
                               them; config.json's decoder_start/bos/eos/pad ids are that tokenizer's

Nothing here imports `transformers` (it is only a test dependency): the configs are written by hand and the
tests load the result with `transformers` and compare logits. Nor does anything import `finetune/`
(pretrain may not, docs/design.md): the fine-tuning configs are read from their `asdict` form in config.json.

Kiln parameter names already are HF's, so each family's key map below is a table of identical columns
plus prefixes; it exists so that a rename on either side is one edited row, and so that export refuses a
checkpoint whose names the table does not cover instead of writing a half-filled model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor

from data_pipeline.configlib import ConfigError, from_dict
from data_pipeline.tokenizer import TARGET_TOKENIZER_FILE, load_translation_tokenizers
from pretrain.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    fetch_checkpoint,
    load_weights,
    verify_checkpoint,
)
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig

# docs/design.md: the special tokens (HF tokenizer attribute -> (token, id in a tokenizer Kiln trained)). A loaded
# vocabulary (an imported BERT's vocab.txt, GPT-2's vocab.json) keeps its own ids, so export reads the real ids from
# the checkpoint's tokenizer; these are the defaults for configs written without one.
HF_SPECIAL_TOKEN_MAP: dict[str, tuple[str, int]] = {
    "pad_token": ("[PAD]", 0),
    "unk_token": ("[UNK]", 1),
    "cls_token": ("[CLS]", 2),
    "sep_token": ("[SEP]", 3),
    "mask_token": ("[MASK]", 4),
    "bos_token": ("[BOS]", 5),
    "eos_token": ("[EOS]", 6),
}
KILN_SPECIAL_IDS: dict[str, int] = {attr: i for attr, (_, i) in HF_SPECIAL_TOKEN_MAP.items()}
# What each exported family cannot work without (the tokenizer must have these tokens).
NEEDED_SPECIALS: dict[str, tuple[str, ...]] = {
    "bert": ("pad_token", "cls_token", "sep_token", "mask_token"),
    "bert_classifier": ("pad_token", "cls_token", "sep_token"),
    "gpt": ("pad_token", "bos_token", "eos_token"),
    "seq2seq_warm": ("pad_token", "bos_token", "eos_token"),
}


# ---------------------------------------------------------------- key maps (tables)
class Row(NamedTuple):
    """One tensor: Kiln name, HF name. `{enc}` is a BERT layer index, `{dec}` a GPT block index."""

    kiln: str
    hf: str
    transpose: bool = (
        False  # HF GPT-2 uses Conv1D, whose weight is (in, out); Kiln's nn.Linear is (out, in)
    )
    when: str | None = None  # "cross_attention" / "projection": present only when the config has it


_LIN = ("weight", "bias")
BERT_MODEL: tuple[Row, ...] = (
    Row("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    Row("embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    Row("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    *(Row(f"embeddings.LayerNorm.{p}", f"embeddings.LayerNorm.{p}") for p in _LIN),
    *(
        Row(f"encoder.layer.{{enc}}.{m}.{p}", f"encoder.layer.{{enc}}.{m}.{p}")
        for p in _LIN
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        )
    ),
    *(Row(f"pooler.dense.{p}", f"pooler.dense.{p}") for p in _LIN),
)
BERT_PRETRAINING_HEADS: tuple[Row, ...] = (
    Row("cls.predictions.bias", "cls.predictions.bias"),
    *(
        Row(f"cls.predictions.transform.{m}.{p}", f"cls.predictions.transform.{m}.{p}")
        for m in ("dense", "LayerNorm")
        for p in _LIN
    ),
    *(Row(f"cls.seq_relationship.{p}", f"cls.seq_relationship.{p}") for p in _LIN),
)
CLASSIFIER_HEAD: tuple[Row, ...] = tuple(Row(f"classifier.{p}", f"classifier.{p}") for p in _LIN)
GPT_LM: tuple[Row, ...] = (
    Row("transformer.wte.weight", "transformer.wte.weight"),
    Row("transformer.wpe.weight", "transformer.wpe.weight"),
    *(
        Row(f"transformer.h.{{dec}}.{m}.{p}", f"transformer.h.{{dec}}.{m}.{p}")
        for m in ("ln_1", "ln_2")
        for p in _LIN
    ),
    *(
        Row(
            f"transformer.h.{{dec}}.{m}.{p}",
            f"transformer.h.{{dec}}.{m}.{p}",
            transpose=p == "weight",
        )
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for p in _LIN
    ),
    *(
        Row(
            f"transformer.h.{{dec}}.{m}.{p}",
            f"transformer.h.{{dec}}.{m}.{p}",
            transpose=p == "weight",
            when="cross_attention",
        )
        for m in ("crossattention.q_attn", "crossattention.c_attn", "crossattention.c_proj")
        for p in _LIN
    ),
    *(
        Row(
            f"transformer.h.{{dec}}.ln_cross_attn.{p}",
            f"transformer.h.{{dec}}.ln_cross_attn.{p}",
            when="cross_attention",
        )
        for p in _LIN
    ),
    *(Row(f"transformer.ln_f.{p}", f"transformer.ln_f.{p}") for p in _LIN),
)
ENC_TO_DEC_PROJ: tuple[Row, ...] = tuple(
    Row(f"enc_to_dec_proj.{p}", f"enc_to_dec_proj.{p}", when="projection") for p in _LIN
)

KeyMap = tuple[tuple[str, str, tuple[Row, ...]], ...]  # (Kiln prefix, HF prefix, rows)
BERT_PRETRAINING_MAP: KeyMap = (("bert.", "bert.", BERT_MODEL), ("", "", BERT_PRETRAINING_HEADS))
GPT_LM_MAP: KeyMap = (("", "", GPT_LM),)
BERT_CLASSIFIER_MAP: KeyMap = (("bert.", "bert.", BERT_MODEL), ("", "", CLASSIFIER_HEAD))
SEQ2SEQ_MAP: KeyMap = (
    ("encoder.", "encoder.", BERT_MODEL),
    ("", "", ENC_TO_DEC_PROJ),
    ("decoder.", "decoder.", GPT_LM),
)


# ---------------------------------------------------------------- the Kiln config, read from its asdict form
@dataclass
class Parts:
    """What the key map and config.json need from a Kiln config: its BERT and/or GPT halves and the head."""

    bert: BertConfig | None = None
    gpt: GPTConfig | None = None
    num_labels: int = 0
    label_names: list[str] = field(default_factory=list)
    classifier_dropout: float | None = None

    def facts(self) -> dict[str, int | bool]:
        """Layer counts for `{enc}`/`{dec}` and the switches that `Row.when` names."""
        return {
            "enc": self.bert.num_hidden_layers if self.bert else 0,
            "dec": self.gpt.n_layer if self.gpt else 0,
            "cross_attention": bool(self.gpt and self.gpt.add_cross_attention),
            "projection": bool(self.bert and self.gpt and self.bert.hidden_size != self.gpt.n_embd),
        }


def _section(values: dict, key: str, where: str) -> dict:
    if not isinstance(values.get(key), dict):
        raise CheckpointError(f"{where}: key {key!r} must be a mapping of the sub-config's fields")
    return values[key]


def _parse_bert(values: dict, where: str) -> Parts:
    return Parts(bert=from_dict(BertConfig, values, where))


def _parse_gpt(values: dict, where: str) -> Parts:
    return Parts(gpt=from_dict(GPTConfig, values, where))


def _parse_classifier(values: dict, where: str) -> Parts:
    bert = from_dict(BertConfig, _section(values, "encoder", where), f"{where} (encoder)")
    num_labels, names = values.get("num_labels"), values.get("label_names") or []
    dropout = values.get("classifier_dropout")
    if not isinstance(num_labels, int) or num_labels < 2:
        raise CheckpointError(f"{where}: key 'num_labels' must be an int >= 2, got {num_labels!r}")
    if not isinstance(names, list) or (names and len(names) != num_labels):
        raise CheckpointError(
            f"{where}: key 'label_names' must list {num_labels} names, got {names!r}"
        )
    if dropout is not None and not isinstance(dropout, (int, float)):
        raise CheckpointError(
            f"{where}: key 'classifier_dropout' must be a number or null, got {dropout!r}"
        )
    if values.get("pooling", "cls") != "cls":
        raise CheckpointError(
            f"{where}: key 'pooling' is {values['pooling']!r}; HF BertForSequenceClassification reads [CLS] "
            "through the pooler only (fine-tune with classifier_pooling=cls to export)"
        )
    return Parts(
        bert=bert,
        num_labels=num_labels,
        label_names=[str(n) for n in names],
        classifier_dropout=dropout,
    )


def _parse_seq2seq(values: dict, where: str) -> Parts:
    bert = from_dict(BertConfig, _section(values, "encoder", where), f"{where} (encoder)")
    gpt = from_dict(GPTConfig, _section(values, "decoder", where), f"{where} (decoder)")
    if not gpt.add_cross_attention:
        raise CheckpointError(
            f"{where}: decoder.add_cross_attention is false; a seq2seq decoder needs it"
        )
    return Parts(bert=bert, gpt=gpt)


# ---------------------------------------------------------------- HF config.json per family
def _hf_bert(c: BertConfig) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "gelu",  # exact erf GELU, as pretrain.models.bert
        "hidden_dropout_prob": c.hidden_dropout_prob,
        "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.initializer_range,
        "layer_norm_eps": c.layer_norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def _generation_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "bos_token_id": ids["bos_token"],
        "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["pad_token"],
    }


def _hf_gpt2(c: GPTConfig, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "activation_function": "gelu_new",  # the tanh GELU of pretrain.models.gpt
        "resid_pdrop": c.resid_pdrop,
        "embd_pdrop": c.embd_pdrop,
        "attn_pdrop": c.attn_pdrop,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_range": c.initializer_range,
        # Kiln's attention is plain SDPA: 1/sqrt(head size), no per-layer scaling, no fp32 upcast reordering.
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": c.add_cross_attention,
        **_generation_ids(ids),
        "tie_word_embeddings": True,
        "use_cache": True,
    }


def _config_bert(p: Parts, ids: dict[str, int]) -> dict[str, Any]:
    return {"architectures": ["BertForPreTraining"], **_hf_bert(p.bert)}


def _config_gpt(p: Parts, ids: dict[str, int]) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], **_hf_gpt2(p.gpt, ids)}


def _config_classifier(p: Parts, ids: dict[str, int]) -> dict[str, Any]:
    names = p.label_names or [f"LABEL_{i}" for i in range(p.num_labels)]
    return {
        "architectures": ["BertForSequenceClassification"],
        **_hf_bert(p.bert),
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "classifier_dropout": p.classifier_dropout,
        "problem_type": "single_label_classification",
    }


def _config_seq2seq(p: Parts, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["EncoderDecoderModel"],
        "model_type": "encoder-decoder",
        "is_encoder_decoder": True,
        "encoder": {"architectures": ["BertModel"], **_hf_bert(p.bert)},
        "decoder": {
            "architectures": ["GPT2LMHeadModel"],
            **_hf_gpt2(p.gpt, ids),
            "is_decoder": True,
        },
        "tie_encoder_decoder": False,  # one tokenizer, but Kiln's encoder and decoder own separate matrices
        "decoder_start_token_id": ids["bos_token"],
        **_generation_ids(ids),
    }


# ---------------------------------------------------------------- the family registry
@dataclass(frozen=True)
class HFFamily:
    key_map: KeyMap
    tied: dict[
        str, str
    ]  # Kiln alias -> Kiln name it shares storage with; not written, HF re-ties it
    hf_tied: dict[
        str, str
    ]  # HF alias -> HF name; HF ties them and its save_pretrained leaves the alias out
    parse: Callable[[dict, str], Parts]
    hf_config: Callable[
        [Parts, dict[str, int]], dict[str, Any]
    ]  # (config, special ids) -> config.json
    generation: (
        Callable[[dict[str, int]], dict[str, int]] | None
    )  # generation_config.json, where HF can `generate`
    max_length: Callable[[Parts], int]  # tokenizer model_max_length: the input side's positions
    model_input_names: tuple[
        str, ...
    ]  # what the HF tokenizer returns: token_type_ids only where BERT takes them


def _encoder_positions(p: Parts) -> int:
    return (
        p.bert.max_position_embeddings
    )  # the tokenizer feeds the encoder (the source, for seq2seq)


def _decoder_positions(p: Parts) -> int:
    return p.gpt.n_positions


_BERT_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
_GPT_INPUTS = ("input_ids", "attention_mask")


def _seq2seq_generation(ids: dict[str, int]) -> dict[str, int]:
    return {**_generation_ids(ids), "decoder_start_token_id": ids["bos_token"]}


# Kiln checkpoint arch -> how it becomes a HF model. "bert_classifier" and "seq2seq_warm" are finetune/'s.
HF_FAMILIES: dict[str, HFFamily] = {
    "bert": HFFamily(  # -> BertForPreTraining (also loads as BertModel, BertForMaskedLM, AutoModel)
        key_map=BERT_PRETRAINING_MAP,
        tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"},
        hf_tied={
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
        parse=_parse_bert,
        hf_config=_config_bert,
        generation=None,
        max_length=_encoder_positions,
        model_input_names=_BERT_INPUTS,
    ),
    "gpt": HFFamily(  # -> GPT2LMHeadModel
        key_map=GPT_LM_MAP,
        tied={"lm_head.weight": "transformer.wte.weight"},
        hf_tied={"lm_head.weight": "transformer.wte.weight"},
        parse=_parse_gpt,
        hf_config=_config_gpt,
        generation=_generation_ids,
        max_length=_decoder_positions,
        model_input_names=_GPT_INPUTS,
    ),
    "bert_classifier": HFFamily(  # -> BertForSequenceClassification
        key_map=BERT_CLASSIFIER_MAP,
        tied={},
        hf_tied={},
        parse=_parse_classifier,
        hf_config=_config_classifier,
        generation=None,
        max_length=_encoder_positions,
        model_input_names=_BERT_INPUTS,
    ),
    "seq2seq_warm": HFFamily(  # -> EncoderDecoderModel (BertModel encoder, GPT2LMHeadModel decoder)
        key_map=SEQ2SEQ_MAP,
        tied={"decoder.lm_head.weight": "decoder.transformer.wte.weight"},
        hf_tied={"decoder.lm_head.weight": "decoder.transformer.wte.weight"},
        parse=_parse_seq2seq,
        hf_config=_config_seq2seq,
        generation=_seq2seq_generation,
        max_length=_encoder_positions,
        # EncoderDecoderModel.forward has no token_type_ids argument; the encoder's are all zero anyway.
        model_input_names=_GPT_INPUTS,
    ),
}


def _family(arch: str, where: str) -> HFFamily:
    if arch not in HF_FAMILIES:
        raise CheckpointError(
            f"{where}: arch {arch!r} has no Hugging Face export (known: {sorted(HF_FAMILIES)})"
        )
    return HF_FAMILIES[arch]


def parse_config(arch: str, model_config: Any, where: str = "model_config") -> Parts:
    """`model_config` as a Kiln config dataclass or its `dataclasses.asdict` form (config.json's "config")."""
    if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        model_config = dataclasses.asdict(model_config)
    if not isinstance(model_config, dict):
        raise CheckpointError(
            f"{where}: expected a config mapping, got {type(model_config).__name__}"
        )
    try:
        return _family(arch, where).parse(model_config, where)
    except ConfigError as e:  # a config.json that does not build its dataclass: a broken checkpoint
        raise CheckpointError(str(e)) from None


def expand_key_map(arch: str, parts: Parts) -> list[Row]:
    """The family's table for this config: one row per tensor, prefixes applied, layer indices filled in."""
    facts = parts.facts()
    rows = []
    for kiln_prefix, hf_prefix, table in _family(arch, "key map").key_map:
        for row in table:
            if row.when is not None and not facts[row.when]:
                continue
            n = facts["enc"] if "{enc}" in row.kiln else facts["dec"] if "{dec}" in row.kiln else 1
            for i in range(n):
                rows.append(
                    row._replace(
                        kiln=kiln_prefix + row.kiln.format(enc=i, dec=i),
                        hf=hf_prefix + row.hf.format(enc=i, dec=i),
                    )
                )
    return rows


# ---------------------------------------------------------------- state-dict conversion, both ways
# Buffers older HF checkpoints carry (recomputed by HF at load, absent from Kiln): ignored on import.
HF_BUFFER_SUFFIXES = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
    ".attn.bias",
    ".attn.masked_bias",
    ".crossattention.bias",
    ".crossattention.masked_bias",
)
_SHOW = 5  # how many offending names an error lists


def _check_names(have: set[str], want: set[str], where: str, side: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: {side} tensor names do not match the key map: missing {len(missing)} "
            f"(e.g. {missing[:_SHOW]}), unexpected {len(unexpected)} (e.g. {unexpected[:_SHOW]})"
        )


def _check_ties(sd: dict[str, Tensor], tied: dict[str, str], where: str) -> None:
    """A tied alias present in `sd` must hold its source's values: HF keeps one matrix for both."""
    for alias, source in tied.items():
        if alias in sd and source in sd and not torch.equal(sd[alias], sd[source]):
            raise CheckpointError(
                f"{where}: {alias!r} differs from {source!r}, but the exported model ties them"
            )


def kiln_to_hf_state_dict(
    arch: str, model_config: Any, state_dict: dict[str, Tensor], where: str = "state_dict"
) -> dict[str, Tensor]:
    """Kiln names -> HF names (GPT-2 Conv1D weights transposed); tied aliases left out, as HF's save_pretrained.

    Raises CheckpointError, naming `where`, when the names are not exactly those of the family's key map."""
    family, parts = _family(arch, where), _as_parts(arch, model_config, where)
    rows = expand_key_map(arch, parts)
    _check_ties(state_dict, family.tied, where)
    _check_names(set(state_dict) - set(family.tied), {r.kiln for r in rows}, where, "Kiln")
    out = {}
    for r in rows:
        t = state_dict[r.kiln].detach()
        out[r.hf] = (t.t() if r.transpose else t).to("cpu").contiguous()
    return out


def hf_to_kiln_state_dict(
    arch: str, model_config: Any, hf_state_dict: dict[str, Tensor], where: str = "hf_state_dict"
) -> dict[str, Tensor]:
    """The reverse map: HF names -> Kiln names, tied aliases filled in (ready for `load_state_dict(strict=True)`)."""
    family, parts = _family(arch, where), _as_parts(arch, model_config, where)
    rows = expand_key_map(arch, parts)
    _check_ties(hf_state_dict, family.hf_tied, where)
    want = {r.hf for r in rows}
    have = {
        k
        for k in hf_state_dict
        if k not in family.hf_tied and (k in want or not k.endswith(HF_BUFFER_SUFFIXES))
    }
    _check_names(have, want, where, "HF")
    out = {}
    for r in rows:
        t = hf_state_dict[r.hf].detach()
        out[r.kiln] = (t.t() if r.transpose else t).contiguous()
    for alias, source in family.tied.items():
        out[alias] = out[source]
    return out


def _as_parts(arch: str, model_config: Any, where: str) -> Parts:
    return (
        model_config if isinstance(model_config, Parts) else parse_config(arch, model_config, where)
    )


def hf_config(
    arch: str,
    model_config: Any,
    dtype: torch.dtype = torch.float32,
    special_ids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The HF config.json for a Kiln config (dataclass or its asdict form); `special_ids` (HF tokenizer attribute
    -> id) default to the ids of a tokenizer Kiln trained."""
    family, parts = _family(arch, "model_config"), _as_parts(arch, model_config, "model_config")
    ids = {**KILN_SPECIAL_IDS, **(special_ids or {})}
    return {**family.hf_config(parts, ids), "dtype": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------- export
def export_hf(checkpoint: Path | str, out: Path) -> Path:
    """Write the Kiln checkpoint at `checkpoint` (a local directory or a URI) as a `transformers`
    model directory `out`; returns `out`.

    The checkpoint's sha256s are verified first (a remote one's on its copy fetched into the cache).
    `out` must not exist or be an empty directory; the files are written to a temporary directory
    beside it and renamed into place when complete."""
    out = Path(out)
    _check_out(out)
    # A URI stays a str (Path() would turn `s3://` into `s3:/`); then the local directory: the
    # checkpoint itself, or the cached copy just verified (not hashed again).
    verify_checkpoint(checkpoint)
    checkpoint = fetch_checkpoint(checkpoint)
    config_file, weights_file = checkpoint / CONFIG_FILE, checkpoint / MODEL_FILE
    arch, values = _read_config(config_file)
    family = _family(arch, str(config_file))
    parts = parse_config(arch, values, str(config_file))
    vocab_size = parts.bert.vocab_size if parts.bert else parts.gpt.vocab_size
    two_tokenizers = arch == "seq2seq_warm" and (checkpoint / TARGET_TOKENIZER_FILE).is_file()
    needed = ("pad_token",) if two_tokenizers else NEEDED_SPECIALS[arch]
    specials = _check_tokenizer(checkpoint / TOKENIZER_FILE, vocab_size, needed)
    target = _target_specials(checkpoint, parts) if two_tokenizers else None
    weights = kiln_to_hf_state_dict(arch, parts, load_weights(weights_file), str(weights_file))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"  # as pretrain.checkpoint: hidden until complete
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an export that crashed
    tmp.mkdir()  # (not tempfile.mkdtemp: its 0700 mode would outlive the rename)
    try:
        save_file(
            weights, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )  # HF refuses other formats
        ids = {
            attr: i for attr, (_, i) in (target or specials).items()
        }  # the decoder's, where it has its own
        _write_json(tmp / "config.json", hf_config(arch, parts, _main_dtype(weights), ids))
        if family.generation is not None:
            _write_json(
                tmp / "generation_config.json", family.generation({**KILN_SPECIAL_IDS, **ids})
            )
        shutil.copyfile(checkpoint / TOKENIZER_FILE, tmp / "tokenizer.json")
        _write_json(
            tmp / "tokenizer_config.json",
            tokenizer_config(family.max_length(parts), family.model_input_names, specials),
        )
        if target is not None:
            (tmp / "decoder_tokenizer").mkdir()
            shutil.copyfile(
                checkpoint / TARGET_TOKENIZER_FILE, tmp / "decoder_tokenizer" / "tokenizer.json"
            )
            _write_json(
                tmp / "decoder_tokenizer" / "tokenizer_config.json",
                tokenizer_config(_decoder_positions(parts), _GPT_INPUTS, target),
            )
        _check_out(out)  # something may have appeared there while we wrote
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tokenizer_config(
    model_max_length: int,
    model_input_names: tuple[str, ...],
    specials: dict[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer over tokenizer.json, with its special tokens named."""
    specials = HF_SPECIAL_TOKEN_MAP if specials is None else specials
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: tok for k, (tok, _) in specials.items()},
        "model_max_length": model_max_length,
        "model_input_names": list(model_input_names),
        "clean_up_tokenization_spaces": False,
    }  # decode exactly as the tokenizers library does


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(
            f"{out}: exists and is not a directory; choose another export directory"
        )
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(
            f"{out}: directory is not empty; refusing to export over it (choose a new path)"
        )


def _read_config(file: Path) -> tuple[str, dict]:
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("arch"), str)
        or not isinstance(doc.get("config"), dict)
    ):
        raise CheckpointError(f"{file}: needs keys 'arch' (a string) and 'config' (a mapping)")
    if doc["config"].get("arch", doc["arch"]) != doc["arch"]:
        raise CheckpointError(
            f"{file}: key 'config.arch' is {doc['config']['arch']!r} but 'arch' is {doc['arch']!r}"
        )
    return doc["arch"], doc["config"]


def _check_tokenizer(
    file: Path, vocab_size: int, needed: tuple[str, ...]
) -> dict[str, tuple[str, int]]:
    """The HF model is only usable with its tokenizer. Returns the special tokens it has (attribute -> (token,
    id)), wherever a loaded vocabulary put them; refuses one that lacks a token the family needs."""
    if not file.is_file():
        raise CheckpointError(
            f"{file}: missing; a Hugging Face export needs the checkpoint's tokenizer "
            "(save the checkpoint with tokenizer_file=...)"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{file}: cannot load with the tokenizers library: {e}") from e
    found = {
        attr: (token, tok.token_to_id(token)) for attr, (token, _) in HF_SPECIAL_TOKEN_MAP.items()
    }
    missing = [found[attr][0] for attr in needed if found[attr][1] is None]
    if missing:
        raise CheckpointError(
            f"{file}: lacks the special token(s) {', '.join(missing)} this model needs"
        )
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise CheckpointError(
            f"{file}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}"
        )
    return {attr: (token, i) for attr, (token, i) in found.items() if i is not None}


def _target_specials(checkpoint: Path, parts: Parts) -> dict[str, tuple[str, int]]:
    """The decoder side of a translation checkpoint with two tokenizers: bos/eos/pad as Kiln framed the targets
    (GPT-2's <|endoftext|> for all three; data_pipeline.tokenizer.translation_tokenizers), checked to fit."""
    _check_tokenizer(checkpoint / TARGET_TOKENIZER_FILE, parts.gpt.vocab_size, ())
    pair = load_translation_tokenizers(checkpoint)
    ids = {"bos_token": pair.tgt.bos, "eos_token": pair.tgt.eos, "pad_token": pair.tgt.pad}
    return {attr: (pair.target.id_to_token(i), i) for attr, i in ids.items() if i is not None}


def _main_dtype(weights: dict[str, Tensor]) -> torch.dtype:
    """The dtype most parameters have (HF reads config.json's `dtype` as the checkpoint's precision)."""
    counts: dict[torch.dtype, int] = {}
    for t in weights.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__)


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
