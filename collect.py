"""Record a Minari dataset from any Gymnasium env with continuous (Box) actions, offline, in one file.

Behaviour policies (`--policy`): `random` (uniform actions); `checkpoint`, the actor of an iql.py, cql.py or
collect.py checkpoint, optionally degraded with Gaussian action noise and epsilon-random actions; `sac`, a compact
online SAC teacher (Haarnoja et al., "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905) trained
for `--teacher-steps` env steps, whose training episodes ("replay" data) and/or final-policy rollouts are saved,
and whose actor is saved as <run>/teacher.pt for later `--policy checkpoint` collection.
Episodes are assembled directly into Minari EpisodeBuffers (T+1 observations; time limits are truncations, not
terminations), so neither minari[create] nor jax is needed. The dataset stores the evaluation env spec and the
reference scores `minari.get_normalized_score` needs: the random policy's mean return and the best policy's.
Usage: README.md, sections "Offline quickstart" and "Recording datasets".
"""

import contextlib
import dataclasses
import difflib
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm

from common import BatchedLinear, get_rng_states, seed_everything, set_rng_states, soft_update

with contextlib.redirect_stderr(io.StringIO()):  # registers PointMaze, AntMaze, Adroit, ...; hides its notice
    import gymnasium_robotics  # that Adroit v1 dense rewards changed in gymnasium-robotics 1.2.1

    gym.register_envs(gymnasium_robotics)

ALGO = "collect-sac"  # the "algo" of the teacher checkpoints this script writes
ACTOR_ALGOS = ("iql", "cql", ALGO)  # checkpoints whose actor --policy checkpoint can run


@dataclass
class Args:
    env: str | None = None
    """Gymnasium env id (Pendulum-v1, HalfCheetah-v5, PointMaze_UMaze-v3, ...); with --policy checkpoint it
    defaults to the checkpoint's env"""
    policy: Literal["random", "checkpoint", "sac"] = "random"
    """behaviour policy: uniform random actions, the actor of --checkpoint, or an online SAC teacher"""
    dataset_id: str | None = None
    """Minari id of the new dataset, with a namespace (local/pendulum/medium-v0); default local/<env>/<policy>-v0"""
    episodes: int = 100
    """episodes to record (with --policy sac: rollouts of the final teacher, none with --sac-data replay)"""
    seed: int = 1
    """seed of python, numpy, torch, actions and env resets: the same seed gives the same dataset"""
    max_episode_steps: int | None = None
    """override the env's time limit (episodes hitting it end with truncation=True)"""
    overwrite: bool = False
    """replace an existing local dataset with the same id"""
    checkpoint: str | None = None
    """--policy checkpoint: an iql.py/cql.py run folder or checkpoint file, or a collect.py teacher.pt"""
    action_noise: float = 0.0
    """std of Gaussian noise added to the policy's actions, in units of half the action range, then clipped"""
    epsilon: float = 0.0
    """probability of a uniform random action instead of the policy's at each step"""
    ref_episodes: int = 20
    """episodes over which the reference scores (random and best policy mean returns) are measured"""
    ref_max_score: float | None = None
    """expert reference return for normalized scores; default: the noise-free checkpoint or teacher's mean return"""
    description: str | None = None
    """dataset description stored in its metadata; default: how it was recorded, with the command line"""
    output: str = "runs"
    """--policy sac: parent folder of the run folder <env>__collect-sac__<seed>__<unix time> with teacher.pt"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """where the networks run; auto picks cuda, then mps, then cpu"""
    threads: int = 1
    """CPU threads of torch: these small networks gain little from more, and on a busy machine OpenMP threads
    beyond the idle cores wait on each other (measured: 2 threads 20-70x slower than 1 beside one busy process)"""

    # SAC teacher (defaults: CleanRL's sac_continuous_action.py, but learning starts after 1000 random steps and
    # the actor is updated at every step)
    teacher_steps: int = 10_000
    """env steps (one gradient step each after learning_starts) of the SAC teacher"""
    sac_data: Literal["final", "replay", "both"] = "final"
    """what the dataset holds: rollouts of the final teacher, every complete training episode, or both"""
    learning_starts: int = 1000
    """uniform random actions for this many steps before SAC updates begin"""
    batch_size: int = 256
    """transitions per SAC gradient step"""
    buffer_size: int = 1_000_000
    """SAC replay buffer capacity in transitions"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics"""
    actor_lr: float = 3e-4
    """actor learning rate"""
    critic_lr: float = 1e-3
    """critic and temperature learning rate"""
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""
    n_hidden: int = 2
    """hidden layers of the actor and critic MLPs"""
    checkpoint_every: int = 1000
    """--policy sac: write <run>/teacher_training.pt (everything --resume needs) every this many teacher steps,
    at the end of training and on SIGINT/SIGTERM"""
    resume: str | None = None
    """continue an interrupted --policy sac run from its run folder (or teacher_training.pt): the teacher's
    training, then the dataset, as the uninterrupted run would have made them; only --device may be given too"""


class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the teacher's training steps: unwinds (removing any partial dataset), then the
    script exits with 128 + signum. A BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


TRAINING_STATE = "teacher_training.pt"  # what --resume reads; not an actor checkpoint for --policy checkpoint
RESUME_HINT = {"text": ""}  # how to go on after an interruption, set once a teacher run folder exists


