"""`srdit check-reference FOLDER`: compare our model and sampler grid with golden data recorded
from the original SR-DiT code (format: tests/fixtures/reference/README.md; the repository ships
that set: `python -m srdit check-reference tests/fixtures/reference` from the repository root).

Builds our model from FOLDER/config.json through the converter, loads FOLDER/model.safetensors,
runs every FOLDER/case*.safetensors and compares each `out.*` tensor (max abs error; fails above
5e-5 in float32, 1e-6 with --float64). Also compares the fixed tables (pos_embed, RoPE), the
`dbg.*` intermediates when present (relative to each tensor's scale; informational) and every
grid of time_grid.safetensors with `srdit.sample.time_grid`. Every size is read from the folder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

FLOAT32_TOLERANCE = 5e-5       # ~10x the reference's own float32-vs-float64 error
FLOAT64_TOLERANCE = 1e-6
TABLE_TOLERANCE = 1e-6         # RoPE tables: float32 arithmetic, may differ in the last bit (~3e-8)
GRID_TOLERANCE = 1e-12         # time grids are float64


@dataclass
class Check:
    group: str                 # file (or "tables")
    name: str                  # tensor / grid name
    error: float               # max abs error (relative to max |reference| when `relative`)
    tolerance: float | None
    informational: bool = False
    relative: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.informational or (self.tolerance is not None and math.isfinite(self.error)
                                      and self.error <= self.tolerance)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _failed(group: str, name: str, note: str) -> Check:
    return Check(group, name, math.inf, 0.0, note=note)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def load_reference_model(folder: Path):
    """(model_cfg, our model in float32 eval mode, the original state_dict)."""
    from safetensors.torch import load_file

    from srdit.convert import convert_state_dict, model_config_from_original
    from srdit.models import build_model

    config = json.loads((folder / "config.json").read_text())
    cfg = model_config_from_original(config)
    original = load_file(str(folder / "model.safetensors"))
    model = build_model(cfg)
    model.load_state_dict(convert_state_dict(original, cfg), strict=True)
    return cfg, model.eval(), original


def check_tables(model, original: dict[str, torch.Tensor]) -> list[Check]:
    """Our recomputed pos_embed / RoPE tables against the reference's stored ones."""
    from srdit.models.tables import sincos_pos_embed_2d

    cfg = model.config
    ours_pos = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size, model.num_prefix).unsqueeze(0)
    checks = [Check("tables", "pos_embed", _max_abs(ours_pos, original["pos_embed"]), TABLE_TOLERANCE)]
    for key, ours in (("feat_rope.freqs_cos", model.rope_cos), ("feat_rope.freqs_sin", model.rope_sin)):
        if key in original:
            ours_hw = ours[model.num_prefix:] if ours is not None else torch.empty(0)
            checks.append(Check("tables", key, _max_abs(ours_hw.float().cpu(), original[key]), TABLE_TOLERANCE))
    return checks


def run_case(model, path: Path, dtype: torch.dtype, tolerance: float, device: torch.device) -> list[Check]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    group = path.name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    mode, uncond = meta.get("mode"), meta.get("uncond", "false") == "true"
    if mode not in ("eval", "train_sparse"):
        return [_failed(group, "mode", f"unknown case mode {mode!r}; expected 'eval' or 'train_sparse'")]
    inputs = {k[3:]: v.to(device) for k, v in tensors.items() if k.startswith("in.")}
    x, t, y = inputs["x"].to(dtype), inputs["t"].to(dtype), inputs["y"]
    cls_token = inputs["cls_token"].to(dtype) if "cls_token" in inputs else None
    kwargs = dict(uncond=uncond)
    if mode == "train_sparse":
        if "ids_keep" not in inputs:
            return [_failed(group, "in.ids_keep", "train_sparse case without in.ids_keep")]
        # the three random parts pinned: stored kept indices, no label dropout, no path drop
        kwargs.update(ids_keep=inputs["ids_keep"], path_drop=False,
                      drop_labels=torch.zeros(x.shape[0], dtype=torch.bool, device=device))
    model.train(mode == "train_sparse")
    capture: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = model(x, t, y, cls_token, capture=capture, **kwargs)
    model.eval()

    ours = {"velocity": out.velocity, "cls_velocity": out.cls_velocity}
    ours.update({f"zs.{j}": z for j, z in enumerate(out.zs)})
    checks = []
    for key in sorted(k for k in tensors if k.startswith("out.")):
        name = key[4:]
        if ours.get(name) is None:
            checks.append(_failed(group, key, "our model produced no such output"))
            continue
        err = _max_abs(ours[name].cpu(), tensors[key])
        checks.append(Check(group, key, err, tolerance,
                            note="" if ours[name].shape == tensors[key].shape else
                            f"shape {tuple(ours[name].shape)} vs {tuple(tensors[key].shape)}"))
    extra = sorted(set(k for k, v in ours.items() if v is not None) - {k[4:] for k in tensors if k.startswith("out.")})
    if extra:
        checks.append(_failed(group, "out.*", f"the case lacks outputs our model produces: {', '.join(extra)}"))
    for key in sorted(k for k in tensors if k.startswith("dbg.")):
        ref, mine = tensors[key], capture.get(key[4:])
        if mine is None:
            checks.append(Check(group, key, math.inf, tolerance, informational=True, relative=True,
                                note="not captured by our model"))
            continue
        scale = max(ref.abs().max().item(), 1e-30)
        checks.append(Check(group, key, _max_abs(mine.cpu(), ref) / scale, tolerance,
                            informational=True, relative=True))
    return checks


