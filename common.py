"""Small tensor helpers shared by iql.py and cql.py.

Only code that is the same in both algorithms and carries no algorithm logic lives here: the batched
("ensemble") layers that let twin critics run as one matmul, Polyak averaging, and RNG seeding/state.
Data loading and evaluation are deliberately *not* here: each script stands alone (see README).
"""

import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchedLinear(nn.Module):
    """`n` independent linear layers evaluated as one batched matmul.

    Input (n, B, in) -> output (n, B, out); a 2-D input (B, in) is shared by all n members.
    Twin critics built from these run both critics in a single kernel instead of two.
    """

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # the same default init as nn.Linear, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.weight.shape[0], *x.shape)
        return torch.baddbmm(self.bias, x, self.weight)


class BatchedLayerNorm(nn.Module):
    """LayerNorm over the last dim with separate affine parameters for each of the `n` members."""

    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


def orthogonal_init(module: nn.Module, gain: float = math.sqrt(2)) -> None:
    """Orthogonal weights (each ensemble member separately) and zero biases, as in the official IQL code."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain)
            nn.init.zeros_(m.bias)
        elif isinstance(m, BatchedLinear):
            for w in m.weight.data:  # (in, out) per member
                nn.init.orthogonal_(w, gain)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging: target <- (1 - tau) * target + tau * source, in one fused foreach kernel."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_states(generator: torch.Generator) -> dict:
    """Every random stream a run uses, as plain tensors/lists so `torch.load(weights_only=True)` reads it."""
    np_state = np.random.get_state()
    states = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "sampler": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    random.setstate((3, tuple(states["python"]), None))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["sampler"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
