"""Typed run configuration: YAML plus dotted overrides merged by OmegaConf into dataclasses.

No JAX import here: the config is loaded and validated before JAX's backend starts, so that
simulated CPU devices and jax.distributed can still be set up from it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxinfra.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Models name logical axes only; this table is the one place that
# decides what is split across devices. A mesh axis is used at most once per array: when two
# dimensions of one array ask for the same mesh axis, the earlier dimension keeps it.
DEFAULT_RULES: dict[str, list[str]] = {
    "batch": ["data", "fsdp"],  # activations and data: batch split over data x fsdp
    "seq": [],
    "embed": ["fsdp"],  # FSDP / ZeRO-3: every weight split over fsdp along d_model
    "vocab": ["tensor"],  # Megatron: vocab, heads and the MLP hidden dim over tensor
    "heads": ["tensor"],
    "kv": [],
    "mlp": ["tensor"],
    "norm": [],
}


@dataclass
class RunConfig:
    """What to run and where its outputs go."""

    name: str = "default"
    dir: str = ""  # run folder; "" means runs/<name>
    seed: int = 0
    steps: int = 600
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4  # held-out batches (of data.batch_size windows) per evaluation
    sample_tokens: int = 160  # bytes sampled per prompt at the end of the run; 0 = none
    sample_prompts: list[str] = field(default_factory=lambda: ["def ", "import ", "class "])
    sample_temperature: float = 0.8
    progress: bool = True  # console progress bar
    plot: bool = True  # plots.png of the metrics in the run folder at the end
    stop_after: int = 0  # end this process after N steps of the run (checkpointed; a restart resumes)
    peak_flops: float = 0.0  # FLOP/s of the whole mesh, the denominator of MFU; 0 = measure a matmul
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: jax.profiler trace of steps a..b

    @property
    def path(self) -> str:
        """The run folder."""
        return self.dir or os.path.join("runs", self.name)


@dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: filled from the device count) and sharding rules."""

    data: int = 2
    fsdp: int = 2
    tensor: int = 2
    cpu_devices: int = 8  # simulated CPU devices in all processes together; 0 = JAX's default
    dcn_data: int = 1  # hybrid mesh: how much of each axis spans nodes / slices (the slow network)
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def sizes(self) -> dict[str, int]:
        """Axis name -> configured size (maybe -1)."""
        return {a: getattr(self, a) for a in MESH_AXES}

    def dcn(self) -> tuple[int, ...]:
        """Across-node factor of each axis (all 1: a plain mesh)."""
        return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)


@dataclass
class DistributedConfig:
    """jax.distributed settings; empty values are taken from the environment (TPU, SLURM)."""

    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: from the environment, else 1
    process_id: int = -1  # -1: from the environment


@dataclass
class ModelConfig:
    """Decoder-only transformer sizes and numerics."""

    vocab_size: int = 256  # byte-level tokens
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384  # hidden size of the gated MLP
    seq_len: int = 128
    rope_theta: float = 10000.0
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"  # master weights
    remat: str = "none"  # none | full | dots (keep matmul outputs, recompute the rest)
    attention: str = "xla"  # xla | cudnn (fused flash attention on NVIDIA GPUs, bf16/fp16 compute)

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.d_model // self.n_heads

    def logical_sizes(self) -> dict[str, tuple[str, int]]:
        """Logical axis -> (config key, size) for the divisibility checks."""
        return {
            "embed": ("model.d_model", self.d_model),
            "heads": ("model.n_heads", self.n_heads),
            "mlp": ("model.d_ff", self.d_ff),
            "vocab": ("model.vocab_size", self.vocab_size),
        }


@dataclass
class DataConfig:
    """Corpus and batching."""

    path: str = ""  # "" = the running interpreter's standard-library sources; else file or folder
    glob: str = "*.py"  # files taken from a folder (recursively)
    batch_size: int = 32  # global batch, in windows of model.seq_len + 1 bytes
    heldout_percent: float = 1.0  # files held out for eval, chosen by a hash of their path


@dataclass
class OptimConfig:
    """Optax optimizer, schedule, clipping and gradient accumulation."""

    name: str = "adamw"  # adamw | sgd | lion | adafactor
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear
    weight_decay: float = 0.1  # 2-D+ weights only; decoupled (adamw, lion, adafactor), L2 for sgd
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    clip_norm: float = 1.0  # global-norm clipping; 0 = off
    grad_accum: int = 1  # micro-batches per step (data.batch_size must divide)