class StopSignal:
    """SIGINT/SIGTERM handler. While `deferred` (inside the teacher's training loop) it only records the
    signal, so the current env/gradient step finishes and a checkpoint is written; elsewhere it raises
    Interrupted at once."""

    def __init__(self):
        self.signum, self.deferred = None, False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum, frame) -> None:
        self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)


STOP = StopSignal()


# --------------------------------------------------------------------------------------------------------
# Environment: id checks, spaces, flattening
# --------------------------------------------------------------------------------------------------------
def make_env(env: str | gym.envs.registration.EnvSpec, max_episode_steps: int | None) -> gym.Env:
    """gym.make with clear errors: unknown ids (with close matches), non-Box actions, no time limit."""
    if isinstance(env, str) and env not in gym.registry:
        close = difflib.get_close_matches(env, list(gym.registry), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UserError(
            f"unknown Gymnasium env '{env}'.{hint} Give a registered id such as Pendulum-v1, HalfCheetah-v5 or "
            "PointMaze_UMaze-v3; an env from another package must be imported (registered) to be found."
        )
    try:
        made = gym.make(env, **({"max_episode_steps": max_episode_steps} if max_episode_steps else {}))
    except Exception as e:
        name = env if isinstance(env, str) else env.id
        raise UserError(f"cannot create env {name}: {type(e).__name__}: {str(e)[:300]}") from e
    space = made.action_space
    if not isinstance(space, gym.spaces.Box):
        raise UserError(
            f"env {made.spec.id} has a {type(space).__name__} action space; collect.py (and iql.py, cql.py) need "
            "continuous actions in a Box. Choose an env with continuous actions, e.g. Pendulum-v1 or MountainCar"
            "Continuous-v0 instead of CartPole-v1 or MountainCar-v0."
        )
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise UserError(f"env {made.spec.id} has an unbounded action space {space}: uniform actions are undefined")
    obs_space = made.observation_space
    spaces = obs_space.spaces.values() if isinstance(obs_space, gym.spaces.Dict) else [obs_space]
    if not all(isinstance(s, gym.spaces.Box) for s in spaces):
        raise UserError(f"env {made.spec.id} has observations {obs_space}: only Box and Dict of Box are supported")
    if made.spec.max_episode_steps is None:
        raise UserError(
            f"env {made.spec.id} has no time limit, so an episode might never end; pass --max-episode-steps N "
            "(episodes that reach it are stored as truncated)."
        )
    return made


def flatten(space: gym.Space, obs) -> np.ndarray:
    """One observation -> flat float32, dict keys in the space's order (as FlattenObservation in iql.py)."""
    return gym.spaces.flatten(space, obs).astype(np.float32)


def stack(observations: list):
    """T+1 observations -> one array, or a dict of arrays for Dict observation spaces."""
    if isinstance(observations[0], dict):
        return {k: stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


def episode_seeds(seed: int, stream: int, n: int) -> list:
    """Reset seeds of n episodes, independent streams for the data, the random and the best-policy references."""
    return [int(s) for s in np.random.SeedSequence([seed, stream]).generate_state(n)]


# --------------------------------------------------------------------------------------------------------
# Behaviour policies. An actor maps a flat observation to an action in [-1, 1]; Behaviour adds noise and maps
# it affinely to the env's [low, high].
# --------------------------------------------------------------------------------------------------------
class Behaviour:
    """env observation -> env action: the actor's action (uniform if there is none), with probability epsilon a
    uniform action instead, plus N(0, noise^2) in [-1, 1] units, clipped, then mapped to [low, high]."""

    def __init__(self, env: gym.Env, actor=None, noise: float = 0.0, epsilon: float = 0.0, seed: int = 0):
        self.actor, self.noise, self.epsilon = actor, noise, epsilon
        self.space, self.obs_space = env.action_space, env.observation_space
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs) -> np.ndarray:
        shape = self.space.shape
        if self.actor is None or self.rng.random() < self.epsilon:
            a = self.rng.uniform(-1.0, 1.0, shape)
        else:
            a = self.actor(flatten(self.obs_space, obs)).reshape(shape)
            if self.noise > 0:
                a = np.clip(a + self.noise * self.rng.standard_normal(shape), -1.0, 1.0)
        return (self.space.low + (a + 1.0) * 0.5 * (self.space.high - self.space.low)).astype(self.space.dtype)


def actor_mean_net(state: dict) -> nn.Sequential:
    """Rebuild the deterministic part of an actor, Linear-ReLU-...-Linear, from its state dict alone, so that
    checkpoints of iql.py, cql.py and collect.py run without importing those scripts. Assumptions, true of all
    three: the mean path is the 2-D `*.weight` tensors in registration order (a state dict keeps it), hidden
    activations are ReLU, every std parameter or head has 'std' in its name, and dropout (no parameters) is off
    when acting. The caller applies tanh to the first act_dim outputs (a fused head [mean, log_std] also works)."""
    names = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    names = [n for n in names if "std" not in n]
    known = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    unknown = [k for k in state if k not in known and "std" not in k]
    if not names or unknown:
        raise UserError(
            f"the checkpoint's actor has a layout collect.py cannot rebuild (parameters {list(state)}): it expects "
            "Linear layers with ReLU between them and a tanh on the output, as in iql.py, cql.py and collect.py"
        )
    layers = []
    for name in names:
        weight, bias = state[f"{name}.weight"], state.get(f"{name}.bias")
        if layers and layers[-2].out_features != weight.shape[1]:
            raise UserError(f"the checkpoint's actor layers do not chain: {name} takes {weight.shape[1]} inputs")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


class ActorPolicy:
    """Flat observation -> deterministic action in [-1, 1]: normalize, MLP, tanh of the mean outputs."""

    def __init__(self, net: nn.Module, obs_mean: np.ndarray, obs_std: np.ndarray, act_dim: int, device):
        self.net, self.act_dim, self.device = net.to(device), act_dim, device
        self.obs_mean, self.obs_std = obs_mean, obs_std

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor((obs - self.obs_mean) / self.obs_std, dtype=torch.float32, device=self.device)
        return torch.tanh(self.net(x)[..., : self.act_dim]).cpu().numpy().astype(np.float64)


def checkpoint_path(path: str) -> Path:
    """A checkpoint file, a collect.py run folder (teacher.pt) or an iql.py/cql.py run folder (checkpoints/last.pt)."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "teacher.pt", p / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
        raise UserError(f"--checkpoint {path}: the folder has neither teacher.pt nor checkpoints/last.pt")
    if not p.is_file():
        raise UserError(f"--checkpoint {path}: no such file or folder")
    return p


def load_checkpoint(path: str) -> dict:
    """Read with weights_only=True: a checkpoint from someone else cannot run code."""
    p = checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--checkpoint {p} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("algo") not in ACTOR_ALGOS or not {"actor", "normalization"} <= set(ckpt):
        algo = ckpt.get("algo") if isinstance(ckpt, dict) else None
        raise UserError(
            f"--checkpoint {p} is not an iql.py, cql.py or collect.py checkpoint with an actor (algo: {algo})"
        )
    return ckpt


def checkpoint_env_spec(ckpt: dict):
    """The env a checkpoint was trained for: stored by collect.py; for iql/cql, the eval env of its dataset."""
    if "env_spec" in ckpt:
        return gym.envs.registration.EnvSpec.from_json(ckpt["env_spec"])
    dataset_id = ckpt.get("minari_id")
    try:
        return minari.load_dataset(dataset_id).recover_environment(eval_env=True).spec
    except Exception as e:
        raise UserError(
            f"the checkpoint was trained on dataset {dataset_id}, which is not in the local Minari store, so its "
            "env is unknown: pass --env (e.g. --env Pendulum-v1)"
        ) from e


def checkpoint_policy(ckpt: dict, env: gym.Env, device) -> ActorPolicy:
    """The checkpoint's deterministic actor, after checking that it fits the env's observations and actions."""
    norm = ckpt["normalization"]
    obs_mean, obs_std = norm["obs_mean"].numpy(), norm["obs_std"].numpy()
    low, high = norm["action_low"].numpy(), norm["action_high"].numpy()
    net = actor_mean_net(ckpt["actor"])
    obs_dim, act_dim = gym.spaces.flatdim(env.observation_space), env.action_space.shape[0]
    trained = f"{ckpt['algo']} checkpoint for {ckpt.get('minari_id') or ckpt.get('env_id')}"
    if net[0].in_features != obs_dim or obs_mean.shape != (obs_dim,) or low.shape != (act_dim,):
        raise UserError(
            f"the {trained} takes observations of size {net[0].in_features} and acts in {low.shape[0]} dims, but "
            f"env {env.spec.id} has observations of size {obs_dim} and {act_dim}-dim actions: it was trained for "
            "another env"
        )
    if net[-1].out_features not in (act_dim, 2 * act_dim):
        raise UserError(f"the {trained} has {net[-1].out_features} actor outputs for {act_dim}-dim actions")
    if not (np.allclose(low, env.action_space.low) and np.allclose(high, env.action_space.high)):
        raise UserError(
            f"the {trained} acts in [{low}, {high}], env {env.spec.id} in [{env.action_space.low}, "
            f"{env.action_space.high}]: it was trained for another env or another version of it"
        )
    return ActorPolicy(net, obs_mean, obs_std, act_dim, device)


# --------------------------------------------------------------------------------------------------------
# Recording: episodes -> EpisodeBuffers
# --------------------------------------------------------------------------------------------------------
class EpisodeRecorder:
    """Collects one episode step by step; `finish` returns it as an EpisodeBuffer (T+1 observations)."""

    def __init__(self, obs, seed: int | None = None):
        self.seed, self.observations = seed, [obs]
        self.actions, self.rewards, self.terminations, self.truncations = [], [], [], []

    def add(self, action, next_obs, reward, terminated, truncated) -> None:
        self.observations.append(next_obs)
        self.actions.append(action)
        self.rewards.append(float(reward))
        self.terminations.append(bool(terminated))
        self.truncations.append(bool(truncated))

    def finish(self) -> EpisodeBuffer:
        return EpisodeBuffer(
            seed=self.seed,
            observations=stack(self.observations),
            actions=np.stack(self.actions),
            rewards=np.asarray(self.rewards, dtype=np.float64),
            terminations=np.asarray(self.terminations),
            truncations=np.asarray(self.truncations),
            infos={},
        )


def rollout(env: gym.Env, behaviour: Behaviour, seeds: list, desc: str | None = None) -> tuple:
    """One episode per reset seed; returns the EpisodeBuffers and the episode returns."""
    episodes = []
    for seed in tqdm(seeds, desc=desc, disable=desc is None, leave=False):
        obs, _ = env.reset(seed=seed)
        recorder, done = EpisodeRecorder(obs, seed), False
        while not done:
            action = behaviour(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            recorder.add(action, obs, reward, terminated, truncated)
            done = terminated or truncated
        episodes.append(recorder.finish())
    return episodes, np.array([float(np.sum(ep.rewards)) for ep in episodes])


# --------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the SAC teacher (twin critics, target critics, tanh-Gaussian actor, automatic entropy tuning)
# --------------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp_trunk(in_dim: int, hidden: int, n_hidden: int) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden), nn.ReLU()]
        dim = hidden
    return nn.Sequential(*layers)


class SACActor(nn.Module):
    """pi(a|s) = tanh(N(mean(s), std(s)^2)); acting deterministically: tanh(mean(s)). This layout (trunk, mean,
    log_std) is what teacher.pt stores and what actor_mean_net rebuilds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        self.trunk = mlp_trunk(obs_dim, hidden, n_hidden)
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor) -> tuple:
        h = self.trunk(obs)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor) -> tuple:
        """a = tanh(u), u ~ N(mean, std^2) (reparameterized); log pi(a|s) with the tanh change of variables,
        log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) written stably (SAC paper, appendix C)."""
        mean, log_std = self(obs)
        u = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob


