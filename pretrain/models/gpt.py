"""GPT-2 (Radford et al., 2019): a pre-LN causal Transformer decoder, optionally with cross-attention.

Read top to bottom: config → KV cache → self-attention → cross-attention → MLP → block → model → LM head.
Parameter names are Hugging Face's `GPT2LMHeadModel` state-dict keys, but every projection is an
`nn.Linear`. HF stores these as `Conv1D` whose weight is the transpose ((in, out) instead of (out, in));
the transposition of `c_attn`, `c_proj`, `c_fc` and `q_attn` weights belongs to the HF import/export key
map, not here. The model returns logits only; the loss lives in `pretrain.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.configlib import check_fields


@dataclass
class GPTConfig:
    """Flat GPT-2 config; field names follow HF `GPT2Config`.

    As with BertConfig, `preset` is applied by `configlib.from_preset` and the config loader, not by
    the constructor (explicit keys must win over the preset, and a dataclass cannot tell them from
    defaults).
    """

    arch: Literal["gpt"] = "gpt"  # discriminator used by config loading and checkpoints; keep it
    preset: str | None = None
    # Sizes only; vocab_size comes from the tokenizer. "base" is GPT-2 small, 124M params (Radford et al.
    # 2019; HF `gpt2` config.json: n_layer=12, n_embd=768, n_head=12, n_positions=1024). "mini"/"small"
    # mirror the BERT miniatures' 4x256 / 4x512 so encoder and decoder presets pair up for warm starts.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(n_embd=64, n_layer=2, n_head=2, n_positions=128),
        "mini": dict(n_embd=256, n_layer=4, n_head=4, n_positions=512),
        "small": dict(n_embd=512, n_layer=4, n_head=8, n_positions=1024),
        "base": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    }
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None = 4 * n_embd, as GPT-2
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # Decoder of an encoder-decoder: every block gets HF-named `crossattention` + `ln_cross_attn`.
    add_cross_attention: bool = False

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch, preset name
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer"):
            if getattr(self, key) <= 0:
                raise ValueError(f"GPTConfig.{key} must be > 0, got {getattr(self, key)}")

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


@dataclass
class KVCache:
    """One block's cached keys/values: self-attention grows by the new tokens each step; the
    cross-attention keys/values over the encoder states are computed once and reused."""

    k: Tensor  # (B, nh, T_past, hs)
    v: Tensor  # (B, nh, T_past, hs)
    cross_k: Tensor | None = None  # (B, nh, S, hs)
    cross_v: Tensor | None = None  # (B, nh, S, hs)

    def index_select(self, index: Tensor) -> KVCache:
        """Rows `index` of the batch (beam search reorders hypotheses this way)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index)

        return KVCache(pick(self.k), pick(self.v), pick(self.cross_k), pick(self.cross_v))


def reorder_cache(cache: list[KVCache], index: Tensor) -> list[KVCache]:
    """Every block's cache restricted/reordered to batch rows `index` (1-D long)."""
    return [layer.index_select(index) for layer in cache]


def _heads(x: Tensor, n_head: int) -> Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)


def _merge_heads(y: Tensor) -> Tensor:
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, C)


class GPTSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: Tensor,
        *,
        past: tuple[Tensor, Tensor] | None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """attn_mask (B, T, T) bool, True = may attend (e.g. causal within each packed document); no cache then."""
        T, C = x.size(1), x.size(2)
        q, k, v = (
            _heads(t, self.n_head) for t in self.c_attn(x).split(C, dim=2)
        )  # each (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        P = k.size(2) - T
        dropout_p = self.attn_pdrop if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask[:, None], dropout_p=dropout_p
            )
        elif P == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token may see every cached key: no mask at all
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # is_causal aligns the triangle top-left (query i sees keys 0..i), which is wrong after P cached
            # keys: query i sits at absolute position P+i and must see keys 0..P+i.
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(
                diagonal=P
            )  # (T, P+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.c_proj(_merge_heads(y))), (k, v)


class GPTCrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder states (HF `GPT2Attention(is_cross_attention)`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.q_attn = nn.Linear(config.n_embd, config.n_embd)
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd)  # k, v of the encoder states
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: Tensor,
        encoder_states: Tensor | None,
        *,
        encoder_mask: Tensor | None,
        cached: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        C = x.size(2)
        q = _heads(self.q_attn(x), self.n_head)  # (B, nh, T, hs)
        if cached is not None:
            k, v = cached
        elif encoder_states is not None:
            k, v = (
                _heads(t, self.n_head) for t in self.c_attn(encoder_states).split(C, dim=2)
            )  # (B, nh, S, hs)
        else:
            raise ValueError(
                "cross-attention needs encoder_hidden_states or a cache holding cross keys/values"
            )
        mask = None
        if encoder_mask is not None:
            mask = encoder_mask.bool()[
                :, None, None, :
            ]  # (B, S) -> (B, 1, 1, S): padded encoder states hidden
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(_merge_heads(y))), (k, v)

    def attention_probs(
        self, x: Tensor, encoder_states: Tensor, encoder_mask: Tensor | None
    ) -> Tensor:
        """The softmax weights (B, nh, T, S) that `forward` applies (without dropout), for attention maps.

        SDPA does not return its weights, so they are recomputed here from the same projections, only when asked
        for; the forward path stays on the fused kernel. Padded encoder positions get exactly 0.
        """
        C = x.size(2)
        q = _heads(self.q_attn(x), self.n_head)  # (B, nh, T, hs)
        k = _heads(self.c_attn(encoder_states).split(C, dim=2)[0], self.n_head)  # (B, nh, S, hs)
        scores = (
            q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        )  # (B, nh, T, S), SDPA's default scale
        if encoder_mask is not None:
            scores = scores.masked_fill(~encoder_mask.bool()[:, None, None, :], -math.inf)
        return scores.softmax(dim=-1)


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(
            self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        )  # GPT-2's "gelu_new"


class GPTBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.crossattention: GPTCrossAttention | None = None
        self.ln_cross_attn: nn.LayerNorm | None = None
        if config.add_cross_attention:
            self.crossattention = GPTCrossAttention(config)
            self.ln_cross_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTMLP(config)

    def forward(
        self,
        x: Tensor,
        *,
        past: KVCache | None,
        encoder_states: Tensor | None,
        encoder_mask: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        own_past = None if past is None else (past.k, past.v)
        a, (k, v) = self.attn(self.ln_1(x), past=own_past, attn_mask=attn_mask)
        x = x + a
        cross: tuple[Tensor, Tensor] | tuple[None, None] = (None, None)
        cached = None if past is None or past.cross_k is None else (past.cross_k, past.cross_v)
        # As HF: a cross-attention decoder given no encoder states (e.g. plain LM pretraining) skips it.
        if self.crossattention is not None and (encoder_states is not None or cached is not None):
            c, cross = self.crossattention(
                self.ln_cross_attn(x), encoder_states, encoder_mask=encoder_mask, cached=cached
            )
            x = x + c
        x = x + self.mlp(self.ln_2(x))
        return x, KVCache(k, v, cross[0], cross[1])


def init_gpt_module(module: nn.Module, std: float) -> None:
    """GPT-2's init (HF `_init_weights`): N(0, std) matrices and embeddings, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class GPTModel(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LayerNorm. Returns (hidden (B,T,C), presents)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place; also the second half of a meta-device build."""
        if self.wte.weight.is_meta:
            return  # shapes only (and the first random init on meta costs seconds of lazy imports)
        # `apply`, not loops over modules() / named_parameters(): under DeepSpeed's zero.Init (ZeRO-3) `apply` makes
        # each module's own parameters whole while its function runs. Only leaves draw random numbers, and `apply`
        # visits leaves in the same order as those loops, so an eager build's weights are unchanged.
        self.apply(lambda module: init_gpt_module(module, self.config.initializer_range))
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), since each block adds two of them
        # (three with cross-attention; HF keeps 2 * n_layer there too) to the residual stream.
        std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
        owners = (GPTSelfAttention, GPTCrossAttention, GPTMLP)
        residual = {id(m.c_proj) for m in self.modules() if isinstance(m, owners)}
        self.apply(
            lambda module: (
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if id(module) in residual
                else None
            )
        )

    def forward(
        self,
        input_ids: Tensor,
        *,
        past_key_values: list[KVCache] | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        use_cache: bool = False,
        position_ids: Tensor | None = None,
        document_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[KVCache] | None]:
        """position_ids (B, T) and document_mask (B, T, T) bool keep packed documents apart (each starts at
        position 0 and attends only within itself; data_pipeline.collators.ClmCollator makes them); no cache then.
        input_ids (B, T) are the new tokens; past_key_values holds one KVCache per block for the P tokens
        before them (positions continue at P). encoder_hidden_states (B, S, n_embd) and encoder_attention_mask
        (B, S; 1 = real) feed cross-attention; once a cache holds the cross keys/values they are reused and
        encoder_hidden_states may be omitted (if given, it is ignored). With use_cache, also returns the
        updated per-block caches."""
        T = input_ids.size(1)
        P = 0 if not past_key_values else past_key_values[0].k.size(2)
        if P + T > self.config.n_positions:
            raise ValueError(
                f"input length {T} + cache length {P} exceeds n_positions={self.config.n_positions}"
            )
        if past_key_values is not None and len(past_key_values) not in (0, len(self.h)):
            raise ValueError(
                f"past_key_values has {len(past_key_values)} entries; the model has {len(self.h)} blocks"
            )
        if encoder_hidden_states is not None and not self.config.add_cross_attention:
            raise ValueError(
                "encoder_hidden_states given, but the model was built with add_cross_attention=False"
            )
        if (position_ids is not None or document_mask is not None) and (P or use_cache):
            raise ValueError(
                "position_ids / document_mask are for packed training batches, not cached decoding"
            )
        positions = torch.arange(
            P, P + T, device=input_ids.device
        )  # positions continue after the cache
        if position_ids is not None:
            positions = position_ids  # (B, T)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))  # (B, T, C) + (T, C) or (B, T, C)
        presents: list[KVCache] | None = [] if use_cache else None
        for i, block in enumerate(self.h):
            past = past_key_values[i] if past_key_values else None
            x, kv = block(
                x,
                past=past,
                encoder_states=encoder_hidden_states,
                encoder_mask=encoder_attention_mask,
                attn_mask=document_mask,
            )
            if presents is not None:
                presents.append(kv)
        return self.ln_f(x), presents


class GPTLMHeadModel(nn.Module):
    """GPTModel + LM head whose weight is the token-embedding matrix (tied)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self) -> None:
        """Re-tie (a meta build's `to_empty` unties), then initialise every parameter in place."""
        self.tie_weights()
        self.transformer.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        *,
        past_key_values: list[KVCache] | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        use_cache: bool = False,
        position_ids: Tensor | None = None,
        document_mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> tuple[Tensor, list[KVCache] | None]:
        """Logits (B, T, V), or with return_hidden the final layer norm's output (B, T, C) for a loss that applies
        the head itself (pretrain.objectives.fused_clm_loss)."""
        hidden, presents = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache,
            position_ids=position_ids,
            document_mask=document_mask,
        )
        return (hidden if return_hidden else self.lm_head(hidden)), presents