@dataclass
class PruneConfig:
    """Magnitude pruning inside the train step (sparsity 0 = off)."""

    sparsity: float = 0.0  # final fraction of zeros in each pruned tensor (or in all, scope=global)
    schedule: str = "cubic"  # cubic (Zhu & Gupta 2017) between start_step and end_step | oneshot at start_step
    start_step: int = 0
    end_step: int = 0
    every: int = 10  # steps between mask updates (cubic)
    scope: str = "layer"  # layer | global (one threshold over all pruned tensors)
    pattern: str = "unstructured"  # unstructured | N:M such as 2:4 (groups along a kernel's input dim)
    criterion: str = "magnitude"  # magnitude | random (a baseline for benchmarks)
    distribution: str = "uniform"  # uniform (every tensor at `sparsity`) | erk (Erdos-Renyi-Kernel, scope layer)
    params: list[str] = field(default_factory=list)  # path globs (blocks/*/mlp/*) or logical axis names
    # (mlp) of the tensors to prune; empty: the 2-D+ kernels of attention and MLP (no embeddings, norms)


@dataclass
class CheckpointConfig:
    """Orbax checkpoints in <run.dir>/checkpoints and merged exports in <run.dir>/exports."""

    every: int = 200  # save every N steps (0: only at the end); always at the end and on SIGTERM
    keep: int = 2  # newest steps kept
    keep_every: int = 0  # also keep every N-th step for good (0: none)
    resume: bool = True  # continue from the newest complete step in the run folder
    restore_step: int = -1  # resume from this step instead of the newest
    fallback: bool = False  # if the chosen step is unreadable, resume from the previous good one
    export_every: int = 0  # also save and export exports/model-<step>.safetensors every N steps (0: never);
    # these saves count towards `keep`
    export_final: bool = True  # ... and at the end of the run
    export_dtype: str = "float32"


@dataclass
class Config:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)


DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn"),
    "optim.name": ("adamw", "sgd", "lion", "adafactor"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "checkpoint.export_dtype": DTYPES,
    "prune.schedule": ("cubic", "oneshot"),
    "prune.scope": ("layer", "global"),
    "prune.distribution": ("uniform", "erk"),
    "prune.criterion": ("magnitude", "random"),
}


def _omegaconf_error(e: OmegaConfBaseException) -> UserError:
    """One readable line from an OmegaConf merge error."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    return UserError(f"config key {key}: {msg}")


def _check_keys(data: Any, schema: Any, prefix: str = "") -> None:
    """Reject unknown keys naming the closest valid one (before OmegaConf sees them)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return
    valid = [f.name for f in dataclasses.fields(schema)]
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(valid)})"
            raise UserError(f"unknown config key {name}{hint}")
        _check_keys(value, hints[key], f"{name}.")