class TwinQ(nn.Module):
    """Both critics in one module: every layer is one batched matmul over the 2 critics. Output (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        layers, dim = [], obs_dim + act_dim
        for _ in range(n_hidden):
            layers += [BatchedLinear(2, dim, hidden), nn.ReLU()]
            dim = hidden
        self.net = nn.Sequential(*layers, BatchedLinear(2, dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


def soft_td_loss(critic, target_critic, actor, alpha, obs, actions, rewards, next_obs, dones, discount):
    """Soft Bellman residual, sum over both critics: y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s')),
    a' ~ pi(.|s'). d is the termination flag only: a time limit does not end the value of the next state."""
    with torch.no_grad():
        next_actions, next_log_prob = actor.sample(next_obs)
        next_q = target_critic(next_obs, next_actions).min(dim=0).values - alpha * next_log_prob
        target = rewards + discount * (1.0 - dones) * next_q
    return ((critic(obs, actions) - target) ** 2).mean(dim=1).sum()


def sac_actor_loss(q: torch.Tensor, log_prob: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """E[alpha log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s) reparameterized."""
    return (alpha * log_prob - q.min(dim=0).values).mean()


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """Automatic entropy tuning: alpha grows while the policy's entropy -E[log pi] is below the target -|A|."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def make_sac_update(actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt, args, act_dim):
    """One SAC step: critics, then actor and temperature on the updated critics, then Polyak."""
    target_entropy = -float(act_dim)

    def update(obs, actions, rewards, next_obs, dones):
        alpha = log_alpha.exp().detach()
        batch = (obs, actions, rewards, next_obs, dones)
        critic_loss = soft_td_loss(critic, target_critic, actor, alpha, *batch, args.discount)
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()

        new_actions, log_prob = actor.sample(obs)
        critic.requires_grad_(False)  # the actor's gradient flows through Q, but Q is not updated by it
        actor_loss = sac_actor_loss(critic(obs, new_actions), log_prob, alpha)
        actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_opt.step()
        critic.requires_grad_(True)

        alpha_loss = temperature_loss(log_alpha, log_prob, target_entropy)
        alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_opt.step()

        soft_update(target_critic, critic, args.tau)

    return update


