"""Transformer encoder-decoder trained from scratch (Vaswani et al., 2017, "Attention Is All You Need").

The baseline the warm-started model (finetune/models/seq2seq.py) is compared against: the same kind of network,
every weight random. One embedding matrix serves the source, the target and the output projection (§3.4; source
and target share the one Kiln tokenizer, docs/design.md), scaled by sqrt(d_model) on input. Positions are the
paper's sinusoids or a learned table; `norm_first` picks pre-LN (Xiong et al., 2020: trains without a long
warm-up, the default) or the paper's post-LN. Attention goes through `F.scaled_dot_product_attention`; the blocks
are written out rather than taken from `nn.Transformer` because incremental decoding needs each decoder layer's
self-attention keys/values cached and the cross-attention keys/values computed once per source.

Parameter names follow fairseq's `TransformerModel` (q_proj / k_proj / v_proj / out_proj, fc1 / fc2).
Read top to bottom: config → positions → attention → layers → model (encode, forward, decode_step,
reorder_cache, cross_attention).
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
class TransformerConfig:
    """Flat config. As with GPTConfig, `preset` is applied by `configlib.from_preset` and the config
    loader, not by the constructor (explicit keys must win over the preset, and a dataclass cannot
    tell them from defaults)."""

    arch: Literal["transformer"] = "transformer"
    preset: str | None = None
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            d_model=64, n_heads=2, d_ff=256, encoder_layers=2, decoder_layers=2, max_positions=128
        ),
        # trains on Multi30k on a 2-core CPU in ~20 minutes
        "small": dict(
            d_model=256, n_heads=4, d_ff=1024, encoder_layers=3, decoder_layers=3, max_positions=512
        ),
        # Vaswani et al. 2017, Table 3 "base"
        "base": dict(
            d_model=512,
            n_heads=8,
            d_ff=2048,
            encoder_layers=6,
            decoder_layers=6,
            max_positions=1024,
        ),
    }
    vocab_size: int = 8000  # set from the tokenizer at launch
    pad_id: int = 0
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1  # embeddings, sublayer outputs, inside the feed-forward
    attn_dropout: float = 0.0  # on the attention probabilities
    norm_first: bool = True  # pre-LN; False = the paper's post-LN
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = 1024  # longest source and longest target
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices, preset name
        for key in (
            "vocab_size",
            "d_model",
            "n_heads",
            "d_ff",
            "encoder_layers",
            "decoder_layers",
            "max_positions",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"TransformerConfig.{key} must be > 0, got {getattr(self, key)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.positions == "sinusoidal" and self.d_model % 2 != 0:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be even for sinusoidal positions"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"TransformerConfig.pad_id ({self.pad_id}) must lie in 0..vocab_size-1"
            )
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(
                    f"TransformerConfig.{key} must be in [0, 1), got {getattr(self, key)}"
                )


def sinusoids(positions: Tensor, dim: int) -> Tensor:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)); (T,) -> (T, dim).

    Computed for the positions asked for rather than kept in a buffer: a decode step needs one row, and there is
    nothing to materialise after a meta-device build.
    """
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / dim)
    )  # (dim/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).view(
        positions.numel(), dim
    )  # (T, dim/2, 2) -> (T, dim)