def _parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if re.fullmatch(r"\d+:\d+", raw.strip()):  # N:M, which YAML 1.1 would read as a base-60 integer
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated; raises UserError naming the key."""
    layers = []
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--config {path}: no such file")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"--config {path}: expected a mapping of sections, got {type(data).__name__}")
        layers.append(data)
    for item in overrides:
        layers.append(_nest(*_parse_override(item)))
    cfg = OmegaConf.structured(Config)
    for layer in layers:
        _check_keys(layer, Config)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(layer))
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e) from None
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(out)
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Checks that need no devices; raises UserError with the key and the numbers."""
    for key, options in CHOICES.items():
        value = _get(cfg, key)
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{key}={value!r} is not one of {', '.join(options)}{hint}")
    for key in ("run.steps", "run.log_every", "data.batch_size", "optim.grad_accum", "model.d_model",
                "model.n_layers", "model.n_heads", "model.d_ff", "model.seq_len", "model.vocab_size"):
        if _get(cfg, key) < 1:
            raise UserError(f"{key}={_get(cfg, key)} must be at least 1")
    for key in ("run.eval_every", "run.eval_batches", "run.sample_tokens", "optim.warmup_steps",
                "mesh.cpu_devices", "distributed.num_processes", "optim.clip_norm", "optim.weight_decay",
                "run.stop_after", "checkpoint.every", "checkpoint.keep_every", "checkpoint.export_every"):
        if _get(cfg, key) < 0:
            raise UserError(f"{key}={_get(cfg, key)} must not be negative")
    if cfg.checkpoint.keep < 1:
        raise UserError(f"checkpoint.keep={cfg.checkpoint.keep} must be at least 1")
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr={cfg.optim.lr} must be positive")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must lie in [0, 1]")
    if cfg.model.d_model % cfg.model.n_heads:
        raise UserError(f"model.d_model={cfg.model.d_model} is not divisible by model.n_heads={cfg.model.n_heads}")
    if cfg.model.attention == "cudnn" and cfg.model.dtype == "float32":
        raise UserError("model.attention=cudnn needs model.dtype=bfloat16 or float16 (cuDNN's fused attention)")
    if cfg.model.head_dim % 2:
        raise UserError(f"model.d_model / model.n_heads = {cfg.model.head_dim} must be even for rotary positions")
    if cfg.data.batch_size % cfg.optim.grad_accum:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                        f"optim.grad_accum={cfg.optim.grad_accum}")
    if not 0 <= cfg.data.heldout_percent < 100:
        raise UserError(f"data.heldout_percent={cfg.data.heldout_percent} must lie in [0, 100)")
    validate_prune(cfg)
    ps = cfg.run.profile_steps
    if ps and (len(ps) != 2 or not 1 <= ps[0] <= ps[1] <= cfg.run.steps):
        raise UserError(f"run.profile_steps={list(ps)} must be [first, last] with 1 <= first <= last <= "
                        f"run.steps={cfg.run.steps}")
    if cfg.run.peak_flops < 0:
        raise UserError(f"run.peak_flops={cfg.run.peak_flops} must not be negative")
    for prompt in cfg.run.sample_prompts:
        data = prompt.encode("utf-8")
        if not data or max(data) >= cfg.model.vocab_size:
            raise UserError(f"run.sample_prompts: {prompt!r} is empty or holds a byte outside "
                            f"model.vocab_size={cfg.model.vocab_size}")
    if cfg.run.sample_temperature < 0:
        raise UserError(f"run.sample_temperature={cfg.run.sample_temperature} must not be negative")
    sizes = cfg.mesh.sizes()
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise UserError(f"mesh.{axis}={size} must be a positive size or -1 (fill from the device count)")
    for axis, size in zip(MESH_AXES, cfg.mesh.dcn()):
        if size < 1:
            raise UserError(f"mesh.dcn_{axis}={size} must be at least 1")
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"at most one mesh size may be -1, got {sizes}")
    for name, axes in cfg.mesh.rules.items():
        for axis in axes:
            if axis not in MESH_AXES:
                close = difflib.get_close_matches(axis, MESH_AXES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"mesh.rules.{name} names mesh axis {axis!r}, not one of "
                                f"{', '.join(MESH_AXES)}{hint}")
        if len(set(axes)) != len(axes):
            raise UserError(f"mesh.rules.{name}={axes} repeats a mesh axis")
    if cfg.data.path and not os.path.exists(cfg.data.path):
        raise UserError(f"data.path={cfg.data.path}: no such file or folder")


def nm_pattern(pattern: str) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); 'unstructured' -> None; anything else raises UserError."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise UserError(f"prune.pattern={pattern!r} is not 'unstructured' or N:M such as 2:4 "
                        f"(quote it in YAML files: \"2:4\")") from None
    if not 0 < n < m:
        raise UserError(f"prune.pattern={pattern}: N={n} must be at least 1 and below M={m}")
    return n, m


def validate_prune(cfg: Config) -> None:
    """Pruning settings that can be checked before any device work."""
    p = cfg.prune
    nm_pattern(p.pattern)
    if not 0 <= p.sparsity < 1:
        raise UserError(f"prune.sparsity={p.sparsity} must lie in [0, 1)")
    if not p.sparsity and p.pattern == "unstructured":
        return
    end = p.start_step if p.schedule == "oneshot" or p.pattern != "unstructured" else p.end_step
    if p.every < 1:
        raise UserError(f"prune.every={p.every} must be at least 1")
    if p.start_step < 0 or end < p.start_step:
        raise UserError(f"prune.start_step={p.start_step} and prune.end_step={p.end_step}: no mask update "
                        f"falls inside [start_step, end_step]")
    if end >= cfg.run.steps:
        raise UserError(f"prune.end_step={end} must be below run.steps={cfg.run.steps} "
                        f"(steps after the last mask update let the model recover)")
    if p.distribution == "erk" and (p.scope != "layer" or p.pattern != "unstructured"):
        raise UserError(f"prune.distribution=erk sets one sparsity per tensor: it needs prune.scope=layer and "
                        f"prune.pattern=unstructured (got {p.scope}, {p.pattern})")


def prune_warnings(cfg: Config) -> list[str]:
    """Legal but risky pruning settings: too few steps after the last mask update."""
    p = cfg.prune
    if not p.sparsity and p.pattern == "unstructured":
        return []
    end = p.start_step if p.schedule == "oneshot" or p.pattern != "unstructured" else p.end_step
    after = cfg.run.steps - end
    if after < 0.2 * cfg.run.steps:
        return [f"warning: only {after} of run.steps={cfg.run.steps} steps ({after / cfg.run.steps:.0%}) come after "
                f"the last mask update (prune.end_step={end}); runs that stop pruning near the end often lose "
                f"quality: keep at least 20% for recovery"]
    return []
