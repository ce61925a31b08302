"""The training dataset and loader over a latent cache (from `srdit encode`).

    loader = make_train_loader(cache, micro_batch=32, rank=r, world_size=w, seed=0, num_workers=4,
                               expect=dict(tokenizer="e2e-invae", resolution=256, teacher="dinov2_vitb14"))
    for batch in loader:          # endless: epoch after epoch
        batch["latent"]           # (B, C, h, w) float32, raw (unscaled) posterior sample
        batch["label"]            # (B,) int64
        batch["index"]            # (B,) int64, the rows read (for checks and debugging)
        batch["teacher_cls"]      # (B, D) and batch["teacher_tokens"] (B, N, D), when cached
        batch["image"]            # (B, 3, R, R) uint8, instead, when the cache has no teacher features
    state = loader.state_dict()   # saved with a checkpoint; loader.load_state_dict(state) resumes

Every rank draws the same permutation of all rows from (seed, epoch); global batch k of an
epoch is rows perm[k*G:(k+1)*G] with G = micro_batch * world_size, and rank r takes its
slice [r*B:(r+1)*B], in the permutation's (random) order. The rows are read in increasing
order (h5py needs it, and it is kinder to the disk), then put back in the permutation's order:
the order inside a micro-batch matters to training, because contrastive flow matching pairs
each sample with its neighbour (`torch.roll` of the batch) as its negative. Caches are written
in class-folder order, so a sorted micro-batch would pair nearly every sample with a sample of
the neighbouring class; in the permuted order the partner is a random other sample, as with
the reference's shuffled DataLoader. The loader counts the batches it has *handed out* (not
those read ahead by its threads), so its state after step n resumes at exactly the batch step
n + 1 would have read. An incomplete last global batch of an epoch is dropped, as the
reference's `drop_last`.
"""
from __future__ import annotations

import json
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import IMAGES, LATENTS, CacheMismatchError, ShardedArrays, check_arrays, open_cache


# Rows at least this large that must be reordered are read one by one into place (see _read).
DIRECT_ROW_BYTES = 128 << 10


