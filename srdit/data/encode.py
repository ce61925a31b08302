"""`srdit encode`: image shards -> tokenizer latents (+ DINOv2 teacher features) as HDF5 shards.

    srdit encode --images IMG/images.h5 --out LAT/shard00003.h5 --tokenizer e2e-invae \
        --teacher dinov2_vitb14 --shard 3 --num-shards 64 [--random-weights] [--resources DIR]
    srdit encode --join LAT/shard*.h5 --out LAT/cache.h5
    srdit encode --images IMG/images.h5 --out LAT --tokenizer e2e-invae --teacher none   # all + join

One posterior sample per image, `mean + std * noise`, with the noise drawn from a generator
seeded by (seed, global image index): reruns, resumed jobs and any sharding store the same
latent for the same image. Shards are cut at multiples of the batch size, so every batch holds
the same images however the work is split. The teacher stores the last layer's normalised
CLS and patch tokens (float16) at 14 x (resolution / 16) px.

Precision, as the reference: the tokenizer always runs in float32, never under autocast (the
reference's preprocessing, `dataset_tools.py encode` with `encoders.py`, encodes in float32
with PyTorch's default TF32 settings, which this leaves as they are). The teacher runs under
bf16 autocast on a GPU, as the reference's training loop computes its features inside
`accelerator.autocast()` with bf16 mixed precision; on the CPU in float32. The precision is
part of what a shard records ("fp32", or "fp32+teacher-bf16"), and shards of different
precision do not join; a shard from before this rule ("bf16": the tokenizer under autocast)
is refused, to be re-encoded.

Reading, computing and writing overlap: a reader thread reads the images and draws the noise
`PREFETCH` batches ahead, the calling thread runs the networks, and a writer thread waits for
each batch's copy back from the GPU and appends it to the shard (hashing it on the way), at most
`PREFETCH` batches behind. The batches, their contents and their order are those of the serial
loop (`overlap=False`), so the shard is the same bit for bit either way.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from srdit.config import parse_overrides
from srdit.resources import MissingResourceError

from .cache import (join_request, FORMAT_VERSION, IMAGES, JOINED_NAMES, LATENTS, CacheError, ShardedArrays, ShardWriter,
                    finished_shard, join_shards, open_cache, shard_attrs, shard_path, split_range)

# Everything a latent shard was built with; shards join only when these agree.
COMMON_KEYS = ("kind", "format", "tokenizer", "tokenizer_settings", "tokenizer_random", "latent_shape",
               "resolution", "teacher", "teacher_random", "teacher_dim", "teacher_tokens", "noise_seed",
               "batch_size", "precision", "moments", "images_file", "images_checksum", "images_rows",
               "num_classes", "class_names")
PREFETCH = 2        # batches read ahead of the networks, and written behind them, when overlapping


def noise_for(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 noise for each global image index, from a generator seeded by (seed, index).

    numpy's SeedSequence takes the pair as entropy (torch's CPU generator keeps only 32 bits of
    a seed, so (seed, index) could not be packed into one torch seed without collisions).
    """
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for row, index in enumerate(np.asarray(indices).tolist()):
        out[row] = np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(out)


