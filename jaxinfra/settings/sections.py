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
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError

MESH_AXES = ("data", "stage", "fsdp", "tensor")  # the one list of mesh axis names (mesh.py takes it from here)
DTYPES = ("float32", "bfloat16", "float16")  # compute, master-weight and export dtypes
SHIPPED = Path(__file__).resolve().parents[1] / "configs"  # the configs installed with the package

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
    "layers": ["stage"],  # pipeline: stacked layers split into consecutive groups, one per stage
    "repeats": [],  # a circular schedule's layer groups: every stage holds one of each
}


def _at_least(values: dict[str, float], low: float, what: str) -> None:
    """Each key=value must be >= low; raises UserError naming the first that is not."""
    for key, value in values.items():
        if value < low:
            raise UserError(f"{key}={value} must {what}")


def _one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    """value must be one of options; the error names the closest one."""
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{key}={value!r} is not one of {', '.join(options)}{hint}")


@dataclass
class RunConfig:
    """What to run and where its outputs go."""

    name: str = "default"
    dir: str = ""  # run folder (a path, s3://bucket/prefix or gs://bucket/prefix); "" means runs/<name>
    local_dir: str = ""  # with a remote run.dir: where its logs are written before upload; "" = under the temp dir
    seed: int = 0
    steps: int = 600
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4  # held-out batches (of data.batch_size windows) per evaluation
    score_heldout: bool = True  # LM job, at the end: bits per byte over every held-out byte, each scored once
    sample_tokens: int = 160  # bytes sampled per prompt at the end of the run; 0 = none
    sample_prompts: list[str] = field(default_factory=lambda: ["def ", "import ", "class "])
    sample_temperature: float = 0.8
    progress: bool = True  # progress: a bar on a terminal, else one plain line every run.log_every steps
    plot: bool = True  # plots.png of the metrics in the run folder at the end
    stop_after: int = 0  # end this process after N steps of the run (checkpointed; a restart resumes)
    peak_flops: float = 0.0  # FLOP/s of the whole mesh, the denominator of MFU; 0 = measure a matmul
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: jax.profiler trace of steps a..b

    @property
    def path(self) -> str:
        """The run folder."""
        return self.dir or os.path.join("runs", self.name)

    @property
    def logs(self) -> str:
        """Where the run's logs and reports are written: the run folder, or a remote one's local mirror."""
        return self.local_dir or storage.local_mirror(self.path) if storage.is_remote(self.path) else self.path

    def check(self) -> None:
        """What the trainer reads of this section."""
        _at_least({"run.steps": self.steps, "run.log_every": self.log_every}, 1, "be at least 1")
        storage.check(self.path, "run.dir")
        _at_least({"run.eval_every": self.eval_every, "run.eval_batches": self.eval_batches,
                   "run.stop_after": self.stop_after}, 0, "not be negative")
        ps = self.profile_steps
        if ps and (len(ps) != 2 or not 1 <= ps[0] <= ps[1] <= self.steps):
            raise UserError(f"run.profile_steps={list(ps)} must be [first, last] with 1 <= first <= last <= "
                            f"run.steps={self.steps}")
        if self.peak_flops < 0:
            raise UserError(f"run.peak_flops={self.peak_flops} must not be negative")

    def check_sampling(self, vocab_size: int) -> None:
        """The LM job's end-of-run samples: prompts must be bytes of the model's vocabulary."""
        _at_least({"run.sample_tokens": self.sample_tokens}, 0, "not be negative")
        for prompt in self.sample_prompts:
            if not isinstance(prompt, str):  # OmegaConf lets a nested list through a list[str]
                raise UserError(f"run.sample_prompts: {prompt!r} is not a string (give prompts as "
                                f"run.sample_prompts=['def ', 'class '])")
            data = prompt.encode("utf-8")
            if not data or max(data) >= vocab_size:
                raise UserError(f"run.sample_prompts: {prompt!r} is empty or holds a byte outside "
                                f"model.vocab_size={vocab_size}")
        if self.sample_temperature < 0:
            raise UserError(f"run.sample_temperature={self.sample_temperature} must not be negative")


@dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: filled from the device count) and sharding rules."""

    data: int = 2
    stage: int = 1  # pipeline stages: the stacked layers split over them (pipeline.* says how)
    fsdp: int = 2
    tensor: int = 2
    cpu_devices: int = 8  # simulated CPU devices in all processes together; 0 = JAX's default
    dcn_data: int = 1  # hybrid mesh: how much of each axis spans nodes / slices (the slow network)
    dcn_stage: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def sizes(self) -> dict[str, int]:
        """Axis name -> configured size (maybe -1)."""
        return {a: getattr(self, a) for a in MESH_AXES}

    def dcn(self) -> tuple[int, ...]:
        """Across-node factor of each axis (all 1: a plain mesh)."""
        return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)

    @property
    def logical_rules(self) -> dict[str, tuple[str, ...]]:
        """The rules as sharding.py takes them: logical name -> tuple of mesh axes."""
        return {name: tuple(axes) for name, axes in self.rules.items()}

    def check(self) -> None:
        """Sizes and rules, before any device exists."""
        _at_least({"mesh.cpu_devices": self.cpu_devices}, 0, "not be negative")
        sizes = self.sizes()
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise UserError(f"mesh.{axis}={size} must be a positive size or -1 (fill from the device count)")
        _at_least({f"mesh.dcn_{a}": d for a, d in zip(MESH_AXES, self.dcn())}, 1, "be at least 1")
        if list(sizes.values()).count(-1) > 1:
            raise UserError(f"at most one mesh size may be -1, got {sizes}")
        for name, axes in self.rules.items():
            for axis in axes:
                if axis not in MESH_AXES:
                    close = difflib.get_close_matches(axis, MESH_AXES, n=1)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    raise UserError(f"mesh.rules.{name} names mesh axis {axis!r}, not one of "
                                    f"{', '.join(MESH_AXES)}{hint}")
            if len(set(axes)) != len(axes):
                raise UserError(f"mesh.rules.{name}={axes} repeats a mesh axis")


@dataclass
class DistributedConfig:
    """jax.distributed settings; empty values are taken from the environment (TPU, SLURM)."""

    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: from the environment, else 1
    process_id: int = -1  # -1: from the environment

    def check(self) -> None:
        """Counts that cannot be negative (the rest is checked when jax.distributed starts)."""
        _at_least({"distributed.num_processes": self.num_processes}, 0, "not be negative")


@dataclass
class ModelConfig:
    """Decoder-only transformer sizes and numerics (the LM job's model only)."""

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
    scan_layers: bool = False  # one compiled block looped over the layers (flat compile time at depth);
    # false unrolls the loop: faster steps for a few small layers (1.19x, the default model on CPU)

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

    def check(self) -> None:
        """Sizes and numerics of the default Transformer."""
        _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.param_dtype", self.param_dtype, DTYPES)
        _one_of("model.remat", self.remat, ("none", "full", "dots"))
        _one_of("model.attention", self.attention, ("xla", "cudnn"))
        _at_least({f"model.{k}": getattr(self, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len",
                                                             "vocab_size")}, 1, "be at least 1")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise UserError("model.attention=cudnn needs model.dtype=bfloat16 or float16 (cuDNN's fused attention)")
        if self.head_dim % 2:
            raise UserError(f"model.d_model / model.n_heads = {self.head_dim} must be even for rotary positions")


@dataclass
class DataConfig:
    """Corpus and batching."""

    path: str = ""  # "" = the running interpreter's standard-library sources; else file or folder
    glob: str = "*.py"  # files taken from a folder (recursively)
    batch_size: int = 32  # global batch, in windows of model.seq_len + 1 bytes
    eval_batch_size: int = 0  # examples per evaluation batch; 0 = data.batch_size
    heldout_percent: float = 1.0  # files held out for eval, chosen by a hash of their path

    @property
    def eval_batch(self) -> int:
        """Examples per evaluation batch."""
        return self.eval_batch_size or self.batch_size

    def check(self) -> None:
        """The batch, which every trainer reads."""
        _at_least({"data.batch_size": self.batch_size}, 1, "be at least 1")
        _at_least({"data.eval_batch_size": self.eval_batch_size}, 0, "not be negative")

    def check_corpus(self) -> None:
        """The LM job's corpus settings."""
        if not 0 <= self.heldout_percent < 100:
            raise UserError(f"data.heldout_percent={self.heldout_percent} must lie in [0, 100)")
        if self.path:
            storage.must_exist(self.path, "data.path", "file or folder")


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

    def check(self, batch_size: int) -> None:
        """The optimizer's settings and the micro-batch split of `batch_size`."""
        _one_of("optim.name", self.name, ("adamw", "sgd", "lion", "adafactor"))
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        _at_least({"optim.grad_accum": self.grad_accum}, 1, "be at least 1")
        _at_least({"optim.warmup_steps": self.warmup_steps, "optim.clip_norm": self.clip_norm,
                   "optim.weight_decay": self.weight_decay}, 0, "not be negative")
        if self.lr <= 0:
            raise UserError(f"optim.lr={self.lr} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if batch_size % self.grad_accum:
            raise UserError(f"data.batch_size={batch_size} is not divisible by optim.grad_accum={self.grad_accum}")


@dataclass
class PipelineConfig:
    """How the default Transformer's stacked layers run over mesh.stage > 1 (docs/strategies.md)."""

    microbatches: int = 0  # M: micro-batches per (grad_accum) batch; 0 = one per stage
    repeats: int = 1  # R: layer groups per stage, visited in a circle (1 = GPipe)

    def check(self) -> None:
        """Counts (what they must divide is checked against the mesh, see check_mesh)."""
        _at_least({"pipeline.microbatches": self.microbatches}, 0, "not be negative")
        _at_least({"pipeline.repeats": self.repeats}, 1, "be at least 1")

    def check_mesh(self, stages: int, n_layers: int, rows: int, batch_ways: int) -> None:
        """Layers split into stages x repeats groups; a step's `rows` (per grad_accum micro-batch) into
        micro-batches that the batch mesh axes (`batch_ways`) split evenly; circular needs M >= S."""
        M = self.microbatches or stages
        if n_layers % (stages * self.repeats):
            raise UserError(f"model.n_layers={n_layers} is not divisible by mesh.stage={stages} x "
                            f"pipeline.repeats={self.repeats} = {stages * self.repeats}")
        if stages > 1 and (rows % M or (rows // M) % batch_ways):
            raise UserError(f"data.batch_size / optim.grad_accum = {rows} rows do not split into pipeline.microbatches"
                            f"={M} micro-batches of a multiple of the batch mesh axes' {batch_ways} ways")
        if self.repeats > 1 and M < stages:
            raise UserError(f"pipeline.microbatches={M} is below mesh.stage={stages}: a circular schedule "
                            f"(pipeline.repeats={self.repeats}) needs at least one micro-batch per stage")


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
    # (mlp) of the tensors to prune (a 1-D tensor only by its full path); empty: every 2-D+ matmul or conv
    # weight but the output layer, read from the forward pass (never embeddings, biases, norm scales)
    exclude: list[str] = field(default_factory=list)  # path globs left dense (removed from the selection)

    @property
    def enabled(self) -> bool:
        """Whether the run prunes at all (a sparsity, or an N:M pattern)."""
        return bool(self.sparsity) or self.pattern != "unstructured"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured."""
        return nm_pattern(self.pattern)

    @property
    def last_update(self) -> int:
        """The step of the last mask update: start_step for one-shot and N:M masks, else end_step."""
        return self.start_step if self.schedule == "oneshot" or self.pattern != "unstructured" else self.end_step

    def check(self, steps: int) -> None:
        """Pruning settings that can be checked before any device work."""
        _one_of("prune.schedule", self.schedule, ("cubic", "oneshot"))
        _one_of("prune.scope", self.scope, ("layer", "global"))
        _one_of("prune.distribution", self.distribution, ("uniform", "erk"))
        _one_of("prune.criterion", self.criterion, ("magnitude", "random"))
        nm_pattern(self.pattern)
        if not 0 <= self.sparsity < 1:
            raise UserError(f"prune.sparsity={self.sparsity} must lie in [0, 1)")
        if not self.enabled:
            return
        end = self.last_update
        if self.every < 1:
            raise UserError(f"prune.every={self.every} must be at least 1")
        if self.start_step < 0 or end < self.start_step:
            raise UserError(f"prune.start_step={self.start_step} and prune.end_step={self.end_step}: no mask "
                            f"update falls inside [start_step, end_step]")
        if end >= steps:
            raise UserError(f"prune.end_step={end} must be below run.steps={steps} "
                            f"(steps after the last mask update let the model recover)")
        if self.distribution == "erk" and (self.scope != "layer" or self.pattern != "unstructured"):
            raise UserError(f"prune.distribution=erk sets one sparsity per tensor: it needs prune.scope=layer and "
                            f"prune.pattern=unstructured (got {self.scope}, {self.pattern})")

    def warnings(self, steps: int) -> list[str]:
        """Legal but risky settings: too few steps after the last mask update."""
        if not self.enabled:
            return []
        end = self.last_update
        after = steps - end
        if after < 0.2 * steps:
            return [f"warning: only {after} of run.steps={steps} steps ({after / steps:.0%}) come after "
                    f"the last mask update (prune.end_step={end}); runs that stop pruning near the end often lose "
                    f"quality: keep at least 20% for recovery"]
        return []


@dataclass
class QuantConfig:
    """Quantization-aware training through Qwix: the forward pass runs on int8-rounded weights (and
    activations), the backward pass is float (straight-through); the trained weights stay float."""

    weights: str = "none"  # none | int8: symmetric, one scale per output channel
    activations: str = "none"  # none | int8: symmetric, one scale per token, computed on the fly (W8A8)
    params: list[str] = field(default_factory=list)  # path globs or logical axis names, as prune.params; empty:
    # every 2-D+ matmul or conv weight, the output layer too, read from the forward pass
    exclude: list[str] = field(default_factory=list)  # path globs left in float

    @property
    def enabled(self) -> bool:
        """Whether the forward pass quantizes anything."""
        return self.weights != "none"

    def check(self) -> None:
        """The types, and activations only beside weights."""
        _one_of("quant.weights", self.weights, ("none", "int8"))
        _one_of("quant.activations", self.activations, ("none", "int8"))
        if self.activations != "none" and not self.enabled:
            raise UserError(f"quant.activations={self.activations} needs quant.weights=int8 (Qwix quantizes the "
                            f"inputs of the matmuls whose weights it quantizes)")
        if not self.enabled and (self.params or self.exclude):
            raise UserError("quant.params / quant.exclude are set but quant.weights=none: nothing is quantized")


@dataclass
class CheckpointConfig:
    """Orbax checkpoints in <run.dir>/checkpoints and merged exports in <run.dir>/exports."""

    every: int = 200  # save every N steps (0: only at the end); always at the end and on SIGTERM
    keep: int = 2  # newest steps kept
    keep_every: int = 0  # also keep every N-th step for good (0: none)
    resume: bool = True  # continue from the newest complete step in the run folder
    restore_step: int = -1  # resume from this step instead of the newest
    fallback: bool = False  # if the chosen step is unreadable, resume from the previous good one
    init_from: str = ""  # a fresh run starts from this model: a run folder (its newest step), a step folder
    # (runs/x/checkpoints/200) or a safetensors export; fresh optimizer, step 0
    export_every: int = 0  # also save and export exports/model-<step>.safetensors every N steps (0: never);
    # these saves count towards `keep`
    export_final: bool = True  # ... and at the end of the run
    export_dtype: str = "float32"
    export_format: str = "safetensors"  # safetensors (exports/model-<step>.safetensors) | hf (exports/hf-<step>/:
    # the Hugging Face Llama layout, for the default Transformer)
    export_errors: str = "fail"  # fail: a failed export fails the run (exit 1; checkpoints kept) | warn

    def check(self) -> None:
        """Frequencies, rotation and the export dtype."""
        _one_of("checkpoint.export_dtype", self.export_dtype, DTYPES)
        _one_of("checkpoint.export_format", self.export_format, ("safetensors", "hf"))
        _one_of("checkpoint.export_errors", self.export_errors, ("fail", "warn"))
        _at_least({"checkpoint.every": self.every, "checkpoint.keep_every": self.keep_every,
                   "checkpoint.export_every": self.export_every}, 0, "not be negative")
        _at_least({"checkpoint.keep": self.keep}, 1, "be at least 1")
        if self.init_from:
            storage.must_exist(self.init_from, "checkpoint.init_from", "run folder, step folder or export")


@dataclass
class Config:
    """The whole run: the sections every trainer reads, plus the LM job's (model, corpus, sampling)."""

    run: RunConfig = field(default_factory=RunConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def check_train(self) -> None:
        """What `train_model` reads, for any model: run, mesh, batch, optimizer, checkpoints, pruning."""
        self.run.check()
        self.mesh.check()
        self.distributed.check()
        self.data.check()
        self.optim.check(self.data.batch_size)
        self.checkpoint.check()
        self.prune.check(self.run.steps)
        self.quant.check()

    def check_lm(self) -> None:
        """What only the default LM job reads: the model, the corpus, the samples."""
        self.model.check()
        self.pipeline.check()
        self.data.check_corpus()
        self.run.check_sampling(self.model.vocab_size)


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


# A config is a few hundred values: more (YAML aliases expand without bound, a "billion laughs") or
# deeper nesting is refused before OmegaConf copies it, which would take minutes or recurse too deep.
MAX_VALUES, MAX_DEPTH = 100_000, 32


def _bounded(data: Any, where: str) -> Any:
    """`data` if it expands to at most MAX_VALUES values nested at most MAX_DEPTH deep; the walk stops
    at the first excess, so a hostile file costs no more than the limit."""
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise UserError(f"{where}: expands to more than {MAX_VALUES:,} values (YAML aliases?): not a config")
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep: not a config")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return data


def _safe_load(text: Any, where: str) -> Any:
    """yaml.safe_load, with nesting too deep for the parser reported as one line."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to parse: not a config") from None


def _parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if re.fullmatch(r"\d+:\d+", raw.strip()):  # N:M, which YAML 1.1 would read as a base-60 integer
        return key.strip(), raw.strip()
    try:
        value = _safe_load(raw, f"override {key.strip()}") if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), _bounded(value, f"override {key.strip()}")


def _nest(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def shipped_configs() -> list[str]:
    """Names of the configs that come with the package (default, accelerator, dp, ...)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def config_path(name: str) -> str:
    """A YAML file's path, or the name of a shipped config (`accelerator`), from any folder."""
    if os.path.isfile(name):
        return name
    shipped = SHIPPED / f"{name.removesuffix('.yaml')}.yaml"
    if os.sep not in name and shipped.is_file():
        return str(shipped)
    raise UserError(f"--config {name}: no such file (shipped configs: {', '.join(shipped_configs())})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (a path or a shipped config's name) <- dotted overrides, validated;
    raises UserError naming the key."""
    layers = []
    if path:
        path = config_path(path)
        with open(path) as f:
            try:
                data = _bounded(_safe_load(f, f"--config {path}") or {}, f"--config {path}")
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
    out.check_train()
    out.check_lm()  # a config file is the LM job's too: its sections must be valid even when unused
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