class TrainDataset(Dataset):
    """Random access to a latent cache; `dataset[indices]` returns one batch as a dict of tensors,
    its rows in the order of `indices` (unique, any order; read in increasing order).

    `expect` (tokenizer, resolution, teacher, ...) is checked against what the cache was built
    with. The teacher is only checked when the cache holds features; without them the batches
    carry the uint8 images (read from the image cache the latents were encoded from) and the
    trainer runs its teacher itself.
    """

    def __init__(self, cache_path: str | Path, expect: dict[str, Any] | None = None,
                 feature_dtype: torch.dtype = torch.float32, pin_memory: bool = False):
        expect = dict(expect or {})
        teacher = expect.pop("teacher", None)
        self.index = open_cache(cache_path, LATENTS, expect=expect)
        attrs = self.index.attrs
        self.has_teacher = attrs["teacher"] != "none"
        self.latent_shape = tuple(json.loads(attrs["latent_shape"]))
        required = {"latents": (self.latent_shape, np.float32), "labels": ((), np.int64)}
        if self.has_teacher:
            required.update(teacher_cls=((attrs["teacher_dim"],), np.float16),
                            teacher_tokens=((attrs["teacher_tokens"], attrs["teacher_dim"]), np.float16))
        check_arrays(self.index, required)             # shapes and dtypes as the cache records them
        if teacher is not None and self.has_teacher and attrs["teacher"] != teacher:
            raise CacheMismatchError(
                f"{self.index.path} holds features of teacher {attrs['teacher']!r}, but {teacher!r} is expected; "
                f"use a cache encoded with --teacher {teacher} (or one without features, --no-teacher)")
        self.feature_dtype = feature_dtype
        self.pin_memory = pin_memory
        self._buffers = threading.local()
        self.arrays = ShardedArrays(self.index)
        self.images = None
        if not self.has_teacher:
            images_path = self.index.path.parent / attrs["images_file"]
            try:
                image_index = open_cache(images_path, IMAGES, expect={"checksum": attrs["images_checksum"]},
                                         required={"images": ((attrs["resolution"],) * 2 + (3,), np.uint8)})
            except CacheMismatchError as e:
                raise CacheMismatchError(f"{images_path} is not the image cache {self.index.path} was encoded "
                                         f"from (its checksum differs); re-encode the latents from it") from e
            self.images = ShardedArrays(image_index)
        # Labels are small (8 bytes a row): read them once instead of once per batch.
        self.labels = torch.from_numpy(self.arrays.read("labels", np.arange(self.index.rows)))

    def __len__(self) -> int:
        return self.index.rows

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        # Read in increasing row order; `place` puts sorted row k back at its position in `indices`.
        order = np.argsort(indices, kind="stable")
        place = None if np.all(order[1:] > order[:-1]) else order
        ascending = indices[order]
        rows = torch.from_numpy(indices)
        batch = {"index": rows, "latent": self._read(self.arrays, "latents", ascending, torch.float32, place),
                 "label": self.labels[rows]}
        if self.has_teacher:
            batch["teacher_cls"] = self._read(self.arrays, "teacher_cls", ascending, self.feature_dtype, place)
            batch["teacher_tokens"] = self._read(self.arrays, "teacher_tokens", ascending, self.feature_dtype, place)
        else:
            batch["image"] = self._read(self.images, "images", ascending, torch.uint8, place).permute(0, 3, 1, 2)
        return batch

    def _read(self, arrays: ShardedArrays, name: str, ascending: np.ndarray, dtype: torch.dtype,
              place: np.ndarray | None = None) -> torch.Tensor:
        """Read rows `ascending` (sorted) into the batch tensor (pinned when asked), converting the
        dtype if needed; with `place`, sorted row k lands at position place[k] of the batch.

        Pinned tensors come from torch's caching host allocator, which recycles freed blocks:
        besides making the host-to-GPU copy asynchronous, that spares the page faults of fresh
        memory, which cost more than the reads themselves (measured on this CPU). For the same
        reason a read that must be converted or reordered goes through a buffer that each reader
        thread keeps and reuses. Large rows in the stored dtype (teacher tokens as float16,
        images) that must be reordered are read one row at a time straight into their places
        instead: a second pass over them costs more than the per-read overhead (measured on a
        shared 2-core VM, DINOv2-B tokens as float16, batch 32: buffer + reorder ~2x the time of
        the sorted read, row by row 1.05-1.3x).
        """
        row_shape, stored = arrays.index.arrays[name]
        out = torch.empty((len(ascending), *row_shape), dtype=dtype, pin_memory=self.pin_memory)
        same_dtype = torch.from_numpy(np.empty(0, stored)).dtype == dtype
        if same_dtype and place is None:
            arrays.read(name, ascending, out=out.numpy())
            return out
        if same_dtype and out[0].nbytes >= DIRECT_ROW_BYTES:
            slots = out.numpy()
            for k, p in enumerate(place.tolist()):
                arrays.read(name, ascending[k:k + 1], out=slots[p:p + 1])
            return out
        read = torch.from_numpy(arrays.read(name, ascending, out=self._buffer(name, len(ascending), row_shape, stored)))
        if place is None:
            out.copy_(read)
        elif out[0].nbytes >= DIRECT_ROW_BYTES:
            for k, p in enumerate(place.tolist()):      # one copy per row, converting the dtype on the way
                out[p].copy_(read[k])
        else:                                           # small rows: one call (out[place[k]] = read[k])
            out.index_copy_(0, torch.from_numpy(place), read if same_dtype else read.to(dtype))
        return out

    def _buffer(self, name: str, rows: int, row_shape: tuple, dtype) -> np.ndarray:
        """This thread's reusable read buffer for array `name`, `rows` rows long."""
        buffers = self._buffers.__dict__
        buf = buffers.get(name)
        if buf is None or len(buf) < rows:
            buf = buffers[name] = np.empty((rows, *row_shape), dtype)
        return buf[:rows]


