"""One CLI, one subcommand per stage: `python -m srdit <command> ...`.

Each command lives in its own module, imported only when that command runs, so that `info`
does not pay for DeepSpeed and `train` does not pay for the metrics. A module registers its
command with `register(parser)`, which adds arguments and sets `func` to a callable
`func(args) -> int` (the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("srdit.info", "print a preset's resolved config and its parameter count"),
    "check-reference": ("srdit.reference", "compare our model with golden outputs of the original code"),
    "fetch": ("srdit.resources", "download pretrained weights and reference batches into resources/"),
    "demo-data": ("srdit.data.demo", "write the small bundled image tree the CPU demo trains on"),
    "prepare": ("srdit.data.prepare", "ImageNet folder -> ADM center crop -> sharded uint8 HDF5"),
    "encode": ("srdit.data.encode", "image shards -> tokenizer latents (+ teacher features) HDF5"),
    "train": ("srdit.train", "DeepSpeed training in bounded, resumable segments"),
    "train-job": ("srdit.trainjob", "one workflow training job: diverged/lock gate, log per attempt, requeue"),
    "sample": ("srdit.generate", "generate one shard of samples from a consolidated checkpoint"),
    "merge": ("srdit.generate_merge", "merge sample shards into an ADM-format samples.npz + grid"),
    "evaluate": ("srdit.metrics.evaluate", "FID, sFID, IS, precision/recall and KDD of a samples.npz"),
    "reference-batch": ("srdit.metrics.reference_batch", "build an ADM-format reference batch .npz from images"),
    "verify-release": ("srdit.verify", "download, convert, sample and evaluate the released SR-DiT-B/1"),
    "launch": ("srdit.launch", "submit a stage through submitit (Slurm or local)"),
    "status": ("srdit.status", "one table of every training run: step, speed, ETA, checkpoint, state, job"),
    "report": ("srdit.report", "ablation tables, FID-vs-step curves and sample grids"),
    "plan": ("srdit.plan", "jobs, GPU-hours, wall time and disk of a target, before anything runs"),
    "prune": ("srdit.retention", "delete a run's snapshots and training states that retention does not keep"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srdit", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    lines = [f"  {name:<17} {help_}" for name, (_, help_) in COMMANDS.items()]
    p.epilog = "commands:\n" + "\n".join(lines) + "\n\n`srdit COMMAND --help` shows a command's options."
    p.add_argument("command", nargs="?", help="one of the commands below")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; allowed: {', '.join(COMMANDS)}")
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"srdit {name}", description=help_)
    module.register(parser)
    args = parser.parse_args(rest)
    from srdit.config import ConfigError
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"srdit {name}: config error: {e}", file=sys.stderr)
        return 2
