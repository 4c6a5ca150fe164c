"""ConvS2S (Gehring et al., 2017, "Convolutional Sequence to Sequence Learning").

Encoder: token + learned position embeddings → linear into the conv width → blocks of [conv (kernel k, same
padding) → GLU → residual, scaled by sqrt(0.5)] → linear back to the embedding width: the keys z. The values are
z + e (the input embeddings), so attention can also fetch "what was there", not only "what was computed" (§3.3).

Decoder: the same embeddings → linear in → blocks of [causal conv (k-1 positions of left padding) → GLU →
attention over the encoder (with its own residual) → residual], each residual sum scaled by sqrt(0.5) →
linear out to the embedding width → output projection. Every block attends (multi-step attention).

Incremental decoding: a causal conv at position t reads only inputs t-k+1..t, so each decoder block keeps the
last k-1 inputs it saw (`ConvCache.buffers`) and the step count (for positions); a step costs the same
whatever the prefix length. Starting from zero buffers is exactly the training-time left zero padding.

Left out from the paper, deliberately: weight normalisation (plain Linear/Conv1d with the paper's
variance-preserving init, §3.5, instead) and the gradient scaling of the encoder by 1/(2 × attention layers)
(fairseq's GradMultiply). Both aid deep models; the Kiln presets are 2-4 layers deep. Kept: the sqrt(0.5)
residual scaling and the m·sqrt(1/m) scaling of the attention output (m = real source length).

Parameter names follow fairseq's `FConvModel`. Read top to bottom: config → encoder → attention → decoder → model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.configlib import check_fields

SQRT_HALF = math.sqrt(0.5)  # keeps the variance of a sum of two unit-variance terms at one (§3.5)


@dataclass
class ConvS2SConfig:
    """Flat config; `preset` is applied by `configlib.from_preset` and the config loader, not by the
    constructor."""

    arch: Literal["convs2s"] = "convs2s"
    preset: str | None = None
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            embed_dim=32,
            channels=64,
            encoder_layers=2,
            decoder_layers=2,
            kernel_size=3,
            max_positions=128,
        ),
        # fairseq's fconv_iwslt_de_en: 256-wide embeddings and convs, 4 encoder and 3 decoder blocks, kernel 3
        "small": dict(
            embed_dim=256,
            channels=256,
            encoder_layers=4,
            decoder_layers=3,
            kernel_size=3,
            max_positions=512,
        ),
    }
    vocab_size: int = 8000  # set from the tokenizer at launch
    pad_id: int = 0
    embed_dim: int = 256  # embeddings, attention keys/values
    channels: int = 256  # conv width
    encoder_layers: int = 4
    decoder_layers: int = 3
    kernel_size: int = 3  # odd, so the encoder's "same" padding is symmetric
    dropout: float = 0.2
    max_positions: int = 1024  # longest source and longest target

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch, preset name
        for key in (
            "vocab_size",
            "embed_dim",
            "channels",
            "encoder_layers",
            "decoder_layers",
            "kernel_size",
            "max_positions",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"ConvS2SConfig.{key} must be > 0, got {getattr(self, key)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"ConvS2SConfig.kernel_size must be odd (symmetric same padding), got {self.kernel_size}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ConvS2SConfig.pad_id ({self.pad_id}) must lie in 0..vocab_size-1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ConvS2SConfig.dropout must be in [0, 1), got {self.dropout}")


def _positions(start: int, length: int, max_positions: int, device: torch.device) -> Tensor:
    if start + length > max_positions:
        raise ValueError(
            f"sequence of {start + length} positions exceeds ConvS2SConfig.max_positions={max_positions}"
        )
    return torch.arange(start, start + length, device=device)  # (T,)


class ConvEncoder(nn.Module):
    def __init__(self, config: ConvS2SConfig) -> None:
        super().__init__()
        self.max_positions = config.max_positions
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.embed_positions = nn.Embedding(config.max_positions, config.embed_dim)
        self.fc1 = nn.Linear(config.embed_dim, config.channels)
        k, c = config.kernel_size, config.channels
        self.convs = nn.ModuleList(
            nn.Conv1d(c, 2 * c, k, padding=k // 2) for _ in range(config.encoder_layers)
        )
        self.fc2 = nn.Linear(config.channels, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, src_ids: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B,S) ids and mask -> attention keys z (B,S,E) and values z + e (B,S,E), both 0 at padding."""
        pos = _positions(0, src_ids.size(1), self.max_positions, src_ids.device)
        e = self.dropout(self.embed_tokens(src_ids) + self.embed_positions(pos))  # (B,S,E)
        pad = ~src_mask.bool()  # (B,S)
        x = self.fc1(e).transpose(1, 2)  # (B,S,C) -> (B,C,S)
        for conv in self.convs:
            residual = x
            # zeroed padding looks to the kernel exactly like the conv's own zero padding, so extra padding
            # after a sentence cannot change its states
            x = self.dropout(x).masked_fill(pad[:, None, :], 0.0)
            x = F.glu(conv(x), dim=1)  # (B,2C,S) -> (B,C,S)
            x = (x + residual) * SQRT_HALF
        z = self.fc2(x.transpose(1, 2)).masked_fill(pad[..., None], 0.0)  # (B,C,S) -> (B,S,E)
        return z, (z + e).masked_fill(pad[..., None], 0.0)


