"""BERT (Devlin et al., 2019): a post-LN Transformer encoder with the MLM + NSP pretraining heads.

Read top to bottom: config → embeddings → self-attention → block → encoder → pooler → model → heads.
Parameter names are Hugging Face's `BertForPreTraining` state-dict keys, so import/export is a key
table, not code. The model returns logits only; the losses live in `pretrain.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.configlib import check_fields


@dataclass
class BertConfig:
    """Flat BERT config. Field names follow HF `BertConfig` so a HF config.json maps one to one.

    `preset` records which row of PRESETS the sizes came from; the config loader (and
    `configlib.from_preset(BertConfig, ...)`) starts from that row and lets explicit keys win.
    Constructing `BertConfig(preset="tiny")` directly does NOT apply the preset: a dataclass cannot
    tell an explicit value from a default, so applying it here would silently override explicit keys.
    """

    arch: Literal["bert"] = "bert"  # discriminator used by config loading and checkpoints; keep it
    preset: str | None = None
    # Sizes only; vocab_size comes from the tokenizer. "base" is BERT-base (L=12, H=768, A=12, 110M params)
    # from Devlin et al. 2019, §3; "mini"/"small" are BERT-Mini (4x256) and BERT-Small (4x512) of Turc et al. 2019
    # ("Well-Read Students Learn Better", google-research/bert miniatures).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        ),
        "mini": dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=512,
        ),
        "small": dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            intermediate_size=2048,
            max_position_embeddings=512,
        ),
        "base": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        ),
    }
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch, preset name
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"BertConfig.{key} must be > 0, got {getattr(self, key)}")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        T = input_ids.size(1)
        if T > self.max_positions:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings={self.max_positions}"
            )
        # Positions are computed, not a buffer: a buffer would be left uninitialised by meta-device builds.
        positions = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)  # (B, T, H) + (T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        B, T, H = x.shape
        hs = H // self.n_head
        q = self.query(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # attn_mask (B, 1, 1, T) bool, True = attend: padded keys are invisible to every query.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        return y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual + LayerNorm (post-LN): shared shape of the attention and MLP outputs."""

    def __init__(self, in_size: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        for layer in self.layer:
            x = layer(x, attn_mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # the [CLS] position, (B, H)


def init_bert_module(module: nn.Module, std: float) -> None:
    """BERT's init (HF `_init_weights`): N(0, std) matrices, zero biases, zero padding row, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """Embeddings + encoder + pooler. Returns (sequence_output (B,T,H), pooled_output (B,H))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place; also the second half of a meta-device build."""
        if self.embeddings.word_embeddings.weight.is_meta:
            return  # shapes only (and the first random init on meta costs seconds of lazy imports)
        # `apply`, not a loop over modules(): under DeepSpeed's zero.Init (ZeRO-3) `apply` makes each module's own
        # parameters whole while its function runs. Only leaves draw random numbers, and `apply` (post-order)
        # visits leaves in the same order as modules() (pre-order), so an eager build's weights are unchanged.
        self.apply(lambda module: init_bert_module(module, self.config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,
        *,  # the two (B, T) masks are named at every call: HF orders them the other way round
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[
                :, None, None, :
            ]  # (B, T) -> (B, 1, 1, T), broadcast over heads, queries
        x = self.encoder(self.embeddings(input_ids, token_type_ids), attn_mask)
        return x, self.pooler(x)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # The decoder matrix is the word-embedding matrix (tied by BertForPreTraining.tie_weights); the
        # output bias is its own parameter, named `cls.predictions.bias` as in HF.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        # F.linear with the bias: one fused matmul + add over the (N, V) output instead of two passes.
        return F.linear(self.transform(x), self.decoder.weight, self.bias)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


@dataclass
class BertPreTrainingOutput:
    mlm_logits: Tensor  # (N, V) at masked_positions, or (B, T, V) when no positions were given
    nsp_logits: Tensor  # (B, 2); class 0 = B follows A, 1 = B is random (HF convention)


class BertForPreTraining(nn.Module):
    """BertModel + MLM head (decoder tied to the word embeddings) + NSP head."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def init_weights(self) -> None:
        """Re-tie (a meta build's `to_empty` unties), then initialise every parameter in place."""
        self.tie_weights()
        if self.cls.predictions.bias.is_meta:
            return  # shapes only; materialize() calls this again on real storage
        self.apply(
            self._init_module
        )  # per module, as BertModel.init_weights (ZeRO-3 gathers inside `apply`)

    def _init_module(self, module: nn.Module) -> None:
        # The decoder shares the embedding matrix; initialising it as a Linear would redo the embedding
        # init and lose its zeroed [PAD] row.
        if module is not self.cls.predictions.decoder:
            init_bert_module(module, self.config.initializer_range)
        if module is self.cls.predictions:
            nn.init.zeros_(
                module.bias
            )  # here, where `apply` has made it whole, not on a ZeRO-3 partition

    def forward(
        self,
        input_ids: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        masked_positions: Tensor | None = None,
    ) -> BertPreTrainingOutput:
        """masked_positions: 1-D long indices into the flattened (B*T) positions. When given, the MLM head
        runs only there, since projecting every position onto the vocabulary dominates BERT's cost."""
        seq, pooled = self.bert(
            input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        )
        if masked_positions is not None:
            seq = seq.reshape(-1, seq.size(-1)).index_select(
                0, masked_positions
            )  # (B*T, H) -> (N, H)
        mlm_logits = self.cls.predictions(seq)
        return BertPreTrainingOutput(
            mlm_logits=mlm_logits, nsp_logits=self.cls.seq_relationship(pooled)
        )
