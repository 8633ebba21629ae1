"""Small tensor helpers shared by the algorithm scripts: batched ("ensemble") layers that run twin critics as one
matmul, float32 output layers for --bf16, Adam and the --bf16/--compile wrapper of an update step, Polyak averaging,
RNG state and atomic file writes. Data loading and evaluation are deliberately not here: each script shows
its whole data path (its shared block)."""

import io
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchedLinear(nn.Module):
    """`n` independent linear layers as one batched matmul: (n, B, in) -> (n, B, out); a 2-D input (B, in) is
    shared by all members. Twin critics built from these run both critics in one kernel per layer."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # the same default init as nn.Linear, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x.expand(len(self.weight), *x.shape) if x.dim() == 2 else x, self.weight)


class OutputLinear(nn.Linear):
    """A network's last layer, in float32 even under bf16 autocast (bf16's spacing at Q ~ 100 is 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # a plain layer (and a plain graph for torch.export)
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class BatchedOutputLinear(BatchedLinear):
    """BatchedLinear as the last layer of twin critics: float32 under bf16 autocast, like OutputLinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class BatchedLayerNorm(nn.Module):
    """LayerNorm over the last dim with separate affine parameters for each of the `n` members."""

    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


def orthogonal_init(*modules: nn.Module, gain: float = math.sqrt(2)) -> None:
    """Orthogonal weights (each ensemble member separately) and zero biases, as in the official IQL code."""
    for m in (m for module in modules for m in module.modules()):
        if isinstance(m, nn.Linear | BatchedLinear):
            for w in m.weight.data.view(-1, *m.weight.shape[-2:]):  # one matrix, or one per member
                nn.init.orthogonal_(w, gain)
            nn.init.zeros_(m.bias)


def adam(net: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel per step); the learning rate a tensor, so that --compile does not recompile when a
    schedule changes it."""
    return torch.optim.Adam(net.parameters(), lr=torch.tensor(lr), fused=True)


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimizer step on one loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def accelerate(step, device_type: str, bf16: bool, compile: bool):
    """An update step under bfloat16 autocast (--bf16: the hidden layers; output layers, losses, weights and optimizer
    stay float32) and torch.compile (--compile)."""
    if bf16:
        step = torch.autocast(device_type, torch.bfloat16)(step)
    return torch.compile(step) if compile else step


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
    _, np_state, np_pos, *_ = np.random.get_state()
    states = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state.astype(np.int64)),
        "numpy_pos": int(np_pos),
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


def serialize(state: dict) -> memoryview:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer()


def atomic_write(path: Path, data) -> None:
    """Bytes to a temporary file of this process, flushed and renamed: a crash or a full disk leaves the previous file
    whole. Raises OSError when the write fails."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, state: dict, step: int, keep: int) -> None:
    """checkpoints/step_<N>.pt and last.pt, each written atomically; keeps the last `keep` step files. Raises OSError
    when a write fails (the previous checkpoints stay whole)."""
    data = serialize(state)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for path in (run_dir / "checkpoints" / f"step_{step}.pt", run_dir / "checkpoints" / "last.pt"):
        atomic_write(path, data)
    for old in sorted((run_dir / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem[5:]))[:-keep]:
        old.unlink()
