"""Training throughput of iql.py and cql.py against a straightforward PyTorch implementation, in one run.

    python benchmarks/throughput.py   # CPU; a locally built Adroit-door dataset (39-d obs, 28-d actions)
    python benchmarks/throughput.py --device cuda --steps 5000 --env D4RL/door/human-v2

"Ours" is the real script run as a user runs it (a subprocess, default network sizes, batch 256); its steps/s
are read from the script's own `charts/SPS` TensorBoard windows (evaluation and checkpoints excluded), the
first window (start-up, warm-up, compilation) dropped, median over windows and repeats. The baseline is the
textbook PyTorch version of the same networks and losses (CORL-style): separate critic modules, six critic
calls per CQL step (OOD actions through the autograd graph), per-field batch gathers, `.item()` logging
on every step. Also reported: evaluation seconds per episode (vectorized envs) from the script's summary.
"""

import copy
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    env: str = ""
    """dataset; empty: build a random-action Adroit-door dataset (bench/door/random-v0) in a temporary store"""
    algos: tuple[str, ...] = ("iql", "cql")
    """which algorithms to benchmark"""
    device: str = "cpu"
    """cpu or cuda"""
    steps: int = 2000
    """gradient steps per repeat (the first of 5 logging windows is dropped as warm-up)"""
    repeats: int = 3
    """repeats; the median is reported"""
    threads: int = 2
    """torch/OpenMP threads for both implementations"""
    eval_episodes: int = 10
    """episodes of the final evaluation (reported as seconds per episode)"""
    ours_flags: str = ""
    """extra flags for the scripts, e.g. "--bf16" or "--compile" """
    baseline: bool = True
    """also run the straightforward baseline"""


# ---- the straightforward baseline ------------------------------------------------------------------------
def mlp(i, o, hidden=256, n_hidden=2):
    layers, d = [], i
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, o))


def sgd_step(optimizer, loss, retain_graph=False):
    optimizer.zero_grad()
    loss.backward(retain_graph=retain_graph)
    optimizer.step()


@torch.no_grad()
def polyak(targets, sources, tau=0.005):
    """A parameter-by-parameter Python loop, as in most implementations."""
    for target, source in zip(targets, sources, strict=True):
        for t, p in zip(target.parameters(), source.parameters(), strict=True):
            t.data.copy_((1 - tau) * t.data + tau * p.data)


class GaussianActor(nn.Module):  # IQL: tanh mean, state-independent log-std
    def __init__(self, o, a):
        super().__init__()
        self.net, self.log_std = mlp(o, a), nn.Parameter(torch.zeros(a))

    def log_prob(self, s, a):
        return torch.distributions.Normal(torch.tanh(self.net(s)), self.log_std.clamp(-5, 2).exp()).log_prob(a).sum(-1)


class TanhGaussianActor(nn.Module):  # SAC/CQL: state-dependent std, tanh squashing
    def __init__(self, o, a):
        super().__init__()
        self.net = mlp(o, 2 * a, n_hidden=3)

    def forward(self, s):
        mean, log_std = self.net(s).chunk(2, -1)
        dist = torch.distributions.Normal(mean, log_std.clamp(-5, 2).exp())
        u = dist.rsample()
        a = torch.tanh(u)
        return a, (dist.log_prob(u) - torch.log(1 - a.pow(2) + 1e-6)).sum(-1)


