"""The Optax transformation and learning-rate schedule described by the config."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from jaxinfra.config import OptimConfig, PruneConfig


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


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norms' scales or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


OPTIMIZERS: dict[str, Callable[[OptimConfig, optax.Schedule], optax.GradientTransformation]] = {
    "adamw": lambda c, lr: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                                       mask=_decay_mask),
    "sgd": lambda c, lr: optax.chain(optax.add_decayed_weights(c.weight_decay, _decay_mask),
                                     optax.sgd(lr, momentum=c.momentum or None)),
    "lion": lambda c, lr: optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=_decay_mask),
    # adafactor adds its decay after the learning-rate scaling: scale it by the peak lr here
    "adafactor": lambda c, lr: optax.adafactor(lr, weight_decay_rate=(c.weight_decay * c.lr) or None,
                                               weight_decay_mask=_decay_mask),
}


def make_optimizer(cfg: OptimConfig, steps: int, prune_cfg: PruneConfig | None = None, logical: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip -> optimizer), wrapped in magnitude pruning when prune_cfg asks, and its lr schedule.

    `logical` (the logical PartitionSpec tree of the parameters) lets prune.params name logical axes
    and is checked: a pattern that selects no parameter raises UserError.
    """
    schedule = make_schedule(cfg, steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    tx = optax.chain(*parts, OPTIMIZERS[cfg.name](cfg, schedule))
    p = prune_cfg
    if p is None or not p.enabled:
        return tx, schedule
    from jaxinfra.errors import UserError
    from jaxinfra.pruning import cubic_sparsity, make_include, prune, unmatched
    if logical is not None and p.params:
        missing = unmatched(list(p.params), logical, logical)
        if missing:
            raise UserError(f"prune.params: {', '.join(map(repr, missing))} matches no parameter (give path globs "
                            f"such as 'blocks/*/mlp/*' or logical axis names)")
    end = p.last_update  # N:M masks are set once, at start_step, whatever the schedule
    sparsity = lambda t: cubic_sparsity(t, p.sparsity, p.start_step, end) if p.schedule == "cubic" \
        else jnp.where(t >= p.start_step, p.sparsity, 0.0)
    return prune(tx, sparsity, update_every=p.every, start=p.start_step, end=end, nm=p.nm,
                 scope=p.scope, include=make_include(list(p.params), logical),
                 erk=p.sparsity if p.distribution == "erk" else None, criterion=p.criterion), schedule
