"""Training throughput of the algorithm scripts against a straightforward PyTorch implementation, in one run.

    python benchmarks/throughput.py   # CPU; a locally built Adroit-door dataset (39-d obs, 28-d actions)
    python benchmarks/throughput.py --algos td3_bc rebrac --corl ~/CORL   # and CORL's real td3_bc.py
    python benchmarks/throughput.py --device cuda --steps 5000 --env D4RL/door/human-v2

"Ours" is the real script run as a user runs it (a subprocess, default settings for the dataset: batch 256 on
the benchmark's door data); its steps/s are read from the script's own `charts/SPS` TensorBoard windows
(evaluation and checkpoints excluded), the first window (start-up, warm-up, compilation) dropped, median over
windows and repeats. The baseline is the textbook PyTorch version of the same networks and losses (CORL-style):
separate critic modules (and, for TD3+BC, CORL's separate critic optimizers), six critic calls per CQL step (OOD
actions through the autograd graph), per-field batch gathers, a parameter-by-parameter Polyak loop, `.item()`
logging on every step; the same batch size as ours. With --corl (a CORL checkout, bare clone or the file),
td3_bc also gets CORL's own algorithms/offline/td3_bc.py, run unmodified through the shim modules of
benchmarks/compare.py (its wandb shim times the steps between evaluations; CORL's per-step wandb.log is a
no-op there). Repeats are interleaved (ours, baseline, CORL, ours, ...), so a slow spell of a shared machine hits
each alike. Also reported: evaluation seconds per episode (vectorized envs) from the script's summary.
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
    """which algorithms to benchmark: iql, cql, td3_bc, rebrac"""
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
    corl: str | None = None
    """td3_bc: also time CORL's td3_bc.py (a CORL checkout, a bare clone or the file), through compare.py's shims"""


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


def baseline_td3_bc(data, o, a, device, batch=256):
    """CORL's td3_bc.py step: two critic modules with an optimizer each, the actor and the three targets updated
    every second step; the actor's BC term averaged over batch and action dims."""
    actor = nn.Sequential(mlp(o, a), nn.Tanh()).to(device)
    q1, q2 = mlp(o + a, 1).to(device), mlp(o + a, 1).to(device)
    actor_t, q1t, q2t = copy.deepcopy(actor), copy.deepcopy(q1), copy.deepcopy(q2)
    pi_opt = torch.optim.Adam(actor.parameters(), 3e-4)
    q1_opt, q2_opt = torch.optim.Adam(q1.parameters(), 3e-4), torch.optim.Adam(q2.parameters(), 3e-4)
    total_it = [0]

    def q(net, s, act):
        return net(torch.cat([s, act], 1))

    def step():
        total_it[0] += 1
        idx = torch.randint(len(data["obs"]), (batch,), device=device)
        s, act, r, s2, d = (data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        r, d = r.unsqueeze(-1), d.unsqueeze(-1)
        with torch.no_grad():
            noise = (torch.randn_like(act) * 0.2).clamp(-0.5, 0.5)
            next_a = (actor_t(s2) + noise).clamp(-1.0, 1.0)
            target = r + (1 - d) * 0.99 * torch.min(q(q1t, s2, next_a), q(q2t, s2, next_a))
        q_loss = F.mse_loss(q(q1, s, act), target) + F.mse_loss(q(q2, s, act), target)
        log = {"critic_loss": q_loss.item()}  # logged every step
        q1_opt.zero_grad()
        q2_opt.zero_grad()
        q_loss.backward()
        q1_opt.step()
        q2_opt.step()
        if total_it[0] % 2 == 0:
            pi = actor(s)
            q_pi = q(q1, s, pi)
            pi_loss = -2.5 / q_pi.abs().mean().detach() * q_pi.mean() + F.mse_loss(pi, act)
            log["actor_loss"] = pi_loss.item()
            sgd_step(pi_opt, pi_loss)
            polyak([q1t, q2t, actor_t], [q1, q2, actor])
        return log

    return step


def rebrac_mlp(i, o, layer_norm, hidden=256, n_hidden=3):
    """ReBRAC's MLP: Linear -> ReLU -> (LayerNorm) per hidden layer, then the output layer."""
    layers, d = [], i
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()] + ([nn.LayerNorm(hidden)] if layer_norm else [])
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, o))