def baseline_iql(data, o, a, device):
    q1, q2, v, actor = mlp(o + a, 1).to(device), mlp(o + a, 1).to(device), mlp(o, 1).to(device), None
    actor = GaussianActor(o, a).to(device)
    q1t, q2t = copy.deepcopy(q1), copy.deepcopy(q2)
    q_opt = torch.optim.Adam([*q1.parameters(), *q2.parameters()], 3e-4)
    v_opt, pi_opt = torch.optim.Adam(v.parameters(), 3e-4), torch.optim.Adam(actor.parameters(), 3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(pi_opt, 1_000_000)

    def step():
        idx = torch.randint(len(data["obs"]), (256,), device=device)
        s, act, r, s2, d = (data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        with torch.no_grad():
            tq = torch.min(q1t(torch.cat([s, act], 1)), q2t(torch.cat([s, act], 1))).squeeze(-1)
            next_v = v(s2).squeeze(-1)
        adv = tq - v(s).squeeze(-1)
        v_loss = (torch.abs(0.7 - (adv < 0).float()) * adv**2).mean()
        sgd_step(v_opt, v_loss)
        target = r + 0.99 * (1 - d) * next_v
        x = torch.cat([s, act], 1)
        q_loss = F.mse_loss(q1(x).squeeze(-1), target) + F.mse_loss(q2(x).squeeze(-1), target)
        sgd_step(q_opt, q_loss)
        w = torch.exp(3.0 * adv.detach()).clamp(max=100.0)
        pi_loss = -(w * actor.log_prob(s, act)).mean()
        sgd_step(pi_opt, pi_loss)
        sched.step()
        polyak([q1t, q2t], [q1, q2])
        return {"v": v_loss.item(), "q": q_loss.item(), "pi": pi_loss.item()}  # logged every step

    return step


def baseline_cql(data, o, a, device, n=10):
    q1, q2 = mlp(o + a, 1, n_hidden=3).to(device), mlp(o + a, 1, n_hidden=3).to(device)
    actor = TanhGaussianActor(o, a).to(device)
    q1t, q2t = copy.deepcopy(q1), copy.deepcopy(q2)
    log_alpha = torch.zeros(1, requires_grad=True, device=device)
    q_opt = torch.optim.Adam([*q1.parameters(), *q2.parameters()], 3e-4)
    pi_opt, a_opt = torch.optim.Adam(actor.parameters(), 1e-4), torch.optim.Adam([log_alpha], 1e-4)

    def q(net, s, act):
        return net(torch.cat([s, act], -1)).squeeze(-1)

    def step():
        idx = torch.randint(len(data["obs"]), (256,), device=device)
        s, act, r, s2, d = (data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        new_a, logp = actor(s)
        alpha_loss = -(log_alpha * (logp + (-a)).detach()).mean()
        alpha = log_alpha.exp()
        pi_loss = (alpha.detach() * logp - torch.min(q(q1, s, new_a), q(q2, s, new_a))).mean()
        q1p, q2p = q(q1, s, act), q(q2, s, act)
        with torch.no_grad():
            na, _ = actor(s2)
            target = r + 0.99 * (1 - d) * torch.min(q(q1t, s2, na), q(q2t, s2, na))
        td = F.mse_loss(q1p, target) + F.mse_loss(q2p, target)
        s_rep, s2_rep = s.repeat_interleave(n, 0), s2.repeat_interleave(n, 0)
        rand_a = torch.empty(256 * n, a, device=device).uniform_(-1, 1)
        cur_a, cur_logp = (x.detach() for x in actor(s_rep))  # CORL detaches the sampled OOD actions
        nxt_a, nxt_logp = (x.detach() for x in actor(s2_rep))
        rand_density = math.log(0.5**a)
        penalty = 0
        for net, pred in ((q1, q1p), (q2, q2p)):  # six critic calls
            cat = torch.cat(
                [
                    (q(net, s_rep, rand_a) - rand_density).view(256, n),
                    (q(net, s_rep, nxt_a) - nxt_logp).view(256, n),
                    (q(net, s_rep, cur_a) - cur_logp).view(256, n),
                ],
                1,
            )
            penalty = penalty + 10.0 * (torch.logsumexp(cat, 1).mean() - pred.mean())
        q_loss = td + penalty
        sgd_step(a_opt, alpha_loss)
        sgd_step(pi_opt, pi_loss, retain_graph=True)
        sgd_step(q_opt, q_loss)
        polyak([q1t, q2t], [q1, q2])
        return {"q": q_loss.item(), "pi": pi_loss.item(), "alpha": alpha.item()}  # logged every step

    return step


def baseline_sps(algo, data, device, steps):
    torch.manual_seed(0)
    o, a = data["obs"].shape[1], data["actions"].shape[1]
    step = (baseline_iql if algo == "iql" else baseline_cql)(data, o, a, device)
    for _ in range(max(steps // 5, 10)):  # warm-up, like the dropped first window of the scripts
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


# ---- ours: the scripts themselves -----------------------------------------------------------------------
def ours_sps(algo, args, env, out):
    window = args.steps // 5
    cmd = [sys.executable, str(ROOT / f"{algo}.py"), "--env", env, "--device", args.device]
    cmd += ["--total-steps", str(args.steps + window), "--log-every", str(window), "--eval-every", "100000000"]
    cmd += ["--eval-episodes", str(args.eval_episodes), "--checkpoint-every", "100000000", "--output", str(out)]
    cmd += args.ours_flags.split()
    env_vars = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, env=env_vars, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{algo}.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    windows = [e.value for e in events.Scalars("charts/SPS")][1:]  # drop the warm-up window
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_seconds = summary["eval_history"][-1]["seconds"] / args.eval_episodes
    return windows, eval_seconds


MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def profile_update(algo: str, args: Args, buffer, steps: int = 50) -> tuple:
    """The script's own update (make_networks/make_optimizers/make_update, with --ours-flags) under
    torch.profiler: kernels per step (leaf operators on the CPU, device kernels on a GPU), aten::copy_ calls per
    step, and the share of the step's time spent in matmuls. Shows on any machine where a step's time goes."""
    module = importlib.import_module(algo)
    margs = tyro.cli(module.Args, args=args.ours_flags.split())
    device = buffer.obs.device
    nets = {
        k: v.to(device) for k, v in module.make_networks(margs, buffer.obs.shape[1], buffer.steps.shape[1] - 2).items()
    }
    update = module.make_update(nets, module.make_optimizers(nets, margs), margs)
    for step in range(1, 11):  # warm-up (and compilation, with --compile)
        update(buffer.sample(256), step)
    gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(11, 11 + steps):
            update(buffer.sample(256), step)
        if gpu:
            torch.cuda.synchronize()
    events = prof.events()
    if gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels)
        matmul = sum(e.self_device_time_total for e in kernels if "gemm" in e.name.lower() or "matmul" in e.name)
    else:
        kernels = [e for e in events if e.name.startswith("aten::") and not e.cpu_children]
        total = sum(e.self_cpu_time_total for e in events if e.name.startswith("aten::"))
        matmul = sum(e.self_cpu_time_total for e in events if e.name in MATMULS)
    copies = sum(e.name == "aten::copy_" for e in events)
    return len(kernels) / steps, copies / steps, matmul / max(total, 1e-9)


def build_dataset() -> str:
    """A random-action Adroit door dataset with the real door dimensions (39-d observations, 28-d actions)."""
    import gymnasium as gym
    import gymnasium_robotics
    import minari
    from minari.data_collector import EpisodeBuffer

    gym.register_envs(gymnasium_robotics)

    dataset_id = "bench/door/random-v0"
    env = gym.make("AdroitHandDoor-v1", max_episode_steps=200)
    episodes = []
    for i in range(10):
        obs, _ = env.reset(seed=i)
        o, act, rew, term, trunc = [obs], [], [], [], []
        while not (term and term[-1]) and not (trunc and trunc[-1]):
            action = env.action_space.sample()
            obs, r, te, tr, _ = env.step(action)
            o.append(obs), act.append(action), rew.append(r), term.append(te), trunc.append(tr)
        episodes.append(
            EpisodeBuffer(
                id=i,
                observations=np.stack(o),
                actions=np.stack(act),
                rewards=np.array(rew),
                terminations=np.array(term),
                truncations=np.array(trunc),
                infos={},
            )
        )
    minari.create_dataset_from_buffers(
        dataset_id,
        episodes,
        env=env,
        eval_env=env.spec,
        ref_min_score=-50.0,
        ref_max_score=3000.0,
        algorithm_name="random",
        description="benchmark",
    )
    return dataset_id


def main(args: Args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        env = args.env
        if not env:
            os.environ["MINARI_DATASETS_PATH"] = str(Path(tmp) / "minari")
            env = build_dataset()
        sys.path.insert(0, str(ROOT))
        import iql  # the baseline trains on exactly the script's tensors

        buffer, _ = iql.load_buffer(iql.load_dataset(iql.resolve_dataset_name(env)[0]), iql.Args(), device)
        steps = buffer.steps  # the baseline gets the textbook layout: separate obs and next_obs copies
        data = {
            "obs": buffer.obs[buffer.rows[0]],
            "actions": steps[:, :-2],
            "rewards": steps[:, -2],
            "next_obs": buffer.obs[buffer.rows[1]],
            "dones": steps[:, -1],
        }
        print(
            f"dataset {env}: {len(steps)} transitions, obs {buffer.obs.shape[1]}, "
            f"actions {steps.shape[1] - 2}; device {args.device}, {args.threads} threads, batch 256"
        )
        rows = []
        for algo in args.algos:
            windows, evals = [], []
            for r in range(args.repeats):
                w, e = ours_sps(algo, args, env, Path(tmp) / f"{algo}{r}")
                windows += w
                evals.append(e)
            ours = statistics.median(windows)
            base = float("nan")
            if args.baseline:
                base = statistics.median(baseline_sps(algo, data, device, args.steps) for _ in range(args.repeats))
            ops, copies, matmul = profile_update(algo, args, buffer)
            rows.append((algo, ours, base, ours / base, statistics.median(evals), ops, copies, matmul))
            print(
                f"{algo}: ours {ours:.1f} steps/s, baseline {base:.1f} steps/s, ratio {ours / base:.2f}x, "
                f"eval {statistics.median(evals):.3f} s/episode; per step {ops:.0f} kernels, {copies:.0f} copies, "
                f"{matmul:.0%} of the time in matmuls",
                flush=True,
            )
        print(
            "\n| algo | ours (steps/s) | baseline (steps/s) | ratio | eval s/episode | kernels/step | copies/step "
            "| matmul share |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for algo, ours, base, ratio, ev, ops, copies, matmul in rows:
            cells = [f"{ours:.1f}", f"{base:.1f}", f"{ratio:.2f}x", f"{ev:.3f}", f"{ops:.0f}", f"{copies:.0f}"]
            print(f"| {algo} | {' | '.join(cells)} | {matmul:.0%} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