def encode_shard(images: str | Path, out: str | Path, tokenizer, teacher=None, shard: int = 0, num_shards: int = 1,
                 batch_size: int = 64, seed: int = 0, moments: bool = False, device: str | torch.device = "cpu",
                 after_batch: Callable[[int], None] | None = None, overlap: bool = True,
                 teacher_autocast: bool | None = None) -> Path:
    """Encode rows of the joined image cache `images` into the latent shard file `out`.

    `after_batch(rows_written)` is called after every written batch, in the writer thread when
    overlapping (progress hooks; tests use it to simulate a job killed mid-shard: an exception
    it raises stops the encode and leaves no finished shard). `overlap=False` reads, encodes and
    writes one batch after the other in the calling thread. `teacher_autocast`: run the teacher
    under bf16 autocast (default: on CUDA only; tests turn it on for the CPU). The tokenizer runs
    in float32 whatever this says.
    """
    out, device = Path(out), torch.device(device)
    image_index = open_cache(images, IMAGES)
    resolution = int(image_index.attrs["resolution"])
    latent_shape = tokenizer.latent_shape(resolution)
    start, stop = split_range(image_index.rows, shard, num_shards, block=batch_size)
    gpu = device.type == "cuda"
    teacher_bf16 = bool(teacher) and (gpu if teacher_autocast is None else teacher_autocast)
    identity = dict(
        kind=LATENTS, format=FORMAT_VERSION, tokenizer=tokenizer.name, tokenizer_settings=tokenizer.settings,
        tokenizer_random=tokenizer.random_weights, latent_shape=list(latent_shape), resolution=resolution,
        teacher=teacher.name if teacher else "none", teacher_random=bool(teacher and teacher.random_weights),
        teacher_dim=teacher.dim if teacher else 0, teacher_tokens=teacher.num_tokens if teacher else 0,
        noise_seed=seed, batch_size=batch_size, precision="fp32+teacher-bf16" if teacher_bf16 else "fp32",
        moments=moments, images_file=os.path.relpath(image_index.path, out.parent),
        images_checksum=image_index.attrs["checksum"], images_rows=image_index.rows,
        num_classes=image_index.attrs["num_classes"], class_names=image_index.attrs["class_names"],
        row_start=start, row_stop=stop)
    if finished_shard(out, identity):
        print(f"{out}: already complete, skipped")
        return out

    datasets = {"latents": (latent_shape, np.float32), "labels": ((), np.int64)}
    if moments:
        datasets.update(latent_mean=(latent_shape, np.float32), latent_std=(latent_shape, np.float32))
    if teacher:
        datasets.update(teacher_cls=((teacher.dim,), np.float16),
                        teacher_tokens=((teacher.num_tokens, teacher.dim), np.float16))
    if gpu:   # same batch -> same bits: no autotuned algorithm choice
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    tokenizer.to(device)
    if teacher:
        teacher.to(device)
    reader = ShardedArrays(image_index)

    def read(begin: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]:
        """Everything a batch needs that is not a network: its pixels, noise and labels."""
        rows = np.arange(begin, min(stop, begin + batch_size))
        pixels, noise = torch.from_numpy(reader.read("images", rows)), noise_for(rows, latent_shape, seed)
        if gpu:                                     # page-locked: the copies to the GPU run asynchronously
            pixels, noise = pixels.pin_memory(), noise.pin_memory()
        return rows, pixels, noise, reader.read("labels", rows)

    def encode(pixels: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The networks on one batch; the results on the CPU (copies still in flight on a GPU)."""
        pixels, noise = pixels.to(device, non_blocking=True), noise.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=False):            # float32, even inside a caller's autocast
            mean, std = tokenizer.posterior(pixels)
            results = {"latents": mean + std * noise}
            if moments:
                results.update(latent_mean=mean, latent_std=std)
        if teacher:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=teacher_bf16):
                cls, tokens = teacher.features(pixels)
            results.update(teacher_cls=cls.half(), teacher_tokens=tokens.half())
        # to the CPU: asynchronous into pinned memory on a GPU (the writer waits for it), a no-op on the CPU
        return {k: v.to("cpu", non_blocking=gpu) for k, v in results.items()}

    def write(results: dict[str, torch.Tensor], labels: np.ndarray, copied: Any) -> None:
        if copied is not None:
            copied.synchronize()                    # the batch's copies back from the GPU have landed
        writer.append(labels=labels, **{k: v.numpy() for k, v in results.items()})
        if after_batch:
            after_batch(writer.rows)

    begins = list(range(start, stop, batch_size))
    with ShardWriter(out, datasets, identity, capacity=stop - start) as writer, torch.no_grad(), \
            _Pipeline(overlap) as pipe:
        reads = deque(pipe.read(read, b) for b in begins[:PREFETCH + 1])
        writes: deque[Future] = deque()
        for i in tqdm(range(len(begins)), desc=out.name, unit="batch"):
            rows, pixels, noise, labels = reads.popleft().result()
            if i + PREFETCH + 1 < len(begins):
                reads.append(pipe.read(read, begins[i + PREFETCH + 1]))
            results = encode(pixels, noise)
            copied = None
            if gpu:
                copied = torch.cuda.Event()
                copied.record()
            writes.append(pipe.write(write, results, labels, copied))
            while len(writes) > PREFETCH or (writes and writes[0].done()):
                writes.popleft().result()           # bounds the memory held; raises what the writer raised
        while writes:
            writes.popleft().result()
        writer.finish()
    reader.close()
    print(f"{out}: rows {start}..{stop - 1} encoded ({tokenizer.name}, teacher {identity['teacher']})")
    return out


class _Pipeline:
    """One reader and one writer thread (each keeps its batches in order), or, with overlap off,
    the same calls run at once in the calling thread. After a write fails, the writes queued
    behind it do nothing (they fail too; the caller sees the first failure first). Leaving it
    waits for both threads, so nothing touches the shard after its writer is closed."""

    def __init__(self, overlap: bool):
        self.overlap = overlap
        self._pools: list[ThreadPoolExecutor] = []
        self._write_failed = False

    def __enter__(self) -> "_Pipeline":
        if self.overlap:
            self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"srdit-encode-{n}") for n in ("read", "write")]
        return self

    def __exit__(self, *exc) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def read(self, fn, *args) -> Future:
        return self._pools[0].submit(fn, *args) if self.overlap else _done(fn, *args)

    def write(self, fn, *args) -> Future:
        return self._pools[1].submit(self._write, fn, *args) if self.overlap else _done(fn, *args)

    def _write(self, fn, *args):
        if self._write_failed:
            raise RuntimeError("not written: an earlier batch's write failed")
        try:
            return fn(*args)
        except BaseException:
            self._write_failed = True
            raise


def _done(fn, *args) -> Future:
    """Run `fn` now; its result (or exception) in a finished Future."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as e:                      # noqa: BLE001 - handed on through .result()
        future.set_exception(e)
    return future


def join_latents(shards: list[Path], out: str | Path) -> Path:
    """Join latent shards into `out` (cache.h5), checking they cover every image row once."""
    out = Path(out)
    attrs = sorted(((shard_attrs(p), p) for p in shards), key=lambda a: a[0]["row_start"])
    expected = 0
    for a, path in attrs:
        if a["row_start"] != expected:
            raise CacheError(f"cannot join: image rows {expected}..{a['row_start'] - 1} are in no shard (next is "
                             f"{path.name}); run the missing `srdit encode --shard` jobs first")
        expected = a["row_stop"]
    if expected != attrs[-1][0]["images_rows"]:
        raise CacheError(f"cannot join: image rows {expected}..{attrs[-1][0]['images_rows'] - 1} are in no shard; "
                         f"run the missing `srdit encode --shard` jobs first")
    paths = [p for _, p in attrs]
    # images_file is relative to each shard's folder; the joined file sits in the same folder.
    if any(p.parent.resolve() != out.parent.resolve() for p in paths):
        raise CacheError(f"the joined file {out} must be in the same folder as its shards")
    join_shards(out, paths, LATENTS, COMMON_KEYS)
    print(f"{out}: {expected} latents in {len(paths)} shard(s)")
    return out


def _load_models(args):
    from srdit.teachers import load_teacher
    from srdit.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.resources, random_init=args.random_weights,
                               **parse_overrides(args.tokenizer_set))
    teacher = None
    if args.teacher != "none":
        resolution = int(open_cache(args.images, IMAGES).attrs["resolution"])
        teacher = load_teacher(args.teacher, resolution, args.resources, random_init=args.random_weights,
                               **parse_overrides(args.teacher_set))
    return tokenizer, teacher


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", help="joined image cache (images.h5 from `srdit prepare`)")
    parser.add_argument("--out", required=True,
                        help="with --shard: the shard file (or a folder for shardNNNNN.h5); with --join: the "
                             "joined file (or a folder for cache.h5); otherwise the cache folder")
    parser.add_argument("--tokenizer", default="e2e-invae", choices=["e2e-invae", "sd-vae", "pixel"])
    parser.add_argument("--teacher", default="dinov2_vitb14",
                        choices=["dinov2_vitb14", "dinov2_vitl14", "dinov2_vits14", "none"],
                        help="teacher whose CLS + patch tokens are cached (none: no features)")
    parser.add_argument("--no-teacher", dest="teacher", action="store_const", const="none",
                        help="same as --teacher none")
    parser.add_argument("--shard", type=int, help="encode only this shard (a Slurm array index)")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch; shards are cut at multiples")
    parser.add_argument("--seed", type=int, default=0, help="posterior-noise seed (with each image's index)")
    parser.add_argument("--moments", action="store_true", help="also store the posterior mean and std")
    parser.add_argument("--random-weights", action="store_true",
                        help="randomly initialised tokenizer and teacher (tests, the CPU demo): latents mean nothing")
    parser.add_argument("--resources", default=None, help="folder of pretrained files (default: resources/)")
    parser.add_argument("--tokenizer-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="tokenizer constructor overrides, e.g. ch=32 (random weights only)")
    parser.add_argument("--teacher-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="teacher overrides, e.g. depth=2 (tests)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--join", nargs="*", metavar="SHARD",
                        help="join these shards (default: the folder's shard*.h5) into the joined file")
    parser.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    try:
        if args.join is not None:
            join_latents(*join_request(out, args.join, LATENTS))
            return 0
        if not args.images:
            print("srdit encode: --images is required (except with --join)", file=sys.stderr)
            return 2
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        tokenizer, teacher = _load_models(args)
        common = dict(tokenizer=tokenizer, teacher=teacher, num_shards=args.num_shards, batch_size=args.batch_size,
                      seed=args.seed, moments=args.moments, device=device)
        if args.shard is not None:
            path = out if out.suffix == ".h5" else shard_path(out, args.shard)
            encode_shard(args.images, path, shard=args.shard, **common)
        else:
            paths = [encode_shard(args.images, shard_path(out, i), shard=i, **common) for i in range(args.num_shards)]
            join_latents(paths, out / JOINED_NAMES[LATENTS])
    except (CacheError, MissingResourceError, ValueError) as e:
        print(f"srdit encode: {e}", file=sys.stderr)
        return 1
    return 0