class AttentionLayer(nn.Module):
    """§3.3: d_i = W h_i + b + g_i (g = the decoder input embedding); a_ij = softmax_j(d_i · z_j);
    c_i = sum_j a_ij (z_j + e_j), scaled by m·sqrt(1/m); projected back to the conv width and added to h_i."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.in_projection = nn.Linear(channels, embed_dim)
        self.out_projection = nn.Linear(embed_dim, channels)

    def forward(
        self,
        x: Tensor,
        *,  # keys and values are both (N,S,E) (x and target_embedding too if C == E): named
        target_embedding: Tensor,
        keys: Tensor,
        values: Tensor,
        src_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """x (N,t,C), target_embedding (N,t,E), keys/values (N,S,E) -> (N,t,C) and the weights (N,t,S)."""
        d = (self.in_projection(x) + target_embedding) * SQRT_HALF  # (N,t,E)
        scores = d @ keys.transpose(1, 2)  # (N,t,S)
        weights = scores.masked_fill(~src_mask.bool()[:, None, :], float("-inf")).softmax(dim=-1)
        c = weights @ values  # (N,t,E)
        # m·sqrt(1/m) = sqrt(m): undoes the shrinking of a uniform average over m real source vectors
        c = c * src_mask.sum(dim=1).to(c.dtype).sqrt()[:, None, None]
        return (self.out_projection(c) + x) * SQRT_HALF, weights


@dataclass
class ConvCache:
    """Per decoder block the last k-1 inputs of its conv, and how many target tokens have been fed."""

    buffers: list[Tensor]  # each (N, k-1, C)
    steps: int

    def index_select(self, index: Tensor) -> ConvCache:
        return ConvCache([b.index_select(0, index) for b in self.buffers], self.steps)


class ConvDecoder(nn.Module):
    def __init__(self, config: ConvS2SConfig) -> None:
        super().__init__()
        self.max_positions = config.max_positions
        self.kernel_size = config.kernel_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.embed_positions = nn.Embedding(config.max_positions, config.embed_dim)
        self.fc1 = nn.Linear(config.embed_dim, config.channels)
        k, c = config.kernel_size, config.channels
        # no padding here: the k-1 inputs to the left come from the cache buffers (zeros at the start)
        self.convs = nn.ModuleList(nn.Conv1d(c, 2 * c, k) for _ in range(config.decoder_layers))
        self.attention = nn.ModuleList(
            AttentionLayer(c, config.embed_dim) for _ in range(config.decoder_layers)
        )
        self.fc2 = nn.Linear(config.channels, config.embed_dim)
        self.fc3 = nn.Linear(config.embed_dim, config.vocab_size)
        self.dropout = nn.Dropout(config.dropout)

    def start_cache(self, batch: int, like: Tensor) -> ConvCache:
        width = self.convs[0].in_channels
        return ConvCache(
            [like.new_zeros(batch, self.kernel_size - 1, width) for _ in self.convs], 0
        )

    def forward(
        self,
        tgt_ids: Tensor,
        *,
        keys: Tensor,
        values: Tensor,
        src_mask: Tensor,
        cache: ConvCache,
    ) -> tuple[Tensor, Tensor, ConvCache]:
        """New target ids (N,t) -> logits (N,t,V), the last block's attention (N,t,S), the updated cache."""
        pos = _positions(cache.steps, tgt_ids.size(1), self.max_positions, tgt_ids.device)
        e = self.dropout(self.embed_tokens(tgt_ids) + self.embed_positions(pos))  # (N,t,E)
        x = self.fc1(e)  # (N,t,C)
        keep = self.kernel_size - 1
        buffers, weights = [], e.new_zeros(0)
        for conv, attention, buffer in zip(self.convs, self.attention, cache.buffers, strict=True):
            residual = x
            window = torch.cat([buffer, self.dropout(x)], dim=1)  # (N, k-1+t, C)
            buffers.append(
                window[:, window.size(1) - keep :]
            )  # the last k-1 inputs, for the next step
            x = F.glu(conv(window.transpose(1, 2)), dim=1).transpose(
                1, 2
            )  # (N,C,k-1+t) -> (N,2C,t) -> (N,t,C)
            x, weights = attention(
                x, target_embedding=e, keys=keys, values=values, src_mask=src_mask
            )
            x = (x + residual) * SQRT_HALF
        x = self.dropout(self.fc2(x))  # (N,t,E)
        return self.fc3(x), weights, ConvCache(buffers, cache.steps + tgt_ids.size(1))


