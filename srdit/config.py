"""Typed configuration: every switch of the SR-DiT recipe and its ablations.

An experiment is an `ExperimentConfig` made of small dataclasses (model, objective, data,
train, sample, eval). Experiments are named entries of the ablation registry
(`config/ablations.yaml`, shipped in the package as `srdit/presets/ablations.yaml`); each entry
patches its `parent`. Everything that enters from a dict goes through `from_dict`, which refuses
unknown keys and bad values with an error that names the key and what is allowed, and then
through `validate`, which refuses impossible combinations.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or inconsistent; the message names the key."""


# --------------------------------------------------------------------------------------------
# Model sizes (SiT registry). Patch size is part of the name: "B/1" is SiT-B with patch 1.
# --------------------------------------------------------------------------------------------

MODEL_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    # Not in the paper: a tiny model for tests and the CPU demo.
    "T": dict(depth=6, hidden_size=64, num_heads=4),
}
PATCH_SIZES = (1, 2, 4)

# Width of each teacher's CLS / patch tokens: the REG class token and the REPA target are this wide.
TEACHER_DIMS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024}
TEACHER_PATCH_PIXELS = 16     # the teacher gives one patch token per 16 x 16 pixels (srdit.teachers)

# Pixels per latent position along each side, per tokenizer (srdit.tokenizers): the latent side
# model.input_size is data.resolution / this. "pixel" is the CPU demo's space-to-depth stand-in.
TOKENIZER_DOWNSAMPLE = {"e2e-invae": 16, "sd-vae": 8, "pixel": 4}


def model_size(name: str) -> dict[str, int]:
    """'B/1' -> dict(depth=12, hidden_size=768, num_heads=12, patch_size=1)."""
    allowed = [f"{s}/{p}" for s in MODEL_SIZES for p in PATCH_SIZES]
    try:
        size, patch = name.split("/")
        out = dict(MODEL_SIZES[size], patch_size=int(patch))
    except (ValueError, KeyError):
        raise ConfigError(f"model.size: unknown size {name!r}; allowed: {', '.join(allowed)}") from None
    if out["patch_size"] not in PATCH_SIZES:
        raise ConfigError(f"model.size: unknown size {name!r}; allowed: {', '.join(allowed)}")
    return out


# --------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------

@dataclass
class SprintConfig:
    """SPRINT token routing: dense encoder -> sparse middle on a random subset -> fusion -> dense decoder."""
    enabled: bool = True
    encoder_depth: int = 2          # dense blocks before the drop (f)
    decoder_depth: int = 2          # dense blocks after the fusion (h)
    drop_ratio: float = 0.75        # fraction of all T tokens (class token included) dropped in training
    path_drop: float = 0.05         # per-step probability that the whole batch's sparse path is replaced by the mask token


@dataclass
class ModelConfig:
    depth: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    patch_size: int = 1
    input_size: int = 16            # latent side H = W (resolution / 16 for E2E-INVAE, see TOKENIZER_DOWNSAMPLE)
    in_channels: int = 32           # latent channels C
    num_classes: int = 1000         # label K is the null class
    mlp_ratio: float = 4.0
    mlp_act: Literal["gelu_tanh", "swiglu", "relu2"] = "gelu_tanh"
    norm: Literal["layer", "rms"] = "rms"
    rope: bool = True               # 2D axial RoPE (EVA-02 style) on q and k of every block
    rope_theta: float = 10000.0
    qk_norm: bool = True            # per-head RMSNorm with gain on q and k, before RoPE
    value_residual: Literal["none", "scalar", "linear"] = "scalar"
    class_token: bool = True        # REG: the noised teacher CLS token is token 0
    cls_token_dim: int = 768        # teacher feature width (DINOv2-B: 768)
    sprint: SprintConfig = field(default_factory=SprintConfig)
    align_depths: list[int] = field(default_factory=lambda: [2])  # REPA reads the output after this many blocks
    projector_dim: int = 2048       # REPA projector hidden width
    label_dropout: float = 0.1      # training-time label dropout to the null class (enables CFG)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2 + int(self.class_token)


@dataclass
class ObjectiveConfig:
    path: Literal["linear"] = "linear"          # x_t = (1 - t) x0 + t eps; t = 1 is noise
    t_dist: Literal["uniform", "logit_normal"] = "uniform"
    time_shift: bool = True                     # t' = s t / (1 + (s - 1) t), s = sqrt(C H W / shift_base)
    shift_base: int = 4096
    cls_coeff: float = 0.03                     # REG class-token flow loss weight
    proj_coeff: float = 0.5                     # REPA negative-cosine weight
    cfm_coeff: float = 0.05                     # contrastive flow matching weight (0 = off)
    cfm_weighting: Literal["uniform", "linear"] = "uniform"  # linear = t-weighted (TCFM)


