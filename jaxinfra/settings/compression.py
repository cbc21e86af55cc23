"""The compression sections of the config: prune.* (magnitude pruning in the step) and quant.* (int8 QAT)."""
from __future__ import annotations

from dataclasses import dataclass

from jaxinfra.core.errors import UserError
from jaxinfra.settings.checks import knob, one_of


@dataclass
class PruneConfig:
    """Magnitude pruning inside the train step (sparsity 0 = off)."""

    sparsity: float = knob(0.0, "final fraction of zeros in each pruned tensor (or in all, scope=global)")
    schedule: str = knob("cubic", "cubic (Zhu & Gupta 2017) between start_step and end_step | oneshot at start_step")
    start_step: int = knob(0, "the step pruning begins (oneshot and N:M masks: the only mask update)")
    end_step: int = knob(0, "cubic: the last mask update, where the sparsity reaches prune.sparsity")
    every: int = knob(10, "steps between mask updates (cubic)")
    scope: str = knob("layer", "layer | global (one threshold over all pruned tensors)")
    pattern: str = knob("unstructured", "unstructured | N:M such as 2:4 (groups along a kernel's input dim)")
    criterion: str = knob("magnitude", "magnitude | random (a baseline for benchmarks)")
    distribution: str = knob("uniform", "uniform (every tensor at `sparsity`) | erk (Erdos-Renyi-Kernel, scope layer)")
    params: list[str] = knob([], "path globs (blocks/*/mlp/*) or logical axis names (mlp) of the tensors to prune "
                             "(a 1-D tensor only by its full path); empty: every 2-D+ matmul or conv weight but the "
                             "output layer, read from the forward pass (never embeddings, biases, norm scales)")
    exclude: list[str] = knob([], "path globs left dense (removed from the selection)")

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
        one_of("prune.schedule", self.schedule, ("cubic", "oneshot"))
        one_of("prune.scope", self.scope, ("layer", "global"))
        one_of("prune.distribution", self.distribution, ("uniform", "erk"))
        one_of("prune.criterion", self.criterion, ("magnitude", "random"))
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

    weights: str = knob("none", "none | int8: symmetric, one scale per output channel")
    activations: str = knob("none", "none | int8: symmetric, one scale per token, computed on the fly (W8A8)")
    params: list[str] = knob([], "path globs or logical axis names, as prune.params; empty: every 2-D+ matmul or "
                             "conv weight, the output layer too, read from the forward pass")
    exclude: list[str] = knob([], "path globs left in float")

    @property
    def enabled(self) -> bool:
        """Whether the forward pass quantizes anything."""
        return self.weights != "none"

    def check(self) -> None:
        """The types, and activations only beside weights."""
        one_of("quant.weights", self.weights, ("none", "int8"))
        one_of("quant.activations", self.activations, ("none", "int8"))
        if self.activations != "none" and not self.enabled:
            raise UserError(f"quant.activations={self.activations} needs quant.weights=int8 (Qwix quantizes the "
                            f"inputs of the matmuls whose weights it quantizes)")
        if not self.enabled and (self.params or self.exclude):
            raise UserError("quant.params / quant.exclude are set but quant.weights=none: nothing is quantized")


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
