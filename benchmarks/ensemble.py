"""Steps/s of SAC-N's and EDAC's update with the N critics as one batched module against N separate critics called in
a Python loop, at N = 10, 50 and 500.

    python benchmarks/ensemble.py                                   # CPU, one thread, sac_n and edac, N = 10 50 500
    python benchmarks/ensemble.py --algos sac_n --sizes 10 50 --hidden-dim 64
    python benchmarks/ensemble.py --device cuda --seconds 10

Both variants run the script's own update step (make_networks, make_optimizers and make_update of sac_n.py or
edac.py, with its Args defaults: 3 hidden layers of 256, batch 256): "batched" with the script's EnsembleQ (every layer
one batched matmul over the N critics), "loop" with the same weights as N nn.Sequential critics of nn.Linear layers,
called one after another in a Python loop and their outputs stacked (what a straightforward implementation does). The
optimizer (one fused Adam over all critic parameters), the Polyak update, the losses and the order of the steps are
the script's in both, so the difference is the ensemble's forward and backward passes alone. Batches are random
transitions with Hopper's sizes (11-d observations, 3-d actions) drawn from an on-device table of 100,000 rows.
Each measurement: 2 warm-up steps, then steps until --seconds have passed (at least 3); the variants alternate
(batched, loop, batched, ...) over --repeats, and the median is reported. Host syncs: only at the end of a
measurement (the metrics stay on the device, as in the scripts).
"""

import importlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


@dataclass
class Args:
    algos: tuple[str, ...] = ("sac_n", "edac")
    """sac_n and/or edac"""
    sizes: tuple[int, ...] = (10, 50, 500)
    """ensemble sizes N"""
    hidden_dim: int = 256
    """width of the networks (the scripts' default: 256)"""
    batch_size: int = 256
    """transitions per step"""
    device: str = "cpu"
    """cpu or cuda"""
    threads: int = 1
    """torch threads"""
    seconds: float = 15.0
    """time per measurement, after the warm-up"""
    repeats: int = 2
    """measurements per variant, interleaved; the median is reported"""


class LoopEnsemble(nn.Module):
    """The members of a batched EnsembleQ as N separate MLPs, called in a Python loop: the same interface (obs with
    actions (B, A) or one action batch per member (N, B, A) -> (N, B)) and the same weights."""

    def __init__(self, batched: nn.Module):
        super().__init__()
        members = []
        for i in range(len(batched.net[0].weight)):
            layers = []
            for layer in batched.net:
                if isinstance(layer, common.BatchedLinear):
                    linear = nn.Linear(*layer.weight.shape[1:], device=layer.weight.device)
                    linear.load_state_dict({"weight": layer.weight[i].T, "bias": layer.bias[i, 0]})
                    layers.append(linear)
                else:
                    layers.append(nn.ReLU())
            members.append(nn.Sequential(*layers))
        self.members = nn.ModuleList(members)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if actions.dim() == 2:
            x = torch.cat([obs, actions], dim=-1)
            return torch.stack([member(x).squeeze(-1) for member in self.members])
        return torch.stack(
            [member(torch.cat([obs, a], dim=-1)).squeeze(-1) for member, a in zip(self.members, actions, strict=True)]
        )


def learner(module, args: Args, n: int, loop: bool, device: torch.device, obs_dim: int, act_dim: int):
    """The script's update, with its EnsembleQ or with the same critics as a LoopEnsemble."""
    margs = module.Args(num_critics=n, hidden_dim=args.hidden_dim, batch_size=args.batch_size)
    torch.manual_seed(0)
    nets = {name: net.to(device) for name, net in module.make_networks(margs, obs_dim, act_dim).items()}
    if loop:
        nets["critic"] = LoopEnsemble(nets["critic"])
        nets["target_critic"] = LoopEnsemble(nets["target_critic"]).requires_grad_(False)
    return module.make_update(nets, module.make_optimizers(nets, margs), margs)


def steps_per_second(update, data: dict, args: Args, device: torch.device) -> float:
    def step(i):
        idx = torch.randint(len(data["obs"]), (args.batch_size,), device=device)
        return update({k: v[idx] for k, v in data.items()}, i)

    for i in range(2):
        metrics = step(i + 1)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    sync()
    start, steps = time.perf_counter(), 0
    while steps < 3 or time.perf_counter() - start < args.seconds:
        metrics = step(steps + 3)
        steps += 1
    float(metrics["losses/critic_loss"])  # the one host sync, after the last step
    sync()
    return steps / (time.perf_counter() - start)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    obs_dim, act_dim, rows = 11, 3, 100_000  # Hopper's sizes
    g = torch.Generator().manual_seed(0)
    data = {
        "obs": torch.randn(rows, obs_dim, generator=g),
        "actions": torch.rand(rows, act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(rows, generator=g),
        "next_obs": torch.randn(rows, obs_dim, generator=g),
        "dones": (torch.rand(rows, generator=g) < 0.01).float(),
    }
    data = {k: v.to(device) for k, v in data.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {args.threads} thread(s); hidden {args.hidden_dim}, batch {args.batch_size}, Hopper's sizes")
    rows_out = []
    for algo in args.algos:
        module = importlib.import_module(algo)
        for n in args.sizes:
            speeds = {False: [], True: []}
            for _ in range(args.repeats):
                for loop in (False, True):  # interleaved: a slow spell of a shared machine hits both
                    update = learner(module, args, n, loop, device, obs_dim, act_dim)
                    speeds[loop].append(steps_per_second(update, data, args, device))
            batched, looped = statistics.median(speeds[False]), statistics.median(speeds[True])
            rows_out.append((algo, n, batched, looped))
            print(f"{algo} N={n}: batched {batched:.2f} steps/s, loop {looped:.2f} steps/s ({batched / looped:.2f}x)")
    print("\n| algo | N | batched (steps/s) | loop over critics (steps/s) | batched / loop |")
    print("|---|---|---|---|---|")
    for algo, n, batched, looped in rows_out:
        print(f"| {algo} | {n} | {batched:.2f} | {looped:.2f} | {batched / looped:.2f}x |")


if __name__ == "__main__":
    main(tyro.cli(Args))