@dataclass
class DataConfig:
    resolution: int = 256
    tokenizer: Literal["e2e-invae", "sd-vae", "pixel"] = "e2e-invae"
    latent_scale: float | None = None           # None = the tokenizer's default (0.3099 for E2E-INVAE)
    latent_bias: float = 0.0
    teacher: Literal["dinov2_vitb14", "dinov2_vitl14", "dinov2_vits14"] = "dinov2_vitb14"
    cache_teacher: bool = True                  # store teacher CLS + patch tokens in the HDF5 cache


@dataclass
class TrainConfig:
    global_batch: int = 256
    micro_batch: int = 32                       # per process and step; accumulation = global / (micro x world)
    max_steps: int = 400_000
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # auto: 0 (plain data parallel) on one process or for models whose AdamW state is small
    # (< 4 GB: B/1, L/1), else 1 (XL/1); see srdit.train.resolve_zero_stage
    zero_stage: typing.Union[Literal[0, 1, 2], Literal["auto"]] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    compile: typing.Union[bool, Literal["auto"]] = "auto"  # torch.compile the step; auto: on CUDA only
    seed: int = 0
    num_workers: int = 4
    ckpt_every: int = 10_000                    # full training state + consolidated snapshot
    keep_ckpts: int = 2                         # full training states kept (snapshots are all kept)
    segment_steps: int = 0                      # 0 = no step bound per job
    segment_minutes: float = 0.0                # 0 = no wall-clock bound per job
    log_every: int = 100


@dataclass
class SampleConfig:
    mode: Literal["sde", "ode"] = "sde"
    num_steps: int = 250                        # "NFE 250" = 250 grid points, the last step deterministic
    cfg_scale: float = 1.0
    cls_cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    path_drop_guidance: bool = True             # unconditional branch drops SPRINT's sparse path
    null_label_guidance: bool = True            # unconditional branch uses the null label
    time_shift: bool = True
    balanced: bool = True                       # sample i has class i mod K
    seed: int = 0
    num_samples: int = 50_000
    batch_size: int = 256                       # samples per batch (they do not depend on it)
    use_ema: bool = True


@dataclass
class EvalConfig:
    reference: str = "VIRTUAL_imagenet256_labeled.npz"
    kdd: bool = True
    kdd_subsets: int = 100
    kdd_subset_size: int = 1000
    kdd_seed: int = 13579
    pr_k: int = 3
    is_split_size: int = 5000


@dataclass
class ExperimentConfig:
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------------------------
# dict -> dataclass with strict checking
# --------------------------------------------------------------------------------------------

