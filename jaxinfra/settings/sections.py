"""The typed config's sections (dataclasses with their checks): run, mesh, distributed, model, data, optim,
pipeline, checkpoint, and the whole `Config`; loading.py fills them from YAML and overrides.

No JAX import here: the config is loaded and validated before JAX's backend starts, so that
simulated CPU devices and jax.distributed can still be set up from it.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.settings.checks import DTYPES, at_least, knob, one_of
from jaxinfra.settings.compression import PruneConfig, QuantConfig
from jaxinfra.settings.model import ModelConfig

MESH_AXES = ("data", "stage", "fsdp", "tensor")  # the one list of mesh axis names (mesh.py takes it from here)
EXPORT_FORMATS = ("safetensors", "hf")  # checkpoint.export_format and export.py --format (train/exporter.py writes each)

# Logical axis -> mesh axes. Models name logical axes only; this table is the one place that
# decides what is split across devices. A mesh axis is used at most once per array: when two
# dimensions of one array ask for the same mesh axis, the earlier dimension keeps it.
DEFAULT_RULES: dict[str, list[str]] = {
    "batch": ["data", "fsdp"],  # activations and data: batch split over data x fsdp
    "seq": [],
    "embed": ["fsdp"],  # FSDP / ZeRO-3: every weight split over fsdp along d_model
    "vocab": ["tensor"],  # Megatron: vocab, heads and the MLP hidden dim over tensor
    "heads": ["tensor"],
    "kv_heads": ["tensor"],  # grouped KV heads; replicated when fewer than the tensor axis (models/factory.py)
    "kv": [],
    "mlp": ["tensor"],
    "norm": [],
    "layers": ["stage"],  # pipeline: stacked layers split into consecutive groups, one per stage
    "repeats": [],  # a circular schedule's layer groups: every stage holds one of each
}


@dataclass
class RunConfig:
    """What to run and where its outputs go."""

    name: str = knob("default", "the run's name: its folder is runs/<name> when run.dir is empty")
    dir: str = knob("", "run folder (a path, s3://bucket/prefix or gs://bucket/prefix); \"\" means runs/<name>")
    local_dir: str = knob("", "with a remote run.dir: where its logs are written before upload; "
                          "\"\" = under the temp dir")
    seed: int = knob(0, "seeds the initial weights, the data order, the per-step random streams and the samples")
    steps: int = knob(600, "optimizer steps of the whole run (the learning-rate schedule spans them)")
    log_every: int = knob(10, "write metrics (metrics.jsonl, TensorBoard) every N steps and at the last one")
    eval_every: int = knob(100, "evaluate on held-out batches every N steps and after the last one (0: only then)")
    eval_batches: int = knob(4, "held-out batches (of data.batch_size windows) per evaluation")
    score_heldout: bool = knob(True, "LM job, at the end: bits per byte over every held-out byte, each scored once")
    sample_tokens: int = knob(160, "tokens sampled per prompt at the end of the run; 0 = none")
    sample_prompts: list[str] = knob(["def ", "import ", "class "], "prompts of the end-of-run samples")
    sample_temperature: float = knob(0.8, "temperature of the end-of-run samples; 0 = greedy")
    progress: bool = knob(True, "progress: a bar on a terminal, else one plain line every run.log_every steps")
    plot: bool = knob(True, "plots.png of the metrics in the run folder at the end")
    stop_after: int = knob(0, "end this process after N steps of the run (checkpointed; a restart resumes)")
    peak_flops: float = knob(0.0, "FLOP/s of the whole mesh, the denominator of MFU; 0 = measure a matmul")
    profile_steps: list[int] = knob([], "[a, b]: jax.profiler trace of steps a..b")

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
        at_least({"run.steps": self.steps, "run.log_every": self.log_every}, 1, "be at least 1")
        storage.check(self.path, "run.dir")
        at_least({"run.eval_every": self.eval_every, "run.eval_batches": self.eval_batches,
                   "run.stop_after": self.stop_after}, 0, "not be negative")
        ps = self.profile_steps
        if ps and (len(ps) != 2 or not 1 <= ps[0] <= ps[1] <= self.steps):
            raise UserError(f"run.profile_steps={list(ps)} must be [first, last] with 1 <= first <= last <= "
                            f"run.steps={self.steps}")
        if self.peak_flops < 0:
            raise UserError(f"run.peak_flops={self.peak_flops} must not be negative")

    def check_sampling(self, vocab_size: int) -> None:
        """The LM job's end-of-run samples: prompts must be non-empty (and, for bytes, of the vocabulary)."""
        at_least({"run.sample_tokens": self.sample_tokens}, 0, "not be negative")
        for prompt in self.sample_prompts:
            if not isinstance(prompt, str):  # OmegaConf lets a nested list through a list[str]
                raise UserError(f"run.sample_prompts: {prompt!r} is not a string (give prompts as "
                                f"run.sample_prompts=['def ', 'class '])")
            data = prompt.encode("utf-8")
            if not data or max(data) >= (vocab_size or 256):
                raise UserError(f"run.sample_prompts: {prompt!r} is empty or holds a byte outside "
                                f"model.vocab_size={vocab_size}")
        if self.sample_temperature < 0:
            raise UserError(f"run.sample_temperature={self.sample_temperature} must not be negative")


@dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: filled from the device count) and sharding rules."""

    data: int = knob(2, "data-parallel ways: replicas of the weights, each fed its share of the batch")
    stage: int = knob(1, "pipeline stages: the stacked layers split over them (pipeline.* says how)")
    fsdp: int = knob(2, "FSDP (ZeRO-3) ways: weights and optimizer state split over them, and the batch too")
    tensor: int = knob(2, "tensor-parallel (Megatron) ways: heads, the MLP hidden dim and the vocab split over them")
    cpu_devices: int = knob(8, "simulated CPU devices in all processes together; 0 = JAX's default")
    dcn_data: int = knob(1, "hybrid mesh: how much of each axis spans nodes / slices (the slow network)")
    dcn_stage: int = knob(1, "as mesh.dcn_data, for the stage axis")
    dcn_fsdp: int = knob(1, "as mesh.dcn_data, for the fsdp axis")
    dcn_tensor: int = knob(1, "as mesh.dcn_data, for the tensor axis")
    rules: dict[str, list[str]] = knob(DEFAULT_RULES, "logical axis -> the mesh axes that split it (docs/mesh.md)")

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
        at_least({"mesh.cpu_devices": self.cpu_devices}, 0, "not be negative")
        sizes = self.sizes()
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise UserError(f"mesh.{axis}={size} must be a positive size or -1 (fill from the device count)")
        at_least({f"mesh.dcn_{a}": d for a, d in zip(MESH_AXES, self.dcn())}, 1, "be at least 1")
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

    coordinator: str = knob("", "host:port of process 0")
    num_processes: int = knob(0, "processes of the job; 0: from the environment, else 1")
    process_id: int = knob(-1, "this process's index; -1: from the environment")

    def check(self) -> None:
        """Counts that cannot be negative (the rest is checked when jax.distributed starts)."""
        at_least({"distributed.num_processes": self.num_processes}, 0, "not be negative")


@dataclass
class DataConfig:
    """Corpus and batching."""

    path: str = knob("", "\"\" = the running interpreter's standard-library sources; else file or folder: "
                     ".jsonl(.gz/.zst) and .parquet hold a document per row, any other file is one")
    glob: str = knob("*.py", "files taken from a folder (recursively)")
    text_key: str = knob("text", "the field of each JSONL or Parquet row that holds its document")
    tokenizer: str = knob("bytes", "bytes | bpe:N (a byte-level BPE of N ids trained on the training split) | a "
                          "tokenizer.json or a folder holding one")
    tokenizer_sample: int = knob(100_000_000, "bpe:N trains on at most this many bytes of training documents "
                                 "(a fixed, hash-chosen sample); 0 = all")
    packing: str = knob("concat", "concat (documents back to back, attention across them) | documents (attention "
                        "masked to each document, positions restarting)")
    cache: str = knob("", "folder of token caches (shareable between runs); \"\" = <run folder>/cache")
    heldout_path: str = knob("", "held-out documents of your own (file or folder, data.glob applies); \"\" = "
                             "data.heldout_percent of the corpus")
    batch_size: int = knob(32, "global batch, in windows of model.seq_len + 1 tokens")
    eval_batch_size: int = knob(0, "examples per evaluation batch; 0 = data.batch_size")
    heldout_percent: float = knob(1.0, "documents held out for eval, chosen by a hash of their path (and row)")

    @property
    def eval_batch(self) -> int:
        """Examples per evaluation batch."""
        return self.eval_batch_size or self.batch_size

    @property
    def tokenizer_vocab(self) -> int:
        """Ids of data.tokenizer when its name says (bytes: 256, bpe:N: N); 0 for a file, known once it is read."""
        if self.tokenizer == "bytes":
            return 256
        return int(self.tokenizer[4:]) if self.tokenizer.startswith("bpe:") and self.tokenizer[4:].isdigit() else 0

    def check(self) -> None:
        """The batch, which every trainer reads."""
        at_least({"data.batch_size": self.batch_size}, 1, "be at least 1")
        at_least({"data.eval_batch_size": self.eval_batch_size}, 0, "not be negative")

    def check_corpus(self) -> None:
        """The LM job's corpus settings."""
        if not 0 <= self.heldout_percent < 100:
            raise UserError(f"data.heldout_percent={self.heldout_percent} must lie in [0, 100)")
        one_of("data.packing", self.packing, ("concat", "documents"))
        at_least({"data.tokenizer_sample": self.tokenizer_sample}, 0, "not be negative (0: all)")
        if self.tokenizer.startswith("bpe:") and not (self.tokenizer[4:].isdigit() and int(self.tokenizer[4:]) >= 258):
            raise UserError(f"data.tokenizer={self.tokenizer}: bpe:N needs N >= 258 (256 bytes, end-of-text and a merge)")
        if not self.text_key:
            raise UserError("data.text_key is empty: name the field that holds each row's text")
        for key, value in (("data.path", self.path), ("data.heldout_path", self.heldout_path)):
            if value:
                storage.must_exist(value, key, "file or folder")


