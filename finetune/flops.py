"""Training FLOPs of the fine-tuning architectures, for the MFU (`train/mfu`) of translation and classification.

The conventions are pretrain/flops.py's (PaLM, Appendix B): only matmuls and convolutions count, a multiply-add is
2 FLOPs, the backward pass twice the forward (TRAIN_MULTIPLIER = 3); embedding lookups, norms, softmax,
nonlinearities and the optimizer step are not counted. Real tokens are counted, never padding; attention over a
sequence is counted over its padded length (S source, U target), as pretrain/flops.py's T.

Why one module here, not a method on each model: the models stay plain nn.Modules that know nothing of
accounting, the conventions live in one place where the counts can be read side by side (and next to
pretrain/flops.py, whose Transformer block they reuse), and pretrain/ never imports finetune/.

A *batch* is counted, not a token: a source token, a target token and a sequence each cost something different
(cross-attention keys per source token, the output projection per target token, a classifier head per sequence).
The fine-tuning modules divide the count by their `count_tokens(batch)`; KilnModule multiplies it back.

Forward FLOPs (d width, f feed-forward, V vocabulary, H LSTM width, E embedding width, C conv channels, k kernel):
  Transformer layer   transformer_layer_flops(d, f, T) = 2·(4d² + 2df) + 4Td per token (pretrain/flops.py)
  enc-dec Transformer source: Le layers over S, plus 2·2d² per decoder layer (its cross-attention K and V);
  (scratch, warm)     target: per decoder layer a self-attention layer over U, 2·2d² (cross Q, out) and 4Sd;
                      2dV output projection; warm start: BERT encoder, 2·d_enc·d_dec projection when the widths
                      differ, and BERT's pooler once per sequence, forward only (frozen, its output unused)
  LSTM layer          2·4H·(in + H) per token and direction
  LSTM seq2seq        source: the (bi)LSTM, 2·2H·H state projection when bidirectional and attended (arch
                      "lstm" has none: its decoder reads the final states alone); per sequence the two
                      bridges (2·2·2H·H per layer); target: the decoder LSTM, attention (Bahdanau: 2H² query,
                      2HS energy, 2HS context, 2·(2H+E)·2H deep output, 2H² per source token for the keys; Luong:
                      2HS score, 2HS context, 2·2H·H combine, 2H² per source token for "general"), 2HV output
  ConvS2S             source: 2EC in, Le·2·k·C·2C convs, 2CE out; target: the same in/out, Ld convs, per layer
                      attention 2CE + 2ES + 2SE + 2EC, and 2EV output projection
  classifiers         the encoder (BERT / GPT / biLSTM) per token; per sequence the head (BERT: its pooler 2d²)
Two exceptions to "backward = 2 × forward", so that the counts equal PyTorch's FlopCounterMode op for op:
what runs forward only (BERT's pooler in the warm-started model),
and an LSTM starting from a zero state (the encoders, the classifier), whose first step needs no gradient of
that state: 2·4H·H less backward per sequence, layer and direction. (On a padded batch PyTorch's packed reverse
direction computes that gradient anyway for rows shorter than the longest, up to the same amount; it is not
counted, being work the model does not need.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.models.classifier import ClassifierConfig, GPTClassifierConfig, LSTMClassifierConfig
from finetune.models.convs2s import ConvS2SConfig
from finetune.models.rnn import RNNSeq2SeqConfig
from finetune.models.seq2seq import Seq2SeqConfig
from finetune.models.transformer import TransformerConfig
from pretrain.flops import TRAIN_MULTIPLIER, transformer_layer_flops
from pretrain.models.bert import BertConfig


@dataclass(frozen=True)
class BatchShape:
    """What a count needs to know of a batch. Classification batches have a source side only."""

    sequences: int  # B
    src_tokens: int  # real source (classifier input) tokens in the batch
    src_len: int  # padded source length S
    tgt_tokens: int = 0  # real target tokens (positions with a label)
    tgt_len: int = 0  # padded target length U


@dataclass(frozen=True)
class _Forward:
    """Forward FLOPs per source token, per target token and per sequence of what is trained; `forward_only`:
    FLOPs per source token and `frozen`: per sequence that run without a backward; `no_grad_state`: backward
    FLOPs per sequence that autograd never needs (an LSTM's zero initial state)."""

    src: float = 0.0
    tgt: float = 0.0
    seq: float = 0.0
    forward_only: float = 0.0
    frozen: float = 0.0
    no_grad_state: float = 0.0

    def training(self, b: BatchShape) -> float:
        trained = self.src * b.src_tokens + self.tgt * b.tgt_tokens + self.seq * b.sequences
        untrained = (
            self.forward_only * b.src_tokens + (self.frozen - self.no_grad_state) * b.sequences
        )
        return TRAIN_MULTIPLIER * trained + untrained


def _cross_decoder(d: int, ff: int, layers: int, vocab: int, b: BatchShape) -> _Forward:
    """A Transformer decoder with cross-attention and an output projection: (per source token, per target token)."""
    tgt = layers * (
        transformer_layer_flops(d, ff, b.tgt_len) + 2.0 * 2 * d * d + 4.0 * b.src_len * d
    )
    return _Forward(src=layers * 2.0 * 2 * d * d, tgt=tgt + 2.0 * d * vocab)


def _bert_per_token(cfg: BertConfig, seq_len: int) -> float:
    return cfg.num_hidden_layers * transformer_layer_flops(
        cfg.hidden_size, cfg.intermediate_size, seq_len
    )


def transformer_flops(cfg: TransformerConfig, b: BatchShape) -> float:
    """TransformerSeq2Seq (finetune/models/transformer.py), trained from scratch."""
    d = cfg.d_model
    dec = _cross_decoder(d, cfg.d_ff, cfg.decoder_layers, cfg.vocab_size, b)
    src = cfg.encoder_layers * transformer_layer_flops(d, cfg.d_ff, b.src_len)
    return _Forward(src=src + dec.src, tgt=dec.tgt).training(b)


def warm_seq2seq_flops(cfg: Seq2SeqConfig, b: BatchShape) -> float:
    """WarmStartedSeq2Seq: BERT encoder, GPT decoder with cross-attention (finetune/models/seq2seq.py)."""
    enc, dec_cfg = cfg.encoder, cfg.decoder
    d_enc, d_dec = enc.hidden_size, dec_cfg.n_embd
    dec = _cross_decoder(d_dec, dec_cfg.inner_size, dec_cfg.n_layer, dec_cfg.vocab_size, b)
    bridge = 2.0 * d_enc * d_dec if d_enc != d_dec else 0.0
    src = _bert_per_token(enc, b.src_len) + bridge + dec.src
    return _Forward(src=src, tgt=dec.tgt, frozen=2.0 * d_enc * d_enc).training(b)


def _lstm_layer(input_size: int, hidden: int) -> float:
    """Per token and direction: the four gates' input and recurrent products."""
    return 2.0 * 4 * hidden * (input_size + hidden)


def _lstm_stack(input_size: int, hidden: int, layers: int, directions: int) -> float:
    """Per token: a (bi)LSTM of `layers`; layers above the first read all directions' outputs."""
    upper = (layers - 1) * _lstm_layer(directions * hidden, hidden)
    return directions * (_lstm_layer(input_size, hidden) + upper)


def _zero_state(hidden: int, layers: int, directions: int) -> float:
    """Backward FLOPs per sequence an LSTM from a zero state skips: no gradient of h0 through W_hh."""
    return layers * directions * 2.0 * 4 * hidden * hidden


def _lstm_attention(cfg: RNNSeq2SeqConfig, s: int) -> tuple[float, float]:
    """(per source token, per target token) of an attention decoder's attention and output layers."""
    H, E = cfg.hidden_size, cfg.embedding_dim
    if cfg.attention == "bahdanau":
        return 2.0 * H * H, 2.0 * H * H + 2.0 * H * s + 2.0 * s * H + 2.0 * (2 * H + E) * 2 * H
    keys = 2.0 * H * H if cfg.attention == "luong_general" else 0.0
    return keys, 2.0 * s * H + 2.0 * s * H + 2.0 * 2 * H * H


def lstm_seq2seq_flops(cfg: RNNSeq2SeqConfig, b: BatchShape) -> float:
    """RNNSeq2Seq, arch "lstm" and "lstm_attention" (finetune/models/rnn.py)."""
    H, E, L = cfg.hidden_size, cfg.embedding_dim, cfg.num_layers
    D = 2 if cfg.bidirectional else 1
    attention = cfg.attention is not None
    # encoder states to the decoder's width: built only where attention reads them
    proj = 2.0 * 2 * H * H if D == 2 and attention else 0.0
    src = _lstm_stack(E, H, L, D) + proj
    seq = 2 * L * 2.0 * 2 * H * H if D == 2 else 0.0  # bridges of h and c, per layer
    dec_input = (
        E + H if attention else E
    )  # attention decoders feed the context (or h~) into the LSTM
    tgt = _lstm_layer(dec_input, H) + (L - 1) * _lstm_layer(H, H) + 2.0 * H * cfg.vocab_size
    if attention:
        per_src, per_tgt = _lstm_attention(cfg, b.src_len)
        src, tgt = src + per_src, tgt + per_tgt
    return _Forward(
        src=src,
        tgt=tgt,
        seq=seq,
        no_grad_state=_zero_state(H, L, D),
    ).training(b)


def convs2s_flops(cfg: ConvS2SConfig, b: BatchShape) -> float:
    """ConvS2S (finetune/models/convs2s.py)."""
    E, C, k = cfg.embed_dim, cfg.channels, cfg.kernel_size
    conv, in_out = 2.0 * k * C * 2 * C, 2.0 * E * C + 2.0 * C * E
    attention = 2.0 * C * E + 2.0 * E * b.src_len + 2.0 * b.src_len * E + 2.0 * E * C
    src = in_out + cfg.encoder_layers * conv
    tgt = in_out + cfg.decoder_layers * (conv + attention) + 2.0 * E * cfg.vocab_size
    return _Forward(src=src, tgt=tgt).training(b)


def bert_classifier_flops(cfg: ClassifierConfig, b: BatchShape) -> float:
    """EncoderClassifier: BERT, its pooler and a linear head on [CLS] (finetune/models/classifier.py)."""
    d = cfg.encoder.hidden_size
    head = 2.0 * d * d + 2.0 * d * cfg.num_labels
    return _Forward(src=_bert_per_token(cfg.encoder, b.src_len), seq=head).training(b)


def gpt_classifier_flops(cfg: GPTClassifierConfig, b: BatchShape) -> float:
    """DecoderClassifier: GPT, a linear head on the last real token (finetune/models/classifier.py)."""
    dec = cfg.decoder
    body = dec.n_layer * transformer_layer_flops(dec.n_embd, dec.inner_size, b.src_len)
    return _Forward(src=body, seq=2.0 * dec.n_embd * cfg.num_labels).training(b)


def lstm_classifier_flops(cfg: LSTMClassifierConfig, b: BatchShape) -> float:
    """LSTMClassifier: biLSTM, max + mean pooling, a linear head (finetune/models/classifier.py)."""
    H = cfg.hidden_size
    body = _lstm_stack(cfg.embedding_dim, H, cfg.num_layers, 2)
    return _Forward(
        src=body, seq=2.0 * 4 * H * cfg.num_labels, no_grad_state=_zero_state(H, cfg.num_layers, 2)
    ).training(b)


# arch -> the count for its config; every translation and classification architecture of the
# registry (finetune.models.ARCHITECTURES) has one, tests/finetune/test_finetune_flops.py checks.
FLOPS: dict[str, Callable[[Any, BatchShape], float]] = {
    "transformer": transformer_flops,
    "seq2seq_warm": warm_seq2seq_flops,
    "lstm": lstm_seq2seq_flops,
    "lstm_attention": lstm_seq2seq_flops,
    "convs2s": convs2s_flops,
    "bert_classifier": bert_classifier_flops,
    "gpt_classifier": gpt_classifier_flops,
    "lstm_classifier": lstm_classifier_flops,
}


def training_flops(config: Any, batch: BatchShape) -> float | None:
    """Training FLOPs (forward + backward) of one batch for a model built from `config`; None for a config
    without a count here (then the run logs no train/mfu rather than a wrong one)."""
    count = FLOPS.get(getattr(config, "arch", None))
    return None if count is None else count(config, batch)
