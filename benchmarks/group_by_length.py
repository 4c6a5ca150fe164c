"""Length-grouped training batches (trainer.group_by_length=N) against random ones, same recipe, on this machine.

    .venv/bin/python benchmarks/group_by_length.py [--config configs/translation-scratch.yaml]
        [--data runs/multi30k] [--groups 50] [--steps 60] [--skip 10] [--rounds 2]

Runs `kiln finetune --config <recipe>` twice per round, alternating: with trainer.group_by_length=0
(random batches) and with trainer.group_by_length=N (rows sorted by length in chunks of N batches, so a
batch pads less; data_pipeline/loader.py), everything else the recipe's own: model, batch, workers, seed.
Throughput is the median of the tokens/s that the progress lines report after the first --skip logged
steps (start-up and warm-up excluded); Kiln counts real, non-pad tokens
(finetune/module.py count_tokens), so padding no longer computed shows up as a higher rate. Seconds per
step come from the progress lines' elapsed time over the same steps. The ratio grouped / random says what
the option is worth for the recipe. Writes benchmarks/results/group_by_length.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kilnrun import (  # noqa: E402
    LOG_EVERY,
    Timing,
    loadavg,
    machine,
    measure,
    prepared,
    timing_overrides,
    torch_version,
)

PREPARE = "kiln data prepare --config configs/data-multi30k.yaml --out {data}"


@dataclass(frozen=True)
class Run:
    """One timed run: which batches, which round, and its timing."""

    groups: int  # trainer.group_by_length: 0 = random batches
    round: int
    timing: Timing

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.timing.rates)


def order(r: int, groups: int) -> tuple[int, int]:
    """The two runs of round `r`, as group_by_length values: random first in even rounds, grouped first
    in odd ones (ABBA), so load that drifts over the benchmark (other jobs, a warming CPU) falls on both."""
    return (0, groups) if r % 2 == 0 else (groups, 0)


def run(args: argparse.Namespace, groups: int, r: int) -> Run:
    # group_by_length=0 is passed too: a recipe that turns grouping on itself still gets a random baseline.
    overrides = [*timing_overrides(args.data, args.steps), f"trainer.group_by_length={groups}"]
    timing = measure("finetune", args.config, overrides, args.skip)
    if not timing.rates or timing.s_per_step is None:
        sys.exit(
            f"group_by_length={groups}: no progress line with tokens/s after step {args.skip} in the "
            f"output of `kiln finetune --config {args.config}`"
        )
    return Run(groups, r, timing)


def _label(groups: int) -> str:
    return (
        "random (`group_by_length=0`)" if groups == 0 else f"grouped (`group_by_length={groups}`)"
    )


def _row(runs: list[Run], groups: int) -> tuple[str, float, float]:
    mine = sorted((x for x in runs if x.groups == groups), key=lambda x: x.round)
    rates = [x.tokens_per_s for x in mine]
    steps = [x.timing.s_per_step for x in mine]
    rate, s = statistics.median(rates), statistics.median(steps)
    cells = [
        _label(groups),
        ", ".join(f"{x:,.0f}" for x in rates),
        f"{rate:,.0f}",
        ", ".join(f"{x:.2f}" for x in steps),
        f"{s:.2f}",
    ]
    return "| " + " | ".join(cells) + " |", rate, s


def report(
    args: argparse.Namespace,
    runs: list[Run],
    command: str,
    when: dt.datetime,
    loads: tuple[str, str],
) -> list[str]:
    """The results file's lines: the two kinds of batches side by side, then every run with its load."""
    random_row, random_rate, random_s = _row(runs, 0)
    grouped_row, grouped_rate, grouped_s = _row(runs, args.groups)
    lines = [
        "# Length-grouped batches vs random batches",
        "",
        f"- {when:%Y-%m-%d %H:%M}, `{command}`",
        f"- `finetune --config {args.config} data_dir={args.data}`, the recipe's model, batch and "
        f"workers; {args.steps} steps per run, a progress line every {LOG_EVERY}; tokens/s (real, non-pad "
        f"tokens) = median over logged steps after step {args.skip}, s/step = elapsed over those "
        f"steps / steps (elapsed in whole seconds); median over {args.rounds} "
        "rounds, random and grouped alternating (ABBA)",
        f"- {machine()}, torch {torch_version()}; load average at start / end: {loads[0]} / {loads[1]}",
        "",
        "| batches | tokens/s per round | median | s/step per round | median |",
        "|---|---|---|---|---|",
        random_row,
        grouped_row,
        "",
        f"grouped / random: tokens/s **{grouped_rate / random_rate:.2f}**, "
        f"s/step {grouped_s / random_s:.2f} (below 1: faster steps)",
        "",
        "| round | batches | tokens/s | s/step | load at start | load at end |",
        "|---|---|---|---|---|---|",
    ]
    for x in runs:
        kind = "random" if x.groups == 0 else "grouped"
        lines.append(
            f"| {x.round} | {kind} | {x.tokens_per_s:,.0f} | {x.timing.s_per_step:.2f} | "
            f"{x.timing.load_start} | {x.timing.load_end} |"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default="configs/translation-scratch.yaml", help="the recipe")
    parser.add_argument(
        "--data",
        default="runs/multi30k",
        help="prepared data, passed as data_dir",
    )
    parser.add_argument(
        "--groups", type=int, default=50, help="N of the grouped runs: trainer.group_by_length=N"
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--skip", type=int, default=10, help="steps <= this are warm-up, left out")
    parser.add_argument("--rounds", type=int, default=2, help="each a random and a grouped run")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/results/group_by_length.md",
        help="the results file",
    )
    args = parser.parse_args(argv)
    if args.groups < 1:
        parser.error(f"--groups must be >= 1 (0 is the random baseline); got {args.groups}")
    if args.steps <= args.skip:
        # The last step always prints a progress line, so one step past --skip is measurable (if barely).
        parser.error(f"--steps must exceed --skip; got --steps {args.steps} --skip {args.skip}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not prepared(args.data):
        print(
            f"{ROOT / args.data / 'manifest.json'} is missing: prepare the data first, "
            f"`{PREPARE.format(data=args.data)}`",
            file=sys.stderr,
        )
        return 2
    when, start_load, runs = dt.datetime.now(), loadavg(), []
    for r in range(args.rounds):
        for groups in order(r, args.groups):
            runs.append(run(args, groups, r))
            t = runs[-1].timing
            print(
                f"round {r} group_by_length={groups}: {runs[-1].tokens_per_s:,.0f} tokens/s, "
                f"{t.s_per_step:.2f} s/step, load {t.load_start} -> {t.load_end}",
                flush=True,
            )
    command = " ".join(
        [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else [Path(__file__).name, *argv]
    )
    lines = report(args, runs, command, when, (start_load, loadavg()))
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