def baseline_rebrac(data, o, a, device, batch=256, lr=1e-3, beta1=0.05, beta2=0.01):
    """ReBRAC's step written out as d3rlpy's and CORL's (3 x 256, LayerNorm in the critics): the critics every step
    with the next-action penalty in the target, the actor (BC summed over action dims, Q / mean|Q| of the min) and
    the targets every second step, counting from step 0."""
    actor = nn.Sequential(rebrac_mlp(o, a, False), nn.Tanh()).to(device)
    q1, q2 = rebrac_mlp(o + a, 1, True).to(device), rebrac_mlp(o + a, 1, True).to(device)
    actor_t, q1t, q2t = copy.deepcopy(actor), copy.deepcopy(q1), copy.deepcopy(q2)
    pi_opt, q_opt = torch.optim.Adam(actor.parameters(), lr), torch.optim.Adam([*q1.parameters(), *q2.parameters()], lr)
    it = [0]

    def q(net, s, act):
        return net(torch.cat([s, act], 1))

    def step():
        idx = torch.randint(len(data["obs"]), (batch,), device=device)
        s, act, r, s2, d, a2 = (
            data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "dones", "next_actions")
        )
        r, d = r.unsqueeze(-1), d.unsqueeze(-1)
        with torch.no_grad():
            noise = (torch.randn_like(act) * 0.2).clamp(-0.5, 0.5)
            next_a = (actor_t(s2) + noise).clamp(-1.0, 1.0)
            penalty = ((next_a - a2) ** 2).sum(-1, keepdim=True)
            next_q = torch.min(q(q1t, s2, next_a), q(q2t, s2, next_a))
            target = r + (1 - d) * 0.99 * (next_q - beta2 * penalty)
        q_loss = F.mse_loss(q(q1, s, act), target) + F.mse_loss(q(q2, s, act), target)
        sgd_step(q_opt, q_loss)
        log = {"critic_loss": q_loss.item()}  # logged every step
        if it[0] % 2 == 0:
            pi = actor(s)
            q_pi = torch.min(q(q1, s, pi), q(q2, s, pi))
            bc = ((pi - act) ** 2).sum(-1, keepdim=True)
            pi_loss = (beta1 * bc - q_pi / q_pi.abs().mean().detach()).mean()
            sgd_step(pi_opt, pi_loss)
            polyak([q1t, q2t, actor_t], [q1, q2, actor])
            log["actor_loss"] = pi_loss.item()
        it[0] += 1
        return log

    return step


BASELINES = {"iql": baseline_iql, "cql": baseline_cql, "td3_bc": baseline_td3_bc, "rebrac": baseline_rebrac}


