"""The Optax transformation and learning-rate schedule described by the config."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxinfra.compress.pruning import cubic_sparsity, default_include, prune
from jaxinfra.core.names import lead_of, path_str

if TYPE_CHECKING:
    from jaxinfra.compress.roles import Selection
    from jaxinfra.settings.compression import PruneConfig
    from jaxinfra.settings.sections import OptimConfig


def make_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine, linear or constant until `steps` (warmup capped at steps - 1)."""
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))
    rest = max(steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, rest)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def schedule_change(cfg: OptimConfig, old_steps: int | None, steps: int, step: int, known: bool = True) -> str:
    """The line a resume prints when run.steps changed: what the schedule does at the resume step."""
    if old_steps is None or old_steps == steps:
        return ""
    line = f"run.steps is {steps}, but step {step} was saved by a run of {old_steps} steps"
    if known:
        before, after = float(make_schedule(cfg, old_steps)(step)), float(make_schedule(cfg, steps)(step))
        line += (f": the learning rate jumps from {before:.6g} to {after:.6g} at step {step}" if before != after
                 else f": the learning rate at step {step} stays {after:.6g}, the rest of the schedule is stretched")
    return line + "; for a bit-exact continuation keep run.steps and stop early with run.stop_after"


def decay_mask(stacked: Mapping[str, Any] | None = None) -> Callable[[Any], Any]:
    """Weight decay on matrices only (not norms' scales or biases), counting a stacked tensor's dims
    per layer (`stacked`: ModelDef.stacked), so stacked norm scales (layers, d_model) stay undecayed."""
    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, p: p.ndim - lead_of(path_str(path), p.shape, stacked or {}) >= 2, params)
    return mask


Mask = Callable[[Any], Any]
OPTIMIZERS: dict[str, Callable[[OptimConfig, optax.Schedule, Mask], optax.GradientTransformation]] = {
    "adamw": lambda c, lr, m: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=m),
    "sgd": lambda c, lr, m: optax.chain(optax.add_decayed_weights(c.weight_decay, m),
                                        optax.sgd(lr, momentum=c.momentum or None)),
    "lion": lambda c, lr, m: optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=m),
    # adafactor adds its decay after the learning-rate scaling: scale it by the peak lr here
    "adafactor": lambda c, lr, m: optax.adafactor(lr, weight_decay_rate=(c.weight_decay * c.lr) or None,
                                                  weight_decay_mask=m),
}


def make_optimizer(cfg: OptimConfig, steps: int, prune_cfg: PruneConfig | None = None,
                   selection: Selection | None = None, stacked: Mapping[str, Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> optimizer), wrapped in magnitude pruning when prune_cfg asks, and its lr schedule;
    `stacked` (ModelDef.stacked) keeps weight decay off stacked norm scales."""
    schedule = make_schedule(cfg, steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    tx = optax.chain(*parts, OPTIMIZERS[cfg.name](cfg, schedule, decay_mask(stacked)))
    if prune_cfg is None or not prune_cfg.enabled:
        return tx, schedule
    return with_pruning(tx, prune_cfg, selection), schedule


def with_pruning(tx: optax.GradientTransformation, p: PruneConfig, selection: Selection | None = None
                 ) -> optax.GradientTransformation:
    """`tx` wrapped in the magnitude pruning prune config `p` describes, of the tensors `selection`
    takes (roles.select: every 2-D+ kernel but the output layer by default) along their input features."""
    end = p.last_update  # N:M masks are set once, at start_step, whatever the schedule
    sparsity = lambda t: cubic_sparsity(t, p.sparsity, p.start_step, end) if p.schedule == "cubic" \
        else jnp.where(t >= p.start_step, p.sparsity, 0.0)
    where = {"include": selection.include, "nm_axis": selection.axis, "layers": selection.layers} \
        if selection is not None \
        else {"include": default_include}
    return prune(tx, sparsity, update_every=p.every, start=p.start_step, end=end, nm=p.nm, scope=p.scope,
                 erk=p.sparsity if p.distribution == "erk" else None, criterion=p.criterion, **where)
