"""Stream large `.npz` files in and out without holding them in memory.

50,000 samples at 256 px are 9.8 GB of uint8: `np.savez` would need all of it in memory and
`np.load` would read all of it. An `.npz` is a zip of `.npy` members, so both directions can
stream: the writer emits a `.npy` header and then the rows chunk by chunk (uncompressed,
ZIP64, as ADM's reference batches are), the reader parses the header and reads rows in batches.
Files made here load with plain `np.load` and with ADM's evaluator.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.lib.format as npy_format


class NpzWriter:
    """Write an `.npz` under a temporary name; `close()` renames it into place.

    Use as a context manager: an exception leaves no file with the final name.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.part-{os.getpid()}")   # unique per writer
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        """A whole (small) array."""
        array = np.ascontiguousarray(array)
        self.add_streamed(name, array.shape, array.dtype, [array])

    def add_streamed(self, name: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]) -> None:
        """An array of `shape` whose rows arrive as `chunks` (each (n, *shape[1:])), in order."""
        dtype = np.dtype(dtype)
        header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        rows = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
            npy_format.write_array_header_2_0(member, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{self.path}: member {name}: chunk of shape {chunk.shape} does not "
                                     f"match rows of shape {tuple(shape[1:])}")
                member.write(chunk.tobytes())
                rows += chunk.shape[0] if chunk.ndim else 1
        expected = shape[0] if len(shape) else 1
        if rows != expected:
            raise ValueError(f"{self.path}: member {name}: wrote {rows} rows, header promised {expected}")

    def close(self) -> Path:
        self._zip.close()
        os.replace(self.tmp, self.path)     # only a complete file gets the real name
        return self.path

    def abort(self) -> None:
        self._zip.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def npz_keys(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def _open_member(z: zipfile.ZipFile, path: Path, key: str):
    if f"{key}.npy" not in z.namelist():
        raise KeyError(f"{path}: no array {key!r}; it has {', '.join(n[:-4] for n in z.namelist())}")
    f = z.open(f"{key}.npy")
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{path}: array {key!r} has .npy format version {version}; expected 1.0 or 2.0")
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: array {key!r} is Fortran-ordered or holds objects; expected a plain C array")
    return f, tuple(shape), dtype


def npz_array_info(path: str | Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one member, read from its header only."""
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        f, shape, dtype = _open_member(z, path, key)
        f.close()
    return shape, dtype


def iter_npz_batches(path: str | Path, key: str = "arr_0", batch_size: int = 256,
                     limit: int | None = None) -> Iterator[np.ndarray]:
    """Rows of member `key` in batches of `batch_size` (the first `limit` rows when given)."""
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        f, shape, dtype = _open_member(z, path, key)
        with f:
            total = shape[0] if limit is None else min(limit, shape[0])
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            done = 0
            while done < total:
                n = min(batch_size, total - done)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise ValueError(f"{path}: array {key!r} is truncated at row {done}; expected {shape[0]} rows")
                yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))
                done += n


def load_npz_array(path: str | Path, key: str) -> np.ndarray:
    with np.load(path) as data:
        if key not in data.files:
            raise KeyError(f"{path}: no array {key!r}; it has {', '.join(data.files)}")
        return data[key]
