"""`ShardLoader`: each training rank's share of a split, streamed, in a seeded order, resumable
mid-epoch, also on another number of ranks.

Why not a Ray Data iterator: those cannot resume mid-epoch (ray-project/ray#37633) and exact resume
is a requirement (docs/design.md). This module makes no Ray or torch.distributed call, so it works
the same inside a Ray Train worker and in a plain process; rank and world size are passed in.

The order of an epoch is one global sequence that depends on the data, the seed and the epoch only,
never on the number of ranks (`EpochOrder`): the shards in a seeded order, cut into blocks of
`block_rows` rows (a Parquet row group), consecutive blocks grouped into windows of
`window_blocks`, and the rows of each window in a seeded order. A layout (`Layout`) cuts that
sequence into global batches of world_size * batch_size rows and hands each rank its slice of every
one, so N ranks train on exactly the batches one rank of N times the batch would (DDP's guarantee).
The price: every rank reads every window (its slices are spread over all of them), so a split is
read N times per epoch across the ranks, while each rank holds one window in memory and reads the
next ahead. Resuming on another number of ranks is simple for the same reason: after k batches the
ranks served the sequence's first k * N * batch_size rows, and the rest of the epoch is split over
the new ones (`Layout.rest`); later epochs use the new layout from their start.

Length grouping (`group_by_length`, off by default; Hugging Face Trainer's option of that name): rows
are sorted by length within chunks of `group_by_length * batch_size` positions, so a batch pads to
the length of similar rows (Multi30k, batches of 64, N = 100: 49% real tokens at random, 83% grouped). It is
part of the global sequence, not of `Layout`: a chunk is a stretch of positions fixed by the per-rank
batch size (which a resume must keep) and never by the world size, so one sequence still serves all
world sizes and resuming on another number of ranks needs nothing new. A chunk lies inside one
window (a window's rows are all in memory, nothing more is held) and its edges sit on multiples of
the chunk size, hence on batch edges; in the chunk, the sorted rows are cut into batch-sized slots
served in a seeded order, so batches do not come in ascending length. The order now depends on the
rows' lengths too, still the same on every rank and run. For fixed-length rows (clm blocks) the sort
changes nothing and only the slots' order moves: harmless, and allowed on every task.
"""

from __future__ import annotations

import hashlib
import math
import os
from bisect import bisect_right
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from data_pipeline.collators import (
    ClassificationCollator,
    ClmCollator,
    MlmNspCollator,
    TranslationCollator,
)
from data_pipeline.errors import DataError
from data_pipeline.shards import (
    MANIFEST,
    ROW_GROUP_ROWS,
    read_json_at,
    read_manifest,
    read_rows,
    verify_sha256,
)
from data_pipeline.storage import Location, is_uri, resolve

__all__ = [
    "COLLATORS",
    "ClassificationCollator",
    "ClmCollator",
    "Collator",
    "EpochOrder",
    "Layout",
    "MlmNspCollator",
    "ShardLoader",
    "TranslationCollator",
    "make_loader",
    "read_manifest",
]

WINDOW_BLOCKS = 8  # blocks shuffled together: 8 x 1,024 rows in memory, one more window read ahead
Span = tuple[int, int]  # [start, stop) of positions in an epoch's global sequence


