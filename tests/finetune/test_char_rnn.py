"""The character-level RNN LM: config presets, the character vocabulary, state carrying, learning, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.configlib import from_preset
from finetune.models.char_rnn import CharRNNConfig, CharRNNLM, CharVocab, detach_state, sample_text
from pretrain.checkpoint import CheckpointError

TEXT = "to be or not to be, that is the question.\n"


def train(model: CharRNNLM, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """Full-sequence teacher forcing on one text; returns the loss per step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits, _ = model(ids[None, :-1])  # (1, T, V)
        loss = F.cross_entropy(logits[0], ids[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_presets_and_validation() -> None:
    cfg = from_preset(CharRNNConfig, "tiny", hidden=32, vocab_size=40)
    assert (cfg.preset, cfg.embed, cfg.hidden, cfg.layers, cfg.vocab_size) == (
        "tiny",
        16,
        32,
        1,
        40,
    )
    assert from_preset(CharRNNConfig, "small").hidden == 256
    with pytest.raises(ValueError, match="cell"):
        CharRNNConfig(cell="transformer")
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset(CharRNNConfig, "huge")
    with pytest.raises(ValueError, match="arch"):
        CharRNNConfig(arch="gpt")


def test_vocab_encodes_decodes_and_round_trips(tmp_path: Path) -> None:
    vocab = CharVocab.from_text(TEXT)
    assert len(vocab) == len(set(TEXT)) + 1 and vocab.chars[0] == "<unk>"
    assert vocab.decode(vocab.encode(TEXT)) == TEXT
    assert vocab.encode("tZ") == [vocab.encode("t")[0], vocab.unk_id]  # Z was never seen
    assert vocab.decode([vocab.unk_id]) == "\ufffd"
    again = CharVocab.load(vocab.save(tmp_path / "vocab.json"))
    assert again.chars == vocab.chars and again.encode("Zebra, \n") == vocab.encode("Zebra, \n")
    (tmp_path / "bad.json").write_text(
        '{"format": "kiln-char-vocab", "chars": ["ab"]}', encoding="utf-8"
    )
    with pytest.raises(CheckpointError, match="bad.json"):
        CharVocab.load(tmp_path / "bad.json")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_shapes_and_carried_state_equal_one_pass(cell: str) -> None:
    torch.manual_seed(0)
    cfg = from_preset(CharRNNConfig, "tiny", vocab_size=11, cell=cell, layers=2)
    model = CharRNNLM(cfg).eval()
    ids = torch.randint(0, 11, (3, 10))
    logits, state = model(ids)
    assert logits.shape == (3, 10, 11)
    h = state[0] if cell == "lstm" else state
    assert h.shape == (2, 3, cfg.hidden)
    first, mid = model(ids[:, :4])
    second, _ = model(ids[:, 4:], detach_state(mid))
    torch.testing.assert_close(torch.cat([first, second], dim=1), logits)


def test_loss_falls_on_a_tiny_text() -> None:
    torch.manual_seed(0)
    vocab = CharVocab.from_text(TEXT * 3)
    model = CharRNNLM(from_preset(CharRNNConfig, "tiny", vocab_size=len(vocab)))
    losses = train(model, torch.tensor(vocab.encode(TEXT * 3)), steps=60)
    assert losses[0] > 2.5  # about ln(18) for a fresh model
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def test_overfits_a_short_string_and_reproduces_it_greedily() -> None:
    torch.manual_seed(0)
    text = "hello kiln\n" * 4
    vocab = CharVocab.from_text(text)
    model = CharRNNLM(from_preset(CharRNNConfig, "tiny", vocab_size=len(vocab), hidden=64))
    losses = train(model, torch.tensor(vocab.encode(text)), steps=150, lr=2e-2)
    assert losses[-1] < 0.05
    assert sample_text(model, vocab, "\nh", 21, temperature=0.0) == "\nhello kiln\nhello kiln\n"


def test_sampling_is_reproducible_with_a_seed() -> None:
    torch.manual_seed(0)
    vocab = CharVocab.from_text(TEXT)
    model = CharRNNLM(from_preset(CharRNNConfig, "tiny", vocab_size=len(vocab)))

    def draw(seed: int, **kw: object) -> str:
        return sample_text(
            model, vocab, "to", 60, generator=torch.Generator().manual_seed(seed), **kw
        )  # type: ignore[arg-type]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert (
        draw(1, top_k=1) == draw(2, top_k=1) == sample_text(model, vocab, "to", 60, temperature=0.0)
    )
    assert all(c in vocab.chars for c in draw(3, top_k=3, temperature=1.5))  # never <unk>'s U+FFFD
    assert model.training  # sampling restores the mode it found
    with pytest.raises(ValueError, match="prompt"):
        sample_text(model, vocab, "", 5)
