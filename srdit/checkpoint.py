"""Checkpoints of a training run: atomic files, RNG state, full training states and snapshots.

Layout of `RUN/checkpoints/`:

    step0000100/state.pt          rank 0: model (fp32), EMA, optimizer (full tensors per
                                  parameter name), step, world size, config
    step0000100/rank00000.pt      one per rank: RNG states (python, numpy, torch, CUDA) and the
                                  data loader position
    latest                        text: the tag of the newest complete checkpoint

and `RUN/snapshots/step0000100.safetensors` (model + EMA, for sampling).

A checkpoint is written into `.tmp-step0000100/`, every file itself written under a temporary
name and renamed; the directory is renamed to `step0000100/` only when every rank has finished,
and `latest` is rewritten last. A job killed at any moment therefore leaves either the previous
checkpoint or the new one, never a partial one that looks complete.

The optimizer state is stored whole (not as DeepSpeed's per-rank ZeRO partitions), so a
checkpoint does not depend on the number of processes that wrote it: `gather_optimizer_state`
assembles each parameter's AdamW moments from the ZeRO partitions, and
`restore_optimizer_state` cuts them again for the current world size.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
SNAPSHOT_DIR = "snapshots"
LATEST = "latest"
STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = "srdit-train-state/1"
SNAPSHOT_FORMAT = "srdit-snapshot/1"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_TAG = re.compile(r"^step(\d{7,})$")


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(text)
    _replace_atomically(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    torch.save(obj, tmp)
    _replace_atomically(tmp, path)


# --------------------------------------------------------------------------------------------
# RNG state (per rank)
# --------------------------------------------------------------------------------------------

def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG a training step may touch, in a form `torch.load(weights_only=True)` reads."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise ValueError("the checkpoint was written on the CPU and has no CUDA RNG state; "
                             "it cannot resume bitwise on a GPU (start the segment on the CPU, or "
                             "accept a fresh CUDA seed by resuming with another world size)")
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    """random.setstate wants nested tuples; a round trip through torch.load may give lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------

def step_tag(step: int) -> str:
    return f"step{step:07d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place) under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names; if the pointer is missing (a job killed between the rename
    and the pointer update), the newest complete checkpoint directory."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists():
        tag = pointer.read_text().strip()
        path = root / tag
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{pointer} names {tag!r} but {path / STATE_FILE} does not exist; "
                                    f"the checkpoint directory was removed by hand? Point {pointer} at "
                                    f"one of {[p.name for _, p in list_checkpoints(root)]} or delete it")
        return path
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    root = Path(root)
    current = latest_checkpoint(root)
    found = list_checkpoints(root)
    removed = []
    for _, path in found[:max(0, len(found) - max(keep, 1))]:
        if current is not None and path.resolve() == current.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Optimizer state across ZeRO partitions
# --------------------------------------------------------------------------------------------

def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _adam_step_value(state: dict) -> int:
    return int(float(state["step"]))


