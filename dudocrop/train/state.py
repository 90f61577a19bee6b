"""Training state that resumes exactly: EMA weights, schedules, per-step random streams, atomic state files.

Exact resume rests on one rule: nothing random is carried between steps. The data order
(:func:`dudocrop.train.rows.batch_indices`), the augmentations and the diffusion noise of step ``s`` on rank ``r``
are drawn from generators seeded by ``(seed, s, r)`` (:func:`step_generator`), so a run restarted from the state
saved after step ``s`` replays steps ``s+1...`` bit for bit, whatever happened to the process before.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from dudocrop.atomic import torch_save
from dudocrop.serialization import load_torch

STATE_FILE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers (REFERENCE §1: β ≈ 0.995)."""

    def __init__(self, model: nn.Module, decay: float = 0.995):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in unwrap(model).state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (unwrapped) holding the EMA weights."""
        m = copy.deepcopy(unwrap(model))
        m.load_state_dict(self.shadow)
        return m


def cosine_lr(step: int, total: int, base: float, *, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine annealing from ``base`` to ``final`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * p))


def step_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu",
                   stream: int = 0) -> torch.Generator:
    """The torch generator of (seed, step, rank, stream): independent of everything that happened before."""
    ss = np.random.SeedSequence([int(seed), int(step), int(rank), int(stream)])
    g = torch.Generator(device=device)
    g.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return g


def step_rng(seed: int, step: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    """The numpy counterpart of :func:`step_generator` (data augmentation)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(rank), int(stream)]))


def save_state(directory: str, state: Mapping) -> str:
    """``torch.save`` the state into ``directory/state.pt`` atomically (temp file + os.replace)."""
    path = os.path.join(directory, STATE_FILE)
    torch_save(path, dict(state))
    return path


def load_state(directory: str, map_location: str | torch.device = "cpu") -> dict:
    """The state saved by :func:`save_state` (raises FileNotFoundError naming the file). Tensors and plain data
    only: a ``checkpoint_*`` folder under a shared storage path is not trusted to run code
    (:class:`~dudocrop.serialization.UnsafeFileError`)."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training state at {path}")
    return load_torch(path, "training state", map_location=map_location)