class Collator(Protocol):
    columns: tuple[str, ...]

    def __call__(self, rows: list[dict], generator: torch.Generator) -> dict[str, Tensor]: ...


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers; unlike seed + epoch, nearby inputs give unrelated streams."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- the global order of an epoch
class EpochOrder:
    """An epoch's global sequence of rows; a function of (shard sizes, seed, epoch) only, and of the
    rows' lengths when `group_rows` > 0 (rows sorted by length in chunks of that many positions,
    cut into slots of `batch_rows`; see the module docstring).

    Holds O(shards) integers; a window's rows are located and permuted on demand.
    """

    def __init__(
        self,
        shard_rows: list[int],
        block_rows: int,
        window_blocks: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        group_rows: int = 0,
        batch_rows: int = 1,
    ) -> None:
        self.block_rows, self.window_blocks = block_rows, window_blocks
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.group_rows, self.batch_rows = group_rows, batch_rows
        count = len(shard_rows)
        order = _permutation(count, seed_for(seed, epoch)) if shuffle else range(count)
        # shard indices, in this epoch's order
        self.shards = [s for s in order if shard_rows[s] > 0]
        rows = [shard_rows[s] for s in self.shards]
        self.cum_rows = list(accumulate(rows, initial=0))
        self.cum_blocks = list(accumulate((math.ceil(r / block_rows) for r in rows), initial=0))
        self.num_rows = self.cum_rows[-1]
        self.num_windows = math.ceil(self.cum_blocks[-1] / window_blocks)

    def window_of(self, position: int) -> int:
        k = bisect_right(self.cum_rows, position) - 1
        block = self.cum_blocks[k] + (position - self.cum_rows[k]) // self.block_rows
        return block // self.window_blocks

    def window_span(self, window: int) -> Span:
        first = window * self.window_blocks
        return self._block_start(first), self._block_start(
            min(first + self.window_blocks, self.cum_blocks[-1])
        )

    def window_parts(self, window: int) -> list[tuple[int, int, int]]:
        """(shard index, first row, end row) of each shard stretch the window holds, in order."""
        start, stop = self.window_span(window)
        parts, k = [], bisect_right(self.cum_rows, start) - 1
        while start < stop:
            end = min(stop, self.cum_rows[k + 1])
            parts.append((self.shards[k], start - self.cum_rows[k], end - self.cum_rows[k]))
            start, k = end, k + 1
        return parts

    def window_permutation(self, window: int) -> list[int] | None:
        """The order of the window's rows (None: as stored). The -1 keeps these seeds apart from
        the masks' (seed, epoch, rank, batch)."""
        if not self.shuffle:
            return None
        start, stop = self.window_span(window)
        return _permutation(stop - start, seed_for(self.seed, self.epoch, -1, window))

    def grouped(
        self, window: int, permutation: list[int] | None, lengths: np.ndarray
    ) -> np.ndarray:
        """The window's order with length grouping: `permutation` (None: as stored) re-ordered chunk
        by chunk. `lengths` are the window's rows' lengths as stored."""
        start, stop = self.window_span(window)
        order = np.arange(stop - start) if permutation is None else np.asarray(permutation)
        edges = _cuts(start, stop, self.group_rows)
        for a, b in pairwise(edges):
            chunk = order[a - start : b - start]
            # stable: rows of equal length keep the seeded order among them
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            order[a - start : b - start] = self._deal(chunk, a, b)
        return order

    def _deal(self, ranked: np.ndarray, a: int, b: int) -> np.ndarray:
        """Positions [a, b) get the rows `ranked` (by length) in batch-sized slots whose order is
        seeded: the k-th run of the ranking fills slot order[k]. The -2 keeps these seeds apart
        from the window permutation's and the masks'."""
        edges = _cuts(a, b, self.batch_rows)
        slots = list(pairwise(edges))
        out, taken = np.empty_like(ranked), 0
        for k in _permutation(len(slots), seed_for(self.seed, self.epoch, -2, a)):
            lo, hi = slots[k]
            out[lo - a : hi - a] = ranked[taken : taken + hi - lo]
            taken += hi - lo
        return out

    def _block_start(self, block: int) -> int:
        if block >= self.cum_blocks[-1]:
            return self.num_rows
        k = bisect_right(self.cum_blocks, block) - 1
        return self.cum_rows[k] + (block - self.cum_blocks[k]) * self.block_rows