def to_tensors(x):
    """Observations (arrays, or dicts of arrays) -> tensors, for a weights_only checkpoint."""
    if isinstance(x, dict):
        return {k: to_tensors(v) for k, v in x.items()}
    return torch.from_numpy(np.array(x))


def to_arrays(x):
    if isinstance(x, dict):
        return {k: to_arrays(v) for k, v in x.items()}
    return x.numpy()


def unstack(observations) -> list:
    """stack's inverse: (T+1, ...) arrays or dicts of them -> a list of T+1 observations."""
    if isinstance(observations, dict):
        parts = {k: unstack(v) for k, v in observations.items()}
        return [dict(zip(parts, values, strict=True)) for values in zip(*parts.values(), strict=True)]
    return list(observations)


def recorder_state(recorder: "EpisodeRecorder") -> dict:
    return {
        "seed": -1 if recorder.seed is None else int(recorder.seed),
        "observations": [to_tensors(o) for o in recorder.observations],
        "actions": [torch.from_numpy(np.array(a)) for a in recorder.actions],
        "rewards": [float(r) for r in recorder.rewards],
        "terminations": [bool(t) for t in recorder.terminations],
        "truncations": [bool(t) for t in recorder.truncations],
    }


def load_recorder(state: dict) -> "EpisodeRecorder":
    recorder = EpisodeRecorder(to_arrays(state["observations"][0]), None if state["seed"] < 0 else state["seed"])
    recorder.observations = [to_arrays(o) for o in state["observations"]]
    recorder.actions = [a.numpy() for a in state["actions"]]
    recorder.rewards, recorder.terminations = list(state["rewards"]), list(state["terminations"])
    recorder.truncations = list(state["truncations"])
    return recorder