# the linear layers whose input is dropped out (the embeddings, the decoder's last hidden states)
_DROPPED_OUT_INPUTS = ("encoder.fc1", "decoder.fc1", "decoder.fc3")


class ConvS2S(nn.Module):
    """Implements the decoding protocol of `finetune.decode` and `cross_attention` for attention maps.
    The memory is the tuple (keys z, values z + e), each (B,S,E)."""

    def __init__(self, config: ConvS2SConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config)
        self.decoder = ConvDecoder(config)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise in place; also the second half of a meta-device build. §3.5 (as fairseq): embeddings
        N(0, 0.1); a layer with fan-in n gets N(0, sqrt(1/n)), or sqrt(4/n) when a GLU halves its output, each
        variance times (1 - dropout) where its input is dropped out. Biases 0."""
        if self.encoder.embed_tokens.weight.is_meta:
            return  # shapes only
        keep = 1.0 - self.config.dropout
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.1)
            elif isinstance(module, nn.Conv1d):
                fan_in = module.in_channels * module.kernel_size[0]
                nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(4.0 * keep / fan_in))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                p_keep = keep if name in _DROPPED_OUT_INPUTS else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(p_keep / module.in_features))
                nn.init.zeros_(module.bias)

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B,S) source ids and mask (1 = real) -> memory (keys (B,S,E), values (B,S,E))."""
        return self.encoder(src_ids, src_mask)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B,U,V) for every decoder input position."""
        logits, _, _ = self._teacher_forced(src_ids, src_mask, tgt_in)
        return logits

    def decode_step(
        self,
        tgt_ids: Tensor,
        memory: tuple[Tensor, Tensor],
        *,
        src_mask: Tensor,
        cache: ConvCache | None,
    ) -> tuple[Tensor, ConvCache]:
        """Feed the (N,t) target ids not yet in `cache`; return the last position's logits (N,V) and the cache."""
        keys, values = memory
        if cache is None:
            cache = self.decoder.start_cache(tgt_ids.size(0), keys)
        logits, _, cache = self.decoder(
            tgt_ids, keys=keys, values=values, src_mask=src_mask, cache=cache
        )
        return logits[:, -1], cache

    def reorder_cache(self, cache: ConvCache, index: Tensor) -> ConvCache:
        return cache.index_select(index)

    def cross_attention(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """The last decoder block's attention weights, teacher forced: (B,U,S); rows sum to 1 over the real
        source positions, 0 at padding. Call in eval mode (dropout would perturb it)."""
        _, weights, _ = self._teacher_forced(src_ids, src_mask, tgt_in)
        return weights

    def _teacher_forced(
        self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor
    ) -> tuple[Tensor, Tensor, ConvCache]:
        """The decoder over the whole of tgt_in from an empty cache: (logits, last attention, cache)."""
        keys, values = self.encode(src_ids, src_mask)
        start = self.decoder.start_cache(tgt_in.size(0), keys)
        return self.decoder(tgt_in, keys=keys, values=values, src_mask=src_mask, cache=start)
