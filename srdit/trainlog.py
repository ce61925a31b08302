"""Where training numbers go: `metrics.jsonl`, TensorBoard, and W&B when it is set up.

Only rank 0 writes. `metrics.jsonl` gets one JSON object per logged step (flushed at once, so
a killed job loses nothing that was logged); a resumed segment appends, and each line carries
the `segment` (its first step) so that a reader can keep the last line per step when a job was
killed after logging but before its checkpoint. TensorBoard writes into `RUN/tb/` and drops
events past the resume step (`purge_step`). W&B is used only when the `wandb` package is
installed and WANDB_PROJECT is set; the run id is derived from the run directory so resumed
segments continue the same W&B run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, start_step: int, config: dict | None = None,
                 run_name: str | None = None):
        self.enabled = enabled
        self.start_step = start_step
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step)
        except Exception as e:                      # tensorboard missing or broken: keep going
            print(f"srdit train: TensorBoard disabled ({e})", flush=True)
        if os.environ.get("WANDB_PROJECT") and importlib.util.find_spec("wandb") is not None:
            import wandb
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(project=os.environ["WANDB_PROJECT"], name=run_name or run_dir.name,
                                     id=run_id, resume="allow", dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "segment": self.start_step, **values}
        self._jsonl.write(json.dumps(record, default=_json_default) + "\n")
        scalars = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """A non-metric line (resume, checkpoint, stop) in metrics.jsonl."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, "segment": self.start_step, "event": kind, **fields},
                                         default=_json_default) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)
