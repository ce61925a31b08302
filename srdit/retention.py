"""Retention: what a training run keeps on disk once it has moved on.

A run writes a consolidated snapshot (model + EMA, ~1.1 GB for B/1, ~5.4 GB for XL/1) at every
`train.ckpt_every` steps and keeps `train.keep_ckpts` full training states (model, EMA and the
AdamW moments, ~2.2 GB each for B/1). Kept whole, the paper's 23 runs would hold ~1.6 TB of
snapshots. With config `retention.snapshots: evaluated` the workflow runs `srdit prune` after
each training job: it deletes every snapshot of the run that no registry entry evaluates,
except the newest one (the run's current end), and every training state but the newest (the
one the next job resumes from).

Deleting a boundary snapshot that only the next segment read is safe for Snakemake: a
missing intermediate file does not make finished jobs rerun (as with its temp() files), while
every snapshot an evaluation samples is kept. A later entry that wants to evaluate a pruned
step needs that stretch of the run to be trained again.

    srdit prune --run-dir results/runs/b1_srdit --keep-steps 50000,100000,400000 [--dry-run]
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from srdit.checkpoint import CHECKPOINT_DIR, SNAPSHOT_DIR, list_checkpoints, latest_checkpoint

_SNAPSHOT = re.compile(r"^step(\d{7,})\.safetensors$")


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot of a run, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT.match(p.name))]
    return sorted(found)


def snapshots_to_prune(steps: list[int], keep_steps: set[int]) -> list[int]:
    """The steps among `steps` that retention deletes: neither kept nor the newest."""
    if not steps:
        return []
    newest = max(steps)
    return [s for s in sorted(steps) if s not in keep_steps and s != newest]


def prune_run(run_dir: str | Path, keep_steps: set[int] | list[int], keep_states: int = 1,
              dry_run: bool = False) -> list[Path]:
    """Delete the run's snapshots outside `keep_steps` (but never the newest) and all training
    states but the newest `keep_states`. Returns the paths deleted (or that would be)."""
    run_dir = Path(run_dir)
    keep = {int(s) for s in keep_steps}
    snapshots = dict(list_snapshots(run_dir))
    doomed = [snapshots[s] for s in snapshots_to_prune(list(snapshots), keep)]
    root = run_dir / CHECKPOINT_DIR
    states = list_checkpoints(root)
    latest = latest_checkpoint(root)
    if keep_states < 1:
        raise ValueError(f"keep_states must be at least 1 (the state the next job resumes from), not {keep_states}")
    keep_state_paths = {p for _, p in states[-keep_states:]} | ({latest} if latest else set())
    doomed_states = [p for _, p in states if p not in keep_state_paths]
    if not dry_run:
        for path in doomed:
            path.unlink(missing_ok=True)      # read-only (protected) files: the folder's mode decides
        for path in doomed_states:
            shutil.rmtree(path, ignore_errors=True)
    return doomed + doomed_states


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run's folder (results/runs/<run>)")
    parser.add_argument("--keep-steps", default="", help="comma-separated steps whose snapshots stay "
                        "(the steps registry entries evaluate); the newest snapshot always stays")
    parser.add_argument("--keep-states", type=int, default=1, help="training states kept (newest first)")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        keep = {int(s) for s in args.keep_steps.split(",") if s.strip()}
    except ValueError:
        print(f"srdit prune: --keep-steps: {args.keep_steps!r} is not a comma-separated list of steps")
        return 2
    paths = prune_run(args.run_dir, keep, keep_states=args.keep_states, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for path in paths:
        print(f"srdit prune: {verb} {path}")
    print(f"srdit prune: {verb} {len(paths)} file(s) of {args.run_dir}; kept steps {sorted(keep)} and the newest")
    return 0