@dataclass
class OptimConfig:
    """Optax optimizer, schedule, clipping and gradient accumulation."""

    name: str = knob("adamw", "adamw | sgd | lion | adafactor")
    lr: float = knob(3e-3, "peak learning rate, reached at the end of the warmup")
    schedule: str = knob("cosine", "cosine | linear | constant (after warmup)")
    warmup_steps: int = knob(50, "steps of linear warmup from 0 to optim.lr (at most run.steps - 1)")
    min_lr_ratio: float = knob(0.1, "final lr / peak lr for cosine and linear")
    weight_decay: float = knob(0.1, "2-D+ weights only; decoupled (adamw, lion, adafactor), L2 for sgd")
    b1: float = knob(0.9, "decay of the gradient's moving average (adamw, lion)")
    b2: float = knob(0.95, "decay of the squared gradient's moving average (adamw; lion: of its momentum)")
    eps: float = knob(1e-8, "added to adamw's denominator, for numerical stability")
    momentum: float = knob(0.9, "sgd's momentum (0: none)")
    clip_norm: float = knob(1.0, "global-norm clipping; 0 = off")
    grad_accum: int = knob(1, "micro-batches per step (data.batch_size must divide)")

    def check(self, batch_size: int) -> None:
        """The optimizer's settings and the micro-batch split of `batch_size`."""
        one_of("optim.name", self.name, ("adamw", "sgd", "lion", "adafactor"))
        one_of("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        at_least({"optim.grad_accum": self.grad_accum}, 1, "be at least 1")
        at_least({"optim.warmup_steps": self.warmup_steps, "optim.clip_norm": self.clip_norm,
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

    microbatches: int = knob(0, "M: micro-batches per (grad_accum) batch; 0 = one per stage")
    repeats: int = knob(1, "R: layer groups per stage, visited in a circle (1 = GPipe)")

    def check(self) -> None:
        """Counts (what they must divide is checked against the mesh, see check_mesh)."""
        at_least({"pipeline.microbatches": self.microbatches}, 0, "not be negative")
        at_least({"pipeline.repeats": self.repeats}, 1, "be at least 1")

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
class CheckpointConfig:
    """Orbax checkpoints in <run.dir>/checkpoints and merged exports in <run.dir>/exports."""

    every: int = knob(200, "save every N steps (0: only at the end); always at the end and on SIGTERM")
    keep: int = knob(2, "newest steps kept")
    keep_every: int = knob(0, "also keep every N-th step for good (0: none)")
    resume: bool = knob(True, "continue from the newest complete step in the run folder")
    restore_step: int = knob(-1, "resume from this step instead of the newest")
    fallback: bool = knob(False, "if the chosen step is unreadable, resume from the previous good one")
    init_from: str = knob("", "a fresh run starts from this model: a run folder (its newest step), a step folder "
                          "(runs/x/checkpoints/200) or a safetensors export; fresh optimizer, step 0")
    export_every: int = knob(0, "also save and export exports/model-<step>.safetensors every N steps (0: never); "
                             "these saves count towards checkpoint.keep")
    export_final: bool = knob(True, "save and export at the end of the run too")
    export_dtype: str = knob("float32", "dtype of the exported tensors: float32 | bfloat16 | float16")
    export_format: str = knob("safetensors", "safetensors (exports/model-<step>.safetensors) | hf (exports/hf-<step>/: "
                              "the Hugging Face Llama layout, for the default Transformer)")
    export_errors: str = knob("fail", "fail: a failed export fails the run (exit 1; checkpoints kept) | warn")

    def check(self) -> None:
        """Frequencies, rotation and the export dtype."""
        one_of("checkpoint.export_dtype", self.export_dtype, DTYPES)
        one_of("checkpoint.export_format", self.export_format, EXPORT_FORMATS)
        one_of("checkpoint.export_errors", self.export_errors, ("fail", "warn"))
        at_least({"checkpoint.every": self.every, "checkpoint.keep_every": self.keep_every,
                   "checkpoint.export_every": self.export_every}, 0, "not be negative")
        at_least({"checkpoint.keep": self.keep}, 1, "be at least 1")
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
        if self.model.attention == "cudnn" and self.data.packing == "documents" and self.model.seq_len % 2:
            raise UserError(f"model.attention=cudnn with data.packing=documents needs an even model.seq_len (cuDNN's "
                            f"masked attention differentiates only even lengths), got {self.model.seq_len}")
        need = self.data.tokenizer_vocab
        if self.model.vocab_size and need and self.model.vocab_size < need:
            raise UserError(f"model.vocab_size={self.model.vocab_size} is smaller than data.tokenizer={self.data.tokenizer}'s "
                            f"{need} ids: set model.vocab_size=0 (the tokenizer's) or at least {need}")


