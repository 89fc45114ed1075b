"""Optimiser, learning-rate schedule, weight EMA and BatchNorm re-estimation for the fit loop.

Each is an option of ``TeachConfig``; with the defaults (Adam, constant lr, no EMA, no
re-estimation) training is the method's.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from uts_cli.config import TeachConfig
from uts_cli.model.cam import batch_norm_layers


def make_optimizer(model: nn.Module, params: TeachConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Adam (coupled L2 decay, the method) or AdamW (decoupled decay) over all parameters.

    With AdamW, BatchNorm weights and biases are not decayed: shrinking them only rescales
    activations the next layer undoes, and it destabilises small-batch training. ``fused`` (CUDA
    only) runs the whole update as one kernel.
    """
    if params.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay,
                                fused=fused or None)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=params.lr, fused=fused or None)


def lr_factor(step: int, total_steps: int, params: TeachConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``params.lr`` for training step ``step`` (0-based) of ``total_steps``.

    ``warmup-cosine``: linear ramp from 1/warm-up to 1 over ``warmup_epochs``, then a cosine decay
    to 0 at the last step. A function of the step only, so a resumed run needs no scheduler state.
    """
    if params.lr_schedule == "constant":
        return 1.0
    warmup = int(round(params.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightEma:
    """Exponential moving average of a model's weights (``shadow = d * shadow + (1 - d) * w``).

    Floating-point parameters are averaged; buffers (BatchNorm running statistics, counters) are
    copied from the training model, so the averaged network normalises like the current one.
    Early on the decay is limited to ``(1 + n) / (10 + n)`` after ``n`` updates, so the average
    is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.module.parameters(), model.parameters()):
            shadow.lerp_(p.detach(), 1.0 - d)
        for shadow, b in zip(self.module.buffers(), model.buffers()):
            shadow.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state.get("updates", 0))


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm layer's running statistics from ``images`` (already prepared inputs).

    Training uses class-balanced batches; validation and inference see the natural class mix, so
    statistics collected during training may not fit it. The statistics become the plain average
    over the batches given (momentum ``None``). Weights are untouched.

    Returns:
        The number of batches used (0 leaves the statistics as they were).
    """
    bns = batch_norm_layers(model)
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    batches = iter(images)
    first = next(batches, None)
    if first is None:
        return 0
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        model(first)
        n = 1
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return n
