"""Warm-started encoder-decoder for translation (Rothe et al., 2020, "Leveraging Pre-trained Checkpoints
for Sequence Generation Tasks"): a pretrained BERT encoder and a pretrained GPT decoder, joined by freshly
initialised cross-attention in every decoder block.

Usually source and target share the one Kiln tokenizer (docs/design.md): the data pipeline trains a single
vocabulary over every task, so the encoder's input embeddings and the decoder's embeddings and tied output
projection index the same ids. Two released checkpoints (a BERT and a GPT-2) come with two vocabularies instead:
the encoder reads source ids of its tokenizer and the decoder writes target ids of its own, so the two
vocab_sizes may differ. Either way each half must speak the data's tokenizer of its side, which
`from_pretrained` checks before any training step.

Sequence formats (docs/design.md): the source is `src [EOS]`, the decoder input `[BOS] y`, the target `y [EOS]`;
with two tokenizers `[CLS] src [SEP]` and GPT-2's `<|endoftext|>` as BOS and EOS.

Read top to bottom: config → model (encode, forward, decode_step, reorder_cache, cross_attention) →
from_pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from data_pipeline.configlib import check_fields
from finetune.models.warm_start import check_tokenizers, copy_matching, load_pretrained
from pretrain.models.bert import BertConfig, BertModel, init_bert_module
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel, KVCache, reorder_cache


def _default_decoder() -> GPTConfig:
    return GPTConfig(vocab_size=BertConfig.vocab_size, add_cross_attention=True)


@dataclass
class Seq2SeqConfig:
    """Encoder (BERT) and decoder (GPT with cross-attention) configs. Round-trips through
    `dataclasses.asdict`: `Seq2SeqConfig(**asdict(cfg))` rebuilds the nested configs from their dicts."""

    arch: Literal["seq2seq_warm"] = "seq2seq_warm"
    encoder: BertConfig = field(default_factory=BertConfig)
    decoder: GPTConfig = field(default_factory=_default_decoder)

    def __post_init__(self) -> None:
        check_fields(self)  # types, arch; `encoder` / `decoder` mappings become their configs
        if not self.decoder.add_cross_attention:
            raise ValueError(
                "Seq2SeqConfig.decoder.add_cross_attention must be True (the decoder attends to the "
                "encoder through it)"
            )


def _is_fresh_decoder_tensor(name: str) -> bool:
    return ".crossattention." in name or ".ln_cross_attn." in name


class WarmStartedSeq2Seq(nn.Module):
    """BERT encoder → (projection if widths differ) → GPT decoder with cross-attention → logits.

    Implements the decoding protocol of `finetune.decode` (encode / decode_step / reorder_cache).
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = BertModel(config.encoder)
        # BertModel always computes the pooled [CLS] output, which a seq2seq loss never reaches. Frozen, it
        # gets no gradient by design, so DDP does not wait for one (no find_unused_parameters needed) and the
        # optimiser skips it. Its weights still round-trip through checkpoints.
        for p in self.encoder.pooler.parameters():
            p.requires_grad_(False)
        enc_width, dec_width = config.encoder.hidden_size, config.decoder.n_embd
        # HF EncoderDecoderModel's name for the same projection.
        self.enc_to_dec_proj: nn.Module = (
            nn.Linear(enc_width, dec_width) if enc_width != dec_width else nn.Identity()
        )
        self.decoder = GPTLMHeadModel(config.decoder)
        self._init_projection()

    def _init_projection(self) -> None:
        init_bert_module(self.enc_to_dec_proj, self.config.encoder.initializer_range)

    def init_weights(self) -> None:
        """(Re)initialise everything in place; the second half of a meta-device build."""
        self.encoder.init_weights()
        self.decoder.init_weights()
        self._init_projection()

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        """(B,S) source ids and mask (1 = real) -> memory (B,S,C) in the decoder's width."""
        hidden, _ = self.encoder(src_ids, attention_mask=src_mask)  # (B,S,H)
        return self.enc_to_dec_proj(hidden)  # (B,S,C)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B,U,V) for every decoder input position."""
        memory = self.encode(src_ids, src_mask)
        logits, _ = self.decoder(
            tgt_in, encoder_hidden_states=memory, encoder_attention_mask=src_mask
        )
        return logits

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: list[KVCache] | None
    ) -> tuple[Tensor, list[KVCache]]:
        """Feed the (N,t) target ids not yet in `cache`; return the last position's logits (N,V) and the cache.

        The first call (cache None) projects `memory` to cross-attention keys/values once per block; the
        cache carries them, so later steps only run the new token's self-attention over the cached keys.
        """
        logits, presents = self.decoder(
            tgt_ids,
            past_key_values=cache,
            encoder_hidden_states=memory,
            encoder_attention_mask=src_mask,
            use_cache=True,
        )
        assert presents is not None  # use_cache=True always returns the cache
        return logits[:, -1], presents  # (N,t,V) -> (N,V)

    def reorder_cache(self, cache: list[KVCache], index: Tensor) -> list[KVCache]:
        return reorder_cache(cache, index)

    def cross_attention(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """(B,U,S) attention over the source for every decoder input position, teacher forced: the last decoder
        block's cross-attention probabilities averaged over heads (rows sum to 1 over real source positions).

        A forward hook recomputes them from the block's own inputs (GPTCrossAttention.attention_probs), so the
        ordinary forward keeps its fused attention kernel and pays nothing for this method's existence.
        """
        seen: list[Tensor] = []

        def keep_probs(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            x, encoder_states = args  # the mask is keyword-only (GPTCrossAttention.forward)
            seen.append(module.attention_probs(x, encoder_states, kwargs["encoder_mask"]))

        block = self.decoder.transformer.h[-1].crossattention
        handle = block.register_forward_hook(keep_probs, with_kwargs=True)
        try:
            self.forward(src_ids, src_mask, tgt_in)
        finally:
            handle.remove()
        return seen[0].mean(dim=1)  # (B, nh, U, S) -> (B, U, S)

    @classmethod
    def from_pretrained(
        cls, bert_ckpt: Path, gpt_ckpt: Path, data_dir: Path | None = None
    ) -> tuple[WarmStartedSeq2Seq, list[str]]:
        """Encoder from a BERT pretraining checkpoint (its `bert.*` weights; the MLM/NSP heads are dropped),
        decoder from a GPT checkpoint; cross-attention (and the projection) initialised fresh.

        Returns the model and the names of the freshly initialised tensors. Raises CheckpointError when a
        checkpoint is of the wrong family, does not speak the tokenizer of its side of `data_dir` (without
        data_dir: when the two checkpoints' tokenizers differ), or any other tensor differs in name or shape.
        """
        bert, gpt = load_pretrained(bert_ckpt, "bert"), load_pretrained(gpt_ckpt, "gpt")
        check_tokenizers(bert, gpt, data_dir)
        config = Seq2SeqConfig(
            encoder=bert.model_config, decoder=replace(gpt.model_config, add_cross_attention=True)
        )
        model = cls(config)
        enc_source = {
            k.removeprefix("bert."): v
            for k, v in bert.model.state_dict().items()
            if k.startswith("bert.")
        }
        copy_matching(model.encoder, enc_source, f"{bert_ckpt} (encoder)", lambda name: False)
        new = copy_matching(
            model.decoder, gpt.model.state_dict(), f"{gpt_ckpt} (decoder)", _is_fresh_decoder_tensor
        )
        new = [f"decoder.{name}" for name in new]
        new += [f"enc_to_dec_proj.{name}" for name, _ in model.enc_to_dec_proj.named_parameters()]
        return model, new
