"""`srdit launch`: submit a stage command through submitit, from a shell or a notebook.

    srdit launch encode --shards 8 -- --images results/cache/imagenet/images256/images.h5 \\
        --out results/cache/imagenet/latents256/shard.h5 --tokenizer e2e-invae --teacher dinov2_vitb14
    srdit launch train --configfile config/imagenet256.yaml --wait -- b1_srdit

The stage runs the command the workflow's rule runs (`python -m srdit STAGE ...`, with this
process's interpreter), in a subprocess of the submitit job. With `--shards N` it is a job array
of N tasks, task i running the command with `--shard i --num-shards N` appended. `train` with
more than one GPU runs under `python -m torch.distributed.run`, one launcher owning all GPUs of
the node.

`train ROW` trains the run the workflow trains for that row, under the workflow config given by
`--configfile` (on top of config/config.yaml, as Snakemake reads it): an evaluation-only row
(b1_srdit) resolves to the run it samples, and the run directory, latent cache and flags are the
workflow's (srdit.layout), so a run launched by hand is the one the workflow reuses, and vice
versa. A `--run-dir` or `--cache` that disagrees is refused. It trains up to the run's last step
(`--until-step` to stop earlier); the snapshots it writes at the segment boundaries are the
workflow's outputs.

Preemption and time limits: submitit signals the job (SIGUSR2, `--signal-delay-s` before the
limit); `StageCommand.checkpoint` then sends SIGTERM to the stage, whose trainer writes a
checkpoint and exits, and returns a fresh copy of itself, which submitit requeues; the
requeued job runs the same command, which resumes. Shards are redone from their start.

Resources: per stage, the defaults are the per-rule values of the Slurm profile
(profiles/slurm/config.yaml: its `site` block and `set-resources`), so the site is edited in one
place; every value can be overridden on the command line. They become the sbatch options the
profile's executor plugin would use (`sbatch_options`): `--mem=<mem_mb>M` (Slurm's M is the MiB
Snakemake's mem_mb is passed as, exact), `--gpus=[MODEL:]N` for `gpu`/`gpu_model`, `--gres=...`
for `gres`. `--dry-run` prints the resolved command and sbatch options and submits nothing.
`--cluster local` runs the jobs as local processes through submitit's LocalExecutor (no Slurm
needed); `--cluster debug` runs them in this process.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

# Exit status of a stage that stopped early and wants to be rerun (srdit.train.EXIT_REQUEUE).
EXIT_REQUEUE = 75
# stage -> the workflow rule whose profile resources it borrows
STAGE_RULES = {
    "demo-data": "demo_images", "prepare": "prepare_images", "encode": "encode_latents",
    "train": "train_segment", "sample": "sample_shard", "merge": "merge_samples",
    "evaluate": "evaluate", "reference-batch": "reference_batch", "report": "report",
}
SHARDED_STAGES = ("prepare", "encode", "sample")
# commands that are not stages to submit (they read or plan; they run where you are)
NOT_STAGES = ("launch", "status", "plan")
DEFAULT_PROFILE = Path("profiles/slurm/config.yaml")


@dataclass
class JobResources:
    partition: str | None = None
    account: str | None = None
    gpus: int = 0
    gpu_model: str | None = None
    gres: str | None = None         # a profile's `gres` (e.g. gpu:h100:8), passed as --gres
    nodes: int | str = 1            # train: nodes per job (the profile's number or per-run expression)
    cpus: int = 2
    mem_mb: int = 8000
    minutes: int = 60


def gres_gpus(gres: str | None) -> int:
    """GPUs of a GRES request: gpu:8 and gpu:h100:8 -> 8, gpu -> 1, anything else -> 0
    (srdit.distributed.requested_shape, which the workflow's launcher uses too)."""
    from srdit.distributed import requested_shape
    return requested_shape({"gres": gres})[1] or 0


def profile_resources(stage: str, profile: Path | None) -> JobResources:
    """The Slurm profile's resources for the rule that runs `stage` (defaults + set-resources)."""
    res = JobResources()
    if profile is None or not Path(profile).exists():
        return res
    data = yaml.safe_load(Path(profile).read_text()) or {}
    values = dict(data.get("default-resources") or {})
    values.update((data.get("set-resources") or {}).get(STAGE_RULES.get(stage, ""), {}))
    res.partition = values.get("slurm_partition") or None
    res.account = values.get("slurm_account") or None
    res.gpus = int(values.get("gpu", 0) or 0)
    res.gpu_model = values.get("gpu_model") or None
    res.gres = values.get("gres") or None
    res.nodes = values.get("nodes") or 1
    if not res.gpus and res.gres:
        res.gpus = gres_gpus(res.gres)
    res.cpus = int(values.get("cpus_per_task", res.cpus))
    res.mem_mb = int(values.get("mem_mb", res.mem_mb))
    res.minutes = int(values.get("runtime", res.minutes))
    return res


def sbatch_options(res: JobResources) -> dict[str, str]:
    """The sbatch options (name -> value) for `res`, as snakemake-executor-plugin-slurm builds
    them from the same profile: memory in MiB exactly as given (`--mem=480000M`, never rounded to
    GB: 480 GB would be 491,520 MiB and may exceed a node), GPUs as `--gpus=[MODEL:]N` or the
    profile's `--gres`."""
    opts = {"time": str(res.minutes), "cpus-per-task": str(res.cpus), "mem": f"{int(res.mem_mb)}M"}
    if res.partition:
        opts["partition"] = res.partition
    if res.account:
        opts["account"] = res.account
    if res.gres:
        opts["gres"] = res.gres
    elif res.gpus and res.gpu_model:
        opts["gpus"] = f"{res.gpu_model}:{res.gpus}"
    elif res.gpus:
        opts["gpus"] = str(res.gpus)
    return opts


def stage_command(stage: str, args: list[str], gpus: int, nodes: int = 1) -> list[str]:
    """The command a job runs: the CLI stage with this interpreter, under
    `python -m torch.distributed.run` (torchrun) when training on several GPUs of one node. On
    several nodes every Slurm task (one per GPU) is a trainer of its own (srdit/distributed.py)."""
    if stage == "train" and gpus > 1 and nodes == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(gpus), "-m", "srdit", stage, *args]
    return [sys.executable, "-m", "srdit", stage, *args]