def episode_state(ep: EpisodeBuffer) -> dict:
    recorder = EpisodeRecorder(None, ep.seed)
    recorder.observations, recorder.actions = unstack(ep.observations), list(ep.actions)
    recorder.rewards, recorder.terminations = list(ep.rewards), list(ep.terminations)
    recorder.truncations = list(ep.truncations)
    return recorder_state(recorder)


def time_limit(env: gym.Env):
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env
        env = env.env
    return None


def env_snapshot(env: gym.Env) -> dict | None:
    """The env's full state where it is known to be a few numbers: the classic-control envs (Pendulum,
    MountainCarContinuous), whose dynamics state is `unwrapped.state` and whose only randomness is np_random.
    Other envs (MuJoCo, robotics) return None: their in-progress episode is dropped on --resume."""
    u, limit = env.unwrapped, time_limit(env)
    if not type(u).__module__.startswith("gymnasium.envs.classic_control") or limit is None:
        return None
    if not isinstance(getattr(u, "state", None), np.ndarray):
        return None
    return {
        "state": torch.from_numpy(u.state.copy()),
        "np_random": json.dumps(u.np_random.bit_generator.state),
        "elapsed_steps": int(limit._elapsed_steps),
    }


def restore_env(env: gym.Env, snapshot: dict) -> None:
    env.reset()  # OrderEnforcing and PassiveEnvChecker want a reset first; everything it changed is then set
    u = env.unwrapped
    u.state = snapshot["state"].numpy().copy()
    u.np_random.bit_generator.state = json.loads(snapshot["np_random"])
    time_limit(env)._elapsed_steps = snapshot["elapsed_steps"]


def resume_seed(seed: int, step: int) -> int:
    """Reset seed of the episode that restarts an env whose interrupted episode could not be saved."""
    return int(np.random.SeedSequence([seed, 3, step]).generate_state(1)[0])


def train_teacher(env: gym.Env, args: Args, device: torch.device, run_dir: Path, state: dict | None = None):
    """Online SAC for args.teacher_steps env steps. Returns the actor, every complete training episode as an
    EpisodeBuffer (the "replay" data; an episode cut by the end of training is dropped), and their returns.
    Writes <run_dir>/teacher_training.pt every --checkpoint-every steps, at the end, and on SIGINT/SIGTERM
    (then exits 128 + signum); `state` (such a checkpoint) continues from it: networks, optimizers, replay
    buffer, recorded episodes and every random stream, and for classic-control envs the env and its
    unfinished episode too, so the result is the uninterrupted run's. Other envs restart the interrupted
    episode with reset seed resume_seed(seed, step), so the run goes on validly but not identically."""
    obs_space, act_space = env.observation_space, env.action_space
    obs_dim, act_dim = gym.spaces.flatdim(obs_space), act_space.shape[0]
    actor = SACActor(obs_dim, act_dim, args.hidden_dim, args.n_hidden).to(device)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden).to(device)
    target_critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    log_alpha = torch.zeros(1, device=device, requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.critic_lr)
    update = make_sac_update(actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt, args, act_dim)
    modules = {"actor": actor, "critic": critic, "target_critic": target_critic}
    modules |= {"actor_opt": actor_opt, "critic_opt": critic_opt, "alpha_opt": alpha_opt}

    # Replay buffer in [-1, 1] action units; `dones` holds terminations only (truncations keep bootstrapping)
    size = min(args.buffer_size, args.teacher_steps)
    buf = {
        "obs": np.zeros((size, obs_dim), np.float32),
        "actions": np.zeros((size, act_dim), np.float32),
        "rewards": np.zeros(size, np.float32),
        "next_obs": np.zeros((size, obs_dim), np.float32),
        "dones": np.zeros(size, np.float32),
    }
    rng = np.random.default_rng(args.seed)
    low, high = act_space.low, act_space.high
    start = 0
    if state is None:
        obs, _ = env.reset(seed=args.seed)
        recorder, episodes, returns = EpisodeRecorder(obs, args.seed), [], []
    else:
        start = state["step"]
        for name, obj in modules.items():
            obj.load_state_dict(state[name])
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
        filled = min(start, size)
        for k in buf:
            buf[k][:filled] = state["buffer"][k].numpy()
        episodes = [load_recorder(e).finish() for e in state["episodes"]]
        returns = [float(np.sum(ep.rewards)) for ep in episodes]
        rng.bit_generator.state = json.loads(state["rng_actions"])
        set_rng_states(state["rng"], torch.Generator())
        if state["env"] is not None:
            restore_env(env, state["env"])
            recorder = load_recorder(state["recorder"])
            obs = recorder.observations[-1]
        else:
            seed = resume_seed(args.seed, start)
            obs, _ = env.reset(seed=seed)
            recorder = EpisodeRecorder(obs, seed)
            print(
                f"note: env {env.spec.id} cannot be saved mid-episode; its interrupted episode restarts (seed {seed})"
            )

    def checkpoint(step: int) -> None:
        """Everything after `step` env steps, written atomically: torch.load(weights_only=True) reads it."""
        snapshot = env_snapshot(env)
        ckpt = {
            "algo": ALGO + "-training",
            "step": step,
            "args": dataclasses.asdict(args),
            "argv": RESUME_HINT.get("argv", []),
            "dataset_id": RESUME_HINT.get("dataset_id"),
            **{name: obj.state_dict() for name, obj in modules.items()},
            "log_alpha": log_alpha.detach().cpu(),
            "buffer": {k: torch.from_numpy(v[: min(step, size)].copy()) for k, v in buf.items()},
            "episodes": [episode_state(ep) for ep in episodes],
            "env": snapshot,
            "recorder": recorder_state(recorder) if snapshot is not None else None,
            "rng_actions": json.dumps(rng.bit_generator.state),
            "rng": get_rng_states(torch.Generator()),
        }
        data = io.BytesIO()
        torch.save(ckpt, data)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / TRAINING_STATE, data.getvalue())
        except OSError as e:
            tqdm.write(f"warning: teacher checkpoint at step {step} not written ({e}); the previous one is kept")

    pbar = tqdm(range(start, args.teacher_steps), initial=start, total=args.teacher_steps, desc="SAC teacher")
    STOP.deferred = True
    try:
        for step in pbar:
            if step < args.learning_starts:
                a = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
            else:
                with torch.no_grad():
                    a = actor.sample(torch.as_tensor(flatten(obs_space, obs), device=device))[0].cpu().numpy()
            action = (low + (a + 1.0) * 0.5 * (high - low)).astype(act_space.dtype)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            i = step % size
            buf["obs"][i], buf["actions"][i], buf["rewards"][i] = flatten(obs_space, obs), a, reward
            buf["next_obs"][i], buf["dones"][i] = flatten(obs_space, next_obs), float(terminated)
            recorder.add(action, next_obs, reward, terminated, truncated)
            obs = next_obs
            if terminated or truncated:
                episodes.append(recorder.finish())
                returns.append(float(np.sum(episodes[-1].rewards)))
                pbar.set_postfix(episodes=len(returns), last_return=f"{returns[-1]:.1f}")
                obs, _ = env.reset()
                recorder = EpisodeRecorder(obs)

            if step >= args.learning_starts:
                idx = rng.integers(0, min(step + 1, size), args.batch_size)
                update(*(torch.as_tensor(v[idx], device=device) for v in buf.values()))

            done = step + 1
            if STOP.signum is not None or done % args.checkpoint_every == 0 or done == args.teacher_steps:
                checkpoint(done)
            if STOP.signum is not None:
                pbar.close()
                print(
                    f"\ninterrupted at teacher step {done}/{args.teacher_steps}; checkpoint saved in "
                    f"{run_dir / TRAINING_STATE}. Resume with: python collect.py --resume {run_dir}",
                    flush=True,
                )
                sys.exit(128 + STOP.signum)
    finally:
        STOP.deferred = False
    return actor.eval(), episodes, np.array(returns)


