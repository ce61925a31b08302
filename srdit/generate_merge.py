"""`srdit merge DIR`: the shards of `srdit sample` -> ADM's samples.npz, a sample grid, sampler.json.

    DIR/samples.npz    arr_0 (N, H, W, 3) uint8 in global index order (what ADM's evaluator reads),
                       arr_1 (N,) int64 class labels (as guided-diffusion's sampler writes them)
    DIR/grid.png       the first 64 samples (fewer if N < 64), each labelled with its class
    DIR/sampler.json   the shards' common sampler settings, N and the shard list

Every shard 0..S-1 must be present, complete (its JSON sidecar written) and made with the same
settings; the index ranges must tile 0..N-1. Shards are streamed, so 50K images at 256 px
(9.8 GB) never sit in memory at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from srdit.generate import SHARD_FORMAT, identity, settings_differences, shard_paths, write_json_atomic

GRID_SIZE = 64
GRID_COLUMNS = 8


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="sample directory holding shards/ (the --out of `srdit sample`)")
    parser.add_argument("--grid-size", type=int, default=GRID_SIZE, help="samples in grid.png (default 64)")
    parser.set_defaults(func=run)


class IncompleteShardsError(RuntimeError):
    """Some shards are missing, incomplete or disagree; the message lists them."""


def collect_shards(out: str | Path) -> tuple[list[dict], dict]:
    """The complete, consistent shard records of `out`, in shard order, and their common settings."""
    out = Path(out)
    records = []
    for path in sorted((out / "shards").glob("shard*.json")):
        rec = json.loads(path.read_text())
        if rec.get("format") == SHARD_FORMAT and rec.get("complete"):
            records.append(rec)
    if not records:
        raise IncompleteShardsError(f"{out}/shards: no complete shard; run `srdit sample --out {out} --shard I "
                                    f"--num-shards S` for every shard first")
    settings = records[0]["settings"]
    for rec in records[1:]:
        diffs = settings_differences(settings, rec["settings"])
        if diffs:
            raise IncompleteShardsError(f"{out}: shard {rec['shard']} was made with other settings than shard "
                                        f"{records[0]['shard']} ({'; '.join(diffs[:4])}); remove one of them")
    num_shards, total = settings["num_shards"], settings["num_samples"]
    by_index = {rec["shard"]: rec for rec in records}
    missing = [i for i in range(num_shards) if i not in by_index or not shard_paths(out, i)[0].exists()]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise IncompleteShardsError(
            f"{out}: {len(missing)} of {num_shards} shards are missing or incomplete: {shown}. Make them with "
            f"`srdit sample --snapshot {settings['snapshot']} --out {out} --shard I --num-shards {num_shards}` "
            f"(with the same --set options), then merge again")
    ordered = [by_index[i] for i in range(num_shards)]
    position = 0
    for rec in ordered:
        if rec["start"] != position or rec["rows"] != rec["stop"] - rec["start"]:
            raise IncompleteShardsError(f"{out}: shard {rec['shard']} covers {rec['start']}..{rec['stop']} with "
                                        f"{rec['rows']} rows; expected to start at {position} with no gap")
        position = rec["stop"]
    if position != total:
        raise IncompleteShardsError(f"{out}: the shards cover {position} samples; sample.num_samples is {total}")
    return ordered, settings


def shard_arrays(out: Path, rec: dict) -> dict[str, np.ndarray]:
    npz = shard_paths(out, rec["shard"])[0]
    with np.load(npz) as data:
        arrays = {k: data[k] for k in ("images", "indices", "labels")}
    if not np.array_equal(arrays["indices"], np.arange(rec["start"], rec["stop"])):
        raise IncompleteShardsError(f"{npz}: its indices are not {rec['start']}..{rec['stop'] - 1}; the file does "
                                    f"not belong to its record: delete both and sample the shard again")
    return arrays


def sample_grid(images: np.ndarray, labels: np.ndarray, columns: int = GRID_COLUMNS):
    """A PIL image of `images` in rows of `columns`, each with its class label printed on a dark strip."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    strip = 12
    rows = -(-n // columns)
    cols = min(columns, n)
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), (0, 0, 0))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % columns) * w, (i // columns) * (h + strip)
        grid.paste(Image.fromarray(images[i]), (x, y + strip))
        draw.text((x + 2, y), f"y={int(labels[i])}", fill=(255, 255, 255))
    return grid


def merge(out: str | Path, grid_size: int = GRID_SIZE) -> dict:
    from srdit.metrics.npz_io import NpzWriter

    out = Path(out)
    records, settings = collect_shards(out)
    total = settings["num_samples"]
    image_shape = tuple(records[0]["image_shape"])
    labels = []

    def chunks():
        for rec in records:
            arrays = shard_arrays(out, rec)
            labels.append(arrays["labels"])
            yield arrays["images"]

    with NpzWriter(out / "samples.npz") as writer:
        writer.add_streamed("arr_0", (total, *image_shape), np.uint8, chunks())
        writer.add("arr_1", np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))

    shown = min(grid_size, total)
    first = []
    for rec in records:                  # the first `shown` samples, reading only the shards needed
        if sum(len(a["images"]) for a in first) >= shown:
            break
        first.append(shard_arrays(out, rec))
    if shown:
        grid_images = np.concatenate([a["images"] for a in first])[:shown]
        grid_labels = np.concatenate([a["labels"] for a in first])[:shown]
        grid = sample_grid(grid_images, grid_labels)
        tmp = out / f".grid.png.tmp-{os.getpid()}"
        grid.save(tmp, format="PNG")
        tmp.replace(out / "grid.png")

    sidecar = {**identity(settings), "batch_size": settings.get("batch_size"), "snapshot": settings.get("snapshot"),
               "num_samples": total, "image_shape": list(image_shape),
               "shards": [{k: r[k] for k in ("shard", "start", "stop", "sha256", "device", "seconds")}
                          for r in records],
               "grid": {"file": "grid.png", "samples": shown}}
    write_json_atomic(out / "sampler.json", sidecar)
    print(f"merged {len(records)} shards -> {out / 'samples.npz'} (arr_0 {(total, *image_shape)} uint8), "
          f"{out / 'grid.png'}, {out / 'sampler.json'}")
    return sidecar


def run(args) -> int:
    try:
        merge(args.dir, args.grid_size)
    except (IncompleteShardsError, FileNotFoundError) as e:
        print(f"srdit merge: {e}", file=sys.stderr)
        return 1
    return 0