def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            # accept e.g. 1 for a Literal[0, 1, 2] but not True
            if not (isinstance(value, type(allowed[0])) and not isinstance(value, bool) and value in allowed):
                raise ConfigError(f"{key}: bad value {value!r}; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):      # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and ill-typed values."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = dict(data)
    if cls is ModelConfig and "size" in data:      # "size: B/1" expands to depth/width/heads/patch
        size = model_size(data.pop("size"))
        data = {**size, **data}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            extra = ", size" if cls is ModelConfig else ""
            raise ConfigError(f"{key}: unknown key; allowed keys: {', '.join(names)}{extra}")
        kwargs[k] = _check_value(v, hints[k], key)
    return cls(**kwargs)


def deep_merge(base: dict, patch: dict) -> dict:
    """Recursively merge `patch` into a copy of `base` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------
# Consistency checks
# --------------------------------------------------------------------------------------------

def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    m, o, s, t, d = cfg.model, cfg.objective, cfg.sample, cfg.train, cfg.data
    pos = lambda key, v: v > 0 or _fail(f"{key}: must be > 0, got {v}")  # noqa: E731
    for key in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels",
                "num_classes", "cls_token_dim", "projector_dim"):
        pos(f"model.{key}", getattr(m, key))
    pos("model.mlp_ratio", m.mlp_ratio)
    if m.hidden_size % m.num_heads:
        _fail(f"model.num_heads: hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
    if m.input_size % m.patch_size:
        _fail(f"model.patch_size: input_size {m.input_size} is not divisible by patch_size {m.patch_size}")
    if m.rope and m.head_dim % 4:
        _fail(f"model.rope: 2D RoPE rotates head_dim in adjacent pairs, half per image axis, so head_dim "
              f"must be divisible by 4; got head_dim {m.head_dim} (hidden_size {m.hidden_size} / num_heads "
              f"{m.num_heads}); set model.rope: false or change num_heads")
    if m.qk_norm is not None and m.head_dim < 1:
        _fail("model.num_heads: head_dim must be >= 1")
    if not 0.0 <= m.label_dropout < 1.0:
        _fail(f"model.label_dropout: must be in [0, 1), got {m.label_dropout}")
    if m.value_residual != "none" and m.depth < 2:
        _fail("model.value_residual: needs depth >= 2 (block 0 provides the values)")
    sp = m.sprint
    if sp.enabled:
        if sp.encoder_depth < 1 or sp.decoder_depth < 0:
            _fail("model.sprint.encoder_depth: must be >= 1 (and decoder_depth >= 0)")
        if sp.encoder_depth + sp.decoder_depth > m.depth:
            _fail(f"model.sprint.encoder_depth: the SPRINT split {sp.encoder_depth} dense + "
                  f"{sp.decoder_depth} dense is deeper than model.depth {m.depth}; allowed: "
                  f"encoder_depth + decoder_depth <= depth")
        if not 0.0 <= sp.drop_ratio < 1.0:
            _fail(f"model.sprint.drop_ratio: must be in [0, 1), got {sp.drop_ratio}")
        if not 0.0 <= sp.path_drop <= 1.0:
            _fail(f"model.sprint.path_drop: must be in [0, 1], got {sp.path_drop}")
    if not m.align_depths and o.proj_coeff > 0:
        _fail("model.align_depths: empty, but objective.proj_coeff > 0 needs at least one REPA block")
    for a in m.align_depths:
        if not 1 <= a <= m.depth:
            _fail(f"model.align_depths: {a} is outside 1..depth ({m.depth})")
        if sp.enabled and a > sp.encoder_depth:
            _fail(f"model.align_depths: {a} lies inside the SPRINT sparse path; with sprint enabled "
                  f"allowed values are 1..{sp.encoder_depth} (model.sprint.encoder_depth)")
    if not m.class_token and o.cls_coeff > 0:
        _fail("objective.cls_coeff: > 0 needs model.class_token: true (REG)")
    for key in ("cls_coeff", "proj_coeff", "cfm_coeff"):
        if getattr(o, key) < 0:
            _fail(f"objective.{key}: must be >= 0")
    pos("objective.shift_base", o.shift_base)
    if TEACHER_DIMS[d.teacher] != m.cls_token_dim:
        _fail(f"model.cls_token_dim: {m.cls_token_dim} does not match data.teacher {d.teacher} "
              f"(width {TEACHER_DIMS[d.teacher]}); allowed: {TEACHER_DIMS[d.teacher]}")
    if d.resolution % TEACHER_PATCH_PIXELS:
        _fail(f"data.resolution: must be a multiple of {TEACHER_PATCH_PIXELS} (the teacher's token grid), "
              f"got {d.resolution}")
    side = d.resolution // TOKENIZER_DOWNSAMPLE[d.tokenizer]
    if side != m.input_size:
        _fail(f"model.input_size: {m.input_size} does not match data.resolution {d.resolution} (the "
              f"{d.tokenizer} tokenizer, f{TOKENIZER_DOWNSAMPLE[d.tokenizer]}, gives a latent side of {side}); "
              f"allowed: {side}")
    teacher_grid = d.resolution // TEACHER_PATCH_PIXELS
    if m.align_depths and m.grid_size != teacher_grid:
        _fail(f"model.align_depths: REPA aligns each of the model's {m.grid_size}x{m.grid_size} tokens with a "
              f"teacher token, but the teacher's grid at {d.resolution} px is {teacher_grid}x{teacher_grid}; "
              f"set model.align_depths: [] and objective.proj_coeff: 0, or a patch size giving a "
              f"{teacher_grid}x{teacher_grid} grid")
    pos("train.global_batch", t.global_batch)
    pos("train.micro_batch", t.micro_batch)
    if t.global_batch % t.micro_batch:
        _fail(f"train.micro_batch: global_batch {t.global_batch} is not divisible by micro_batch {t.micro_batch}")
    if not 0.0 <= t.ema_decay < 1.0:
        _fail(f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        _fail(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    pos("train.ckpt_every", t.ckpt_every)
    pos("sample.num_steps", s.num_steps)
    if s.mode == "sde" and s.num_steps < 2:
        _fail("sample.num_steps: the SDE sampler needs at least 2 steps")
    if not 0.0 <= s.guidance_low <= s.guidance_high <= 1.0:
        _fail("sample.guidance_low/guidance_high: need 0 <= guidance_low <= guidance_high <= 1")
    if s.cfg_scale < 1.0:
        _fail(f"sample.cfg_scale: {s.cfg_scale} is below 1; allowed: 1.0 (no guidance) or a scale above 1 "
              f"(the reference sampler guides only above 1)")
    if s.cfg_scale > 1.0 and s.path_drop_guidance and not sp.enabled:
        _fail("sample.path_drop_guidance: true needs model.sprint.enabled (the unconditional branch drops "
              "SPRINT's sparse path); allowed with sprint disabled: false")
    if s.cfg_scale > 1.0 and not (s.path_drop_guidance or s.null_label_guidance):
        _fail("sample.null_label_guidance: guidance (cfg_scale > 1) needs an unconditional branch; set "
              "null_label_guidance and/or path_drop_guidance to true")
    pos("sample.num_samples", s.num_samples)
    pos("sample.batch_size", s.batch_size)
    return cfg


def _fail(msg: str):
    raise ConfigError(msg)


# --------------------------------------------------------------------------------------------
# The ablation registry
# --------------------------------------------------------------------------------------------

PACKAGE_REGISTRY = Path(__file__).parent / "presets" / "ablations.yaml"
# Keys an entry may carry besides the config sections: they describe the entry, not the model.
ENTRY_META_KEYS = ("parent", "description", "paper", "train_from", "eval_steps", "group")
SECTIONS = ("model", "objective", "data", "train", "sample", "eval")


def load_registry(*extra: str | Path) -> dict[str, dict]:
    """The raw ablation registry: the package's entries plus those of any extra YAML files."""
    entries: dict[str, dict] = {}
    for path in (PACKAGE_REGISTRY, *extra):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"ablation registry {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping from entry name to entry")
        data = data.get("ablations", data)
        for name, entry in data.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: entry {name!r} must be a mapping")
            for k in entry:
                if k not in SECTIONS + ENTRY_META_KEYS:
                    raise ConfigError(f"ablations.{name}.{k}: unknown key; allowed keys: "
                                      f"{', '.join(SECTIONS + ENTRY_META_KEYS)}")
            entries[name] = entry
    return entries


