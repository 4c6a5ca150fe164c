"""LSTM encoder-decoders for translation: the sequence models the Transformer replaced, as baselines.

- `arch: "lstm"` (Sutskever et al., 2014, "Sequence to Sequence Learning with Neural Networks"): the decoder
  starts from the encoder's final (h, c), the fixed-size context vector, and sees nothing else of the source.
- `arch: "lstm_attention"` with `attention`:
  - "bahdanau" (Bahdanau et al., 2015, "Neural Machine Translation by Jointly Learning to Align and Translate"):
    additive scores v^T tanh(W s_{i-1} + U h_j) from the *previous* decoder state; the context enters the LSTM
    input, and a maxout "deep output" layer reads (s_i, c_i, y_{i-1}) (their appendix A.2.2).
  - "luong_dot" / "luong_general" (Luong et al., 2015, "Effective Approaches to Attention-based NMT"): scores
    h_t^T h_s / h_t^T W_a h_s from the *current* decoder state, attentional state h~_t = tanh(W_c [c_t; h_t])
    feeding the output layer, and input feeding (h~_{t-1} joins the next LSTM input).

Source and target share the one Kiln tokenizer (docs/design.md), so one embedding serves both, and the output
projection can be tied to it (Press & Wolf, 2017) when embedding_dim == hidden_size. Rows are right-padded;
the encoder packs them, so padding never changes a result. Scheduled sampling needs nothing from the model: it is
the training module's two-pass form (finetune/scheduled_sampling.py), shared by every architecture.

Read top to bottom: config → cache → encoder → attention → the three decoders → model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from data_pipeline.configlib import check_fields

Attention = Literal["bahdanau", "luong_dot", "luong_general"]
RNNMemory = tuple[
    Tensor, Tensor, Tensor
]  # encoder states (B,S,H; D*H for a bidirectional `lstm`, which never reads them), h0 (B,L,H), c0 (B,L,H)


@dataclass
class RNNSeq2SeqConfig:
    """Flat config of the LSTM family. `preset` is applied by `configlib.from_preset` / the config
    loader, as GPTConfig."""

    ATTENTIONS: ClassVar[tuple[str, ...]] = get_args(Attention)
    # "small" halves the 512-wide LSTMs of the common Multi30k baselines (bentrevett/pytorch-seq2seq: 256-d
    # embeddings, 512 hidden, 2 layers) so that training fits a CPU time budget.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(embedding_dim=64, hidden_size=64, num_layers=1),
        "small": dict(embedding_dim=256, hidden_size=256, num_layers=2),
    }

    arch: Literal["lstm", "lstm_attention"] = "lstm"  # both build RNNSeq2Seq
    preset: str | None = None
    # lstm_attention: None = "bahdanau"; lstm: must stay None
    attention: Attention | None = None
    vocab_size: int = 8000
    pad_id: int = 0
    embedding_dim: int = 256
    hidden_size: int = (
        256  # decoder width, each encoder direction's width, and the width of the encoder states
    )
    num_layers: int = (
        2  # encoder and decoder alike, so the encoder's final state maps layer to layer
    )
    bidirectional: bool = True  # encoder only; final states bridged to hidden_size by linear + tanh
    dropout: float = 0.2  # embeddings, between LSTM layers, and before the output projection
    tie_embeddings: bool = (
        True  # output projection = embedding matrix; needs embedding_dim == hidden_size
    )
    init_range: float = (
        0.1  # every weight ~ U(-r, r), as Sutskever et al. (0.08) and Luong et al. (0.1)
    )

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices, preset name
        if self.arch == "lstm" and self.attention is not None:
            raise ValueError(
                f"RNNSeq2SeqConfig.attention={self.attention!r} needs arch 'lstm_attention' (arch 'lstm' "
                "decodes from the final encoder state only)"
            )
        if self.arch == "lstm_attention":
            self.attention = self.attention or "bahdanau"
        for key in ("vocab_size", "embedding_dim", "hidden_size", "num_layers"):
            if getattr(self, key) <= 0:
                raise ValueError(f"RNNSeq2SeqConfig.{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"RNNSeq2SeqConfig.pad_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_id}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RNNSeq2SeqConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init_range <= 0:
            raise ValueError(f"RNNSeq2SeqConfig.init_range must be > 0, got {self.init_range}")
        if self.tie_embeddings and self.embedding_dim != self.hidden_size:
            raise ValueError(
                f"RNNSeq2SeqConfig.tie_embeddings needs embedding_dim == hidden_size, got "
                f"{self.embedding_dim} and {self.hidden_size} (set tie_embeddings: false)"
            )


@dataclass
class LSTMCache:
    """The decoder's incremental state after the target tokens fed so far."""

    h: Tensor  # (L, N, H) hidden state per layer (nn.LSTM's layout)
    c: Tensor  # (L, N, H) cell state per layer
    feed: Tensor | None = None  # (N, H) Luong: the last attentional vector h~ (input feeding)
    keys: Tensor | None = (
        None  # (N, S, H) attention keys of the encoder states, computed once per source
    )

    def index_select(self, index: Tensor) -> LSTMCache:
        """Rows `index` of the batch (beam search reorders hypotheses this way)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index)

        return LSTMCache(
            self.h.index_select(1, index),
            self.c.index_select(1, index),
            pick(self.feed),
            pick(self.keys),
        )


def real_lengths(mask: Tensor, name: str) -> Tensor:
    """Real tokens per row (B,) of a (B,T) mask; refuses masks that are not right-padded and empty rows.

    Packing (and a causal model's last-token read-out) trusts the lengths alone, so a mask with holes would be
    silently misread rather than fail.
    """
    lengths = mask.long().sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError(
            f"{name} has rows without a real token: {(lengths == 0).nonzero().flatten().tolist()}"
        )
    prefix = torch.arange(mask.size(1), device=mask.device) < lengths.unsqueeze(1)  # (B,T)
    if not torch.equal(prefix, mask.bool()):
        raise ValueError(
            f"{name} must be right-padded (1 = real token, then only 0s), as the loader builds it"
        )
    return lengths


def _lstm(input_size: int, config: RNNSeq2SeqConfig, bidirectional: bool = False) -> nn.LSTM:
    return nn.LSTM(
        input_size,
        config.hidden_size,
        config.num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        dropout=config.dropout if config.num_layers > 1 else 0.0,
    )


class LSTMEncoder(nn.Module):
    """(bi)LSTM over the embedded source; returns the states (B,S,H) and the final (h, c) as (B,L,H) each."""

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        self.lstm = _lstm(config.embedding_dim, config, config.bidirectional)
        H, D = config.hidden_size, 2 if config.bidirectional else 1
        self.bridge_h: nn.Module = nn.Linear(D * H, H) if D == 2 else nn.Identity()
        self.bridge_c: nn.Module = nn.Linear(D * H, H) if D == 2 else nn.Identity()
        # States to the decoder's width. Only an attention reads the states (the plain decoder starts from (h, c)
        # alone), and a layer the loss never reaches stops DDP's first backward, so `lstm` has none.
        attends = config.arch == "lstm_attention"
        self.proj: nn.Module = nn.Linear(D * H, H) if D == 2 and attends else nn.Identity()
        if (
            not attends
        ):  # checkpoints saved before 06e7084 hold that unused layer: drop it, nothing is lost
            self._register_load_state_dict_pre_hook(_drop_unused_projection)

    def forward(self, emb: Tensor, src_mask: Tensor) -> RNNMemory:
        B, S, _ = emb.shape
        lengths = real_lengths(src_mask, "src_mask")
        # packing runs each row for exactly its length: the backward direction starts at the row's last real token
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)  # h, c (L*D, B, H), final state of each row's real tokens
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B,S,D*H)
        L = self.lstm.num_layers
        D = 2 if self.lstm.bidirectional else 1
        h = h.view(L, D, B, -1).permute(2, 0, 1, 3).reshape(B, L, -1)  # (L*D,B,H) -> (B,L,D*H)
        c = c.view(L, D, B, -1).permute(2, 0, 1, 3).reshape(B, L, -1)  # (L*D,B,H) -> (B,L,D*H)
        if D == 2:
            h, c = torch.tanh(self.bridge_h(h)), torch.tanh(self.bridge_c(c))  # (B,L,H)
        states = self.proj(out).masked_fill(
            ~src_mask.bool().unsqueeze(-1), 0.0
        )  # (B,S,H), 0 at padding
        return states, h, c


def _drop_unused_projection(state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    for name in ("weight", "bias"):
        state_dict.pop(f"{prefix}proj.{name}", None)


def masked_softmax(scores: Tensor, src_mask: Tensor) -> Tensor:
    """Softmax over source positions (N,S); exactly 0 at padding."""
    return scores.masked_fill(~src_mask.bool(), float("-inf")).softmax(dim=-1)


def _attend(weights: Tensor, values: Tensor) -> Tensor:
    return torch.bmm(weights.unsqueeze(1), values).squeeze(1)  # (N,1,S) @ (N,S,H) -> (N,H)


def _initial_cache(memory: RNNMemory) -> LSTMCache:
    _, h0, c0 = memory
    return LSTMCache(
        h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous()
    )  # (B,L,H) -> (L,B,H)


class PlainDecoder(nn.Module):
    """Sutskever et al.: an LSTM language model of the target conditioned only through its initial state."""

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        self.lstm = _lstm(config.embedding_dim, config)

    def start(self, memory: RNNMemory) -> LSTMCache:
        return _initial_cache(memory)

    def forward(
        self, emb: Tensor, memory: RNNMemory, *, src_mask: Tensor, cache: LSTMCache
    ) -> tuple[Tensor, LSTMCache, Tensor | None]:
        """emb (N,t,E) -> (pre-output states (N,t,H), cache, no attention)."""
        out, (h, c) = self.lstm(emb, (cache.h, cache.c))  # (N,t,H)
        return out, LSTMCache(h, c), None


class BahdanauDecoder(nn.Module):
    """Additive attention from s_{i-1}; the LSTM reads [y_{i-1}; c_i]; maxout deep output over (s_i, c_i, y_{i-1})."""

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        H, E = config.hidden_size, config.embedding_dim
        self.lstm = _lstm(E + H, config)
        self.query = nn.Linear(H, H, bias=False)  # W_a
        self.key = nn.Linear(H, H)  # U_a (its bias is the score's bias)
        self.energy = nn.Linear(H, 1, bias=False)  # v_a
        self.deep_out = nn.Linear(2 * H + E, 2 * H)  # maxout with pool size 2 (their t~_i)

    def start(self, memory: RNNMemory) -> LSTMCache:
        cache = _initial_cache(memory)
        cache.keys = self.key(
            memory[0]
        )  # (B,S,H): U_a h_j does not depend on the decoder, so once per source
        return cache

    def forward(
        self, emb: Tensor, memory: RNNMemory, *, src_mask: Tensor, cache: LSTMCache
    ) -> tuple[Tensor, LSTMCache, Tensor]:
        """emb (N,t,E) -> (pre-output states (N,t,H), cache, alignment weights (N,t,S))."""
        values, keys = memory[0], cache.keys
        assert keys is not None  # start() sets them
        h, c = cache.h, cache.c
        N, H = values.size(0), values.size(2)
        outs, weights = [], []
        for i in range(emb.size(1)):
            y = emb[:, i]  # (N,E)
            scores = self.energy(torch.tanh(self.query(h[-1]).unsqueeze(1) + keys)).squeeze(
                -1
            )  # (N,S)
            w = masked_softmax(scores, src_mask)
            ctx = _attend(w, values)  # (N,H)
            s, (h, c) = self.lstm(torch.cat([y, ctx], dim=-1).unsqueeze(1), (h, c))  # s (N,1,H)
            t = self.deep_out(torch.cat([s[:, 0], ctx, y], dim=-1))  # (N,2H)
            outs.append(t.view(N, H, 2).amax(dim=-1))  # maxout over pairs: (N,H,2) -> (N,H)
            weights.append(w)
        return torch.stack(outs, dim=1), LSTMCache(h, c, keys=keys), torch.stack(weights, dim=1)


class LuongDecoder(nn.Module):
    """Global attention from h_t (dot or general), h~_t = tanh(W_c [c_t; h_t]), input feeding of h~_{t-1}."""

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        H, E = config.hidden_size, config.embedding_dim
        self.lstm = _lstm(E + H, config)
        # "general": score = h_t^T W_a h_s, i.e. h_t . (W_a h_s), so the keys W_a h_s are computed once per source
        self.score: nn.Module = (
            nn.Linear(H, H, bias=False) if config.attention == "luong_general" else nn.Identity()
        )
        self.combine = nn.Linear(2 * H, H, bias=False)  # W_c

    def start(self, memory: RNNMemory) -> LSTMCache:
        cache = _initial_cache(memory)
        cache.keys = self.score(memory[0])  # (B,S,H)
        cache.feed = memory[0].new_zeros(memory[0].size(0), memory[0].size(2))  # h~_0 = 0
        return cache

    def forward(
        self, emb: Tensor, memory: RNNMemory, *, src_mask: Tensor, cache: LSTMCache
    ) -> tuple[Tensor, LSTMCache, Tensor]:
        """emb (N,t,E) -> (attentional states h~ (N,t,H), cache, alignment weights (N,t,S))."""
        values, keys, feed = memory[0], cache.keys, cache.feed
        assert keys is not None and feed is not None  # start() sets them
        h, c = cache.h, cache.c
        outs, weights = [], []
        for i in range(emb.size(1)):
            s, (h, c) = self.lstm(
                torch.cat([emb[:, i], feed], dim=-1).unsqueeze(1), (h, c)
            )  # s (N,1,H)
            scores = torch.bmm(keys, s.transpose(1, 2)).squeeze(-1)  # (N,S,H) @ (N,H,1) -> (N,S)
            w = masked_softmax(scores, src_mask)
            feed = torch.tanh(
                self.combine(torch.cat([_attend(w, values), s[:, 0]], dim=-1))
            )  # h~_t (N,H)
            outs.append(feed)
            weights.append(w)
        return (
            torch.stack(outs, dim=1),
            LSTMCache(h, c, feed=feed, keys=keys),
            torch.stack(weights, dim=1),
        )


# The decoder a config builds: "lstm" for the plain arch, else the attention name.
DECODERS: dict[str, type[nn.Module]] = {
    "lstm": PlainDecoder,
    "bahdanau": BahdanauDecoder,
    "luong_dot": LuongDecoder,
    "luong_general": LuongDecoder,
}


class RNNSeq2Seq(nn.Module):
    """Shared embedding → LSTMEncoder → one of DECODERS → dropout → output projection (tied when configured).

    Implements the decoding protocol of `finetune.decode` (encode / decode_step / reorder_cache) and
    `cross_attention` for the attention variants. Teacher forcing and incremental decoding run the same
    decoder code on the same cache, so cached and uncached logits agree.
    """

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = LSTMEncoder(config)
        self.decoder = DECODERS[config.attention or config.arch](config)
        self.out = nn.Linear(config.hidden_size, config.vocab_size)
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.out.weight = self.embedding.weight

    def init_weights(self) -> None:
        """Re-tie (a meta build's `to_empty` unties), then initialise every parameter in place."""
        self.tie_weights()
        if self.embedding.weight.is_meta:
            return  # shapes only; materialize() calls this again on real storage
        r = self.config.init_range
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-r, r)

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> RNNMemory:
        """(B,S) right-padded source -> (encoder states (B,S,H), h0 (B,L,H), c0 (B,L,H))."""
        return self.encoder(self.dropout(self.embedding(src_ids)), src_mask)

    def _decode(
        self, tgt_ids: Tensor, memory: RNNMemory, *, src_mask: Tensor, cache: LSTMCache
    ) -> tuple[Tensor, LSTMCache, Tensor | None]:
        emb = self.dropout(self.embedding(tgt_ids))  # (N,t,E)
        states, cache, weights = self.decoder(emb, memory, src_mask=src_mask, cache=cache)
        return self.out(self.dropout(states)), cache, weights  # states (N,t,H) -> (N,t,V)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B,U,V) for every decoder input position."""
        memory = self.encode(src_ids, src_mask)
        logits, _, _ = self._decode(
            tgt_in, memory, src_mask=src_mask, cache=self.decoder.start(memory)
        )
        return logits

    def decode_step(
        self, tgt_ids: Tensor, memory: RNNMemory, *, src_mask: Tensor, cache: LSTMCache | None
    ) -> tuple[Tensor, LSTMCache]:
        """Feed the (N,t) target ids not yet in `cache`; return the last position's logits (N,V) and the cache."""
        if cache is None:
            cache = self.decoder.start(memory)
        logits, cache, _ = self._decode(tgt_ids, memory, src_mask=src_mask, cache=cache)
        return logits[:, -1], cache  # (N,t,V) -> (N,V)

    def reorder_cache(self, cache: LSTMCache, index: Tensor) -> LSTMCache:
        return cache.index_select(index)

    def cross_attention(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced alignment weights (B,U,S): rows sum to 1 over real source tokens, 0 at padding."""
        if self.config.arch == "lstm":
            raise ValueError(
                "arch 'lstm' has no attention to show: its decoder sees only the final encoder state "
                "(use arch 'lstm_attention')"
            )
        memory = self.encode(src_ids, src_mask)
        start = self.decoder.start(memory)
        _, _, weights = self._decode(tgt_in, memory, src_mask=src_mask, cache=start)
        assert weights is not None  # every attention decoder returns them
        return weights