class EpochBatchSampler:
    """Endless stream of this rank's index batches (in the permutation's order, not sorted),
    starting at global batch `position`."""

    def __init__(self, num_samples: int, micro_batch: int, rank: int, world_size: int, seed: int, position: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_samples, self.micro_batch, self.rank, self.world_size = num_samples, micro_batch, rank, world_size
        self.seed, self.position = seed, position
        self.global_batch = micro_batch * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the cache has {num_samples} samples, fewer than one global batch "
                             f"(micro_batch {micro_batch} x world_size {world_size}); use a smaller batch")

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch, batch = divmod(self.position, self.batches_per_epoch)
        while True:
            order = self.permutation(epoch)
            for k in range(batch, self.batches_per_epoch):
                lo = k * self.global_batch + self.rank * self.micro_batch
                yield order[lo:lo + self.micro_batch]
            epoch, batch = epoch + 1, 0


class TrainLoader:
    """Iterates batches (dicts of tensors) forever; `state_dict()` / `load_state_dict()` for exact resume.

    Batches are read by `num_workers` threads, `prefetch` batches ahead, and handed out in order.
    Threads, not worker processes: a batch read is a memory copy from the page cache (numpy and
    torch release the GIL for it), while a worker process must hand each batch over through
    fresh shared memory, which measured 3.5x slower than the read itself.
    """

    def __init__(self, dataset: TrainDataset, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 4, prefetch: int | None = None):
        self.dataset = dataset
        self.sampler_args = dict(num_samples=len(dataset), micro_batch=micro_batch, rank=rank,
                                 world_size=world_size, seed=seed)
        self.batches_per_epoch = EpochBatchSampler(**self.sampler_args).batches_per_epoch
        self.num_workers = num_workers
        self.prefetch = prefetch if prefetch is not None else 2 * max(1, num_workers)
        self.position = 0           # global batches handed out so far (the same on every rank)

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = iter(EpochBatchSampler(**self.sampler_args, position=self.position))
        if self.num_workers == 0:
            for indices in batches:
                batch = self.dataset[indices]
                self.position += 1
                yield batch
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="srdit-loader")
        try:
            pending = deque(pool.submit(self.dataset.__getitem__, next(batches)) for _ in range(self.prefetch))
            while True:
                batch = pending.popleft().result()
                pending.append(pool.submit(self.dataset.__getitem__, next(batches)))
                self.position += 1      # counted when handed out, not when read ahead
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def state_dict(self) -> dict[str, int]:
        a = self.sampler_args
        return dict(position=self.position, epoch=self.epoch, batch_in_epoch=self.position % self.batches_per_epoch,
                    num_samples=a["num_samples"], global_batch=a["micro_batch"] * a["world_size"],
                    micro_batch=a["micro_batch"], world_size=a["world_size"], seed=a["seed"])

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position; the next `iter()` starts there. Refuses a different order."""
        mine = self.state_dict()
        for key in ("num_samples", "global_batch", "micro_batch", "world_size", "seed"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {mine[key]}: the batch order "
                                 f"would differ, so the run cannot resume exactly; use the saved {key}")
        self.position = int(state["position"])


def make_train_loader(cache_path: str | Path, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                      num_workers: int = 4, expect: dict[str, Any] | None = None,
                      feature_dtype: torch.dtype = torch.float32, pin_memory: bool | None = None) -> TrainLoader:
    """The training loader over a latent cache (its folder or cache.h5); see the module docstring.

    `num_workers` reader threads (0: read in the calling thread). `pin_memory` (default: when
    CUDA is available) puts batches in page-locked memory for asynchronous copies to the GPU.
    `feature_dtype=torch.float16` hands the teacher features over as stored, half the bytes and
    no conversion (measured ~2x the samples/s here); cast them on the GPU instead.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    dataset = TrainDataset(cache_path, expect=expect, feature_dtype=feature_dtype, pin_memory=pin)
    return TrainLoader(dataset, micro_batch, rank, world_size, seed, num_workers)