def resolve_entry(name: str, registry: dict[str, dict]) -> dict[str, Any]:
    """Flatten an entry with its chain of parents into one dict of sections (+ meta of the entry)."""
    if name not in registry:
        raise ConfigError(f"ablation {name!r}: unknown; allowed: {', '.join(sorted(registry))}")
    chain, cur = [], name
    while cur is not None:
        if cur in chain:
            raise ConfigError(f"ablations.{name}: parent cycle {' -> '.join(chain + [cur])}")
        if cur not in registry:
            raise ConfigError(f"ablations.{chain[-1]}.parent: unknown entry {cur!r}; allowed: "
                              f"{', '.join(sorted(registry))}")
        chain.append(cur)
        cur = registry[cur].get("parent")
    merged: dict[str, Any] = {}
    for entry_name in reversed(chain):
        entry = registry[entry_name]
        merged = deep_merge(merged, {k: v for k, v in entry.items() if k in SECTIONS})
    return merged


def build_config(sections: dict[str, Any], name: str = "unnamed", description: str = "") -> ExperimentConfig:
    """Sections dict (model/objective/...) -> validated ExperimentConfig."""
    return validate(from_dict(ExperimentConfig, {"name": name, "description": description, **sections}))


def get_config(name: str, *extra_registries: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """The resolved, validated config of ablation `name`, optionally patched by `overrides`."""
    registry = load_registry(*extra_registries)
    sections = resolve_entry(name, registry)
    if overrides:
        sections = deep_merge(sections, overrides)
    return build_config(sections, name=name, description=registry[name].get("description", ""))


def entry_meta(name: str, *extra_registries: str | Path) -> dict[str, Any]:
    """The descriptive keys the entry itself sets (paper numbers, train_from, eval_steps...); for
    `train_from` and `group` as inherited from parents, use `inherited_meta`."""
    registry = load_registry(*extra_registries)
    if name not in registry:
        raise ConfigError(f"ablation {name!r}: unknown; allowed: {', '.join(sorted(registry))}")
    return {k: v for k, v in registry[name].items() if k in ENTRY_META_KEYS}


# Sections that change what a run trains; an entry that patches one of them trains its own run.
TRAINING_SECTIONS = ("model", "objective", "data", "train")


def inherited_meta(name: str, registry: dict[str, dict], key: str):
    """A descriptive key of entry `name`, taken from the nearest entry of its parent chain that sets
    it. Used for `train_from` and `group`, which an entry shares with its parent (the 100K
    checkpoint row inherits the run of the 50K row); `paper` and `description` are never inherited."""
    seen = []
    while name is not None and name not in seen:
        seen.append(name)
        entry = registry.get(name, {})
        if key in entry:
            return entry[key]
        if key == "train_from" and any(section in entry for section in TRAINING_SECTIONS):
            return None     # it changes what is trained: a new run, not an evaluation of the parent's
        name = entry.get("parent")
    return None


def list_presets(*extra_registries: str | Path) -> list[str]:
    return sorted(load_registry(*extra_registries))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['model.depth=4', 'train.lr=2e-4'] -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.depth=4")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_experiment_file(path: str | Path) -> ExperimentConfig:
    """A resolved config written by `to_json` (e.g. a run directory's config.json)."""
    data = json.loads(Path(path).read_text())
    return validate(from_dict(ExperimentConfig, data))