def _option_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def _drop_option(args: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def resolve_train_args(args: list[str], configfiles=(), root: str | Path = ".") -> tuple[list[str], str]:
    """`ROW [--until-step N] [other train options]` -> the arguments of `srdit train` the workflow
    would give ROW's run (srdit.layout), and a line saying which run that is.

    Raises ValueError when `--run-dir`/`--cache` disagree with the workflow's, or when `--registry`
    or `--resources` are given (they come from the workflow config's extra_registries and
    resources_dir)."""
    from srdit import layout

    if not args or args[0].startswith("-"):
        raise ValueError("srdit launch train: give the row first: srdit launch train [options] -- ROW "
                         "[--until-step N]; ROW is an entry of config/ablations.yaml")
    row, rest = args[0], list(args[1:])
    config = layout.load_workflow_config(configfiles, root)
    job = layout.resolve_train(row, config)
    for name, expected in (("--run-dir", job.run_dir), ("--cache", job.cache)):
        given = _option_value(rest, name)
        if given is not None and os.path.normpath(given) != os.path.normpath(expected):
            raise ValueError(f"srdit launch train: row {row} trains in {job.run_dir} on {job.cache} under this "
                             f"workflow config (the run the workflow trains and reuses); {name} {given} would "
                             f"train a run the workflow never uses. Leave {name} out.")
        rest = _drop_option(rest, name)
    for name in ("--registry", "--resources"):
        if _option_value(rest, name) is not None:
            raise ValueError(f"srdit launch train: {name} comes from the workflow config "
                             f"(extra_registries, resources_dir); pass the config with --configfile instead")
    until = _option_value(rest, "--until-step")
    rest = _drop_option(rest, "--until-step")
    resolved = job.args(int(until) if until is not None else None) + rest
    what = (f"row {row}" + (f" samples run {job.run}" if job.run != row else "") +
            f": training {job.run} in {job.run_dir}")
    return resolved, what


def _ignore_submitit_signal() -> None:
    # Slurm delivers submitit's warning signal (USR2) to every process of the job step; its
    # default action would kill the stage before it could checkpoint. The submitit process
    # handles it and asks the stage to stop with SIGTERM instead.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class StageCommand:
    """A picklable, checkpointable job: run one `srdit` command to completion.

    Called in the submitit job. Returns a dict with the command and its exit status; raises
    RuntimeError when the command fails, so that `job.result()` fails too."""

    def __init__(self, command: list[str], grace_s: float = 80.0):
        self.command = list(command)
        self.grace_s = grace_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        # the running subprocess stays with this job; a requeued copy starts its own
        return {"command": self.command, "grace_s": self.grace_s, "_proc": None}

    def __call__(self) -> dict:
        started = time.time()
        print("srdit launch: running " + " ".join(self.command), flush=True)
        self._proc = subprocess.Popen(self.command, preexec_fn=_ignore_submitit_signal, start_new_session=True)
        code = self._proc.wait()
        self._proc = None
        if code == EXIT_REQUEUE:
            raise RuntimeError(f"{' '.join(self.command)} stopped early (exit {EXIT_REQUEUE}: preempted or out of "
                               f"time) after writing a checkpoint; submit the same command again to resume")
        if code != 0:
            raise RuntimeError(f"{' '.join(self.command)} failed with exit status {code}; see this job's log")
        return {"command": self.command, "returncode": code, "seconds": round(time.time() - started, 1)}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on its timeout/preemption signal: stop the stage, let it write its
        checkpoint, and requeue a fresh copy of this command (which resumes)."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)      # the trainer checkpoints on SIGTERM
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                print(f"srdit launch: the stage did not stop within {self.grace_s:.0f} s; requeued anyway, it "
                      f"resumes from its last periodic checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(StageCommand(self.command, self.grace_s))


def make_executor(stage: str, res: JobResources, cluster: str | None, folder: str, max_requeues: int,
                  array_parallelism: int, signal_delay_s: int):
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues)
    params = dict(name=f"srdit-{stage}", timeout_min=res.minutes, nodes=1, tasks_per_node=1,
                  cpus_per_task=res.cpus)
    multinode = isinstance(res.nodes, int) and res.nodes > 1
    if multinode:
        # one task per GPU on each node, each a trainer (SLURM_PROCID is its rank); the GPUs asked
        # per node (the plugin's `gpu` is per job), the profile's CPUs and memory per node
        from srdit.distributed import requested_shape

        _, per_node, _ = requested_shape({"nodes": res.nodes, "gres": res.gres, "gpu": 0 if res.gres else res.gpus})
        per_node = per_node or 1
        params.update(nodes=res.nodes, tasks_per_node=per_node, cpus_per_task=max(1, res.cpus // per_node))
    if executor.cluster == "slurm":
        opts = sbatch_options(res)
        if multinode:
            opts.pop("gpus", None)
            opts["gres"] = res.gres or f"gpu:{res.gpu_model + ':' if res.gpu_model else ''}{params['tasks_per_node']}"
            # one failed or lost task ends them all (submitit's srun)
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        params.update(slurm_signal_delay_s=signal_delay_s, slurm_array_parallelism=array_parallelism,
                      slurm_mem=opts["mem"])
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.account:
            params["slurm_account"] = res.account
        if "gres" in opts:
            params["slurm_gres"] = opts["gres"]
        if "gpus" in opts:
            params["slurm_additional_parameters"] = {"gpus": opts["gpus"]}
    else:
        params.update(mem_gb=max(1, res.mem_mb // 1000), gpus_per_node=res.gpus)
    executor.update_parameters(**params)
    return executor


def launch(stage: str, args: list[str], *, shards: int | None = None, cluster: str | None = None,
           folder: str = "results/submitit/%j", profile: str | Path | None = DEFAULT_PROFILE,
           overrides: dict | None = None, max_requeues: int = 5, array_parallelism: int = 256,
           signal_delay_s: int = 90, configfiles=(), dry_run: bool = False) -> list:
    """Submit `srdit STAGE args` (or its N shards as a job array); returns the submitit jobs.

    `overrides` may set any JobResources field (partition, account, gpus, gpu_model, gres, cpus,
    mem_mb, minutes) on top of the profile's values for the stage. For `train`, `args` start with
    a row of the registry and are resolved to the workflow's run under `configfiles`
    (resolve_train_args). `dry_run` prints what would be submitted and returns []."""
    from srdit.cli import COMMANDS

    if stage not in COMMANDS or stage in NOT_STAGES:
        allowed = [c for c in COMMANDS if c not in NOT_STAGES]
        raise ValueError(f"srdit launch: unknown stage {stage!r}; allowed: {', '.join(allowed)}")
    if shards is not None and stage not in SHARDED_STAGES:
        raise ValueError(f"srdit launch: --shards is for the sharded stages ({', '.join(SHARDED_STAGES)}), not {stage}")
    if shards is not None and shards < 1:
        raise ValueError(f"srdit launch: --shards must be >= 1, got {shards}")
    if shards is not None and any(a in ("--shard", "--num-shards") for a in args):
        raise ValueError("srdit launch: give --shards N, not --shard/--num-shards: the array sets them per task")
    res = profile_resources(stage, Path(profile) if profile else None)
    for key, value in (overrides or {}).items():
        if not hasattr(res, key):
            raise ValueError(f"srdit launch: unknown resource {key!r}; allowed: {', '.join(vars(res))}")
        if value is not None:
            setattr(res, key, value)
    if (overrides or {}).get("gres") and (overrides or {}).get("gpus") is None:
        res.gpus = gres_gpus(res.gres)
    if stage == "train":
        args, what = resolve_train_args(args, configfiles)
        print(f"srdit launch: {what}", flush=True)
        from srdit.distributed import site_nodes
        res.nodes = site_nodes(res.nodes, args[0])          # the profile's per-run expression, for this run
    else:
        res.nodes = 1
    grace_s = max(10.0, signal_delay_s - 10.0)
    if dry_run:
        opts = " ".join(f"--{k}={v}" for k, v in sbatch_options(res).items())
        if res.nodes > 1:
            from srdit.distributed import requested_shape
            per_node = requested_shape({"nodes": res.nodes, "gres": res.gres, "gpu": 0 if res.gres else res.gpus})[1]
            opts = " ".join(f"--{k}={v}" for k, v in sbatch_options(res).items() if k not in ("gpus", "cpus-per-task"))
            opts += (f" --nodes={res.nodes} --ntasks-per-node={per_node or 1} --cpus-per-task="
                     f"{max(1, res.cpus // (per_node or 1))}") + ("" if res.gres else f" --gres=gpu:{per_node or 1}")
        print(f"srdit launch: sbatch {opts}" + (f" --array=0-{shards - 1}" if shards else ""), flush=True)
        print("srdit launch: command " + shlex.join(stage_command(stage, args, res.gpus, res.nodes)), flush=True)
        return []
    executor = make_executor(stage, res, cluster, folder, max_requeues, array_parallelism, signal_delay_s)
    if shards is None:
        return [executor.submit(StageCommand(stage_command(stage, args, res.gpus, res.nodes), grace_s))]
    with executor.batch():       # one sbatch --array for all shards
        jobs = [executor.submit(StageCommand(stage_command(stage, [*args, "--shard", str(i), "--num-shards", str(shards)],
                                                           res.gpus), grace_s))
                for i in range(shards)]
    return jobs


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                        help="submitit executor (default: slurm where sbatch is on PATH, else local)")
    parser.add_argument("--shards", type=int, default=None,
                        help="job array of N tasks, each with --shard i --num-shards N (prepare, encode, sample)")
    parser.add_argument("--folder", default="results/submitit/%j", help="submitit logs and pickles (%%j = job id)")
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE),
                        help="Snakemake Slurm profile whose site block and per-rule resources are the defaults "
                             "('' for none)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs per job (train: one node, one process per GPU)")
    parser.add_argument("--gpu-model", default=None, help="Slurm GRES type of the GPUs, e.g. h100")
    parser.add_argument("--gres", default=None, help="a GRES request instead of --gpus, e.g. gpu:h100:8")
    parser.add_argument("--nodes", type=int, default=None,
                        help="train: nodes per job (default: the profile's train_segment nodes), one task per GPU")
    parser.add_argument("--cpus", type=int, default=None, help="CPU cores per job")
    parser.add_argument("--mem-mb", type=int, default=None, help="memory per job, MB (sbatch --mem=<N>M)")
    parser.add_argument("--minutes", type=int, default=None, help="time limit per job")
    parser.add_argument("--max-requeues", type=int, default=5,
                        help="how often a job may be requeued after a time limit")
    parser.add_argument("--array-parallelism", type=int, default=256, help="array tasks running at once")
    parser.add_argument("--signal-delay-s", type=int, default=90,
                        help="seconds before the time limit at which the stage is told to checkpoint")
    parser.add_argument("--wait", action="store_true", help="wait for the jobs and exit non-zero if one failed")
    parser.add_argument("--configfile", action="append", default=None, metavar="FILE",
                        help="train: the workflow config (over config/config.yaml) whose run a row trains; "
                             "repeat for several files")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved command and sbatch options; submit nothing")


def register(parser: argparse.ArgumentParser) -> None:
    parser.usage = "srdit launch STAGE [launch options] [-- stage arguments]"
    parser.add_argument("stage", help="the srdit command to run: prepare, encode, train, sample, merge, evaluate, ...")
    # Everything after STAGE: launch options, then `--`, then the stage's own arguments. argparse
    # cannot split that by itself (options of both would mix), so `run` does.
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                        help="launch options (below), then `--` and the arguments of `srdit STAGE`")
    _add_options(parser.add_argument_group("launch options"))
    parser.set_defaults(func=run)


def split_arguments(rest: list[str], base: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
    """['--shards', '2', '--', '--out', 'x'] -> (launch options, stage arguments).

    argparse drops a `--` that directly follows STAGE, so without a `--` the words are launch
    options if they all parse as such, and otherwise all belong to the stage."""
    options = argparse.ArgumentParser(prog="srdit launch STAGE", add_help=False)
    _add_options(options)
    # options given before STAGE (`srdit launch --shards 2 encode ...`) are the starting point
    keys = [a.dest for a in options._actions]
    start = lambda: argparse.Namespace(**{k: getattr(base, k) for k in keys if hasattr(base, k)})  # noqa: E731
    if "--" in rest:
        cut = rest.index("--")
        return options.parse_args(rest[:cut], namespace=start()), rest[cut + 1:]
    parsed, unknown = options.parse_known_args(rest, namespace=start())
    if unknown:
        return options.parse_args([], namespace=start()), rest
    return parsed, []


def run(args) -> int:
    opts, stage_args = split_arguments(args.rest, args)
    overrides = dict(partition=opts.partition, account=opts.account, gpus=opts.gpus, gpu_model=opts.gpu_model,
                     gres=opts.gres, nodes=opts.nodes, cpus=opts.cpus, mem_mb=opts.mem_mb, minutes=opts.minutes)
    try:
        jobs = launch(args.stage, stage_args, shards=opts.shards, cluster=opts.cluster, folder=opts.folder,
                      profile=opts.profile or None, overrides=overrides, max_requeues=opts.max_requeues,
                      array_parallelism=opts.array_parallelism, signal_delay_s=opts.signal_delay_s,
                      configfiles=opts.configfile or (), dry_run=opts.dry_run)
    except ValueError as e:          # ConfigError is a ValueError too
        print(e, file=sys.stderr)
        return 2
    for job in jobs:
        print(f"submitted {args.stage} job {job.job_id} (logs: {job.paths.stdout})", flush=True)
    if not opts.wait:
        return 0
    failed = 0
    for job in jobs:
        try:
            result = job.result()
            print(f"job {job.job_id}: done in {result['seconds']} s", flush=True)
        except Exception as e:          # submitit re-raises the job's error here
            failed += 1
            print(f"job {job.job_id}: FAILED: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0