def gather_optimizer_state(engine, named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
    """AdamW state as whole tensors: {"step": int, "exp_avg": {name: t}, "exp_avg_sq": {name: t}}.

    Collective under ZeRO 1/2 (each parameter's moments are all-reduced from the ranks that own
    a piece of it): every rank must call it, in the same order. Tensors come back on the CPU.
    """
    out: dict[str, Any] = {k: {} for k in ADAM_STATE_KEYS}
    stage = _zero_stage(engine)
    if stage == 0:
        opt = engine.optimizer
        step = None
        for name, p in named_params:
            st = opt.state.get(p)
            if not st:
                raise RuntimeError(f"optimizer has no state for {name}: a checkpoint needs at least one step")
            for k in ADAM_STATE_KEYS:
                out[k][name] = st[k].detach().float().cpu().clone()
            step = _adam_step_value(st)
    elif stage in (1, 2):
        from deepspeed.utils import safe_get_full_optimizer_state
        base = engine.optimizer.optimizer
        partition = base.param_groups[0]["params"][0]
        if partition not in base.state:
            raise RuntimeError("optimizer has no state yet: a checkpoint needs at least one step")
        step = _adam_step_value(base.state[partition])
        for name, p in named_params:
            for k in ADAM_STATE_KEYS:
                out[k][name] = safe_get_full_optimizer_state(p, k).detach().float().cpu()
    else:
        raise ValueError(f"ZeRO stage {stage} is not supported (allowed: 0, 1, 2)")
    out["step"] = step
    return out


def restore_optimizer_state(engine, named_params: list[tuple[str, torch.nn.Parameter]],
                            saved: dict[str, Any]) -> None:
    """Load whole-tensor AdamW state into the engine's optimizer, partitioned for this world size.

    Call right after `deepspeed.initialize`, before the first step: the state is created here
    (torch's optimizers create it lazily) through the optimizer's own `load_state_dict`, which
    puts every tensor on the right device and dtype. Under ZeRO 1/2 each rank keeps the
    fragments of the flat fp32 partition it owns (`param._hp_mapping` says which).
    """
    missing = [n for n, _ in named_params if n not in saved["exp_avg"]]
    if missing:
        raise KeyError(f"the checkpoint's optimizer state has no entry for {missing[:5]}; "
                       f"was it written for another model config?")
    step = torch.tensor(float(saved["step"]), dtype=torch.float32)
    stage = _zero_stage(engine)
    if stage == 0:
        opt = engine.optimizer
        by_id = {id(p): n for n, p in named_params}
        state, index = {}, 0
        for group in opt.param_groups:
            for p in group["params"]:
                name = by_id[id(p)]
                state[index] = {"step": step.clone(), **{k: saved[k][name] for k in ADAM_STATE_KEYS}}
                index += 1
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        return
    if stage not in (1, 2):
        raise ValueError(f"ZeRO stage {stage} is not supported (allowed: 0, 1, 2)")
    base = engine.optimizer.optimizer
    flats = [{k: torch.zeros_like(g["params"][0]) for k in ADAM_STATE_KEYS} for g in base.param_groups]
    for name, p in named_params:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:           # this rank owns no piece of the parameter
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        for k in ADAM_STATE_KEYS:
            piece = saved[k][name].reshape(-1).narrow(0, lp.start, lp.numel)
            flats[mapping.param_group_index][k].narrow(0, hp.start, hp.numel).copy_(piece)
    state = {i: {"step": step.clone(), **flat} for i, flat in enumerate(flats)}
    base.load_state_dict({"state": state, "param_groups": base.state_dict()["param_groups"]})


# --------------------------------------------------------------------------------------------
# Snapshots: model + EMA in one safetensors file, independent of the training world size
# --------------------------------------------------------------------------------------------

def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def save_snapshot(path: str | Path, model_state: dict[str, torch.Tensor],
                  ema_state: dict[str, torch.Tensor], config_json: str, step: int) -> None:
    """Tensors `model.<name>` and `ema.<name>`; metadata `config` (the experiment JSON), `step`."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"model.{k}": _cpu_copy(v) for k, v in model_state.items()}
    tensors.update({f"ema.{k}": _cpu_copy(v) for k, v in ema_state.items()})
    tmp = _tmp_name(path)
    save_file(tensors, str(tmp), metadata={"format": SNAPSHOT_FORMAT, "config": config_json, "step": str(step)})
    _replace_atomically(tmp, path)


def read_snapshot(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metadata, model state_dict, EMA state_dict) of a snapshot file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"snapshot {path} does not exist; snapshots are written by "
                                f"`srdit train` into RUN/snapshots/step{{N:07d}}.safetensors")
    model, ema = {}, {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            prefix, _, name = key.partition(".")
            (model if prefix == "model" else ema)[name] = f.get_tensor(key)
    if meta.get("format") != SNAPSHOT_FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not an srdit snapshot (metadata format {meta.get('format')!r}, "
                         f"expected {SNAPSHOT_FORMAT!r} with a 'config' entry)")
    return meta, model, ema


def load_snapshot(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(cfg, model) from a snapshot: the model built from the stored config, with the EMA (or the
    raw) weights loaded strictly, in eval mode."""
    from srdit.config import ExperimentConfig, from_dict, validate
    from srdit.models import build_model

    meta, model_state, ema_state = read_snapshot(path)
    cfg = validate(from_dict(ExperimentConfig, json.loads(meta["config"])))
    model = build_model(cfg.model)
    state = ema_state if use_ema else model_state
    if not state:
        raise ValueError(f"{path} has no {'ema' if use_ema else 'model'}.* tensors")
    model.load_state_dict(state, strict=True)
    return cfg, model.to(device).eval()
