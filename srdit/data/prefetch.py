"""Copy training batches to the GPU ahead of time, on a side stream, from pinned memory.

    loader = DevicePrefetcher(make_train_loader(...), device)
    for batch in loader:            # tensors already on `device`
        ...
    loader.state_dict()             # the position after the last batch handed out (exact resume)

While the GPU computes step n, batch n + 1 is already being copied on a second CUDA stream
(`depth` batches ahead); the compute stream waits for that copy only when it takes the batch.
The host tensors must be in pinned memory for the copy to be asynchronous: the loader pins
them on CUDA (`make_train_loader`), and any tensor that is not pinned is pinned here.

On the CPU (or any device that is not CUDA) the prefetcher passes the loader's batches through
unchanged: there is nothing to overlap. `force=True` runs the read-ahead queue anyway, with
plain copies (tests exercise the queue on the CPU that way).

Exact resume: the wrapped loader counts the batches it has handed out, and the prefetcher has
taken `depth` more than the trainer has used, so `state_dict()` is the loader's state recorded
right after the batch the trainer took last, not the loader's current one.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import torch


class DevicePrefetcher:
    def __init__(self, loader, device, depth: int = 1, force: bool = False):
        if depth < 1:
            raise ValueError(f"DevicePrefetcher: depth must be >= 1, got {depth}")
        self.loader = loader
        self.device = torch.device(device)
        self.depth = depth
        self.cuda = self.device.type == "cuda"
        self.enabled = self.cuda or force
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._queue: deque = deque()
        self._source: Iterator | None = None
        self._consumed_state: dict | None = None

    # ------------------------------------------------------------------ the loader's interface
    def __len__(self):
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or self._consumed_state is None:
            return self.loader.state_dict()
        return dict(self._consumed_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._queue.clear()
        self._source = None
        self._consumed_state = None

    def __getattr__(self, name):
        # epoch, position, batches_per_epoch, ... of the wrapped loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "DevicePrefetcher":
        if not self.enabled:
            return iter(self.loader)
        if self._source is None:
            self._source = iter(self.loader)
        return self

    def __next__(self) -> dict[str, Any]:
        if self._source is None:
            iter(self)
        while len(self._queue) < self.depth:
            if not self._enqueue():
                break
        if not self._queue:
            self._source = None
            raise StopIteration
        batch, host, event, state = self._queue.popleft()
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                    value.record_stream(current)     # allocated on the side stream, used on this one
        del host                                     # the copy has been waited for: the pinned buffer may go
        self._consumed_state = state
        self._enqueue()                              # start copying the next batch while this one is used
        return batch

    def _enqueue(self) -> bool:
        """Take one batch from the loader and start its copy; False when the loader is exhausted."""
        try:
            host = next(self._source)
        except StopIteration:
            return False
        state = self.loader.state_dict()
        if self.cuda:
            with torch.cuda.stream(self._stream):
                batch = {k: _to_device(v, self.device) for k, v in host.items()}
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            batch, event = {k: _to_device(v, self.device) for k, v in host.items()}, None
        self._queue.append((batch, host, event, state))
        return True


def _to_device(value, device: torch.device):
    if not isinstance(value, torch.Tensor):
        return value
    if device.type == "cuda":
        if value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    return value.to(device)
