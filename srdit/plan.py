"""`srdit plan`: what a target costs, before anything is submitted.

    python -m srdit plan --configfile config/imagenet256.yaml [TARGET ...]

takes the same config files and targets as snakemake and prints, per row and in total:
- the jobs by kind, as Snakemake's own dry run plans them (`snakemake -n` through the profile,
  so with its rerun triggers): jobs whose outputs are already present are not planned and so
  not counted;
- GPU-hours by stage (training, encoding, sampling, evaluation) and the wall time at the site's
  GPUs (the profile's `site:` block: node_gpus, and `nodes` or --nodes);
- the disk each stage adds (images, latents, teacher features, checkpoints, snapshots, samples,
  metrics) per file-system root (config results_root / cache_root), what the retention policy
  keeps, and the peak;
- for every training run, the teacher trade-off: features cached (disk) or the teacher run
  online in bf16 during training (GPU-hours).

Every GPU figure says where it comes from: "measured" (a row of BENCHMARKS.md's table "GPU
throughput for srdit plan" for that GPU model, stage and model) or "estimated" (FLOPs from
srdit/flops.py at a stated fraction of the GPU's dense bf16 peak, below). Disk sizes follow from
the stored dtypes and are exact up to HDF5/zip headers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from srdit.config import ConfigError, build_config, deep_merge, inherited_meta, load_registry, resolve_entry
from srdit.flops import PEAK_BF16_TFLOPS, TEACHER_SHAPES, forward_flops_per_image

# ------------------------------------------------------------------------------ stated assumptions

# Fraction of the dense bf16 peak each stage reaches, applied to the FLOPs below.
# Training: calibrated on the original's logged speeds (8 H100, global batch 256, DINOv2-B run
# online): SR-DiT-B/1 10.5 it/s, B/1 REG 15 it/s, XL/1 REG 2.99 it/s imply 6.7%, 9.5% and 7.5%
# of the peak when training FLOPs are counted dense (3 x the forward with every token, SPRINT's
# savings not counted: they do not show up in the logged step time) plus the teacher's forward.
TRAIN_MFU = 0.075
# Sampling, decoding, encoding and the evaluation networks: inference at large batches; not
# calibrated (no GPU measurement yet), a deliberately modest figure.
INFER_MFU = 0.10
DEFAULT_GPU = "H100"
# Matmul FLOPs per image at 256 px (x (res/256)^2 at other sizes): E2E-INVAE encoder and decoder,
# counted with torch.utils.flop_counter on the real module; SD-VAE taken as the same; the demo's
# pixel tokenizer is a reshape.
TOKENIZER_GFLOPS = {"e2e-invae": (137.9, 252.2), "sd-vae": (137.9, 252.2), "pixel": (0.0, 0.0)}
INCEPTION_GFLOPS = 11.5            # Inception-v3 at 299 px (5.7 G multiply-adds)
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train, used when the image cache does not exist yet
METRICS_BYTES = 20_000             # metrics.json + sampler.json + grid.png, about
STAGES = ("training", "encoding", "sampling", "evaluation")
DISK_KINDS = ("images", "latents", "teacher features", "checkpoints", "snapshots", "samples", "metrics")


class PlanError(RuntimeError):
    """The dry run failed, or the plan's inputs are inconsistent."""


# ------------------------------------------------------------------------------ the dry run

