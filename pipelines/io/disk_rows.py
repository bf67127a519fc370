"""A raw study's samples kept on disk, read a few rows at a time.

At a site's size a raw MRF study is larger than what a node should hold while it reconstructs one slice: 10 slices
of 256² spiral FISP with 16 coils are 1.4 GB of samples, Cartesian FISP at R 5 16 GB. The pipelines take one
slice's rows at a time (``raw.data[rows]``), so the reader writes the samples to an unnamed temporary file as it goes
(:class:`RowWriter`) and hands the pipeline a :class:`DiskRows` in place of the array: indexing reads the rows asked
for into a fresh array, so a run holds one slice's samples, not the study's (the file's pages are the kernel's cache,
which it drops under pressure, not the process's memory).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np

# Studies with more samples than this are kept on disk when the caller gives a folder for it (the node: its
# <spool>/tmp). Smaller ones stay in memory: one slice of such a study is already most of it.
SPILL_BYTES = 256 * 1024**2
# Readouts taken at once where code sums over a whole study (a bounded copy when the study is on disk).
ROW_CHUNK = 4096


class DiskRows:
    """complex64 [rows, coils, samples] in a file; ``rows[key]`` returns an in-memory copy of the rows asked for."""

    dtype = np.dtype(np.complex64)
    ndim = 3

    def __init__(self, fh: IO[bytes], shape: tuple[int, int, int]) -> None:
        self._fh = fh
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows = np.arange(self.shape[0])[key]  # ints, slices, masks and index arrays, as numpy checks them
        out = self._read(np.atleast_1d(rows).reshape(-1)).reshape(*rows.shape, *self.shape[1:])
        return out[(slice(None),) * rows.ndim + rest] if rest else out

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Rows into a fresh array with ``pread`` (no mapping: a run's RSS holds the copy alone), one read per run
        of consecutive rows."""
        out = np.empty((rows.size, *self.shape[1:]), self.dtype)
        if rows.size == 0:
            return out
        row_bytes = out[0].nbytes
        flat = out.reshape(rows.size, -1).view(np.uint8)
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        fd = self._fh.fileno()
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, rows.size], strict=True):
            target = flat[a:b].reshape(-1).data  # a writable memoryview of the rows in ``out``
            offset, done = int(rows[a]) * row_bytes, 0
            while done < target.nbytes:
                n = os.preadv(fd, [target[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"the raw samples' spill file ended at byte {offset + done} (expected more rows)")
                done += n
        if cuts.size == 0:
            self._read_ahead(int(rows[-1]) + 1, rows.size, row_bytes)
        return out

    def _read_ahead(self, start: int, count: int, row_bytes: int) -> None:
        """Ask the kernel to read the ``count`` rows after a contiguous read while the caller computes: slices
        usually follow one another in the file, and at 16 GB the file is not all in the page cache (without this,
        reading each 1.6 GB slice added ~4 s to its reconstruction)."""
        stop = min(start + count, self.shape[0])
        if stop <= start or not hasattr(os, "posix_fadvise"):
            return
        args = (self._fh.fileno(), start * row_bytes, (stop - start) * row_bytes, os.POSIX_FADV_WILLNEED)
        threading.Thread(target=_advise, args=args, name="disk-rows-read-ahead", daemon=True).start()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole study in memory: what this class exists to avoid, kept so that any array code still works."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def close(self) -> None:
        self._fh.close()


def _advise(fd: int, offset: int, length: int, advice: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:  # a hint: a closed file or a file system without it changes nothing
        pass


class RowWriter:
    """Appends float32 rows of ``width`` values (interleaved complex samples) to an unnamed file in ``folder``,
    which the file system frees once its :class:`DiskRows` is gone (or the process ends): nothing to clean up."""

    def __init__(self, folder: Path, width: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - handed on to DiskRows
        self.width = width
        self.rows = 0

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.width:
            raise ValueError(f"rows of {self.width} float32 values expected, got shape {block.shape}")
        self._fh.write(block.data)
        self.rows += block.shape[0]

    def finish(self, coils: int, samples: int) -> DiskRows:
        self._fh.flush()
        return DiskRows(self._fh, (self.rows, coils, samples))