# --------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: arguments, checkpoint, dataset writing
# --------------------------------------------------------------------------------------------------------
def validate(args: Args) -> None:
    checks = [
        (args.episodes > 0 or (args.policy == "sac" and args.sac_data == "replay"), "episodes must be > 0"),
        (args.max_episode_steps is None or args.max_episode_steps > 0, "max_episode_steps must be > 0"),
        (args.action_noise >= 0, "action_noise must be >= 0"),
        (0 <= args.epsilon <= 1, "epsilon must be in [0, 1]"),
        (args.ref_episodes > 0, "ref_episodes must be > 0"),
        (args.teacher_steps > 0 and args.learning_starts >= 0, "teacher_steps must be > 0, learning_starts >= 0"),
        (args.batch_size > 0 and args.buffer_size > 0, "batch_size and buffer_size must be > 0"),
        (0 <= args.discount <= 1 and 0 < args.tau <= 1, "discount must be in [0, 1], tau in (0, 1]"),
        (min(args.actor_lr, args.critic_lr) > 0, "learning rates must be > 0"),
        (args.hidden_dim > 0 and args.n_hidden >= 1, "hidden_dim must be > 0 and n_hidden >= 1"),
        (args.threads >= 1, "threads must be >= 1"),
        (args.checkpoint_every > 0, "checkpoint_every must be > 0"),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if args.policy == "checkpoint" and not args.checkpoint:
        errors.append("--policy checkpoint needs --checkpoint PATH (a run folder or checkpoint file)")
    if args.policy != "checkpoint" and args.checkpoint:
        errors.append(f"--checkpoint is only used with --policy checkpoint, not --policy {args.policy}")
    noisy = args.action_noise > 0 or args.epsilon > 0
    if noisy and (args.policy == "random" or (args.policy == "sac" and args.sac_data == "replay")):
        errors.append("--action-noise and --epsilon degrade a policy's rollouts; random or replay data has none")
    if args.policy == "sac" and args.teacher_steps <= args.learning_starts:
        errors.append(f"teacher_steps ({args.teacher_steps}) must exceed learning_starts ({args.learning_starts})")
    if errors:
        raise UserError("invalid arguments: " + "; ".join(errors) + ".")


def check_dataset_id(dataset_id: str, overwrite: bool) -> None:
    """A valid, new (or --overwrite) id with a namespace: iql.py and cql.py read ids containing '/' verbatim."""
    try:
        namespace, _, _ = minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except Exception:
        namespace = None
    if namespace is None:
        raise UserError(
            f"--dataset-id '{dataset_id}' is not a namespaced Minari id: use the form namespace/name-v<version> "
            "with letters, digits, '-' and '_', e.g. local/pendulum/medium-v0"
        )
    path = minari.storage.get_dataset_path(dataset_id)
    if path.exists() and not overwrite:
        raise UserError(
            f"dataset {dataset_id} already exists ({path}). Choose another --dataset-id (e.g. bump the version) "
            "or pass --overwrite to replace it."
        )


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file and rename: a crash leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_teacher(run_dir: Path, actor: SACActor, env: gym.Env, args: Args, dataset_id: str, returns) -> dict:
    """teacher.pt: the actor in the layout iql.py checkpoints use for acting (identity observation normalization,
    action bounds), plus the env spec, so `--policy checkpoint --checkpoint <run>` needs nothing else."""
    obs_dim = gym.spaces.flatdim(env.observation_space)
    ckpt = {
        "algo": ALGO,
        "env_id": env.spec.id,
        "env_spec": env.spec.to_json(),
        "minari_id": dataset_id,
        "step": args.teacher_steps,
        "args": dataclasses.asdict(args),
        "actor": {k: v.cpu() for k, v in actor.state_dict().items()},
        "normalization": {
            "obs_mean": torch.zeros(obs_dim),
            "obs_std": torch.ones(obs_dim),
            "action_low": torch.as_tensor(env.action_space.low, dtype=torch.float32),
            "action_high": torch.as_tensor(env.action_space.high, dtype=torch.float32),
        },
        "train_returns": [float(r) for r in returns],
    }
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "teacher.pt", buffer.getvalue())
    except OSError as e:
        raise UserError(f"cannot write the teacher checkpoint in {run_dir}: {e}. Choose another --output.") from e
    return ckpt


