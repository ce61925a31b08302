"""Which run trains a row, where it lives, and the flags its trainer gets: one implementation for
the workflow's rules (workflow/rules/common.smk), `srdit launch` and `srdit status`, so that a row
launched by hand trains the very run directory the workflow would train and reuse.

The workflow config is read as Snakemake reads it: config/config.yaml (the demo), then each
`--configfile` on top (mappings merge, other values replace).
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from srdit.config import ConfigError, build_config, deep_merge, inherited_meta, load_registry, resolve_entry

DEFAULT_CONFIG = "config/config.yaml"


def python_command() -> str:
    """The interpreter that runs every stage: the one running this process (the venv's, also when
    snakemake was started as .venv/bin/snakemake without activating the venv), shell-quoted."""
    return shlex.quote(sys.executable)


def load_workflow_config(configfiles=(), root: str | Path = ".") -> dict:
    """config/config.yaml with each of `configfiles` merged on top, paths relative to `root`."""
    root = Path(root)
    config: dict = {}
    for path in (DEFAULT_CONFIG, *configfiles):
        path = Path(path) if Path(path).is_absolute() else root / path
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        config = deep_merge(config, data)
    return config


def results_root(config: dict) -> str:
    """Where runs, metrics, the report and logs live (config results_root, default "results")."""
    return str(config.get("results_root", "results")).rstrip("/") or "."


def cache_root(config: dict) -> str:
    """Where image/latent caches and samples live (config cache_root, default "results")."""
    return str(config.get("cache_root", "results")).rstrip("/") or "."


def runs_folder(config: dict) -> str:
    return f"{results_root(config)}/runs"


def run_dir(config: dict, run: str) -> str:
    return f"{runs_folder(config)}/{run}"


def train_run(name: str, registry: dict[str, dict]) -> str:
    """The registry entry whose training run row `name` samples: itself, or its (inherited)
    `train_from` (evaluation-only rows such as b1_srdit never train a run of their own)."""
    return inherited_meta(name, registry, "train_from") or name


def cache_key(cfg, random_weights: bool) -> str:
    """Name of the latent cache an experiment trains on: what the latents were made with."""
    teacher = cfg.data.teacher if cfg.data.cache_teacher else "noteacher"
    return f"{cfg.data.tokenizer}-{teacher}" + ("-random" if random_weights else "")


def latents_cache(config: dict, cfg) -> str:
    random_weights = bool(config["random_weights"])
    return (f"{cache_root(config)}/cache/{config['data']['name']}/latents{cfg.data.resolution}-"
            f"{cache_key(cfg, random_weights)}/cache.h5")


def train_flags(config: dict, cfg) -> list[str]:
    """The trainer's flags that follow from the workflow config (registries, weights folder)."""
    flags: list[str] = []
    for path in config.get("extra_registries") or []:
        flags += ["--registry", str(path)]
    flags += ["--resources", str(config["resources_dir"])]
    if config["random_weights"] and not cfg.data.cache_teacher:
        flags.append("--random-teacher")
    return flags


@dataclass
class TrainJob:
    """What training row `row` means under a workflow config."""
    row: str
    run: str                    # the registry entry that trains (== row unless evaluation-only)
    run_dir: str
    cache: str
    max_steps: int
    flags: list[str] = field(default_factory=list)

    def args(self, until_step: int | None = None) -> list[str]:
        """Arguments of `srdit train`, as the workflow's train_segment rule passes them."""
        step = self.max_steps if until_step is None else until_step
        return [self.run, "--run-dir", self.run_dir, "--cache", self.cache, "--until-step", str(step), *self.flags]


def resolve_train(row: str, config: dict) -> TrainJob:
    """The run the workflow trains for `row` (a registry entry name) under `config`."""
    registry = load_registry(*(config.get("extra_registries") or []))
    if row not in registry:
        raise ConfigError(f"row {row!r}: not an entry of the ablation registry; allowed: "
                          f"{', '.join(sorted(registry))}")
    run = train_run(row, registry)
    if run not in registry:
        raise ConfigError(f"ablations.{row}.train_from: unknown entry {run!r}")
    cfg = build_config(resolve_entry(run, registry), name=run)
    return TrainJob(row=row, run=run, run_dir=run_dir(config, run), cache=latents_cache(config, cfg),
                    max_steps=cfg.train.max_steps, flags=train_flags(config, cfg))