@dataclass
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def parse_dry_run(text: str) -> tuple[list[Job], dict[str, int]]:
    """The jobs a `snakemake -n` output lists, and its "Job stats" table (rule -> count)."""
    jobs: list[Job] = []
    job = None
    stats: dict[str, int] = {}
    in_stats = False
    for line in text.splitlines():
        if line.startswith("Job stats:"):
            in_stats, stats = True, {}
            job = None
            continue
        if in_stats:
            m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                stats[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total") or not line.strip():
                in_stats = bool(not line.strip() and not stats)
            continue
        if m := re.match(r"^(?:localrule|rule|checkpoint) (\S+):$", line):
            job = Job(m.group(1))
            jobs.append(job)
        elif job is not None and (m := re.match(r"^\s+(wildcards|resources): (.*)$", line)):
            pairs = (p.split("=", 1) for p in m.group(2).split(", ") if "=" in p)
            setattr(job, m.group(1), {k.strip(): v.strip() for k, v in pairs})
        elif job is not None and (m := re.match(r"^\s+(input|output): (.*)$", line)):
            setattr(job, m.group(1) + "s", [p.strip() for p in m.group(2).split(", ")])
    return jobs, stats


def dry_run(configfiles: list[str], targets: list[str], profile: str | None, workdir: Path) -> tuple[list[Job], dict]:
    """Snakemake's own plan for these config files and targets (`snakemake -n`)."""
    cmd = [sys.executable, "-m", "snakemake", "-n"]
    if profile:
        cmd += ["--profile", profile]
    else:
        cmd += ["--rerun-triggers", "mtime"]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    cmd += ["--", *targets] if targets else []
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise PlanError(f"`{' '.join(cmd[1:])}` failed (exit {result.returncode}):\n{out[-3000:]}")
    jobs, stats = parse_dry_run(out)
    counted = Counter(j.rule for j in jobs)
    if stats and dict(counted) != stats:
        raise PlanError(f"could not read the dry run: jobs listed {dict(counted)} but Job stats say {stats}")
    return jobs, stats


# ------------------------------------------------------------------------------ the workflow's settings

def load_workflow_config(configfiles: list[str], workdir: Path) -> dict:
    """config/config.yaml with each --configfile merged on top, as Snakemake does."""
    config: dict = {}
    for path in ["config/config.yaml", *configfiles]:
        p = Path(path) if Path(path).is_absolute() else workdir / path
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        config = deep_merge(config, yaml.safe_load(p.read_text()) or {})
    return config


def load_site(profile: str | None, workdir: Path) -> dict:
    if not profile:
        return {}
    path = (Path(profile) if Path(profile).is_absolute() else workdir / profile) / "config.yaml"
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("site", {}) or {}


def peak_tflops(gpu_model: str) -> tuple[str, float]:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() == gpu_model.lower().strip() or key.lower().replace(" ", "") in gpu_model.lower().replace(" ", ""):
            return key, PEAK_BF16_TFLOPS[key]
    raise ConfigError(f"--gpu-model / site.gpu_model: {gpu_model!r} is not in srdit.flops.PEAK_BF16_TFLOPS; "
                      f"allowed: {', '.join(PEAK_BF16_TFLOPS)}")


def measured_throughput(benchmarks: Path) -> dict[tuple[str, str, str], float]:
    """(gpu, stage, model) -> images/s per GPU from BENCHMARKS.md's table "GPU throughput for
    srdit plan" (columns: GPU | stage | model | images/s per GPU | ...)."""
    table: dict[tuple[str, str, str], float] = {}
    if not benchmarks.exists():
        return table
    inside = False
    for line in benchmarks.read_text().splitlines():
        if line.startswith("#"):
            inside = "throughput for `srdit plan`" in line.lower() or "throughput for srdit plan" in line.lower()
            continue
        if inside and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 4:
                try:
                    table[(cells[0].lower(), cells[1].lower(), cells[2].lower())] = float(cells[3].replace(",", ""))
                except ValueError:
                    pass                         # the header and the separator
    return table


def model_key(cfg) -> str:
    """How BENCHMARKS.md names a model: <hidden>x<depth>, e.g. 768x12 (B/1), 1152x28 (XL/1)."""
    return f"{cfg.model.hidden_size}x{cfg.model.depth}"


def count_parameters(cfg) -> int:
    from srdit.info import count_parameters as count
    return count(cfg)["total"]


# ------------------------------------------------------------------------------ costs

@dataclass
class Figure:
    value: float
    basis: str                                   # "measured: ..." or "estimated: ..."


class Coster:
    """GPU-seconds of each job and bytes of each output, from the configs."""

    def __init__(self, config: dict, registry: dict, gpu: str, peak: float, measured: dict):
        self.config, self.registry, self.gpu, self.peak, self.measured = config, registry, gpu, peak * 1e12, measured
        self.configs: dict = {}
        self.params: dict[str, int] = {}
        self.images = {}
        self.cache_fs = "."

    def cfg(self, name: str):
        if name not in self.configs:
            if name not in self.registry:
                raise PlanError(f"the dry run names {name!r}, which is not in the ablation registry")
            self.configs[name] = build_config(resolve_entry(name, self.registry), name=name)
        return self.configs[name]

    def run_of(self, name: str) -> str:
        return inherited_meta(name, self.registry, "train_from") or name

    def num_params(self, run: str) -> int:
        key = json.dumps(self.cfg(run).to_dict()["model"], sort_keys=True)   # runs share a few models
        if key not in self.params:
            self.params[key] = count_parameters(self.cfg(run))
        return self.params[key]

    def dataset_images(self, res: int) -> tuple[int, str]:
        """Rows of the image cache at `res`: read from images.h5 if it exists, else counted."""
        if res in self.images:
            return self.images[res]
        data = self.config["data"]
        joined = Path(self.cache_fs) / "cache" / data["name"] / f"images{res}" / "images.h5"
        if joined.exists():
            import h5py

            import srdit.data.cache  # noqa: F401  (its HDF5 file-locking default comes first)
            with h5py.File(joined, "r") as f:
                found = (int(f.attrs["rows"]), "the image cache")
        elif data["source"] == "demo":
            found = (4 * int(data["demo_per_class"]), "the demo tree (4 classes)")
        else:
            found = (IMAGENET_TRAIN_IMAGES, "ImageNet-1k train (assumed: the image cache does not exist yet)")
        self.images[res] = found
        return found

    def _rate(self, stage: str, cfg, flops_per_image: float, mfu: float, what: str) -> Figure:
        key = (self.gpu.lower(), stage, model_key(cfg) if cfg is not None else "")
        if key in self.measured:
            return Figure(self.measured[key], f"measured: BENCHMARKS.md, {self.gpu}")
        return Figure(mfu * self.peak / flops_per_image,
                      f"estimated: {what} at {mfu:.1%} of the {self.gpu} bf16 peak ({self.peak / 1e12:.0f} TFLOP/s)")

    # --- training
    def train_flops(self, cfg, online: bool) -> float:
        dense = forward_flops_per_image(_dense(cfg.model))["total"] * 3
        return dense + (teacher_flops_per_image(cfg.data.teacher, cfg.data.resolution) if online else 0.0)

    def train_rate(self, cfg, online: bool) -> Figure:
        stage = "train-online" if online else "train"
        what = (f"{self.train_flops(cfg, online) / 1e9:.0f} GFLOP/image (3 x dense forward"
                + (" + DINOv2 online" if online else "") + ")")
        return self._rate(stage, cfg, self.train_flops(cfg, online), TRAIN_MFU, what)

    # --- inference stages
    def tokenizer_flops(self, cfg, which: int) -> float:
        return TOKENIZER_GFLOPS[cfg.data.tokenizer][which] * 1e9 * (cfg.data.resolution / 256) ** 2

    def encode_rate(self, cfg, with_teacher: bool) -> Figure:
        flops = self.tokenizer_flops(cfg, 0) + (teacher_flops_per_image(cfg.data.teacher, cfg.data.resolution)
                                                if with_teacher else 0)
        return self._rate("encode", cfg, flops, INFER_MFU, f"{flops / 1e9:.0f} GFLOP/image")

    def sample_flops(self, cfg) -> float:
        s = cfg.sample
        per_call = forward_flops_per_image(_dense(cfg.model, inference=True))["total"]
        guided = s.cfg_scale > 1 or s.cls_cfg_scale > 1
        factor = 1 + (max(0.0, s.guidance_high - s.guidance_low) if guided else 0.0)
        return s.num_steps * per_call * factor + self.tokenizer_flops(cfg, 1)

    def sample_rate(self, cfg) -> Figure:
        return self._rate("sample", cfg, self.sample_flops(cfg), INFER_MFU,
                          f"{self.sample_flops(cfg) / 1e12:.1f} TFLOP/image (NFE {cfg.sample.num_steps} + decode)")

    def eval_flops(self, cfg) -> float:
        kdd = cfg.eval.kdd and self.config["evaluate"]["kdd"]
        return INCEPTION_GFLOPS * 1e9 + (teacher_flops_per_image("dinov2_vitl14") if kdd else 0.0)

    def eval_rate(self, cfg) -> Figure:
        return self._rate("evaluate", cfg, self.eval_flops(cfg), INFER_MFU,
                          f"{self.eval_flops(cfg) / 1e9:.0f} GFLOP/image (Inception + KDD's DINOv2-L)")

    # --- bytes
    def snapshot_bytes(self, run: str) -> int:
        return 2 * 4 * self.num_params(run)              # model + EMA, fp32

    def state_bytes(self, run: str) -> int:
        return 4 * 4 * self.num_params(run)              # model, EMA, AdamW exp_avg + exp_avg_sq, fp32

    def image_bytes(self, res: int) -> int:
        return res * res * 3 + 8 + 48                    # uint8 pixels, label, path

    def latent_bytes(self, cfg) -> tuple[int, int]:
        """(latents + label, teacher CLS + patch tokens) per image, as stored."""
        grid = cfg.data.resolution // 16
        latents = cfg.model.in_channels * grid * grid * 4 + 8
        teacher = (grid * grid + 1) * cfg.model.cls_token_dim * 2 if cfg.data.cache_teacher else 0
        return latents, teacher

    def teacher_bytes_if_cached(self, cfg) -> int:
        grid = cfg.data.resolution // 16
        return (grid * grid + 1) * cfg.model.cls_token_dim * 2


def teacher_flops_per_image(teacher: str, resolution: int = 256) -> float:
    """Forward matmul FLOPs of a DINOv2 teacher on one image at the latent grid of `resolution`
    (14 px patches, (resolution / 16)^2 patch tokens + CLS: 224 px at 256, 448 px at 512)."""
    depth, d = TEACHER_SHAPES[teacher]
    grid = resolution // 16
    tokens = grid * grid + 1
    return (depth * (2 * tokens * (4 * d * d + 2 * d * 4 * d) + 4 * tokens * tokens * d)
            + 2 * grid * grid * 3 * 14 * 14 * d)


def _dense(model, inference: bool = False):
    """The model config with SPRINT's token dropping off (its training-time saving does not show
    in the logged step time; at inference every token is processed)."""
    import copy
    m = copy.deepcopy(model)
    m.sprint.enabled = False
    return m


# ------------------------------------------------------------------------------ the plan

@dataclass
class Row:
    name: str
    jobs: Counter = field(default_factory=Counter)
    gpu_hours: dict = field(default_factory=lambda: defaultdict(float))
    wall_hours: float = 0.0
    disk: dict = field(default_factory=lambda: defaultdict(float))        # kind -> bytes added (kept)
    note: str = ""


def build_plan(configfiles: list[str], targets: list[str], profile: str | None = "profiles/slurm",
               workdir: str | Path = ".", gpu_model: str | None = None, nodes: int | None = None,
               benchmarks: str | Path | None = None, dry: tuple[list[Job], dict] | None = None) -> dict:
    """The plan as a dict (`format_plan` prints it). `dry`: a dry run already made for the same
    targets (jobs, stats), reused instead of running Snakemake again."""
    workdir = Path(workdir)
    notes: list[str] = []
    config = load_workflow_config(configfiles, workdir)
    site = load_site(profile, workdir)
    gpu_name = gpu_model or site.get("gpu_model") or DEFAULT_GPU
    gpu, peak = peak_tflops(gpu_name)
    node_gpus = int(site.get("node_gpus") or 8)
    nodes = int(nodes or site.get("nodes") or 1)
    registry = load_registry(*config["extra_registries"])
    measured = measured_throughput(Path(benchmarks) if benchmarks else workdir / "BENCHMARKS.md")
    source = Path(config["data"]["source"])
    source = source if source.is_absolute() else workdir / source
    if config["data"]["source"] != "demo" and not source.exists():
        # Planning on a machine without the images (a laptop, CI): Snakemake would refuse the
        # missing input of prepare; plan as if it were there, with an empty stand-in folder.
        import tempfile
        stand_in = Path(tempfile.mkdtemp(prefix="srdit-plan-"))
        (stand_in / "images").mkdir()
        overlay = stand_in / "source.yaml"
        overlay.write_text(yaml.safe_dump({"data": {"source": str(stand_in / "images")}}))
        notes.append(f"data.source {config['data']['source']} does not exist here: planned as if it did "
                     f"({IMAGENET_TRAIN_IMAGES:,} images assumed)")
        dry_configfiles = [*configfiles, str(overlay)]
    else:
        dry_configfiles = list(configfiles)
    jobs, stats = dry or dry_run(dry_configfiles, targets, profile, workdir)
    c = Coster(config, registry, gpu, peak, measured)
    results_root = str(config["results_root"]).rstrip("/") or "."
    cache_root = str(config["cache_root"]).rstrip("/") or "."
    results_fs, cache_fs = (str(Path(root) if Path(root).is_absolute() else workdir / root)
                            for root in (results_root, cache_root))
    c.cache_fs = cache_fs
    keep_samples = config["retention"]["samples"] == "keep"
    prune = config["retention"]["snapshots"] == "evaluated"

    rows: dict[str, Row] = {}
    bases: dict[str, set[str]] = defaultdict(set)                     # figure -> basis strings
    chains: dict[str, float] = defaultdict(float)                     # run -> serial training hours
    transient = {results_root: 0.0, cache_root: 0.0}                 # largest short-lived file set
    teacher_rows: dict[str, dict] = {}

    def row(name):
        return rows.setdefault(name, Row(name))

    snapshots_planned: dict[str, list[int]] = defaultdict(list)
    for job in jobs:
        w = job.wildcards
        if job.rule == "train_segment":
            run, step = w["run"], int(w["step"])
            cfg = c.cfg(run)
            r = row(run)
            start = _segment_start(job, results_fs, run)
            images = max(0, step - start) * cfg.train.global_batch
            online = not cfg.data.cache_teacher
            rate = c.train_rate(cfg, online)
            gpus = _job_gpus(job.resources, node_gpus)
            hours = images / rate.value / 3600
            r.gpu_hours["training"] += hours
            chains[run] += hours / gpus
            bases["training"].add(rate.basis)
            r.jobs[job.rule] += 1
            snapshots_planned[run].append(step)
            if run not in teacher_rows:
                n_images, _ = c.dataset_images(cfg.data.resolution)
                teacher_rows[run] = dict(run=run, mode="online" if online else "cached", steps=0,
                                         resolution=cfg.data.resolution, teacher=cfg.data.teacher,
                                         cache_bytes=n_images * c.teacher_bytes_if_cached(cfg))
            t = teacher_rows[run]
            t["steps"] += max(0, step - start)
            t["gpu_hours_cached"] = t.get("gpu_hours_cached", 0) + images / c.train_rate(cfg, False).value / 3600
            t["gpu_hours_online"] = t.get("gpu_hours_online", 0) + images / c.train_rate(cfg, True).value / 3600
        elif job.rule == "encode_latents":
            res = int(w["res"])
            n_images, _ = c.dataset_images(res)
            name = _cache_entry(c, w["cache"], res)
            cfg = c.cfg(name)
            shards = int(config["data"]["encode_shards"])
            with_teacher = cfg.data.cache_teacher
            rate = c.encode_rate(cfg, with_teacher)
            r = row("(shared data)")
            r.gpu_hours["encoding"] += n_images / shards / rate.value / 3600
            bases["encoding"].add(rate.basis)
            lat, teach = c.latent_bytes(cfg)
            r.disk["latents"] += n_images / shards * lat
            r.disk["teacher features"] += n_images / shards * teach
            r.jobs[job.rule] += 1
        elif job.rule == "prepare_images":
            res = int(w["res"])
            n_images, _ = c.dataset_images(res)
            r = row("(shared data)")
            r.disk["images"] += n_images / int(config["data"]["prepare_shards"]) * c.image_bytes(res)
            r.jobs[job.rule] += 1
        elif job.rule == "sample_shard":
            name = w["ablation"]
            cfg = c.cfg(name)
            rate = c.sample_rate(cfg)
            r = row(name)
            shards = int(config["sample"]["shards"])
            n = cfg.sample.num_samples / shards
            r.gpu_hours["sampling"] += n / rate.value / 3600
            bases["sampling"].add(rate.basis)
            r.jobs[job.rule] += 1
        elif job.rule == "merge_samples":
            name = w["ablation"]
            cfg = c.cfg(name)
            size = cfg.sample.num_samples * cfg.data.resolution ** 2 * 3
            r = row(name)
            if keep_samples:
                r.disk["samples"] += size
            transient[cache_root] = max(transient[cache_root], 2 * size)   # shards + merged file
            r.disk["metrics"] += METRICS_BYTES
            r.jobs[job.rule] += 1
        elif job.rule == "evaluate":
            name = w["ablation"]
            cfg = c.cfg(name)
            rate = c.eval_rate(cfg)
            r = row(name)
            r.gpu_hours["evaluation"] += cfg.sample.num_samples / rate.value / 3600
            bases["evaluation"].add(rate.basis)
            r.jobs[job.rule] += 1
        else:
            row("(shared data)" if job.rule not in registry else job.rule).jobs[job.rule] += 1

    # snapshots and training states the runs keep once the planned segments are done
    for run, steps in snapshots_planned.items():
        cfg = c.cfg(run)
        r = row(run)
        new = _saved_steps(cfg, steps, results_fs, run)
        if prune:
            keep = _evaluated_steps(c, run, config, steps) | {max(steps)}
            kept = [s for s in new if s in keep]
        else:
            kept = new
        r.disk["snapshots"] += len(kept) * c.snapshot_bytes(run)
        states = 1 if prune else cfg.train.keep_ckpts
        r.disk["checkpoints"] += 0 if _has_states(results_fs, run) else states * c.state_bytes(run)
        # before a prune: the previous snapshot and training state beside the new ones
        transient[results_root] = max(transient[results_root], c.snapshot_bytes(run) + c.state_bytes(run))
        r.note = f"{len(new)} snapshots written, {len(kept)} kept"

    # rows that only sample another row's run cost sampling + evaluation alone
    for name, r in rows.items():
        if name in registry and c.run_of(name) != name and not r.note:
            r.note = f"evaluation-only: samples run {c.run_of(name)}"

    roots = {"images": cache_root, "latents": cache_root, "teacher features": cache_root, "samples": cache_root,
             "checkpoints": results_root, "snapshots": results_root, "metrics": results_root}
    per_root: dict[str, float] = {root: 0.0 for root in dict.fromkeys((results_root, cache_root))}
    for r in rows.values():
        for kind, size in r.disk.items():
            per_root[roots[kind]] += size
    peak_root = {root: per_root.get(root, 0.0) for root in dict.fromkeys((results_root, cache_root))}
    for root, size in transient.items():
        peak_root[root] += size

    totals_gpu = defaultdict(float)
    for r in rows.values():
        for k, v in r.gpu_hours.items():
            totals_gpu[k] += v
    total_gpus = nodes * node_gpus
    train_wall = max([0.0] + list(chains.values()))
    train_wall = max(train_wall, totals_gpu["training"] / total_gpus)
    other_wall = sum(totals_gpu[k] for k in ("encoding", "sampling", "evaluation")) / total_gpus
    for r in rows.values():
        r.wall_hours = (chains.get(r.name, 0.0)
                        + sum(r.gpu_hours[k] for k in ("encoding", "sampling", "evaluation")) / total_gpus)
    present = {results_root: _present_bytes(results_fs), cache_root: _present_bytes(cache_fs)}
    return dict(
        configfiles=configfiles, targets=targets, profile=profile,
        site=dict(gpu=gpu, gpu_from=("--gpu-model" if gpu_model else "site.gpu_model" if site.get("gpu_model")
                                     else f"default ({DEFAULT_GPU}; site.gpu_model is empty)"),
                  node_gpus=node_gpus, nodes=nodes, peak_tflops=peak),
        jobs=dict(sorted(Counter(j.rule for j in jobs).items())), job_stats=stats, total_jobs=len(jobs),
        gpu_hours=dict(totals_gpu), gpu_hours_total=sum(totals_gpu.values()),
        wall_hours=train_wall + other_wall,
        basis={k: sorted(v) for k, v in bases.items()},
        rows={name: dict(jobs=dict(r.jobs), gpu_hours=dict(r.gpu_hours), wall_hours=r.wall_hours,
                         disk=dict(r.disk), note=r.note) for name, r in rows.items()},
        disk={kind: sum(r.disk.get(kind, 0.0) for r in rows.values()) for kind in DISK_KINDS},
        disk_per_root=dict(per_root), peak_per_root=peak_root, present_per_root=present,
        teacher=list(teacher_rows.values()),
        retention=dict(config["retention"]),
        images={res: n for res, (n, _) in c.images.items()},
        notes=notes, dry=(jobs, stats),
    )


def _job_gpus(resources: dict, node_gpus: int) -> int:
    """GPUs of one training job: nodes x GPUs per node as the job requests them (gpu, gres or
    --gpus-per-node, srdit.distributed.requested_shape), else its `gpu` count on one node."""
    try:
        from srdit.distributed import requested_shape
    except ImportError:
        return int(resources.get("gpu", node_gpus) or node_gpus)
    job_nodes, per_node, _ = requested_shape(resources)
    return job_nodes * (per_node or node_gpus)


def _segment_start(job: Job, results_root: str, run: str) -> int:
    """The step a training job starts from: the previous boundary (its snapshot input), or the
    run's newest checkpoint when an interrupted segment already got further."""
    start = 0
    for path in job.inputs:
        if m := re.search(r"/snapshots/step(\d+)\.safetensors$", path):
            start = max(start, int(m.group(1)))
    step = int(job.wildcards["step"])
    checkpoints = Path(results_root) / "runs" / run / "checkpoints"
    if checkpoints.is_dir():
        for p in checkpoints.iterdir():
            if (m := re.match(r"^step(\d+)$", p.name)) and (p / "state.pt").exists() and start < int(m.group(1)) <= step:
                start = int(m.group(1))
    return start


def _saved_steps(cfg, boundaries: list[int], results_root: str, run: str) -> list[int]:
    """Steps at which the planned segments write a snapshot: every ckpt_every and every boundary
    after the run's newest existing snapshot."""
    snaps = Path(results_root) / "runs" / run / "snapshots"
    done = [int(m.group(1)) for p in (snaps.iterdir() if snaps.is_dir() else [])
            if (m := re.match(r"^step(\d+)\.safetensors$", p.name))]
    first = max(done, default=0)
    end = max(boundaries)
    every = cfg.train.ckpt_every
    steps = set(range(every * (first // every + 1), end + 1, every)) | {b for b in boundaries if b > first}
    return sorted(s for s in steps if s > first)


def _evaluated_steps(c: Coster, run: str, config: dict, boundaries: list[int]) -> set[int]:
    """Every step any registry entry samples from run `run` (what retention keeps); with
    evaluate.every_segment, every segment boundary of an entry without its own eval_steps."""
    steps = set()
    for name in c.registry:
        if c.run_of(name) == run:
            explicit = c.registry[name].get("eval_steps")
            steps |= set(explicit or [c.cfg(run).train.max_steps])
            if config["evaluate"]["every_segment"] and not explicit:
                steps |= set(boundaries)
    return steps


def _has_states(results_root: str, run: str) -> bool:
    return (Path(results_root) / "runs" / run / "checkpoints").is_dir()


def _cache_entry(c: Coster, cache: str, res: int) -> str:
    """A registry entry whose latent cache is `cache` at `res` (for the tokenizer and teacher)."""
    random = bool(c.config["random_weights"])
    for name in c.registry:
        try:
            cfg = c.cfg(name)
        except ConfigError:
            continue
        teacher = cfg.data.teacher if cfg.data.cache_teacher else "noteacher"
        key = f"{cfg.data.tokenizer}-{teacher}" + ("-random" if random else "")
        if key == cache and cfg.data.resolution == res:
            return name
    raise PlanError(f"no registry entry trains on latent cache {cache!r} at {res} px")


def _present_bytes(root: str) -> float:
    """Bytes already under a root (outputs of earlier runs, which the plan does not count again)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return float(total)


# ------------------------------------------------------------------------------ printing

def _size(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}" if unit == "TB" else f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def _hours(h: float) -> str:
    return f"{h:.2f}" if h < 10 else f"{h:,.1f}" if h < 1000 else f"{h:,.0f}"


def format_plan(plan: dict) -> str:
    s = plan["site"]
    out = []
    what = " ".join(plan["targets"]) or "the config's default target"
    out.append(f"srdit plan: {what} ({', '.join(plan['configfiles']) or 'config/config.yaml'}; "
               f"profile {plan['profile'] or 'none'})")
    for note in plan["notes"]:
        out.append(f"note: {note}")
    out.append(f"site: {s['nodes']} node(s) x {s['node_gpus']} GPUs, {s['gpu']} (from {s['gpu_from']}); "
               f"outputs already present are not planned")
    out.append("")
    out.append(f"TOTAL: {plan['total_jobs']} jobs, {_hours(plan['gpu_hours_total'])} GPU-hours, "
               f"~{_hours(plan['wall_hours'])} h wall at {s['nodes'] * s['node_gpus']} GPUs, "
               f"{_size(sum(plan['disk'].values()))} new on disk (kept)")
    out.append("  jobs: " + ", ".join(f"{k} {v}" for k, v in plan["jobs"].items()))
    out.append("  GPU-hours: " + ", ".join(f"{k} {_hours(plan['gpu_hours'].get(k, 0.0))}" for k in STAGES))
    for stage in STAGES:
        for basis in plan["basis"].get(stage, []):
            out.append(f"    {stage}: {basis}")
    out.append("")
    out.append("Per row (training rows carry their run; evaluation-only rows only sample + evaluate):")
    head = f"  {'row':<42} {'jobs':>5} {'train':>8} {'encode':>7} {'sample':>7} {'eval':>6} {'wall h':>7} {'disk':>9}  note"
    out.append(head)
    for name, r in sorted(plan["rows"].items(), key=lambda kv: (kv[0] != "(shared data)", kv[0])):
        g = r["gpu_hours"]
        out.append(f"  {name:<42} {sum(r['jobs'].values()):>5} {_hours(g.get('training', 0)):>8} "
                   f"{_hours(g.get('encoding', 0)):>7} {_hours(g.get('sampling', 0)):>7} "
                   f"{_hours(g.get('evaluation', 0)):>6} {_hours(r['wall_hours']):>7} "
                   f"{_size(sum(r['disk'].values())):>9}  {r['note']}")
    out.append("")
    out.append(f"Disk added by the plan, kept after it (retention: snapshots {plan['retention']['snapshots']}, "
               f"samples {plan['retention']['samples']}):")
    for kind in DISK_KINDS:
        out.append(f"  {kind:<17} {_size(plan['disk'][kind]):>10}")
    for root, size in plan["disk_per_root"].items():
        out.append(f"  root {root}/: {_size(size)} kept, peak {_size(plan['peak_per_root'][root])} "
                   f"(plus {_size(plan['present_per_root'].get(root, 0.0))} already there)")
    if plan["teacher"]:
        out.append("")
        out.append("Teacher features, per training run: cached in the latent cache (disk, shared by every run "
                   "on that cache) or run online in bf16 during training (GPU-hours):")
        for t in sorted(plan["teacher"], key=lambda t: t["run"]):
            extra = t["gpu_hours_online"] - t["gpu_hours_cached"]
            out.append(f"  {t['run']:<42} now {t['mode']:<6} cached {_hours(t['gpu_hours_cached'])} GPU-h, "
                       f"online {_hours(t['gpu_hours_online'])} GPU-h (+{_hours(extra)})")
        caches = {(t["resolution"], t["teacher"]): t["cache_bytes"] for t in plan["teacher"]}
        for (res, teacher), size in sorted(caches.items()):
            out.append(f"  cached {teacher} features at {res} px: {_size(size)} for {plan['images'][res]:,} "
                       f"images, once per latent cache (data.cache_teacher: false saves it)")
    return "\n".join(out)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="rows, groups or files, as for snakemake (default: the config's ablations)")
    parser.add_argument("--configfile", action="append", default=[], metavar="FILE",
                        help="workflow config file, as for snakemake (repeat the flag for several; one "
                             "file per flag, so `--configfile FILE TARGET` reads TARGET as a target)")
    parser.add_argument("--profile", default="profiles/slurm",
                        help="Snakemake profile the dry run uses, whose site: block gives the GPUs "
                             "('' for none)")
    parser.add_argument("--gpu-model", default=None,
                        help=f"GPU model for the throughput table (default: site.gpu_model, else {DEFAULT_GPU}); "
                             f"one of: {', '.join(PEAK_BF16_TFLOPS)}")
    parser.add_argument("--nodes", type=int, default=None,
                        help="GPU nodes the jobs can use at once, for the wall time (default: site.nodes, else 1)")
    parser.add_argument("--directory", default=".", help="the workflow folder (default: here)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        plan = build_plan(args.configfile, args.targets, profile=args.profile or None, workdir=args.directory,
                          gpu_model=args.gpu_model, nodes=args.nodes)
    except PlanError as e:
        print(f"srdit plan: {e}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    if args.json:
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps({k: v for k, v in plan.items() if k != "dry"}, indent=1, default=str))
        os.replace(tmp, args.json)
    return 0
