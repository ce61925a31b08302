"""Staging the training cache to node-local disk at the start of a training job.

Where the shared file system cannot feed the GPUs (a B/1 job on 8 GPUs reads about 1 GB/s of
latents and cached teacher features at 10 it/s), config `stage_dir` (e.g. "$TMPDIR") makes every
training job copy its cache there first and read it from there:

- the latent cache (the joined cache.h5 and its shards) and, when the cache holds no teacher
  features (the teacher runs online), the image cache it was encoded from, in the same relative
  layout, so the latent cache still finds its images;
- the copy is verified against the checksums recorded when the cache was built (every shard is
  read back and hashed: `open_cache(..., verify=True)`); a mismatch deletes the copy and fails;
- one copy per node and cache: the processes of a job (and jobs sharing a node) take a file
  lock, and a verified copy is reused (a marker file records the source's checksum);
- free space is checked first, with a message that gives the numbers.

    srdit train NAME --run-dir DIR --cache results/cache/.../cache.h5 --stage-dir '$TMPDIR'
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from srdit.data.cache import IMAGES, LATENTS, CacheError, joined_path, open_cache

MARKER = ".srdit-staged.json"


class StagingError(RuntimeError):
    """The cache could not be staged (no space, no such folder, a corrupt copy)."""


def expand_stage_dir(stage_dir: str) -> Path:
    """Expand environment variables and ~; an unset variable is an error, not a literal '$TMPDIR'."""
    expanded = os.path.expanduser(os.path.expandvars(stage_dir))
    if "$" in expanded:
        raise StagingError(f"stage_dir {stage_dir!r}: an environment variable in it is not set on this "
                           f"node ({expanded!r}); set it, or give a plain path")
    return Path(expanded)


def cache_files(cache: str | Path) -> tuple[Path, list[Path], Path]:
    """(joined latent file, every file a training job reads, their common folder)."""
    src = Path(os.path.abspath(joined_path(cache, LATENTS)))
    index = open_cache(src, LATENTS)
    files = [src] + [Path(os.path.abspath(p)) for p in index.shard_files]
    if index.attrs["teacher"] == "none":            # online teacher: the images come along
        images = Path(os.path.abspath(os.path.normpath(src.parent / index.attrs["images_file"])))
        image_index = open_cache(images, IMAGES)
        files += [images] + [Path(os.path.abspath(p)) for p in image_index.shard_files]
    base = Path(os.path.commonpath([str(p.parent) for p in files]))
    return src, files, base


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def stage_cache(cache: str | Path, stage_dir: str | Path, log=print) -> Path:
    """Copy the cache under `stage_dir`, verify it, and return the staged joined file."""
    src, files, base = cache_files(cache)
    root = expand_stage_dir(str(stage_dir))
    root.mkdir(parents=True, exist_ok=True)
    source_id = hashlib.sha256(str(src).encode()).hexdigest()[:16]
    dest = root / "srdit-stage" / source_id
    dest.mkdir(parents=True, exist_ok=True)
    staged = dest / src.relative_to(base)
    with open(src.parent / src.name, "rb") as f:     # the joined file's bytes identify the build
        source_sum = hashlib.sha256(f.read()).hexdigest()
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # one copier per node; the others wait here
        marker = dest / MARKER
        if marker.exists():
            try:
                if json.loads(marker.read_text()).get("source_sha256") == source_sum:
                    log(f"srdit stage: reusing the verified copy {staged}")
                    return staged
            except (OSError, ValueError):
                pass
            marker.unlink(missing_ok=True)
        need = sum(p.stat().st_size for p in files)
        free = shutil.disk_usage(dest).free
        present = sum((dest / p.relative_to(base)).stat().st_size for p in files
                      if (dest / p.relative_to(base)).exists())
        if need - present > free:
            raise StagingError(f"stage_dir {root}: the cache needs {need / 1e9:.1f} GB, only "
                               f"{(free + present) / 1e9:.1f} GB free there; use a larger node-local "
                               f"folder or set stage_dir: \"\" to read the cache in place")
        t0, copied = time.monotonic(), 0
        for path in files:
            target = dest / path.relative_to(base)
            if target.exists() and target.stat().st_size == path.stat().st_size and path != src:
                continue                         # a shard from an earlier, interrupted staging: verified below
            _copy(path, target)
            copied += path.stat().st_size
        try:
            index = open_cache(staged, LATENTS, verify=True)
            if index.attrs["teacher"] == "none":
                open_cache(staged.parent / index.attrs["images_file"], IMAGES, verify=True)
        except CacheError as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise StagingError(f"the staged copy of {src} failed its checksum ({e}); the copy was deleted") from e
        tmp = marker.with_name(MARKER + ".tmp")
        tmp.write_text(json.dumps({"source": str(src), "source_sha256": source_sum, "bytes": need}))
        os.replace(tmp, marker)
        log(f"srdit stage: copied {copied / 1e9:.2f} GB of {src} to {dest} and verified every shard's "
            f"checksum in {time.monotonic() - t0:.1f} s")
    return staged