def write_dataset(dataset_id, episodes, env, ref, algorithm_name, description, overwrite) -> minari.MinariDataset:
    """create_dataset_from_buffers with the env spec as collection and evaluation env; a failed write leaves no
    half-written dataset behind."""
    path = minari.storage.get_dataset_path(dataset_id)
    backup = path.with_name(f".{path.name}.replaced-{os.getpid()}")  # hidden: Minari's listing skips it
    if overwrite and path.exists():
        path.rename(backup)  # the old dataset stays whole until the new one is complete
    try:
        with warnings.catch_warnings():  # author / email / code permalink are optional metadata
            warnings.simplefilter("ignore")
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                episodes,
                env=env,
                eval_env=env.spec,
                algorithm_name=algorithm_name,
                description=description,
                ref_min_score=ref[0],
                ref_max_score=ref[1],
                num_episodes_average_score=ref[2],
            )
    except BaseException:  # including an interruption (Interrupted, KeyboardInterrupt): no partial dataset
        STOP.deferred = True  # a second signal must not cut the clean-up short
        try:
            shutil.rmtree(path, ignore_errors=True)
            if backup.exists():
                backup.rename(path)
        finally:
            STOP.deferred = False
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return dataset


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name} was asked for but is not available on this machine")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def load_training_state(args: Args, argv: list) -> tuple:
    """--resume: the run folder, its checkpoint and the run's own arguments (only --device may change)."""
    path = Path(args.resume)
    path = path / TRAINING_STATE if path.is_dir() else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = Args(**ckpt["args"])
    except Exception as e:
        raise UserError(
            f"--resume {args.resume}: not a collect.py --policy sac run folder with a readable {TRAINING_STATE} "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if ckpt.get("algo") != ALGO + "-training":
        raise UserError(f"--resume {args.resume}: {path} is not a collect.py teacher training checkpoint")
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")} - {"resume", "device"}
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in sorted(given))
        raise UserError(f"a resumed run keeps its arguments; only --device may be given with --resume, not {flags}")
    return dataclasses.replace(saved, resume=args.resume, device=args.device), ckpt, path.parent


