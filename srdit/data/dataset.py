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
slice [r*B:(r+1)*B]. A batch's indices are sorted before reading (h5py needs increasing
indices; the order inside a batch does not matter to training). The loader counts the batches
it has *handed out* (not those prefetched by workers), so its state after step n resumes at
exactly the batch step n + 1 would have read. An incomplete last global batch of an epoch is
dropped, as the reference's `drop_last`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cache import IMAGES, LATENTS, CacheError, CacheMismatchError, ShardedArrays, open_cache


class TrainDataset(Dataset):
    """Random access to a latent cache; `dataset[sorted_indices]` returns one batch as a dict of tensors.

    `expect` (tokenizer, resolution, teacher, ...) is checked against what the cache was built
    with. The teacher is only checked when the cache holds features; without them the batches
    carry the uint8 images (read from the image cache the latents were encoded from) and the
    trainer runs its teacher itself.
    """

    def __init__(self, cache_path: str | Path, expect: dict[str, Any] | None = None,
                 feature_dtype: torch.dtype = torch.float32):
        expect = dict(expect or {})
        teacher = expect.pop("teacher", None)
        self.index = open_cache(cache_path, LATENTS, expect=expect)
        attrs = self.index.attrs
        self.has_teacher = attrs["teacher"] != "none"
        if teacher is not None and self.has_teacher and attrs["teacher"] != teacher:
            raise CacheMismatchError(
                f"{self.index.path} holds features of teacher {attrs['teacher']!r}, but {teacher!r} is expected; "
                f"use a cache encoded with --teacher {teacher} (or one without features, --no-teacher)")
        self.latent_shape = tuple(json.loads(attrs["latent_shape"]))
        if self.index.arrays["latents"] != (self.latent_shape, np.dtype(np.float32)):
            raise CacheError(f"{self.index.path}: latents are {self.index.arrays['latents']}, the cache says "
                             f"{self.latent_shape} float32")
        self.feature_dtype = feature_dtype
        self.arrays = ShardedArrays(self.index)
        self.images = None
        if not self.has_teacher:
            images_path = self.index.path.parent / attrs["images_file"]
            image_index = open_cache(images_path, IMAGES, expect={"checksum": attrs["images_checksum"]})
            self.images = ShardedArrays(image_index)
        # Labels are small (8 bytes a row): read them once instead of once per batch.
        self.labels = torch.from_numpy(self.arrays.read("labels", np.arange(self.index.rows)))

    def __len__(self) -> int:
        return self.index.rows

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        rows = torch.from_numpy(indices)
        batch = {"index": rows, "latent": torch.from_numpy(self.arrays.read("latents", indices)),
                 "label": self.labels[rows]}
        if self.has_teacher:
            batch["teacher_cls"] = torch.from_numpy(self.arrays.read("teacher_cls", indices)).to(self.feature_dtype)
            batch["teacher_tokens"] = torch.from_numpy(self.arrays.read("teacher_tokens", indices)).to(self.feature_dtype)
        else:
            batch["image"] = torch.from_numpy(self.images.read("images", indices)).permute(0, 3, 1, 2)
        return batch


class EpochBatchSampler:
    """Endless stream of this rank's sorted index batches, starting at global batch `position`."""

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
                yield np.sort(order[lo:lo + self.micro_batch])
            epoch, batch = epoch + 1, 0


class TrainLoader:
    """Iterates batches (dicts of tensors) forever; `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, dataset: TrainDataset, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 4, pin_memory: bool | None = None, prefetch_factor: int = 4):
        self.dataset = dataset
        self.sampler_args = dict(num_samples=len(dataset), micro_batch=micro_batch, rank=rank,
                                 world_size=world_size, seed=seed)
        self.batches_per_epoch = EpochBatchSampler(**self.sampler_args).batches_per_epoch
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.position = 0           # global batches handed out so far (the same on every rank)

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = EpochBatchSampler(**self.sampler_args, position=self.position)
        loader = DataLoader(self.dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
                            persistent_workers=False)
        for batch in loader:
            self.position += 1
            yield batch

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

    `feature_dtype=torch.float16` halves the teacher features' worker-to-trainer traffic (cast
    them on the GPU instead).
    """
    dataset = TrainDataset(cache_path, expect=expect, feature_dtype=feature_dtype)
    return TrainLoader(dataset, micro_batch, rank, world_size, seed, num_workers, pin_memory)
