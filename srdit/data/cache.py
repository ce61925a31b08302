"""HDF5 caches: shard writing, joining, validation on open, and batched random-access reads.

A cache is a folder with shards `shard<index:05d>.h5` and one joined file (`images.h5` for
`prepare`, `cache.h5` for `encode`) that holds an h5py virtual dataset per array over the
shards, the table of shards (file, first row, rows, checksum) and what the cache was built with.
The virtual datasets are a convenience view; fast readers (`ShardedArrays`) read the shards.

Nothing looks complete before it is: a shard is written as `<name>.tmp` and renamed into place
only after its row count, per-dataset SHA-256 digests and a combined checksum are recorded with
`complete = 1`. Opening a cache checks every shard against the table (present, complete, same
rows and checksum, expected shapes and dtypes) and the build settings against what the caller
expects, and refuses any difference with a message that says what to do.

Shards are stored contiguous (no chunking): measured here, a random batch read from a
contiguous dataset is 2x faster per row than from one-row chunks, and h5py fancy indexing on
chunked datasets is 15-100x slower still. Reads are batched: `ShardedArrays.read(name,
sorted_indices)` groups the indices by shard and gathers the rows from a read-only memory map
of the dataset's bytes (contiguous, unfiltered storage has a fixed offset in the file), falling
back to h5py reads for any other layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# Finished caches are only ever read (every file is written once, under a temporary name, by one
# job, then renamed), so srdit takes no HDF5 file locks: locks are what fails on NFS/Lustre/GPFS
# mounts without lock support ("unable to lock file"), and what blocks readers while a file is
# open for writing elsewhere. Set process-wide, before any file is opened, because HDF5 refuses
# to mix locking and non-locking handles on one file in a process (a virtual dataset opens its
# shards itself). An HDF5_USE_FILE_LOCKING already set (TRUE, FALSE, BEST_EFFORT) is kept.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import h5py  # noqa: E402  (after the locking default)
import numpy as np

FORMAT_VERSION = 1
IMAGES, LATENTS = "images", "latents"
JOINED_NAMES = {IMAGES: "images.h5", LATENTS: "cache.h5"}
STR = "str"                                     # dtype marker for variable-length UTF-8 strings


class CacheError(ValueError):
    """A cache or shard is missing, incomplete, corrupt or inconsistent."""


class CacheMismatchError(CacheError):
    """A cache was built with other settings than the caller expects."""


# --------------------------------------------------------------------------------------------
# Names and ranges
# --------------------------------------------------------------------------------------------

def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard{index:05d}.h5"


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def split_range(total: int, shard: int, num_shards: int, block: int = 1) -> tuple[int, int]:
    """Rows [start, stop) of shard `shard` of `num_shards`, cut at multiples of `block` rows.

    Cutting at batch boundaries makes every batch the same set of rows however the work is
    sharded, so sharded and unsharded runs compute bitwise the same values.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1} (num_shards {num_shards})")
    blocks = -(-total // block)
    start = min(total, (blocks * shard // num_shards) * block)
    stop = min(total, (blocks * (shard + 1) // num_shards) * block)
    return start, stop


def joined_path(path: str | Path, kind: str) -> Path:
    """Accept the cache folder or the joined file itself."""
    path = Path(path)
    return path / JOINED_NAMES[kind] if path.is_dir() else path


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

def join_request(out: str | Path, listed: list[str], kind: str) -> tuple[list[Path], Path]:
    """`--join [SHARD...] --out OUT` -> (shards to join, joined file). With no shard listed, every
    shard*.h5 of OUT's folder (OUT itself when it is a folder) is joined."""
    out = Path(out)
    folder = out.parent if out.suffix == ".h5" else out
    shards = [Path(p) for p in listed] or sorted(folder.glob("shard*.h5"))
    return shards, out if out.suffix == ".h5" else out / JOINED_NAMES[kind]


def _as_bytes(values: np.ndarray):
    """The bytes a dataset's rows are hashed as: raw array bytes, or UTF-8 lines for strings."""
    if values.dtype.kind in "OUS":
        return "".join(f"{v.decode() if isinstance(v, bytes) else v}\n" for v in values).encode()
    return np.ascontiguousarray(values)


class DatasetHashes:
    """One SHA-256 per dataset over its rows in order; independent of how rows were batched."""

    def __init__(self, names: Iterable[str]):
        self.hashers = {name: hashlib.sha256() for name in names}

    def update(self, name: str, values: np.ndarray) -> None:
        self.hashers[name].update(_as_bytes(values))

    def digests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in sorted(self.hashers.items())}


def combine_digests(digests: dict[str, str]) -> str:
    text = "".join(f"{name}:{digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def recompute_digests(path: str | Path, block_bytes: int = 64 << 20) -> dict[str, str]:
    """Read a shard back and hash its datasets (slow: reads everything)."""
    with h5py.File(path, "r") as f:
        hashes = DatasetHashes(f.keys())
        for name, ds in f.items():
            row = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
            step = max(1, block_bytes // row)
            for start in range(0, ds.shape[0], step):
                hashes.update(name, ds[start:start + step])
    return hashes.digests()


# --------------------------------------------------------------------------------------------
# Writing one shard
# --------------------------------------------------------------------------------------------

def _to_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_attrs(obj) -> dict[str, Any]:
    return {k: _from_attr(v) for k, v in obj.attrs.items()}


class ShardWriter:
    """Write one shard under `<path>.tmp`; `finish()` records rows and checksums and renames it.

    `datasets` maps a name to (row shape, dtype); dtype `STR` is a variable-length string.
    Datasets are contiguous and `capacity` rows long. When fewer rows arrive (prepare skips
    unreadable files), `finish()` copies the rows into an exactly sized file first; with
    `exact=True` fewer rows are an error. A writer left without `finish()` (an exception, a
    kill) leaves only the temporary file: the shard does not exist.
    """

    def __init__(self, path: str | Path, datasets: dict[str, tuple[tuple, Any]], attrs: dict[str, Any],
                 capacity: int, exact: bool = True):
        self.path = Path(path)
        self.temp = temp_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp.unlink(missing_ok=True)         # a leftover of a killed run
        self.file = h5py.File(self.temp, "w")
        self.capacity, self.exact = capacity, exact
        self.rows = 0
        self.hashes = DatasetHashes(datasets)
        for key, value in attrs.items():
            self.file.attrs[key] = _to_attr(value)
        self.file.attrs["complete"] = 0
        for name, (row_shape, dtype) in datasets.items():
            dtype = h5py.string_dtype() if dtype == STR else np.dtype(dtype)
            self.file.create_dataset(name, shape=(capacity, *row_shape), dtype=dtype)

    def append(self, **arrays: np.ndarray) -> None:
        if set(arrays) != set(self.hashes.hashers):
            raise ValueError(f"append needs exactly the datasets {sorted(self.hashes.hashers)}, got {sorted(arrays)}")
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            raise ValueError(f"append: arrays have different row counts {sorted(counts)}")
        end = self.rows + counts.pop()
        if end > self.capacity:
            raise ValueError(f"{self.path.name}: {end} rows written, but the shard holds {self.capacity}")
        for name, values in arrays.items():
            self.file[name][self.rows:end] = values
            self.hashes.update(name, np.asarray(values))
        self.rows = end

    def finish(self, **attrs: Any) -> Path:
        if self.rows != self.capacity and self.exact:
            raise ValueError(f"{self.path.name}: {self.rows} rows written, expected {self.capacity}")
        digests = self.hashes.digests()
        for key, value in {**attrs, "rows": self.rows, "digests": digests,
                           "checksum": combine_digests(digests), "complete": 1}.items():
            self.file.attrs[key] = _to_attr(value)
        if self.rows != self.capacity:
            self._compact()
        self.file.close()
        os.replace(self.temp, self.path)          # only now does the shard exist
        return self.path

    def _compact(self, block_bytes: int = 64 << 20) -> None:
        """Copy the written rows into an exactly sized temporary file, which replaces the first."""
        smaller = self.temp.with_name(self.temp.name + "2")
        with h5py.File(smaller, "w") as out:
            for key, value in self.file.attrs.items():
                out.attrs[key] = value
            for name, ds in self.file.items():
                target = out.create_dataset(name, shape=(self.rows, *ds.shape[1:]), dtype=ds.dtype)
                step = max(1, block_bytes // max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize))
                for start in range(0, self.rows, step):
                    target[start:min(self.rows, start + step)] = ds[start:min(self.rows, start + step)]
        self.file.close()
        os.replace(smaller, self.temp)
        self.file = h5py.File(self.temp, "r")

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finished_shard(path: Path, identity: dict[str, Any]) -> bool:
    """True when `path` is a complete shard built with `identity`; False when it does not exist.

    A complete shard built with other settings is an error, never silently reused or replaced.
    """
    if not path.exists():
        return False
    attrs = shard_attrs(path)
    differs = {k: (attrs.get(k), v) for k, v in identity.items() if attrs.get(k) != _from_attr(_to_attr(v))}
    if differs:
        detail = "; ".join(f"{k}: shard has {a!r}, this run {b!r}" for k, (a, b) in differs.items())
        raise CacheMismatchError(f"{path} is a finished shard built with other settings ({detail}). "
                                 f"Delete it (and the joined file) to rebuild, or write to another --out.")
    return True


def shard_attrs(path: Path) -> dict[str, Any]:
    """Attributes of a complete shard; raises CacheError if it is unreadable or incomplete."""
    try:
        with h5py.File(path, "r") as f:
            attrs = read_attrs(f)
    except OSError as e:
        raise CacheError(f"{path}: unreadable HDF5 file ({e}); delete it and rerun the step that writes it") from e
    if attrs.get("complete") != 1 or "checksum" not in attrs:
        raise CacheError(f"{path}: shard is incomplete (no complete=1 / checksum); delete it and rerun")
    return attrs


# --------------------------------------------------------------------------------------------
# Joining shards
# --------------------------------------------------------------------------------------------

def join_shards(out_path: str | Path, shard_paths: list[Path], kind: str, common_keys: Iterable[str],
                extra_attrs: dict[str, Any] | None = None) -> Path:
    """Write the joined file: a virtual dataset per array over the shards, plus the shard table.

    Every shard must be complete and agree on `common_keys` (what it was built with); string
    datasets (the source paths) are copied, since virtual datasets of variable-length strings
    are not portable.
    """
    out_path = Path(out_path)
    if not shard_paths:
        raise CacheError(f"no shards to join for {out_path}")
    table, first_attrs, start = [], None, 0
    layouts: dict[str, tuple] = {}
    copied: dict[str, list] = {}
    for path in shard_paths:
        attrs = shard_attrs(path)
        if attrs.get("kind") != kind:
            raise CacheError(f"{path}: a {attrs.get('kind')!r} shard, expected {kind!r}")
        if first_attrs is None:
            first_attrs = attrs
        for key in common_keys:
            if attrs.get(key) != first_attrs.get(key):
                raise CacheError(f"cannot join: {path.name} has {key}={attrs.get(key)!r} but "
                                 f"{shard_paths[0].name} has {first_attrs.get(key)!r}; rebuild the odd shard")
        rows = int(attrs["rows"])
        table.append(dict(file=os.path.relpath(path, out_path.parent), start=start, rows=rows,
                          checksum=attrs["checksum"]))
        with h5py.File(path, "r") as f:
            for name, ds in f.items():
                if ds.dtype.kind == "O":
                    copied.setdefault(name, []).extend(ds[:].tolist())
                else:
                    layouts.setdefault(name, (ds.shape[1:], ds.dtype, []))[2].append((table[-1]["file"], rows))
        start += rows
    tmp = temp_path(out_path)
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w") as f:
        for name, (row_shape, dtype, parts) in layouts.items():
            layout = h5py.VirtualLayout(shape=(start, *row_shape), dtype=dtype)
            offset = 0
            for file, rows in parts:
                if rows:
                    layout[offset:offset + rows] = h5py.VirtualSource(file, name, shape=(rows, *row_shape))
                offset += rows
            f.create_virtual_dataset(name, layout)
        for name, values in copied.items():
            f.create_dataset(name, data=np.asarray(values, dtype=object), dtype=h5py.string_dtype())
        for key in common_keys:
            f.attrs[key] = _to_attr(first_attrs[key])
        for key, value in (extra_attrs or {}).items():
            f.attrs[key] = _to_attr(value)
        f.attrs["kind"] = kind
        f.attrs["format"] = FORMAT_VERSION
        f.attrs["rows"] = start
        f.attrs["shards"] = json.dumps(table)
        f.attrs["checksum"] = combine_digests({t["file"]: t["checksum"] for t in table})
        f.attrs["complete"] = 1
    os.replace(tmp, out_path)
    return out_path


# --------------------------------------------------------------------------------------------
# Opening and validating
# --------------------------------------------------------------------------------------------

@dataclass
class CacheIndex:
    """A validated cache: its attributes, shard files and the shape/dtype of each array."""
    path: Path
    attrs: dict[str, Any]
    shard_files: list[Path]
    offsets: np.ndarray                       # first global row of each shard, plus the total
    arrays: dict[str, tuple[tuple, np.dtype]] = field(default_factory=dict)   # name -> (row shape, dtype)

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])


def open_cache(path: str | Path, kind: str, expect: dict[str, Any] | None = None,
               required: dict[str, tuple[tuple | None, Any]] | None = None, verify: bool = False) -> CacheIndex:
    """Open and validate a joined cache file (or its folder).

    `expect`: build settings the caller needs (e.g. tokenizer, resolution, teacher); any that
    differ raise CacheMismatchError. `required`: arrays that must exist with (row shape or None,
    dtype). `verify`: also re-read every shard and compare its checksums (reads everything).
    """
    path = joined_path(path, kind)
    if not path.exists():
        raise CacheError(f"{path}: no such cache; build it with `srdit {'prepare' if kind == IMAGES else 'encode'}`"
                         f" (and its --join step)")
    try:
        with h5py.File(path, "r") as f:
            attrs = read_attrs(f)
    except OSError as e:
        raise CacheError(f"{path}: unreadable HDF5 file ({e}); rebuild it with the --join step") from e
    if attrs.get("complete") != 1 or attrs.get("kind") != kind:
        raise CacheError(f"{path}: not a complete {kind} cache (kind={attrs.get('kind')!r}, "
                         f"complete={attrs.get('complete')!r}); rerun the step's --join")
    if attrs.get("format") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format {attrs.get('format')}, this code reads {FORMAT_VERSION}; rebuild it")
    for key, wanted in (expect or {}).items():
        have = attrs.get(key)
        if have != wanted:
            raise CacheMismatchError(
                f"{path} was built with {key}={have!r}, but {key}={wanted!r} is expected. Use a cache built "
                f"for {key}={wanted!r} (srdit {'prepare' if kind == IMAGES else 'encode'} with that setting) or "
                f"change the experiment's config.")
    table = json.loads(attrs["shards"])
    files, arrays, offsets = [], {}, [0]
    for entry in table:
        shard = path.parent / entry["file"]
        if not shard.exists():
            raise CacheError(f"{path}: shard {shard} is missing; rebuild it (same --shard) or restore the file")
        sattrs = shard_attrs(shard)
        if int(sattrs["rows"]) != entry["rows"] or sattrs["checksum"] != entry["checksum"]:
            raise CacheError(f"{shard}: rows/checksum ({sattrs['rows']}, {sattrs['checksum'][:12]}) differ from the "
                             f"joined file's table ({entry['rows']}, {entry['checksum'][:12]}): the shard was rebuilt "
                             f"after joining; rerun the --join step")
        with h5py.File(shard, "r") as f:       # shapes and dtypes: every shard alike, every array `rows` long
            for name, ds in f.items():
                if ds.shape[0] != entry["rows"]:
                    raise CacheError(f"{shard}: dataset {name!r} has {ds.shape[0]} rows, the shard {entry['rows']}")
                spec = (tuple(ds.shape[1:]), ds.dtype)
                if arrays.setdefault(name, spec)[0] != spec[0] or arrays[name][1] != spec[1]:
                    raise CacheError(f"{shard}: dataset {name!r} is {spec}, other shards {arrays[name]}")
        if verify:
            digests = recompute_digests(shard)
            if combine_digests(digests) != entry["checksum"]:
                bad = [k for k, v in digests.items() if json.loads(sattrs["digests"]).get(k) != v]
                raise CacheError(f"{shard}: content does not match its checksum (datasets {bad}); it is "
                                 f"corrupt: delete it, rebuild it and rerun the --join step")
        files.append(shard)
        offsets.append(offsets[-1] + entry["rows"])
    if offsets[-1] != attrs["rows"]:
        raise CacheError(f"{path}: shards hold {offsets[-1]} rows, the joined file says {attrs['rows']}")
    index = CacheIndex(path, attrs, files, np.asarray(offsets, dtype=np.int64), arrays)
    check_arrays(index, required or {})
    return index


def check_arrays(index: CacheIndex, required: dict[str, tuple[tuple | None, Any]]) -> None:
    """Raise CacheError unless each named array exists with (row shape or None for any, dtype)."""
    for name, (row_shape, dtype) in required.items():
        if name not in index.arrays:
            raise CacheError(f"{index.path}: has no {name!r} array (has {sorted(index.arrays)})")
        have_shape, have_dtype = index.arrays[name]
        if (row_shape is not None and have_shape != tuple(row_shape)) or have_dtype != np.dtype(dtype):
            raise CacheError(f"{index.path}: {name!r} rows are {have_shape} {have_dtype}, expected "
                             f"{tuple(row_shape) if row_shape is not None else '(any)'} {np.dtype(dtype)}; the "
                             f"cache is inconsistent with what it records: rebuild it")


# --------------------------------------------------------------------------------------------
# Batched reads
# --------------------------------------------------------------------------------------------

class ShardedArrays:
    """Random-access reads over the shards of a validated cache.

    Files are opened lazily and reopened after a fork (h5py handles must not cross one); reads
    from several threads are safe.
    """

    def __init__(self, index: CacheIndex):
        self.index = index
        self._files: list[h5py.File] | None = None
        self._maps: dict[tuple[int, str], np.ndarray | None] = {}
        self._pid = None
        self._lock = threading.Lock()          # loader threads share one reader

    def _handles(self) -> list[h5py.File]:
        with self._lock:
            if self._files is None or self._pid != os.getpid():
                self._files = [h5py.File(p, "r") for p in self.index.shard_files]
                self._maps = {}
                self._pid = os.getpid()
            return self._files

    def _mapped(self, shard: int, name: str) -> np.ndarray | None:
        """A read-only memory map of a contiguous, unfiltered dataset's bytes in the shard file, or None.

        Gathering rows from the map is a plain memory copy from the page cache, without h5py's
        per-selection overhead (measured 2-15x faster for the batch reads of training).
        """
        key = (shard, name)
        if key not in self._maps:
            ds = self._handles()[shard][name]
            with self._lock:
                offset = ds.id.get_offset()
                plain = (ds.chunks is None and not ds.is_virtual and not ds.external and ds.dtype.kind != "O"
                         and ds.dtype.isnative and offset is not None and ds.size > 0)
                self._maps[key] = np.memmap(self.index.shard_files[shard], dtype=ds.dtype, mode="r", offset=offset,
                                            shape=ds.shape) if plain else None
        return self._maps[key]

    def read(self, name: str, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `indices` (sorted, unique, global) of array `name`, in that order (into `out` if given)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) > 1 and not np.all(np.diff(indices) > 0):
            raise ValueError("ShardedArrays.read needs sorted, unique indices")
        if len(indices) and (indices[0] < 0 or indices[-1] >= self.index.rows):
            raise IndexError(f"row indices must lie in [0, {self.index.rows})")
        row_shape, dtype = self.index.arrays[name]
        if out is None:
            out = np.empty((len(indices), *row_shape), dtype=dtype)
        elif out.shape != (len(indices), *row_shape) or out.dtype != dtype:
            raise ValueError(f"out is {out.shape} {out.dtype}, expected {(len(indices), *row_shape)} {dtype}")
        shard_of = np.searchsorted(self.index.offsets, indices, side="right") - 1
        files = self._handles()
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = indices[where] - self.index.offsets[shard]
            lo, hi = int(where[0]), int(where[-1]) + 1
            mapped = self._mapped(int(shard), name)
            if mapped is not None:
                # indices are checked above; mode "clip" lets numpy write into `out` without a buffer
                np.take(mapped, local, axis=0, out=out[lo:hi], mode="clip")
            else:                                                 # any other storage: h5py (slower)
                out[lo:hi] = files[shard][name][local]
        return out

    def close(self) -> None:
        self._maps = {}
        for f in self._files or []:
            f.close()
        self._files = None

    def __getstate__(self):                  # pickled (e.g. into worker processes) without open handles
        return {"index": self.index}

    def __setstate__(self, state):
        self.__init__(state["index"])