def baseline_sps(algo, data, device, steps, batch=256):
    torch.manual_seed(0)
    o, a = data["obs"].shape[1], data["actions"].shape[1]
    if algo in ("td3_bc", "rebrac"):
        step = BASELINES[algo](data, o, a, device, batch=batch)
    else:
        step = BASELINES[algo](data, o, a, device)
    for _ in range(max(steps // 5, 10)):  # warm-up, like the dropped first window of the scripts
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


# ---- ours: the scripts themselves -----------------------------------------------------------------------
def corl_sps(args, env, out, shims):
    """CORL's td3_bc.py through compare.py's shims: its training steps/s per evaluation window (its evaluations,
    1 episode each, excluded by the wandb shim's clock), the first window dropped."""
    window = args.steps // 5
    result = out / "corl.json"
    cmd = [sys.executable, str(shims / "corl_td3_bc.py"), "--env", env, "--device", args.device, "--seed", "0"]
    cmd += ["--max_timesteps", str(args.steps + window), "--eval_freq", str(window), "--n_episodes", "1"]
    env_vars = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "COMPARE_THREADS": str(args.threads)}
    env_vars.update(COMPARE_RESULT=str(result), PYTHONWARNINGS="ignore")
    env_vars["PYTHONPATH"] = os.pathsep.join([str(shims), env_vars.get("PYTHONPATH", "")])
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env_vars, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"CORL's td3_bc.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    evals = json.loads(result.read_text())["evals"]
    return [window / e["train_seconds"] for e in evals][1:]


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


def script_args(algo: str, args: Args, env: str):
    """The script's Args for the dataset as a run gets them: its per-domain settings, then --ours-flags."""
    module = importlib.import_module(algo)
    tuned = module.as_flags(module.tuned_settings(env, False))
    return module, tyro.cli(module.Args, args=[*tuned, *args.ours_flags.split()])


def profile_update(algo: str, args: Args, env: str, buffer, steps: int = 50) -> tuple:
    """The script's own update (make_networks/make_optimizers/make_update, its settings for the dataset and
    --ours-flags) under torch.profiler: kernels per step (leaf operators on the CPU, device kernels on a GPU),
    aten::copy_ calls per step, and the share of the step's time spent in matmuls. Shows on any machine where a
    step's time goes."""
    module, margs = script_args(algo, args, env)
    device = buffer.obs.device
    act_dim = buffer.steps.shape[1] - 3  # steps: action, reward, termination, return-to-go
    nets = {k: v.to(device) for k, v in module.make_networks(margs, buffer.obs.shape[1], act_dim).items()}
    update = module.make_update(nets, module.make_optimizers(nets, margs), margs)
    for step in range(1, 11):  # warm-up (and compilation, with --compile)
        update(buffer.sample(margs.batch_size), step)
    gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(11, 11 + steps):
            update(buffer.sample(margs.batch_size), step)
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
    unknown = set(args.algos) - set(BASELINES)
    if unknown:
        raise SystemExit(f"--algos: unknown {sorted(unknown)}; choose from {sorted(BASELINES)}")
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
        n, act_dim = buffer.rows.shape[1], steps.shape[1] - 3  # steps: action, reward, termination, return-to-go
        data = {
            "obs": buffer.obs[buffer.rows[0]],
            "actions": steps[:n, :act_dim],
            "rewards": steps[:n, act_dim],
            "next_obs": buffer.obs[buffer.rows[1]],
            "dones": steps[:n, act_dim + 1],
            "next_actions": steps[1 : n + 1, :act_dim],  # the next row's action (ReBRAC)
        }
        print(
            f"dataset {env}: {n} transitions, obs {buffer.obs.shape[1]}, actions {act_dim}; device {args.device}, "
            f"{args.threads} threads"
        )
        shims = None
        if args.corl is not None and "td3_bc" in args.algos:
            from compare import corl_script, write_shims  # benchmarks/compare.py

            shims = write_shims(Path(tmp) / "shims")
            corl_script(args.corl, shims)
        rows = []
        for algo in args.algos:
            batch = script_args(algo, args, env)[1].batch_size
            windows, evals, base, corl = [], [], [], []
            for r in range(args.repeats):  # interleaved: ours, the baseline, CORL, ours, ...
                w, e = ours_sps(algo, args, env, Path(tmp) / f"{algo}{r}")
                windows += w
                evals.append(e)
                if args.baseline:
                    base.append(baseline_sps(algo, data, device, args.steps, batch))
                if shims is not None and algo == "td3_bc":
                    corl += corl_sps(args, env, Path(tmp) / f"corl{r}", shims)
            ours = statistics.median(windows)
            base = statistics.median(base) if base else float("nan")
            corl = statistics.median(corl) if corl else float("nan")
            ops, copies, matmul = profile_update(algo, args, env, buffer)
            rows.append((algo, batch, ours, base, corl, statistics.median(evals), ops, copies, matmul))
            corl_text = "" if math.isnan(corl) else f", CORL's script {corl:.1f} steps/s ({ours / corl:.2f}x)"
            print(
                f"{algo} (batch {batch}): ours {ours:.1f} steps/s, baseline {base:.1f} steps/s "
                f"({ours / base:.2f}x){corl_text}; eval {statistics.median(evals):.3f} s/episode; per step "
                f"{ops:.0f} kernels, {copies:.0f} copies, {matmul:.0%} of the time in matmuls",
                flush=True,
            )
        print(
            "\n| algo | batch | ours (steps/s) | baseline (steps/s) | ours / baseline | CORL's script (steps/s) "
            "| ours / CORL | eval s/episode | kernels/step | copies/step | matmul share |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for algo, batch, ours, base, corl, ev, ops, copies, matmul in rows:
            cells = [str(batch), f"{ours:.1f}", f"{base:.1f}", f"{ours / base:.2f}x"]
            cells += [f"{corl:.1f}", f"{ours / corl:.2f}x"] if not math.isnan(corl) else ["", ""]
            cells += [f"{ev:.3f}", f"{ops:.0f}", f"{copies:.0f}"]
            print(f"| {algo} | {' | '.join(cells)} | {matmul:.0%} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
