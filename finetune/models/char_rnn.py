"""A character-level recurrent language model (Karpathy's char-rnn, 2015): the baseline GPT is compared with.

Read top to bottom: config → character vocabulary → model → sampling. The model returns logits and the
recurrent state only; the loss and the training loop live in `finetune.lm_baselines`, sampling below the model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from data_pipeline.configlib import check_fields
from pretrain.checkpoint import CheckpointError

# One per name of CharRNNConfig.cell. RNN: Elman's, tanh.
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
UNK = "<unk>"
VOCAB_FORMAT = "kiln-char-vocab"

# LSTM: (h, c) each (layers, B, hidden); GRU / RNN: h (layers, B, hidden).
State = Tensor | tuple[Tensor, Tensor]


@dataclass
class CharRNNConfig:
    """Flat config of the character LM. As with GPTConfig, `preset` is applied by
    `configlib.from_preset` and by the config loader (keys written explicitly win over it), not by the
    constructor."""

    # discriminator for config loading and checkpoints (the cell may still be a GRU)
    arch: Literal["char_lstm"] = "char_lstm"
    preset: str | None = None
    # "small" is sized to train for minutes on a laptop CPU; "base" is char-rnn's tiny-shakespeare setup
    # (Karpathy 2015, "The Unreasonable Effectiveness of RNNs": 2-layer LSTM, 512 hidden, dropout 0.5).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(embed=16, hidden=64, layers=1, dropout=0.0),
        "small": dict(embed=64, hidden=256, layers=2, dropout=0.1),
        "base": dict(embed=128, hidden=512, layers=2, dropout=0.5),
    }
    vocab_size: int = 128  # set from the CharVocab of the training text
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.1  # between stacked layers and before the output layer

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices, preset name
        for key in ("vocab_size", "embed", "hidden", "layers"):
            if getattr(self, key) <= 0:
                raise ValueError(f"CharRNNConfig.{key} must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CharRNNConfig.dropout must be in [0, 1), got {self.dropout}")


class CharVocab:
    """Characters ↔ ids. Id 0 is `<unk>` (characters not seen in training); the rest sorted by code point."""

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharVocab: chars must be distinct single characters")
        self.chars = [UNK, *chars]
        self._ids = {c: i for i, c in enumerate(self.chars) if i > 0}

    @classmethod
    def from_text(cls, text: str, min_count: int = 1) -> CharVocab:
        counts = Counter(text)
        return cls(sorted(c for c, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def unk_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text; `<unk>` becomes U+FFFD (the replacement character)."""
        return "".join("\ufffd" if i == 0 else self.chars[i] for i in ids)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        doc = {"format": VOCAB_FORMAT, "unk": UNK, "chars": self.chars[1:]}
        path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: character vocabulary not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a JSON character vocabulary ({e})") from None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != VOCAB_FORMAT
            or not isinstance(doc.get("chars"), list)
        ):
            raise CheckpointError(
                f"{path}: not a {VOCAB_FORMAT} file (needs 'format' and a 'chars' list)"
            )
        try:
            return cls(doc["chars"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None


class CharRNNLM(nn.Module):
    """Embedding → stacked LSTM / GRU / Elman RNN → dropout → linear head over the characters."""

    def __init__(self, config: CharRNNConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed)
        rnn_dropout = (
            config.dropout if config.layers > 1 else 0.0
        )  # torch warns on dropout with one layer
        self.rnn = CELLS[config.cell](
            config.embed,
            config.hidden,
            num_layers=config.layers,
            dropout=rnn_dropout,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) → logits (B, T, V) and the state after the last step (zero state when None)."""
        x = self.embed(ids)  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(self.drop(out)), state


def detach_state(state: State) -> State:
    """The state cut from the graph (truncated backpropagation through time between chunks)."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()  # type: ignore[return-value]


@torch.no_grad()
def sample_text(
    model: CharRNNLM,
    vocab: CharVocab,
    prompt: str,
    max_new_chars: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The prompt continued by `max_new_chars` sampled characters (temperature, then top-k; temperature 0 is
    greedy). The prompt must not be empty: it is the context the first sample is drawn from."""
    if not prompt:
        raise ValueError("sample_text: the prompt must hold at least one character")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(
            f"sample_text: need temperature >= 0 and top_k >= 1, got {temperature}, {top_k}"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([vocab.encode(prompt)], device=device)  # (1, P)
    logits, state = model(ids)
    out: list[int] = []
    for _ in range(max_new_chars):
        last = logits[0, -1].float()  # (V,)
        last[vocab.unk_id] = -float("inf")  # <unk> is not a character to print
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            last = last / temperature
            if top_k is not None and top_k < last.numel():
                kth = torch.topk(last, top_k).values[-1]
                last = last.masked_fill(last < kth, -float("inf"))
            nxt = int(torch.multinomial(torch.softmax(last, dim=-1).cpu(), 1, generator=generator))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train(was_training)
    return prompt + vocab.decode(out)
