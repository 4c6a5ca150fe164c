"""Loss curves and the loss-fell check read Lightning's CSV metrics (rows with gaps)."""

from __future__ import annotations

from pathlib import Path

from cluster.report import loss_drop, plot_curves, read_series


def write_csv(path: Path, losses: list[float]) -> Path:
    rows = ["epoch,step,train/loss,val/loss"]
    rows += [f"0,{i},{v}," for i, v in enumerate(losses)]
    rows.append(f"0,{len(losses)},,{losses[-1]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_series_skip_gaps(tmp_path: Path) -> None:
    series = read_series(write_csv(tmp_path / "m.csv", [3.0, 2.0, 1.0]))
    assert series["train/loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert series["val/loss"] == [(3, 1.0)]


def test_loss_drop_windows_never_overlap(tmp_path: Path) -> None:
    assert loss_drop(write_csv(tmp_path / "a.csv", [5.0, 4.0])) == (5.0, 4.0)
    first, last = loss_drop(write_csv(tmp_path / "b.csv", [float(10 - i) for i in range(10)]), window=5)
    assert (first, last) == (8.0, 3.0)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    png = plot_curves(write_csv(tmp_path / "m.csv", [3.0, 2.0, 1.0]), tmp_path / "c.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
