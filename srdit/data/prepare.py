"""`srdit prepare`: an ImageFolder tree -> ADM center crop -> sharded uint8 HDF5 images.

    srdit prepare --src DIR --out OUT/shard00003.h5 --resolution 256 --shard 3 --num-shards 100
    srdit prepare --join OUT/shard*.h5 --out OUT/images.h5
    srdit prepare --src DIR --out OUT --resolution 256 [--num-shards N]    # all shards, then join

Labels are the index of the top-level class folder in sorted order (ImageNet synsets: 0-999).
Every file under a class folder is listed in sorted order; shard I takes a contiguous range of
that list, so one Slurm array task writes one shard. A file that cannot be decoded (corrupt,
truncated, not an image) is skipped and listed with the reason in `<shard>.skipped.tsv` beside
the shard; the count is stored in the shard. A finished shard is skipped on rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cache import (join_request, FORMAT_VERSION, IMAGES, JOINED_NAMES, STR, CacheError, ShardWriter, finished_shard,
                    join_shards, shard_attrs, shard_path, split_range, temp_path)
from .crop import load_and_crop

WRITE_BLOCK = 256                  # rows buffered between writes
COMMON_KEYS = ("kind", "format", "crop", "resolution", "source_list_sha256", "num_files", "class_names",
               "num_classes")


def list_source(src: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to src, label)]) for an ImageFolder tree, in sorted order."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder; expected an ImageFolder tree (one subfolder per class)")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"--src {src}: no class subfolders; expected an ImageFolder tree (one subfolder per class)")
    files = []
    for label, name in enumerate(classes):
        for root, dirs, names in os.walk(src / name):
            dirs.sort()
            rel_root = Path(root).relative_to(src)
            files.extend(((rel_root / n).as_posix(), label) for n in sorted(names) if not n.startswith("."))
    return classes, files


def source_list_digest(files: list[tuple[str, int]]) -> str:
    text = "".join(f"{path}\t{label}\n" for path, label in files)
    return hashlib.sha256(text.encode()).hexdigest()


def _decode(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    path, size = job
    try:
        return load_and_crop(path, size), None
    except Exception as e:  # noqa: BLE001 - any failure to decode is a reason to skip and report the file
        return None, f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")


def _decoded(jobs: list[tuple[str, int]], workers: int, desc: str):
    """Decode in order, with `workers` processes (0 or 1: in this process)."""
    if workers <= 1:
        yield from tqdm(map(_decode, jobs), total=len(jobs), desc=desc, unit="img")
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from tqdm(pool.imap(_decode, jobs, chunksize=16), total=len(jobs), desc=desc, unit="img")


def report_path(shard: Path) -> Path:
    return shard.with_suffix(".skipped.tsv")


def write_report(path: Path, skipped: list[tuple[str, str]]) -> None:
    tmp = temp_path(path)
    tmp.write_text("path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in skipped))
    os.replace(tmp, path)


def read_report(path: Path) -> list[tuple[str, str]]:
    lines = Path(path).read_text().splitlines()[1:]
    return [tuple(line.split("\t", 1)) for line in lines]


def prepare_shard(src: str | Path, out: str | Path, resolution: int, shard: int = 0, num_shards: int = 1,
                  workers: int = 0, listing: tuple[list[str], list[tuple[str, int]]] | None = None) -> Path:
    """Write image shard `shard` of `num_shards` to the file `out`; returns its path."""
    src, out = Path(src), Path(out)
    classes, files = listing or list_source(src)
    start, stop = split_range(len(files), shard, num_shards)
    identity = dict(kind=IMAGES, format=FORMAT_VERSION, crop="adm", resolution=resolution,
                    source_list_sha256=source_list_digest(files), num_files=len(files),
                    file_start=start, file_stop=stop)
    if finished_shard(out, identity):
        print(f"{out}: already complete, skipped")
        return out
    datasets = {"images": ((resolution, resolution, 3), np.uint8), "labels": ((), np.int64), "paths": ((), STR)}
    attrs = dict(identity, class_names=classes, num_classes=len(classes), source_root=str(src.resolve()))
    skipped: list[tuple[str, str]] = []
    block: list[tuple[np.ndarray, int, str]] = []
    jobs = [(str(src / path), resolution) for path, _ in files[start:stop]]
    with ShardWriter(out, datasets, attrs, capacity=stop - start, exact=False) as writer:
        def flush():
            if block:
                writer.append(images=np.stack([b[0] for b in block]), labels=np.asarray([b[1] for b in block]),
                              paths=np.asarray([b[2] for b in block], dtype=object))
                block.clear()

        for (path, label), (pixels, reason) in zip(files[start:stop], _decoded(jobs, workers, out.name)):
            if pixels is None:
                skipped.append((path, reason))
            else:
                block.append((pixels, label, path))
                if len(block) == WRITE_BLOCK:
                    flush()
        flush()
        # The report is in place before the shard, so a complete shard always has its report.
        write_report(report_path(out), skipped)
        writer.finish(skipped=len(skipped), report=report_path(out).name)
    print(f"{out}: {writer.rows} images, {len(skipped)} skipped (listed in {report_path(out)})")
    return out


def join_images(shards: list[Path], out: str | Path) -> Path:
    """Join image shards into `out` (images.h5), checking they tile the whole source list."""
    out = Path(out)
    attrs = [shard_attrs(p) for p in shards]
    order = sorted(range(len(shards)), key=lambda i: attrs[i]["file_start"])
    shards, attrs = [shards[i] for i in order], [attrs[i] for i in order]
    expected = 0
    for path, a in zip(shards, attrs):
        if a["file_start"] != expected:
            raise CacheError(f"cannot join: source files {expected}..{a['file_start'] - 1} are in no shard "
                             f"(next is {path.name}); run the missing `srdit prepare --shard` jobs first")
        expected = a["file_stop"]
    if expected != attrs[-1]["num_files"]:
        raise CacheError(f"cannot join: source files {expected}..{attrs[-1]['num_files'] - 1} are in no shard; "
                         f"run the missing `srdit prepare --shard` jobs first")
    skipped = []
    for path in shards:
        skipped.extend(read_report(report_path(path)))
    write_report(out.with_suffix(".skipped.tsv"), skipped)
    join_shards(out, shards, IMAGES, COMMON_KEYS, extra_attrs={"skipped": len(skipped)})
    total = sum(int(a["rows"]) for a in attrs)
    print(f"{out}: {total} images in {len(shards)} shard(s), {len(skipped)} files skipped "
          f"(listed in {out.with_suffix('.skipped.tsv')})")
    return out


def prepare_all(src: str | Path, folder: str | Path, resolution: int, num_shards: int = 1, workers: int = 0) -> Path:
    """Every shard into `folder`, then the joined `folder/images.h5`."""
    folder = Path(folder)
    listing = list_source(src)
    paths = [prepare_shard(src, shard_path(folder, i), resolution, i, num_shards, workers, listing)
             for i in range(num_shards)]
    return join_images(paths, folder / JOINED_NAMES[IMAGES])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", help="ImageFolder tree (one subfolder per class), e.g. ImageNet train/")
    parser.add_argument("--out", required=True,
                        help="with --shard: the shard file (or a folder for shardNNNNN.h5); with --join: the "
                             "joined file (or a folder for images.h5); otherwise the cache folder")
    parser.add_argument("--resolution", type=int, help="output side in pixels (256 or 512)")
    parser.add_argument("--shard", type=int, help="write only this shard (a Slurm array index)")
    parser.add_argument("--num-shards", type=int, default=1, help="number of shards (default 1)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="decoding processes (default: min(8, CPUs))")
    parser.add_argument("--join", nargs="*", metavar="SHARD",
                        help="join these shards (default: the folder's shard*.h5) into the joined file")
    parser.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    try:
        if args.join is not None:
            join_images(*join_request(out, args.join, IMAGES))
            return 0
        if not args.src or not args.resolution:
            print("srdit prepare: --src and --resolution are required (except with --join)", file=sys.stderr)
            return 2
        if args.shard is not None:
            path = out if out.suffix == ".h5" else shard_path(out, args.shard)
            prepare_shard(args.src, path, args.resolution, args.shard, args.num_shards, args.workers)
        else:
            prepare_all(args.src, out, args.resolution, args.num_shards, args.workers)
    except (CacheError, FileNotFoundError, ValueError) as e:
        print(f"srdit prepare: {e}", file=sys.stderr)
        return 1
    return 0