# ---------------------------------------------------------------- who serves what
@dataclass(frozen=True)
class Layout:
    """How `world_size` ranks split `remaining` (spans of the global sequence, in order), as
    positions of their concatenation R.

    Global batch t is R[t*G, (t+1)*G), G = world_size * batch_size, and rank r serves its slice
    [t*G + r*b, t*G + (r+1)*b). So N ranks of batch b see, step for step, the batches one rank of
    batch N*b sees (DDP's guarantee: the global batch does not depend on N), and what the ranks
    served after k batches each is the prefix R[0, k*G), whatever N was: the rest of the epoch is
    R[k*G:] for any new number of ranks.
    drop_last (training): the last len(R) mod G rows are not served. Otherwise (evaluation) they
    make a last global batch of ceil(L / world_size) rows a rank, topped up by wrapping around to
    the start of R (repeats, fewer than world_size, as torch's DistributedSampler does).
    `start` counts the batches each rank served in this epoch before this layout began.
    """

    remaining: tuple[Span, ...]
    world_size: int
    batch_size: int
    drop_last: bool
    start: int = 0

    @property
    def rows(self) -> int:
        return sum(b - a for a, b in self.remaining)

    @property
    def _full(self) -> int:
        """Whole global batches."""
        return self.rows // (self.world_size * self.batch_size)

    @property
    def batches(self) -> int:
        tail = self.rows - self._full * self.world_size * self.batch_size
        return self._full + (1 if tail and not self.drop_last else 0)

    def rank_spans(self, rank: int, served: int) -> list[Span]:
        """Global positions rank `rank` serves after its first `served` batches of this layout."""
        width, b = self.world_size * self.batch_size, self.batch_size
        spans: list[Span] = []
        for t in range(served, self._full):
            spans += self._positions(t * width + rank * b, t * width + (rank + 1) * b)
        if self.batches > self._full and served <= self._full:  # the evaluation's last batch
            first = self._full * width
            share = math.ceil((self.rows - first) / self.world_size)
            for p in range(first + rank * share, first + (rank + 1) * share):
                spans += self._positions(p % self.rows, p % self.rows + 1)  # wraps to R's start
        return list(_merge(spans))

    def rest(self, served: int, world_size: int) -> Layout:
        """The rest of the epoch after every rank served `served` batches, split over `world_size`
        ranks: R after its first served * G rows (see the class docstring)."""
        consumed = min(served * self.world_size * self.batch_size, self.rows)
        left = self._positions(consumed, self.rows)
        return Layout(
            _merge(left), world_size, self.batch_size, self.drop_last, self.start + served
        )

    def _positions(self, begin: int, end: int) -> list[Span]:
        """Indices [begin, end) of R as spans of global positions."""
        out, offset = [], 0
        for a, b in self.remaining:
            lo, hi = max(begin, offset), min(end, offset + b - a)
            if lo < hi:
                out.append((a + lo - offset, a + hi - offset))
            offset += b - a
        return out