# --------------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------------

def check_time_grids(path: Path) -> list[Check]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    group = path.name
    try:
        from srdit.sample import time_grid
    except ImportError as e:
        return [_failed(group, "time_grid", f"srdit.sample.time_grid is not available ({e})")]
    with safe_open(str(path), "pt") as f:
        grids = json.loads((f.metadata() or {}).get("grids", "{}"))
    stored = load_file(str(path))
    checks = []
    for key in sorted(stored):
        if key not in grids:
            checks.append(_failed(group, key, "no entry for this grid in the `grids` metadata"))
            continue
        spec = grids[key]
        shift = spec.get("shift")
        ours = time_grid(int(spec["num_steps"]), None if shift is None else float(shift))
        checks.append(Check(group, key, _max_abs(torch.as_tensor(ours), stored[key]), GRID_TOLERANCE,
                            note=f"{spec['num_steps']} steps, shift {shift}"))
    return checks


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------

def check_reference(folder: str | Path, float64: bool = False, device: str = "cpu",
                    time_grids: bool = True) -> list[Check]:
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing; FOLDER must hold the reference fixture set "
                                    f"(config.json, model.safetensors, case*.safetensors, time_grid.safetensors); "
                                    f"the project's set is tests/fixtures/reference in the repository")
    dtype = torch.float64 if float64 else torch.float32
    tolerance = FLOAT64_TOLERANCE if float64 else FLOAT32_TOLERANCE
    _, model, original = load_reference_model(folder)
    checks = check_tables(model, original)
    model = model.to(device=torch.device(device), dtype=dtype)
    cases = sorted(folder.glob("case*.safetensors"))
    if not cases:
        checks.append(_failed(folder.name, "case*.safetensors", "no case files in the folder"))
    for case in cases:
        checks += run_case(model, case, dtype, tolerance, torch.device(device))
    if time_grids:
        grid_path = folder / "time_grid.safetensors"
        checks += check_time_grids(grid_path) if grid_path.exists() else \
            [_failed(folder.name, "time_grid.safetensors", "file missing")]
    return checks


def format_checks(checks: list[Check]) -> str:
    lines, group = [], None
    for c in checks:
        if c.group != group:
            group = c.group
            lines.append(group)
        kind = "rel err" if c.relative else "max abs err"
        status = ("info" if c.ok else "info: above") if c.informational else ("ok" if c.ok else "FAIL")
        tol = f"(tol {c.tolerance:.0e})" if c.tolerance else ""
        note = f"  {c.note}" if c.note else ""
        lines.append(f"  {c.name:<22} {kind:>11} {c.error:10.3e} {tol:<11} {status}{note}")
    return "\n".join(lines)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="reference fixture folder (config.json, model.safetensors, case*.safetensors, "
                                       "time_grid.safetensors)")
    parser.add_argument("--float64", action="store_true",
                        help=f"run in float64 (tolerance {FLOAT64_TOLERANCE:g} instead of {FLOAT32_TOLERANCE:g})")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (default: cpu)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        checks = check_reference(args.folder, float64=args.float64, device=args.device)
    except FileNotFoundError as e:
        print(f"srdit check-reference: {e}", file=sys.stderr)
        return 2
    precision = "float64" if args.float64 else "float32"
    print(f"check-reference {args.folder} ({precision}, device {args.device})")
    print(format_checks(checks))
    failed = [f"{c.group}:{c.name}" for c in checks if not c.ok]
    if failed:
        print(f"FAIL: {len(failed)} of {len(checks)} checks: {', '.join(failed)}")
        return 1
    print(f"PASS: {len(checks)} checks")
    return 0