class PositionalEmbedding(nn.Module):
    """Sinusoidal (no parameters) or learned (`table`) position vectors for positions start..start+length-1."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dim = config.d_model
        self.max_positions = config.max_positions
        self.table = (
            nn.Embedding(config.max_positions, config.d_model)
            if config.positions == "learned"
            else None
        )

    def forward(self, start: int, length: int, device: torch.device) -> Tensor:
        if start + length > self.max_positions:
            raise ValueError(
                f"sequence of {start + length} positions exceeds TransformerConfig.max_positions="
                f"{self.max_positions}"
            )
        positions = torch.arange(start, start + length, device=device)  # (T,)
        return (
            self.table(positions) if self.table is not None else sinusoids(positions, self.dim)
        )  # (T, C)


def _heads(x: Tensor, n_heads: int) -> Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hs)


def _merge_heads(y: Tensor) -> Tensor:
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, C)


class MultiHeadAttention(nn.Module):
    """Keys/values are computed separately (`keys_values`) so callers can cache them."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, C) -> keys, values, each (B, nh, S, hs)."""
        return _heads(self.k_proj(x), self.n_heads), _heads(self.v_proj(x), self.n_heads)

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, is_causal: bool = False
    ) -> Tensor:
        """Queries from x (B, T, C) over k, v (B, nh, S, hs); mask broadcasts to (B, nh, T, S), True = may attend."""
        q = _heads(self.q_proj(x), self.n_heads)  # (B, nh, T, hs)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
        return self.out_proj(_merge_heads(y))  # (B, T, C)

    def probabilities(self, x: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """The attention weights SDPA computes internally, written out for plotting: (B, nh, T, S)."""
        q = _heads(self.q_proj(x), self.n_heads)  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class FeedForward(nn.Module):
    """§3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class _Residuals(nn.Module):
    """Where the LayerNorm sits around a sublayer: pre-LN normalises its input, post-LN the residual sum."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first
        self.dropout = nn.Dropout(config.dropout)

    def sublayer_input(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return norm(x) if self.norm_first else x

    def add_residual(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> Tensor:
        x = x + self.dropout(y)
        return x if self.norm_first else norm(x)


class EncoderLayer(_Residuals):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attn_dropout)
        self.self_attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        h = self.sublayer_input(x, self.self_attn_norm)
        k, v = self.self_attn.keys_values(h)
        x = self.add_residual(x, self.self_attn(h, k, v, mask=key_mask), self.self_attn_norm)
        return self.add_residual(x, self.ffn(self.sublayer_input(x, self.ffn_norm)), self.ffn_norm)


@dataclass
class LayerCache:
    """One decoder layer's incremental state: self-attention keys/values of the P target tokens so far (grown
    each step) and the cross-attention keys/values of the source (computed once, at the first step)."""

    k: Tensor  # (N, nh, P, hs)
    v: Tensor  # (N, nh, P, hs)
    cross_k: Tensor  # (N, nh, S, hs)
    cross_v: Tensor  # (N, nh, S, hs)

    def index_select(self, index: Tensor) -> LayerCache:
        return LayerCache(
            *(t.index_select(0, index) for t in (self.k, self.v, self.cross_k, self.cross_v))
        )


def _causal_mask(new: int, past: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for `new` queries after `past` cached keys."""
    if new == 1:
        return None, False  # one new token may see every cached key and itself
    if past == 0:
        return None, True
    # is_causal aligns the triangle top-left (query i sees keys 0..i), wrong after `past` cached keys:
    # query i sits at absolute position past+i and must see keys 0..past+i.
    return torch.ones(new, past + new, dtype=torch.bool, device=device).tril(
        diagonal=past
    ), False  # (T, P+T)


class DecoderLayer(_Residuals):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attn_dropout)
        self.self_attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attn_dropout)
        self.cross_attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def self_attention(self, x: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor, Tensor]:
        """Masked self-attention sublayer over the cached and the new tokens; returns x and the grown keys/values."""
        h = self.sublayer_input(x, self.self_attn_norm)
        k, v = self.self_attn.keys_values(h)  # (N, nh, T, hs)
        past = cache.k.size(2)
        k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (N, nh, P+T, hs)
        mask, is_causal = _causal_mask(x.size(1), past, x.device)
        y = self.self_attn(h, k, v, mask=mask, is_causal=is_causal)
        return self.add_residual(x, y, self.self_attn_norm), k, v

    def forward(
        self, x: Tensor, cache: LayerCache, src_key_mask: Tensor
    ) -> tuple[Tensor, LayerCache]:
        x, k, v = self.self_attention(x, cache)
        h = self.sublayer_input(x, self.cross_attn_norm)
        c = self.cross_attn(h, cache.cross_k, cache.cross_v, mask=src_key_mask)
        x = self.add_residual(x, c, self.cross_attn_norm)
        x = self.add_residual(x, self.ffn(self.sublayer_input(x, self.ffn_norm)), self.ffn_norm)
        return x, LayerCache(k, v, cache.cross_k, cache.cross_v)


def _key_mask(src_mask: Tensor) -> Tensor:
    return src_mask.bool()[
        :, None, None, :
    ]  # (B, S) -> (B, 1, 1, S): padded source positions are never attended


def _final_norm(config: TransformerConfig) -> nn.Module:
    """Pre-LN leaves the residual stream unnormalised, so each stack ends in a LayerNorm; post-LN already has one."""
    return (
        nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        if config.norm_first
        else nn.Identity()
    )


class TransformerSeq2Seq(nn.Module):
    """Shared embedding → encoder layers → memory; decoder layers (self-, cross-attention, FFN) → tied projection.

    Implements the decoding protocol of `finetune.decode` (encode / decode_step / reorder_cache) and
    `cross_attention` for attention maps.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed_tokens = nn.Embedding(
            config.vocab_size, d
        )  # source, target and output projection (§3.4)
        self.embed_scale = math.sqrt(d)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_positions = PositionalEmbedding(config)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(config) for _ in range(config.encoder_layers)
        )
        self.encoder_norm = _final_norm(config)
        self.decoder_positions = PositionalEmbedding(config)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(config) for _ in range(config.decoder_layers)
        )
        self.decoder_norm = _final_norm(config)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter in place (fairseq's Transformer init); also the second half of a
        meta-device build. Xavier-uniform projections; embeddings N(0, d^-1/2), so that after the sqrt(d) scale
        token vectors have unit variance and the tied output projection starts with small logits."""
        if self.embed_tokens.weight.is_meta:
            return  # shapes only
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.d_model**-0.5)

    def _embed(self, ids: Tensor, start: int, positions: PositionalEmbedding) -> Tensor:
        pos = positions(start, ids.size(1), ids.device)  # (T, C)
        return self.dropout(self.embed_tokens(ids) * self.embed_scale + pos)  # (B, T, C)

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        """(B,S) source ids and mask (1 = real) -> memory (B,S,C)."""
        x = self._embed(src_ids, 0, self.encoder_positions)
        key_mask = _key_mask(src_mask)
        for layer in self.encoder_layers:
            x = layer(x, key_mask)
        return self.encoder_norm(x)

    def _start_cache(self, memory: Tensor) -> list[LayerCache]:
        """Empty self-attention state and the cross-attention keys/values of `memory`, once per layer."""
        n, _, d = memory.shape
        empty = memory.new_zeros(
            n, self.config.n_heads, 0, d // self.config.n_heads
        )  # (N, nh, 0, hs)
        return [
            LayerCache(empty, empty, *layer.cross_attn.keys_values(memory))
            for layer in self.decoder_layers
        ]

    def _decode(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: list[LayerCache] | None
    ) -> tuple[Tensor, list[LayerCache]]:
        """Decoder hidden states (N,t,C) of the new target ids, and the cache including them."""
        if cache is None:
            cache = self._start_cache(memory)
        x = self._embed(
            tgt_ids, cache[0].k.size(2), self.decoder_positions
        )  # positions continue after the cache
        key_mask = _key_mask(src_mask)
        new_cache = []
        for layer, layer_cache in zip(self.decoder_layers, cache, strict=True):
            x, layer_cache = layer(x, layer_cache, key_mask)
            new_cache.append(layer_cache)
        return self.decoder_norm(x), new_cache

    def _logits(self, hidden: Tensor) -> Tensor:
        return F.linear(
            hidden, self.embed_tokens.weight
        )  # (..., C) -> (..., V), tied to the embedding

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B,U,V) for every decoder input position."""
        memory = self.encode(src_ids, src_mask)
        hidden, _ = self._decode(tgt_in, memory, src_mask=src_mask, cache=None)
        return self._logits(hidden)

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: list[LayerCache] | None
    ) -> tuple[Tensor, list[LayerCache]]:
        """Feed the (N,t) target ids not yet in `cache`; return the last position's logits (N,V) and the cache."""
        hidden, cache = self._decode(tgt_ids, memory, src_mask=src_mask, cache=cache)
        return self._logits(hidden[:, -1]), cache

    def reorder_cache(self, cache: list[LayerCache], index: Tensor) -> list[LayerCache]:
        return [layer.index_select(index) for layer in cache]

    def cross_attention(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """The last decoder layer's cross-attention, averaged over heads, teacher forced: (B,U,S); each row sums to
        1 over the real source positions and is 0 at padding. Call in eval mode (dropout would perturb it)."""
        memory = self.encode(src_ids, src_mask)
        cache = self._start_cache(memory)
        key_mask = _key_mask(src_mask)
        x = self._embed(tgt_in, 0, self.decoder_positions)
        for layer, layer_cache in zip(self.decoder_layers[:-1], cache[:-1], strict=True):
            x, _ = layer(x, layer_cache, key_mask)
        last: DecoderLayer = self.decoder_layers[-1]
        x, _, _ = last.self_attention(x, cache[-1])
        probs = last.cross_attn.probabilities(
            last.sublayer_input(x, last.cross_attn_norm), cache[-1].cross_k, key_mask
        )
        return probs.mean(dim=1)  # (B, nh, U, S) -> (B, U, S)