def _cuts(start: int, stop: int, step: int) -> list[int]:
    """start, the multiples of `step` strictly inside (start, stop), stop: chunk and slot edges in
    global positions, so they line up with batch edges whatever the window's edges."""
    return [start, *range((start // step + 1) * step, stop, step), stop]


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    out: list[Span] = []
    for a, b in spans:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


# ---------------------------------------------------------------- the loader
class ShardLoader:
    """Iterate one epoch of batches per `for` loop; `len()` is the batch count of the current epoch,
    the same on every rank.

    drop_last=True: whole batches only (training). drop_last=False: every row is served; the last
    rank is topped up by repeating rows from the start of the sequence and the last batch may be
    short. Repeats carry the same sample_id, so an evaluation can count each sample once.
    Memory: the manifest, and at most two windows of `window_blocks * block_rows` rows as Arrow
    columns (the one being served, the next read ahead in a thread); only a batch becomes Python.
    group_by_length=N > 0: rows sorted by length in chunks of N batches (module docstring); a chunk
    never spans windows, so at most a window's rows are sorted together.
    """

    def __init__(
        self,
        task_dir: str | os.PathLike[str],
        split: str,
        batch_size: int,
        collate: Collator,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        block_rows: int = ROW_GROUP_ROWS,
        window_blocks: int = WINDOW_BLOCKS,
        group_by_length: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size; got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if block_rows < 1 or window_blocks < 1:
            raise ValueError(
                f"need block_rows, window_blocks >= 1; got {block_rows}, {window_blocks}"
            )
        if group_by_length < 0:
            raise ValueError(f"need group_by_length >= 0 (0: off); got {group_by_length}")
        self.split, self.batch_size, self.collate = split, batch_size, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.block_rows, self.window_blocks = block_rows, window_blocks
        self.group_by_length = group_by_length
        self.columns = list(collate.columns)
        self._fs, self._root = resolve(task_dir)
        # errors name files as the user wrote the location (a URI keeps its scheme)
        self._shown = os.fspath(task_dir).rstrip("/") if is_uri(task_dir) else self._root
        self._manifest_path = f"{self._root}/{MANIFEST}"
        shown_manifest = f"{self._shown}/{MANIFEST}"
        self._shards = _split_shards(
            read_json_at(self._fs, self._manifest_path, shown_manifest), split, shown_manifest
        )
        self.num_rows = sum(int(s["rows"]) for s in self._shards)
        self.data = hashlib.sha256("".join(s["sha256"] for s in self._shards).encode()).hexdigest()
        self._verified: set[int] = set()  # shards whose sha256 this process checked
        self.stats = {"windows_read": 0, "rows_read": 0, "peak_rows_held": 0}
        self.epoch, self._batch = 0, 0
        self._layout = self._full_layout(world_size)
        if self._layout.batches == 0:
            raise DataError(
                f"{self._shown}/{split}: {self.num_rows} rows make no batch of "
                f"{batch_size} on each of {world_size} ranks; lower the batch size "
                "or add data"
            )
        self._order_cache: EpochOrder | None = None

    def __len__(self) -> int:
        return self._layout.start + self._layout.batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self._batch >= len(
            self
        ):  # the last epoch was served in full but the loop never asked for more
            self.set_epoch(self.epoch + 1)
        order, served = self.order(self.epoch), self._batch - self._layout.start
        rows = self._rank_batches(order, self._layout.rank_spans(self.rank, served))
        try:
            for batch_rows in rows:
                generator = torch.Generator().manual_seed(
                    seed_for(self.seed, self.epoch, self.rank, self._batch)
                )
                batch = self.collate(batch_rows, generator)
                self._batch += (
                    1  # counted as served once handed out: a checkpoint taken now resumes after it
                )
                yield batch
        finally:
            rows.close()  # stops the read-ahead thread when a consumer leaves early
        self.set_epoch(self.epoch + 1)

    def order(self, epoch: int) -> EpochOrder:
        """The global sequence of `epoch` (the same on every rank and for every world size)."""
        if self._order_cache is None or self._order_cache.epoch != epoch:
            self._order_cache = EpochOrder(
                [int(s["rows"]) for s in self._shards],
                self.block_rows,
                self.window_blocks,
                self.seed,
                epoch,
                self.shuffle,
                group_rows=self.group_by_length * self.batch_size,
                batch_rows=self.batch_size,
            )
        return self._order_cache

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (for loops that count epochs themselves)."""
        self.epoch, self._batch = epoch, 0
        self._layout = self._full_layout(self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; identical on every rank, so any rank's copy resumes all
        of them, on this number of ranks or another (load_state_dict)."""
        return {
            "epoch": self.epoch,
            "batches_served": self._batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_rows": self.num_rows,
            "data": self.data,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "block_rows": self.block_rows,
            "window_blocks": self.window_blocks,
            "group_by_length": self.group_by_length,
            "layout": {
                "remaining": [list(s) for s in self._layout.remaining],
                "start": self._layout.start,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly. The data, seed, batch size and order settings must be the ones saved;
        the world size may differ: the rest of the epoch is then split over this loader's ranks."""
        state = {"group_by_length": 0, **state}  # saved before grouping existed: it was off
        mine = self.state_dict()
        fixed = [k for k in mine if k not in ("epoch", "batches_served", "world_size", "layout")]
        wrong = {k: (state.get(k), mine[k]) for k in fixed if state.get(k) != mine[k]}
        if "layout" not in state:
            raise ValueError(
                "loader state has no 'layout': it was saved by an older Kiln loader, "
                "whose order this one does not reproduce"
            )
        if wrong:
            raise ValueError(f"loader state does not match this loader (saved, now): {wrong}")
        saved = Layout(
            tuple((int(a), int(b)) for a, b in state["layout"]["remaining"]),
            int(state["world_size"]),
            self.batch_size,
            self.drop_last,
            int(state["layout"]["start"]),
        )
        served = int(state["batches_served"]) - saved.start
        if not 0 <= served <= saved.batches:
            raise ValueError(
                f"batches_served {state['batches_served']} outside "
                f"{saved.start}..{saved.start + saved.batches}"
            )
        self.epoch, self._batch = int(state["epoch"]), int(state["batches_served"])
        if saved.world_size == self.world_size:
            self._layout = saved
        elif served == saved.batches:  # the epoch was over: the next starts in this layout
            self.set_epoch(self.epoch + 1)
        else:
            self._layout = saved.rest(served, self.world_size)

    def _full_layout(self, world_size: int) -> Layout:
        return Layout(_merge([(0, self.num_rows)]), world_size, self.batch_size, self.drop_last)

    # ------------------------------------------------------------ reading
    def _rank_batches(self, order: EpochOrder, spans: list[Span]) -> Iterator[list[dict]]:
        """This rank's rows, `batch_size` at a time (the last batch may be short)."""
        pending: list[pa.Table] = []
        count = 0
        for piece in self._window_slices(order, spans):
            while piece.num_rows:
                take = min(self.batch_size - count, piece.num_rows)
                pending.append(piece.slice(0, take))
                count, piece = count + take, piece.slice(take)
                if count == self.batch_size:
                    yield [row for t in pending for row in t.to_pylist()]
                    pending, count = [], 0
        if pending:
            yield [row for t in pending for row in t.to_pylist()]

    def _window_slices(self, order: EpochOrder, spans: list[Span]) -> Iterator[pa.Table]:
        """Slices of windows covering `spans`, in order; the next window is read in a thread."""
        pieces = _window_pieces(order, spans)
        following = _next_different([w for w, _, _ in pieces])
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-loader")
        current: tuple[int, pa.Table] | None = None
        ahead: tuple[int, Future[pa.Table]] | None = None
        try:
            for i, (window, a, b) in enumerate(pieces):
                if current is None or current[0] != window:
                    ready = ahead is not None and ahead[0] == window
                    table = ahead[1].result() if ready else self._read_window(order, window)
                    current = (window, table)
                    ahead = None
                    if following[i] is not None:
                        ahead = (following[i], pool.submit(self._read_window, order, following[i]))
                    self._note_held(order, current[1].num_rows, ahead)
                yield current[1].slice(a, b - a)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_window(self, order: EpochOrder, window: int) -> pa.Table:
        tables = [self._read_shard(shard, a, b) for shard, a, b in order.window_parts(window)]
        table = pa.concat_tables(tables)
        permutation: list[int] | np.ndarray | None = order.window_permutation(window)
        if order.group_rows:
            permutation = order.grouped(window, permutation, _row_lengths(table))
        self.stats["windows_read"] += 1
        self.stats["rows_read"] += table.num_rows
        return table if permutation is None else table.take(pa.array(permutation, pa.int64()))

    def _read_shard(self, index: int, start: int, stop: int) -> pa.Table:
        shard = self._shards[index]
        path, shown = f"{self._root}/{shard['file']}", f"{self._shown}/{shard['file']}"
        if index not in self._verified:  # once per process: a full extra read of the shard
            verify_sha256(self._fs, path, shard["sha256"], f"{self._shown}/{MANIFEST}", shown)
            self._verified.add(index)
        return read_rows(self._fs, path, start, stop, self.columns, shown)

    def _note_held(self, order: EpochOrder, rows: int, ahead: tuple[int, Any] | None) -> None:
        if ahead is not None:
            a, b = order.window_span(ahead[0])
            rows += b - a
        self.stats["peak_rows_held"] = max(self.stats["peak_rows_held"], rows)


def _row_lengths(table: pa.Table) -> np.ndarray:
    """Each row's tokens: the sum of its list columns' lengths (src + tgt for translation), the
    collators padding each of them to the batch's longest."""
    total = np.zeros(table.num_rows, np.int64)
    for column in table.columns:
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            total += pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    return total


def _split_shards(manifest: dict, split: str, where: str) -> list[dict]:
    if split not in manifest.get("splits", {}):
        raise DataError(f"{where}: no split {split!r}; it has {sorted(manifest.get('splits', {}))}")
    return list(manifest["splits"][split]["shards"])


def _window_pieces(order: EpochOrder, spans: list[Span]) -> list[tuple[int, int, int]]:
    """(window, first, end) offsets within each window, covering `spans` in order."""
    pieces = []
    for position, stop in spans:
        while position < stop:
            window = order.window_of(position)
            first, last = order.window_span(window)
            end = min(stop, last)
            pieces.append((window, position - first, end - first))
            position = end
    return pieces


def _next_different(windows: list[int]) -> list[int | None]:
    """For each piece, the first window after it that differs from its own (what to read ahead)."""
    out: list[int | None] = [None] * len(windows)
    for i in range(len(windows) - 2, -1, -1):
        out[i] = windows[i + 1] if windows[i + 1] != windows[i] else out[i + 1]
    return out


def _mlm_nsp(top: dict) -> Collator:
    special = top["special_tokens"]
    return MlmNspCollator(
        pad_id=special["[PAD]"],
        mask_id=special["[MASK]"],
        vocab_size=top["vocab_size"],
        special_ids=special.values(),
    )


def _translation(top: dict) -> Collator:
    framing = top.get("translation_specials")  # present when targets have their own tokenizer
    if framing is None:
        return TranslationCollator(top["special_tokens"]["[PAD]"])
    return TranslationCollator(framing["source"]["pad"], framing["target"]["pad"])


COLLATORS: dict[
    str, Callable[[dict], Collator]
] = {  # task -> collator, from the top-level manifest
    "mlm_nsp": _mlm_nsp,
    "clm": lambda top: ClmCollator(top["special_tokens"]["[PAD]"]),
    "translation": _translation,
    "classification": lambda top: ClassificationCollator(top["special_tokens"]["[PAD]"]),
}


def make_loader(
    data_dir: str | os.PathLike[str],
    task: str,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    document_attention: bool = False,
    group_by_length: int = 0,
) -> ShardLoader:
    """A loader for `task`/`split` of a prepared data directory, with the task's collator. document_attention
    (clm only): packed documents do not attend to each other (ClmCollator). group_by_length: batches of
    rows of similar length (ShardLoader; 0 = off)."""
    top, root = read_manifest(data_dir), Location.of(data_dir)  # a local path or a URI
    if task not in top.get("tasks", {}):
        raise DataError(
            f"{root / 'manifest.json'}: no task {task!r}; it has {sorted(top.get('tasks', {}))}"
        )
    collate = COLLATORS[task](top)
    if document_attention:
        if task != "clm":
            raise DataError(f"document_attention applies to the clm task, not {task!r}")
        collate = ClmCollator(top["special_tokens"]["[PAD]"], bos_id=top["special_tokens"]["[BOS]"])
    return ShardLoader(
        (root / task).text,
        split,
        batch_size,
        collate,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        group_by_length=group_by_length,
    )
