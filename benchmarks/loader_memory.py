"""Peak memory of one training rank's loader at 1x and 10x the corpus: streaming vs the whole split.

    .venv/bin/python benchmarks/loader_memory.py [--rows 20000] [--seq-len 128] [--world 2]
                                                 [--batch 16]

The corpus is synthetic `clm` shards (rows of seq_len + 1 random int32 token ids, 4,096 rows a
shard, written by Kiln's shard writer: 1,024-row row groups); 10x is ten copies of the 1x shards
(hard links, so the disk holds them once), listed in one manifest, as issue 14 asks. Each
measurement runs in a fresh Python process, rank 0 of --world:
  streaming   `ShardLoader` serves its whole share of one epoch through the clm collator
  whole split what the loader did before streaming: `read_split` of the split's columns, then every
              column as Python lists (no batch is served; this is its cost before the first batch)
Reported: the process's RSS after imports, its peak RSS (ru_maxrss) and the difference, which is
what the loader costs. Writes benchmarks/results/loader_memory.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_ROWS = 4096


def make_corpus(root: Path, rows: int, seq_len: int, copies: int) -> Path:
    """A data dir with a clm task of `rows` rows, its shards listed `copies` times."""
    import numpy as np
    import pyarrow as pa

    from data_pipeline.examples import BUILDERS
    from data_pipeline.shards import write_json, write_task

    builder = BUILDERS["clm"]
    base = root / "base"
    if not base.exists():
        rng = np.random.default_rng(0)
        tokens = rng.integers(7, 50_000, size=(rows, seq_len + 1), dtype=np.int32)
        offsets = np.arange(0, tokens.size + 1, seq_len + 1, dtype=np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens.ravel()))
        table = pa.table({"sample_id": pa.array(np.arange(rows), pa.int64()), "input_ids": ids})
        write_task(
            base / "clm", "clm", builder.schema, {"train": table}, SHARD_ROWS, builder.token_columns
        )
    data = root / f"x{copies}"
    manifest = json.loads((base / "clm" / "manifest.json").read_text())
    shards = []
    (data / "clm" / "train").mkdir(parents=True)
    for copy in range(copies):
        for shard in manifest["splits"]["train"]["shards"]:
            name = f"train/c{copy:02d}-{Path(shard['file']).name}"
            os.link(base / "clm" / shard["file"], data / "clm" / name)
            shards.append({**shard, "file": name})
    manifest["splits"]["train"] = {
        "shards": shards,
        "rows": rows * copies,
        "tokens": sum(s["tokens"] for s in shards),
    }
    write_json(data / "clm" / "manifest.json", manifest)
    write_json(
        data / "manifest.json",
        {"tasks": {"clm": {}}, "special_tokens": {"[PAD]": 0}, "vocab_size": 50_000},
    )
    return data


def measure(mode: str, data: Path, world: int, batch: int) -> dict:
    """In this (fresh) process: RSS after imports, peak RSS after the loader's work."""
    import torch  # noqa: F401  (imported before the baseline, as in a training worker)

    from data_pipeline.loader import make_loader
    from data_pipeline.shards import read_split

    base = _rss_kib()
    start = time.perf_counter()
    if mode == "streaming":
        loader = make_loader(data, "clm", "train", batch, rank=0, world_size=world, seed=0)
        batches = sum(1 for _ in loader)
        extra = {
            "batches": batches,
            "peak_rows_held": loader.stats["peak_rows_held"],
            "rows_read": loader.stats["rows_read"],
        }
    else:
        table = read_split(data / "clm", "train", columns=["sample_id", "input_ids"])
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        extra = {"rows": len(columns["sample_id"])}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "base_mib": base / 1024,
        "peak_mib": peak / 1024,
        "loader_mib": (peak - base) / 1024,
        "seconds": time.perf_counter() - start,
        **extra,
    }


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_child(mode: str, data: Path, world: int, batch: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        str(data),
        "--world",
        str(world),
        "--batch",
        str(batch),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DATA"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.world, args.batch)))
        return
    rows, args.load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for copies in (1, 10):
            data = make_corpus(Path(tmp), args.rows, args.seq_len, copies)
            for mode in ("streaming", "whole split"):
                result = run_child(mode, data, args.world, args.batch)
                rows.append((copies, mode, result))
                print(copies, mode, result, flush=True)
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[tuple[int, str, dict]]) -> None:
    load = ", ".join(f"{x:.2f}" for x in args.load_before)
    lines = [
        f"# Loader memory per rank at 1x and 10x the corpus ({dt.date.today()})",
        "",
        f"{args.rows:,} rows x {args.seq_len + 1} int32 tokens at 1x; rank 0 of {args.world}; "
        f"batch {args.batch}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) before: {load}; after: "
        f"{os.getloadavg()[0]:.2f}.",
        "",
        "| corpus | loader | RSS after imports (MiB) | peak RSS (MiB) | loader's share (MiB) "
        "| s | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = ("base_mib", "peak_mib", "loader_mib", "seconds")
    for copies, mode, r in rows:
        detail = {k: v for k, v in r.items() if k not in shown}
        lines.append(
            f"| {copies}x | {mode} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['loader_mib']:.0f} | {r['seconds']:.1f} | {detail} |"
        )
    out = ROOT / "benchmarks" / "results" / "loader_memory.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
