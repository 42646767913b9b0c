"""A fleet's rows of a look-back window grouped by instance, and NumPy reductions per instance.

Detection reduces every rule's terms (a quantity's latest value, mean, max, min, least-squares
sums) over each instance's rows of a window ending at the evaluation time. This does it for every
instance at once, with no loop over instances, on a *grid*: one column per instance, its samples
in time order down the column and right-aligned, so every instance's latest sample is in the last
row (an instance with fewer samples has padding cells above its first, inside no window). NumPy
reduces a grid along axis 0 over all instances at once, several times faster than `reduceat` over
10,000 short segments.

How the frame's rows become the grid depends on their layout, checked, never assumed:

- **Rounds** (time order, every round the same instances in the same order, as step-aligned
  samples are): the column reshaped to (rounds, instances) is the grid, with no copy.
- **Segments** (each instance's rows together and in time order, as `Store.recent_scrapes` returns
  them): each column is gathered into the grid with one index computed once.
- Anything else is put in (instance, time) order by one explicit stable sort first, then gathered.

A shorter window is a tail of every column: rows where every instance is inside are reduced as
they are, and only the few rows where some instances are inside and some not are masked. Nulls
are NaN with a `known` mask alongside (None when every sample is known). Results are memoized per
(quantity, window), so terms that share a window's sums compute them once.

Threads may work on different quantities at once once `prepare` has computed the windows, the only
state quantities share.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import polars as pl

Index = np.ndarray[Any, np.dtype[np.int64]]
Floats = np.ndarray[Any, np.dtype[np.float64]]
Mask = np.ndarray[Any, np.dtype[np.bool_]]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _us(d: timedelta) -> int:
    return d // timedelta(microseconds=1)


def _epoch_us(ts: pl.Series) -> Index:
    values: Index = ts.dt.epoch("us").to_numpy()
    return values


def _period(ids: pl.Series, ts: pl.Series) -> int | None:
    """k when the rows are in time order and are rounds of the same k distinct instances in the
    same order (row i and row i + k are the same instance), as step-aligned samples are."""
    n = ids.len()
    if n == 0 or ids.null_count() or not ts.is_sorted():
        return None
    again = (ids == ids[0]).arg_true()
    k = int(again[1]) if again.len() > 1 else n
    if n % k or (k < n and not (ids.slice(k) == ids.slice(0, n - k)).all()):
        return None
    return k if ids.slice(0, k).n_unique() == k else None


def _segments(ids: pl.Series, ts: pl.Series) -> Index | None:
    """Where each instance's rows start when each instance's rows are together and in time order
    (the store returns them so, ordered by instance and time): checked in one pass, never assumed."""
    n = ids.len()
    if n == 0 or ids.null_count():
        return None
    change = np.concatenate(([True], (ids.slice(1) != ids.slice(0, n - 1)).to_numpy()))
    starts: Index = np.flatnonzero(change)
    names = ids.gather(starts)
    # In name order (the store's), neighbours differ, so no instance is in two places; otherwise
    # count them.
    if not names.is_sorted() and names.n_unique() != starts.size:
        return None
    if not np.all(change[1:] | (np.diff(_epoch_us(ts)) >= 0)):
        return None
    return starts


_PADDING: Final = np.iinfo(np.int64).min // 2  # a padding cell's time: inside no window


def _sorted(ids: pl.Series, ts: pl.Series) -> tuple[Index, Index]:
    """One explicit stable sort by (instance, time): the row order, and where each instance starts."""
    codes = ids.rank("dense").fill_null(0).to_numpy()
    order = np.argsort(codes, kind="stable")
    if not ts.is_sorted():
        by_time = np.argsort(_epoch_us(ts), kind="stable")
        order = by_time[np.argsort(codes[by_time], kind="stable")]
    grouped = codes[order]
    starts: Index = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
    return order.astype(np.int64), starts


class WindowGroups:
    """The rows of `(at - widest, at]` (all of them: the caller cut the widest window) as a grid of
    `depth` rows by `k` instances; `first` and `last` are each instance's first and last row in the
    frame."""

    def __init__(self, rows: pl.DataFrame, at: datetime, widest: timedelta) -> None:
        ids, ts = rows["instance_id"], rows["ts"]
        self.rows, self.n, self.widest = rows, rows.height, _us(widest)
        self.at = (at - _EPOCH) // timedelta(microseconds=1)
        self.source: Index | None = None  # per grid cell, the frame row it holds (None: a reshape)
        period = _period(ids, ts)
        if period is not None:
            self.layout, self.k, self.depth = "rounds", period, self.n // period
            self.first: Index = np.arange(period)
            self.last: Index = np.arange(self.n - period, self.n)
            padding = None
        else:
            self.layout, order = "segments", None
            starts = _segments(ids, ts)
            if starts is None:
                self.layout = "sorted"
                order, starts = _sorted(ids, ts)
            lengths = np.diff(np.append(starts, self.n))
            self.k, self.depth = starts.size, int(lengths.max())
            # Right-aligned: grid row r of instance j holds its row starts[j] + r - (depth - lengths[j]),
            # padding above its first (broadcast: no scatter).
            top = self.depth - lengths
            rows_in_grid = (starts - top)[None, :] + np.arange(self.depth)[:, None]
            pad = np.arange(self.depth)[:, None] < top[None, :]
            padding = pad.ravel() if pad.any() else None
            source = np.maximum(rows_in_grid, 0).ravel()  # padding: any row (never read)
            self.source = source if order is None else order[source]
            frame_rows = np.arange(self.n) if order is None else order
            self.first, self.last = frame_rows[starts], frame_rows[starts + lengths - 1]
        stamps = self._grid(_epoch_us(ts))
        if padding is not None:
            stamps.ravel()[padding] = _PADDING
        self.stamps: Index = stamps
        # Nulls as NaN, in one query for every column that has any: NumPy then reads the buffers
        # without a copy (Polars' own null-to-NaN in `to_numpy` is several times slower).
        nullable = [
            c for c in rows.columns if c not in ("instance_id", "engine", "ts") and rows[c].null_count()
        ]
        self.filled = rows.select(pl.col(c).cast(pl.Float64).fill_null(float("nan")) for c in nullable)
        self._columns: dict[str, tuple[Floats, Mask | None]] = {}
        self._windows: dict[int, tuple[int, int, Mask | None, Index]] = {}
        self._memo: dict[tuple[str, str, int], Any] = {}

    def _grid(self, values: Any) -> Any:
        """Per-row values as the (depth, k) grid; padding cells hold arbitrary values (they are
        inside no window, so no reduction reads them)."""
        cells = values if self.source is None else values[self.source]
        return cells.reshape(self.depth, self.k)

    # --- windows -----------------------------------------------------------------------------------

    def _window(self, window: int) -> tuple[int, int, Mask | None, Index]:
        """For `(at - window, at]`: the first grid row with any instance inside, the first with
        every instance inside (each column's cells inside are its tail), the mask of the rows in
        between, and how many cells each instance has inside."""
        if window not in self._windows:
            inside = self.stamps > self.at - window
            some = self.depth - int(np.count_nonzero(inside.any(axis=1)))
            full = self.depth - int(np.count_nonzero(inside.all(axis=1)))
            partial = inside[some:full] if full > some else None
            counts: Index = np.full(self.k, self.depth - full, dtype=np.int64)
            if partial is not None:
                counts += np.count_nonzero(partial, axis=0)
            self._windows[window] = some, full, partial, counts
        return self._windows[window]

    def prepare(self, windows: Iterable[int]) -> None:
        """Compute these windows' rows up front: the one state quantities share, so that threads
        can then work on different quantities without locks (every other memo is per quantity)."""
        for window in windows:
            self._window(window)

    def reduce(self, ufunc: np.ufunc, grid: Any, window: int, fill: Any, dtype: Any = None) -> Any:
        """`ufunc` down each instance's column over its cells inside `(at - window, at]`; `fill` is
        the reduction's identity (its value for an instance without a cell inside)."""
        some, full, partial, _ = self._window(window)
        out = ufunc.reduce(grid[full:], axis=0, dtype=dtype, initial=fill)
        if partial is not None:  # only the edge rows need a mask
            edge = np.where(partial, grid[some:full], fill)
            out = ufunc(out, ufunc.reduce(edge, axis=0, dtype=dtype, initial=fill))
        return out

    def lengths(self, window: int) -> Index:
        """How many rows each instance has inside the window."""
        return self._window(window)[3]

    # --- per quantity ------------------------------------------------------------------------------

    def column(self, quantity: str) -> tuple[Floats, Mask | None]:
        """A quantity's grid (null as NaN) and where it is known (None: everywhere)."""
        if quantity not in self._columns:
            series = self.rows[quantity]
            filled = self.filled[quantity] if series.null_count() else series.cast(pl.Float64)
            flat = filled.to_numpy()
            values: Floats = self._grid(flat)
            known: Mask | None = None
            if series.null_count():
                if np.count_nonzero(np.isnan(flat)) == series.null_count():
                    known = ~np.isnan(values)  # on the grid: no second gather
                else:  # NaN samples too, which are known
                    known = self._grid(series.is_not_null().to_numpy())
            self._columns[quantity] = values, known
        return self._columns[quantity]

    def _memoized(self, key: tuple[str, str, int], make: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def zeroed(self, quantity: str) -> Floats:
        """A quantity's grid, 0 where not known."""

        def make() -> Floats:
            values, known = self.column(quantity)
            return values if known is None else np.where(known, values, 0.0)

        out: Floats = self._memoized((quantity, "zeroed", 0), make)
        return out

    def count(self, quantity: str, window: int) -> Index:
        """How many known samples of a quantity each instance has in the window."""

        def make() -> Index:
            known = self.column(quantity)[1]
            if known is None:
                return self.lengths(window)
            counted: Index = self.reduce(np.add, known, window, 0, dtype=np.int64)
            return counted

        out: Index = self._memoized((quantity, "count", window), make)
        return out

    def reduced(self, quantity: str, how: str, window: int) -> Floats:
        """`sum`, `min` or `max` of a quantity's known values in the window (NaN-skipping, as Polars'
        min and max); 0 (sum) or NaN where there are none."""

        def make() -> Floats:
            if how == "sum":
                return self.sum(self.zeroed(quantity), window)
            ufunc = np.fmin if how == "min" else np.fmax
            out: Floats = self.reduce(ufunc, self.column(quantity)[0], window, np.nan)
            return out

        out: Floats = self._memoized((quantity, how, window), make)
        return out

    def sum(self, grid: Floats, window: int) -> Floats:
        """The sum of a grid's cells in the window, per instance."""
        out: Floats = self.reduce(np.add, grid, window, 0.0)
        return out

    def seconds(self, quantity: str) -> Floats:
        """Each cell's time in seconds relative to `at` (negative), 0 where the quantity is not
        known: the x of a trend's least-squares sums."""

        def make() -> Floats:
            x = (self.stamps - self.at) / 1e6
            known = self.column(quantity)[1]
            return x if known is None else x * known  # x is finite: a product, cheaper than where

        out: Floats = self._memoized((quantity, "seconds", 0), make)
        return out

    def latest(self, quantity: str, window: int) -> tuple[Floats, Mask]:
        """Each instance's latest known value in the window (down its column), and whether it has
        one."""
        values, known = self.column(quantity)
        if known is None and window >= self.widest:  # the last row: every instance's latest sample
            return values[-1], np.ones(self.k, dtype=np.bool_)
        cells = np.arange(self.depth * self.k).reshape(self.depth, self.k)
        # -1 where not known, by arithmetic (cheaper than where)
        index = self.reduce(np.maximum, cells if known is None else (cells + 1) * known - 1, window, -1)
        return values.ravel()[np.maximum(index, 0)], index >= 0