def main(argv: list) -> minari.MinariDataset:
    args = tyro.cli(Args, args=argv, description=__doc__)
    state, run_dir = None, None
    if args.resume:
        args, state, run_dir = load_training_state(args, argv)
        argv = state["argv"]  # the dataset's description quotes the original command
    validate(args)
    if args.resume is None and args.policy != "sac" and args.checkpoint_every != Args.checkpoint_every:
        raise UserError("--checkpoint-every is for --policy sac (the teacher's training)")
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint) if args.policy == "checkpoint" else None
    if args.env is None and ckpt is None:
        raise UserError("give the env to record with --env (e.g. --env Pendulum-v1)")
    env = make_env(args.env if args.env is not None else checkpoint_env_spec(ckpt), args.max_episode_steps)
    env_name = env.spec.name.lower()
    policy_name = f"sac-{args.sac_data}" if args.policy == "sac" else args.policy
    dataset_id = args.dataset_id or f"local/{env_name}/{policy_name}-v0"
    check_dataset_id(dataset_id, args.overwrite)
    if args.policy == "sac":
        run_dir = run_dir or Path(args.output) / f"{env.spec.id}__{ALGO}__{args.seed}__{int(time.time())}"
        RESUME_HINT.update(argv=list(argv), dataset_id=dataset_id)

    # TRY NOT TO MODIFY: seeding
    seed_everything(args.seed)

    # The random policy's mean return (ref_min_score) first: a --ref-max-score below it fails before any training
    ref_seeds = episode_seeds(args.seed, 1, args.ref_episodes)
    ref_min = float(rollout(env, Behaviour(env, seed=args.seed + 1), ref_seeds, desc="random reference")[1].mean())
    if args.ref_max_score is not None and args.ref_max_score <= ref_min:
        raise UserError(
            f"--ref-max-score {args.ref_max_score} must exceed the random policy's mean return {ref_min:.1f}"
        )

    # Behaviour policy: the best noise-free actor we have (None = uniform), then the data episodes
    episodes, best, source = [], None, args.policy
    if ckpt is not None:
        best = checkpoint_policy(ckpt, env, device)
        source = f"{ckpt['algo']} checkpoint {checkpoint_path(args.checkpoint)}"
    elif args.policy == "sac":
        t0 = time.time()
        actor, replay, train_returns = train_teacher(env, args, device, run_dir, state)
        teacher = save_teacher(run_dir, actor, env, dataclasses.replace(args, resume=None), dataset_id, train_returns)
        RESUME_HINT["text"] = (
            f"The teacher is trained: python collect.py --resume {run_dir} records the dataset without training."
        )
        best = checkpoint_policy(teacher, env, device)  # acts exactly as a later --policy checkpoint will
        print(f"SAC teacher: {args.teacher_steps} steps in {time.time() - t0:.0f} s, saved {run_dir / 'teacher.pt'}")
        source = f"SAC teacher ({args.teacher_steps} steps, {run_dir / 'teacher.pt'})"
        if args.sac_data in ("replay", "both"):
            episodes += replay
    if args.policy != "sac" or args.sac_data in ("final", "both"):
        behaviour = Behaviour(env, best, args.action_noise, args.epsilon, seed=args.seed)
        print(f"recording {args.episodes} episodes of {env.spec.id}", flush=True)
        new, _ = rollout(env, behaviour, episode_seeds(args.seed, 0, args.episodes), desc="recording")
        episodes += new
    if not episodes:
        raise UserError(f"no complete episode in {args.teacher_steps} teacher steps: raise --teacher-steps")

    # Reference scores for minari.get_normalized_score, measured on the evaluation env (= the collection env)
    best_return = None
    if best is not None:
        best_seeds = episode_seeds(args.seed, 2, args.ref_episodes)
        best_return = float(rollout(env, Behaviour(env, best), best_seeds, desc="best-policy reference")[1].mean())
    ref_max = args.ref_max_score if args.ref_max_score is not None else best_return
    if ref_max is not None and ref_max <= ref_min:
        print(
            f"warning: the {source} (mean return {ref_max:.1f}) is no better than random ({ref_min:.1f}); the "
            "dataset gets no reference scores. Train longer, or pass --ref-max-score."
        )
        ref_max = None
    elif ref_max is None:
        print("note: random data has no expert reference; pass --ref-max-score to enable normalized scores.")
    ref = (ref_min, ref_max, args.ref_episodes) if ref_max is not None else (None, None, args.ref_episodes)

    # Dataset
    returns = np.array([float(np.sum(ep.rewards)) for ep in episodes])
    steps = sum(len(ep.rewards) for ep in episodes)
    noisy = args.action_noise or args.epsilon
    degraded = f", action noise {args.action_noise}, epsilon {args.epsilon}" if noisy else ""
    sac_kind = {"final": "rollouts of its final policy", "replay": "its complete training episodes"}
    sac_kind["both"] = f"{sac_kind['replay']} and {sac_kind['final']}"
    kind = {"random": "uniform random actions", "checkpoint": source, "sac": f"{source}: {sac_kind[args.sac_data]}"}
    algorithm_name = f"collect.py: {kind[args.policy]}{degraded}"
    max_text = "--ref-max-score" if args.ref_max_score is not None else f"the noise-free {source}"
    description = args.description or (
        f"{len(episodes)} episodes ({steps} steps) of {env.spec.id} recorded by collect.py with "
        f"{kind[args.policy]}{degraded}. Reference scores: "
        + (f"random policy {ref[0]:.2f}, {max_text} {ref[1]:.2f} " if ref[1] is not None else "none ")
        + f"(means over {args.ref_episodes} episodes). Command: python collect.py {shlex.join(argv)}"
    )
    dataset = write_dataset(dataset_id, episodes, env, ref, algorithm_name, description, args.overwrite)
    env.close()
    score = "no reference scores"
    if ref[1] is not None:
        normalized = np.mean(minari.get_normalized_score(dataset, returns)) * 100
        score = f"normalized score {normalized:.1f} (reference returns: random {ref[0]:.1f}, max {ref[1]:.1f})"
    print(
        f"dataset {dataset_id}: {len(episodes)} episodes, {steps} steps, return {returns.mean():.1f} +- "
        f"{returns.std():.1f}, {score}; stored in {minari.storage.get_dataset_path(dataset_id)}"
    )
    if args.policy == "sac":
        summary = {"dataset_id": dataset_id, "teacher_return": best_return, "random_return": ref_min}
        summary |= {"data_return": float(returns.mean()), "episodes": len(episodes), "steps": steps}
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return dataset


if __name__ == "__main__":
    STOP.install()  # SIGINT/SIGTERM: a checkpoint mid-training, no partial dataset ever (see StopSignal)
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        hint = RESUME_HINT["text"] or "Nothing was saved; run the same command again."
        print(f"\ninterrupted ({name}); no dataset was written. {hint}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
