"""Record a Minari dataset from any Gymnasium env with continuous (Box) actions, offline, in one file.

Behaviour policies (`--policy`): `random` (uniform actions); `checkpoint`, the deterministic actor of an algorithm
script's checkpoint (any of iql.py, cql.py, ..., dt.py), a collect.py teacher or an exported policy (dt.py's too),
optionally degraded with Gaussian noise and epsilon-random actions; `sac`, a compact online SAC teacher (Haarnoja et
al., "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905) whose training episodes and/or final-policy
rollouts become the data; its actor is saved as <run>/teacher.pt, and an interrupted run goes on with `--resume <run>`.
Episodes go straight into Minari EpisodeBuffers (T+1 observations; a time limit is a truncation, never a termination),
without minari[create] or jax. The dataset stores its evaluation env and the reference scores of
`minari.get_normalized_score`: random's and the best policy's mean returns.
Usage: README.md, sections "Offline quickstart" and "Recording datasets".
"""

import contextlib
import ctypes
import dataclasses
import errno
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
from functools import partial
from pathlib import Path
from types import SimpleNamespace
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

import policy as policy_tool
from common import BatchedLinear, get_rng_states, seed_everything, set_rng_states, soft_update

with contextlib.redirect_stderr(io.StringIO()):  # registers PointMaze, AntMaze, Adroit, ...; hides its notice
    import gymnasium_robotics  # that Adroit v1 dense rewards changed in gymnasium-robotics 1.2.1

    gym.register_envs(gymnasium_robotics)

ALGO = "collect-sac"  # the "algo" of the teacher.pt checkpoints this script writes
TRAINING_STATE = "teacher_training.pt"  # what --resume reads; its algo is ALGO + "-training"


@dataclass
class Args:
    env: str | None = None
    """Gymnasium env id (Pendulum-v1, HalfCheetah-v5, ...); with --policy checkpoint, default: the checkpoint's env"""
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
    """--policy checkpoint: a run folder or checkpoint of an algorithm script (any of iql.py, cql.py, ..., dt.py), a
    collect.py teacher.pt, or a policy file written by policy.py export (.pt2; give --env with it)"""
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
    """CPU threads of torch: small networks gain little from more (on a busy 2-core machine 2 were 20-70x slower)"""

    # SAC teacher: CleanRL's sac_continuous_action.py defaults, but 1000 random steps and an actor step every step
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
    """--policy sac: teacher steps between writes of <run>/teacher_training.pt (also at the end and on a signal)"""
    resume: str | None = None
    """finish an interrupted --policy sac run (its folder) as it would have ended; only --device may change"""


class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM (args[0]): unwind (no partial dataset is left), exit 128 + signal; `except Exception` skips it."""


# A signal is only recorded while `deferred` (the training loop ends its step and checkpoints), else raised at once
STOP = SimpleNamespace(signum=None, deferred=False, hint="")  # hint: how to go on after an interruption


def on_signal(signum: int, frame) -> None:
    STOP.signum = signum
    if not STOP.deferred:
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred():
    STOP.deferred = True
    try:
        yield
    finally:
        STOP.deferred = False


# ---- ALGO LOGIC: the SAC teacher (twin critics, target critics, tanh-Gaussian actor, automatic entropy tuning) -----
def hidden_layers(in_dim: int, hidden: int, n_hidden: int, linear=nn.Linear) -> list:
    dims = [in_dim] + [hidden] * n_hidden
    return [layer for i, o in zip(dims[:-1], dims[1:], strict=True) for layer in (linear(i, o), nn.ReLU())]


class SACActor(nn.Module):
    """pi(a|s) = tanh(N(mean(s), std(s)^2)); acting deterministically: tanh(mean(s)). This layout (trunk, mean,
    log_std) is what teacher.pt stores and teacher_policy rebuilds."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        self.trunk = nn.Sequential(*hidden_layers(obs_dim, hidden, n_hidden))
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def sample(self, obs: torch.Tensor) -> tuple:
        """a = tanh(u), u ~ N(mean, std^2) (reparameterized); log pi(a|s) with the tanh change of variables,
        log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) written stably (SAC paper, appendix C)."""
        h = self.trunk(obs)
        mean, log_std = self.mean(h), self.log_std(h).clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)
        u = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob


class TwinQ(nn.Module):
    """Both critics in one module: every layer is one batched matmul over the 2 critics. Output (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        linear = partial(BatchedLinear, 2)
        self.net = nn.Sequential(*hidden_layers(obs_dim + act_dim, hidden, n_hidden, linear), linear(hidden, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


class ReplayBuffer:
    """The teacher's transitions in a ring of `size`, flat float32, actions in [-1, 1]. `dones` holds terminations
    only: a time limit (truncation) does not end the value of the next state, so a truncated transition bootstraps."""

    def __init__(self, size: int, obs_dim: int, act_dim: int):
        shapes = {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_obs": (obs_dim,), "dones": ()}
        self.size, self.data = size, {k: np.zeros((size, *shape), np.float32) for k, shape in shapes.items()}

    def add(self, step: int, obs, action, reward, next_obs, terminated: bool, truncated: bool) -> None:
        values = (obs, action, reward, next_obs, float(terminated))  # not `terminated or truncated`: see above
        for column, value in zip(self.data.values(), values, strict=True):
            column[step % self.size] = value

    def batch(self, idx: np.ndarray, device) -> tuple:  # (obs, actions, rewards, next_obs, dones) as tensors
        return tuple(torch.as_tensor(column[idx], device=device) for column in self.data.values())


@torch.no_grad()
def td_target(actor, target_critic, alpha, rewards, next_obs, dones, discount: float) -> torch.Tensor:
    """Soft Bellman target y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s')."""
    next_actions, next_log_prob = actor.sample(next_obs)
    next_q = target_critic(next_obs, next_actions).min(dim=0).values - alpha * next_log_prob
    return rewards + discount * (1.0 - dones) * next_q


def sac_actor_loss(q: torch.Tensor, log_prob: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """E[alpha log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s) reparameterized."""
    return (alpha * log_prob - q.min(dim=0).values).mean()


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """Automatic entropy tuning: alpha grows while the policy's entropy -E[log pi] is below the target -|A|."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class SAC(nn.Module):
    """The teacher: actor, twin critics, their Polyak copy and log alpha (the entropy temperature), with optimizers."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device):
        super().__init__()
        self.actor = SACActor(obs_dim, act_dim, args.hidden_dim, args.n_hidden)
        self.critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden)
        self.target_critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden).requires_grad_(False)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.log_alpha = nn.Parameter(torch.zeros(1))
        self.to(device)
        self.opts = {"actor": torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)}
        self.opts |= {"critic": torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)}
        self.opts |= {"alpha": torch.optim.Adam([self.log_alpha], lr=args.critic_lr)}
        self.discount, self.tau, self.target_entropy = args.discount, args.tau, -float(act_dim)

    def critic_step(self, batch: tuple, alpha: torch.Tensor) -> None:
        """Both critics regress on the soft TD target (squared error, mean over the batch, sum over the critics)."""
        obs, actions, rewards, next_obs, dones = batch
        target = td_target(self.actor, self.target_critic, alpha, rewards, next_obs, dones, self.discount)
        optimize(self.opts["critic"], ((self.critic(obs, actions) - target) ** 2).mean(dim=1).sum())

    def actor_step(self, obs: torch.Tensor, alpha: torch.Tensor) -> None:
        """The actor against the critics (frozen: they pass the gradient on, take none), then the temperature."""
        actions, log_prob = self.actor.sample(obs)
        self.critic.requires_grad_(False)
        optimize(self.opts["actor"], sac_actor_loss(self.critic(obs, actions), log_prob, alpha))
        self.critic.requires_grad_(True)
        optimize(self.opts["alpha"], temperature_loss(self.log_alpha, log_prob, self.target_entropy))

    def update(self, batch: tuple) -> None:
        """One SAC step, in CleanRL's order: critics, then actor and temperature on the updated critics, Polyak."""
        alpha = self.log_alpha.exp().detach()
        self.critic_step(batch, alpha)
        self.actor_step(batch[0], alpha)
        soft_update(self.target_critic, self.critic, self.tau)


# ---- Environment, Minari ids ------------------------------------------------------------------------------------
def make_env(env: str | gym.envs.registration.EnvSpec, max_episode_steps: int | None) -> gym.Env:
    """gym.make (its errors suggest close matches for unknown ids), then: Box actions and observations, a time limit."""
    try:
        made = gym.make(env, **({"max_episode_steps": max_episode_steps} if max_episode_steps else {}))
    except Exception as e:
        raise UserError(f"cannot create env {getattr(env, 'id', env)}: {type(e).__name__}: {str(e)[:300]}") from e
    name, space, obs_space = made.spec.id, made.action_space, made.observation_space
    if not isinstance(space, gym.spaces.Box):
        raise UserError(
            f"env {name} has a {type(space).__name__} action space; collect.py (and the algorithm scripts) need "
            "continuous actions in a Box (e.g. Pendulum-v1, MountainCarContinuous-v0)"
        )
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise UserError(f"env {name} has an unbounded action space {space}: uniform actions are undefined")
    if not all(isinstance(s, gym.spaces.Box) for s in getattr(obs_space, "spaces", {"": obs_space}).values()):
        raise UserError(f"env {name} has observations {obs_space}: only Box and Dict of Box are supported")
    if made.spec.max_episode_steps is None:
        raise UserError(f"env {name} has no time limit, so an episode might never end: pass --max-episode-steps")
    return made


def check_minari_id(dataset_id: str, what: str, namespaced: bool = False) -> str:
    """Minari's own parser says what an id is (which also keeps paths such as ../../x out of the dataset store).
    A new dataset needs a namespace: the algorithm scripts read an id verbatim only if it contains '/'."""
    try:
        valid = minari.dataset.minari_dataset.parse_dataset_id(dataset_id)[0] is not None or not namespaced
    except Exception:  # ValueError; TypeError for an id without a version
        valid = False
    if not valid:
        raise UserError(
            f"{what} '{dataset_id}' is not a valid Minari dataset id: ids look like namespace/name-v<N>"
            f"{'' if namespaced else ' (or name-v<N>)'} of letters, digits, '-' and '_', e.g. local/pendulum/medium-v0"
        )
    return dataset_id


def flatten(space: gym.Space, obs) -> np.ndarray:
    """One observation -> flat float32, dict keys in the space's order (as FlattenObservation in iql.py)."""
    return gym.spaces.flatten(space, obs).astype(np.float32)


def to_env_action(space: gym.spaces.Box, a: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [low, high], affinely: policies act in [-1, 1] whatever the env's bounds."""
    return (space.low + (a + 1.0) * 0.5 * (space.high - space.low)).astype(space.dtype)


def episode_seeds(seed: int, stream: int, n: int) -> list:
    """Reset seeds of n episodes, independent streams for the data, the random and the best-policy references."""
    return [int(s) for s in np.random.SeedSequence([seed, stream]).generate_state(n)]


# ---- Behaviour policies: an actor maps a flat observation to an action in [-1, 1] --------------------------------
def behaviour(env: gym.Env, actor=None, noise: float = 0.0, epsilon: float = 0.0, seed: int = 0):
    """(env observation, the reward of the step before, None at an episode's start) -> env action: the actor's action
    (uniform if there is no actor), with probability epsilon a uniform action instead, plus N(0, noise^2) in [-1, 1]
    units, clipped, then mapped to [low, high]. The actor sees every observation and reward (dt.py's keeps them)."""
    rng, space = np.random.default_rng(seed), env.action_space

    def act(obs, reward: float | None = None) -> np.ndarray:
        a = None if actor is None else actor(flatten(env.observation_space, obs), reward).reshape(space.shape)
        if actor is None or rng.random() < epsilon:
            return to_env_action(space, rng.uniform(-1.0, 1.0, space.shape))
        if noise > 0:
            a = np.clip(a + noise * rng.standard_normal(space.shape), -1.0, 1.0)
        return to_env_action(space, a)

    return act


def load_checkpoint(path: str, names: tuple, algos: tuple | None, keys: tuple, what: str) -> tuple:
    """(checkpoint, file): `path` or the first of `names` in it, of one of `algos` (None: any); weights_only=True, so a
    checkpoint cannot run code."""
    found = [p for p in (Path(path), *(Path(path) / name for name in names)) if p.is_file()]
    if not found:
        raise UserError(f"{path}: no such file, nor a folder with {' or '.join(names)}; {what} was expected")
    try:
        ckpt = torch.load(found[0], map_location="cpu", weights_only=True)
    except Exception as e:
        error = f"{type(e).__name__}: {str(e)[:200]}"
        raise UserError(f"{found[0]} is not a readable PyTorch checkpoint; truncated or damaged? ({error})") from e
    if not isinstance(ckpt, dict) or algos is not None and ckpt.get("algo") not in algos or not set(keys) <= set(ckpt):
        raise UserError(f"{found[0]} is not {what} ({list(ckpt)[:12] if isinstance(ckpt, dict) else type(ckpt)})")
    return ckpt, found[0]


def registered_env_spec(spec, source: str) -> gym.envs.registration.EnvSpec:
    """An env spec read from a file names the function gym.make calls (its entry point, and its wrappers') and the
    arguments: "os:system" with a command would run it. Only the entry point gymnasium registered under the spec's
    id, without extra wrappers, is made; its arguments (kwargs, the time limit) are the file's."""
    registered = gym.registry.get(getattr(spec, "id", None))
    if registered is None or spec.entry_point != registered.entry_point or spec.additional_wrappers:
        what = "an unregistered env" if registered is None else f"env {spec.id} with entry point {spec.entry_point!r}"
        raise UserError(
            f"{source} names {what}{' and wrappers' if getattr(spec, 'additional_wrappers', ()) else ''}, not an env "
            "as gymnasium registered it: making it would call a function that the file names. Give the env with --env."
        )
    return spec


def checkpoint_env_spec(ckpt: dict) -> gym.envs.registration.EnvSpec:
    """The env a checkpoint was trained for: stored by collect.py; for iql/cql, the eval env of its dataset. Either
    comes from a file: registered_env_spec checks it before anything makes it."""
    if "env_spec" in ckpt:
        try:
            spec = gym.envs.registration.EnvSpec.from_json(ckpt["env_spec"])
        except Exception as e:
            raise UserError(f"the checkpoint's env_spec cannot be read ({type(e).__name__}): give --env") from e
        return registered_env_spec(spec, "the checkpoint")
    dataset_id = check_minari_id(str(ckpt.get("minari_id")), "the checkpoint's dataset")
    local = minari.storage.get_dataset_path(dataset_id)
    if not local.exists():
        raise UserError(f"the checkpoint's dataset {dataset_id} is not in the local store ({local}): pass --env")
    try:  # the env is in metadata.json; reading an episode too tells a damaged copy, as iql.py and cql.py do
        dataset = minari.load_dataset(dataset_id)
        next(dataset.iterate_episodes())
    except Exception as e:
        raise UserError(
            f"the local copy of dataset '{dataset_id}' at {local} is damaged and cannot be read ({type(e).__name__}: "
            f"{str(e)[:200]}). Delete the folder {local} and download it again (or copy it again, completely)."
        ) from e
    # recover_environment(eval_env=True) would make the env before we could look at it: its spec, as Minari reads it
    spec = getattr(dataset, "_eval_env_spec", None) or dataset.env_spec
    return registered_env_spec(spec, f"the checkpoint's dataset {dataset_id}")


def teacher_policy(ckpt: dict, env: gym.Env, device):
    """A teacher.pt's deterministic actor: flat observation -> tanh(mean(s)) in [-1, 1]."""
    space, obs_dim = env.action_space, gym.spaces.flatdim(env.observation_space)
    args = ckpt["args"]
    actor = SACActor(obs_dim, space.shape[0], args["hidden_dim"], args["n_hidden"])
    try:
        actor.load_state_dict(ckpt["actor"])
    except RuntimeError as e:
        raise UserError(
            f"the teacher checkpoint does not fit env {env.spec.id} ({str(e)[:200]}): it was trained for another env"
        ) from None
    actor = actor.to(device).eval()

    @torch.no_grad()
    def act(obs: np.ndarray, reward: float | None = None) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return torch.tanh(actor.mean(actor.trunk(x))).cpu().numpy().astype(np.float64)

    return act


def script_policy(path: str, env: gym.Env):
    """An algorithm script's checkpoint, built by policy.py with the script's own networks and acting functions (dt.py's
    keeps its episode's steps, conditioned on its first target return), as an actor: (flat observation, reward of the
    step before) -> action in [-1, 1]."""
    try:
        module, ckpt, _, script = policy_tool.load_policy(path)
    except Exception as e:
        if type(e).__name__ != "UserError":
            raise
        raise UserError(str(e)) from None
    space, obs_dim = env.action_space, gym.spaces.flatdim(env.observation_space)
    low, high = module.action_low.numpy(), module.action_high.numpy()
    fits = len(module.obs_mean) == obs_dim and low.shape == space.shape
    if not (fits and np.allclose(low, space.low) and np.allclose(high, space.high)):
        raise UserError(
            f"the checkpoint takes observations of size {len(module.obs_mean)} and acts in [{low}, {high}], env "
            f"{env.spec.id} has {obs_dim} and [{space.low}, {space.high}]: it was trained for another env"
        )
    act = next(iter(script.numpy_policies(module, ckpt["normalization"], torch.device("cpu")).values()))
    return unit_actor(act, space)


def exported_policy(path: str, env: gym.Env):
    """A policy file written by policy.py export (torch.export: raw flat observation in, env action out; a sequence
    model's: its window of steps in, kept by its script's context_policy at the file's first target return), as an
    actor: (flat observation, reward of the step before) -> action in [-1, 1]. Read by load_exported_policy and
    policy_info: it cannot run code."""
    space, obs_dim = env.action_space, gym.spaces.flatdim(env.observation_space)
    try:
        policy = policy_tool.load_exported_policy(path)
        info = policy_tool.policy_info(path)
    except policy_tool.PolicyFileError as e:
        raise UserError(str(e)) from e
    if "seq_len" in info:
        try:
            keep_window = policy_tool.import_script(info["algo"], None).context_policy
        except (policy_tool.UserError, AttributeError):
            raise UserError(
                f"{path} is a window policy of {info['algo']}.py (its policy.json), and there is no such script with "
                f"a context_policy beside policy.py to keep its window"
            ) from None
        cpu = torch.device("cpu")
        act = keep_window(policy, info["target_returns"][0], info["seq_len"], space.shape[0], cpu)
    else:

        def act(obs: np.ndarray, rewards: np.ndarray | None) -> np.ndarray:
            return policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()

    try:
        shape = act(np.zeros((1, obs_dim), np.float32), None).shape
    except Exception as e:  # a window policy's file without policy.json takes 4 inputs, not 1
        error = f"{type(e).__name__}: {str(e)[:200]}"
        raise UserError(
            f"{path} is not a policy exported for env {env.spec.id} ({error}); export it again with policy.py export"
        ) from e
    if shape != (1, *space.shape):
        raise UserError(f"{path} acts with shape {tuple(shape)[1:]}, env {env.spec.id} with {space.shape}")
    return unit_actor(act, space)


def unit_actor(act, space: gym.spaces.Box):
    """act(observation batch, rewards of the step before or None) -> env actions, as an actor: (flat observation,
    reward) -> action in [-1, 1]."""

    def actor(obs: np.ndarray, reward: float | None = None) -> np.ndarray:
        action = act(obs[None], None if reward is None else np.array([reward]))[0].astype(np.float64)
        return np.clip(2.0 * (action - space.low) / (space.high - space.low) - 1.0, -1.0, 1.0)

    return actor


# ---- Recording: an episode is a dict of EpisodeBuffer's fields, lists while it is played, then arrays --------------
def new_episode(obs, seed: int | None = None) -> dict:
    return {"seed": seed, "observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}


def add_step(episode: dict, action, next_obs, reward, terminated, truncated) -> None:
    step = (action, next_obs, float(reward), bool(terminated), bool(truncated))
    for key, value in zip(("actions", "observations", "rewards", "terminations", "truncations"), step, strict=True):
        episode[key].append(value)


def finish(episode: dict) -> dict:
    """An episode's lists -> arrays (a dict of arrays for Dict observations)."""
    stack = lambda xs: {k: stack([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else np.stack(xs)
    return {k: v if k == "seed" else stack(v) for k, v in episode.items()}


def rollout(env: gym.Env, policy, seeds: list, desc: str | None = None) -> tuple:
    """One episode per reset seed; returns the episodes and their returns."""
    episodes = []
    for seed in tqdm(seeds, desc=desc, disable=desc is None, leave=False):
        obs, done, reward = env.reset(seed=seed)[0], False, None
        episode = new_episode(obs, seed)
        while not done:
            action = policy(obs, reward)
            obs, reward, terminated, truncated, _ = env.step(action)
            add_step(episode, action, obs, reward, terminated, truncated)
            done = terminated or truncated
        episodes.append(finish(episode))
    return episodes, np.array([float(np.sum(ep["rewards"])) for ep in episodes])


# ---- The teacher's training loop, with checkpoints that --resume continues exactly --------------------------------
def tree_map(fn, x):
    """fn on every leaf of nested dicts and lists: numpy <-> torch for checkpoints read with weights_only=True."""
    if isinstance(x, dict | list):
        return {k: tree_map(fn, v) for k, v in x.items()} if isinstance(x, dict) else [tree_map(fn, v) for v in x]
    return fn(x)


to_torch = partial(tree_map, lambda x: torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x)
to_numpy = partial(tree_map, lambda x: x.numpy() if isinstance(x, torch.Tensor) else x)


def env_snapshot(env: gym.Env) -> dict | None:
    """The whole state of a classic-control env (Pendulum, MountainCarContinuous): `unwrapped.state`, np_random and
    the time limit's count. Other envs (MuJoCo, robotics): None, and --resume restarts their interrupted episode."""
    u = env.unwrapped
    if not (type(u).__module__.startswith("gymnasium.envs.classic_control") and hasattr(u, "state")):
        return None
    snapshot = {"state": torch.from_numpy(u.state.copy()), "np_random": json.dumps(u.np_random.bit_generator.state)}
    return snapshot | {"elapsed_steps": int(env.get_wrapper_attr("_elapsed_steps"))}


def restore_env(env: gym.Env, snapshot: dict) -> None:
    env.reset()  # OrderEnforcing and PassiveEnvChecker want a reset first; all it changed is then set
    env.unwrapped.state = snapshot["state"].numpy().copy()
    env.unwrapped.np_random.bit_generator.state = json.loads(snapshot["np_random"])
    env.set_wrapper_attr("_elapsed_steps", snapshot["elapsed_steps"])


def atomic_save(path: Path, obj) -> None:
    """torch.save (or bytes) to a temporary file, then rename: a crash or a signal leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train_teacher(env: gym.Env, args: Args, device, run_dir: Path, argv: list, state: dict | None = None):
    """Online SAC for args.teacher_steps env steps; returns the actor and every complete training episode. Writes
    <run_dir>/teacher_training.pt every --checkpoint-every steps, at the end and on a signal (then raises Interrupted);
    `state`, such a checkpoint, continues the run: exactly for classic-control envs, else with a restarted episode."""
    obs_space, act_space = env.observation_space, env.action_space
    obs_dim, act_dim = gym.spaces.flatdim(obs_space), act_space.shape[0]
    sac = SAC(obs_dim, act_dim, args, device)
    buffer = ReplayBuffer(min(args.buffer_size, args.teacher_steps), obs_dim, act_dim)
    rng = np.random.default_rng(args.seed)  # actions before learning starts, batch indices
    start, episodes = 0, []
    if state is None:
        episode = new_episode(env.reset(seed=args.seed)[0], args.seed)
    else:
        start, episodes = state["step"], to_numpy(state["episodes"])
        sac.load_state_dict(state["sac"])
        for name, opt in sac.opts.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, column in buffer.data.items():
            column[: min(start, buffer.size)] = state["buffer"][name].numpy()
        rng.bit_generator.state = json.loads(state["rng_actions"])
        set_rng_states(state["rng"], torch.Generator())
        if state["env"] is not None:
            restore_env(env, state["env"])
            episode = to_numpy(state["episode"])
        else:
            seed = int(np.random.SeedSequence([args.seed, 3, start]).generate_state(1)[0])
            episode = new_episode(env.reset(seed=seed)[0], seed)
            print(f"note: env {env.spec.id} cannot be saved mid-episode; the interrupted one restarts (seed {seed})")
    obs = episode["observations"][-1]

    def save(step: int) -> None:
        snapshot = env_snapshot(env)
        ckpt = {"algo": ALGO + "-training", "step": step, "args": dataclasses.asdict(args), "argv": list(argv)}
        ckpt |= {"sac": sac.state_dict(), "optimizers": {name: opt.state_dict() for name, opt in sac.opts.items()}}
        ckpt |= {"buffer": to_torch({k: v[: min(step, buffer.size)] for k, v in buffer.data.items()})}
        ckpt |= {"episodes": to_torch(episodes), "env": snapshot, "episode": to_torch(episode) if snapshot else None}
        ckpt |= {"rng_actions": json.dumps(rng.bit_generator.state), "rng": get_rng_states(torch.Generator())}
        try:
            atomic_save(run_dir / TRAINING_STATE, ckpt)
        except OSError as e:
            tqdm.write(f"warning: teacher checkpoint at step {step} not written ({e}); the previous one is kept")

    pbar = tqdm(range(start, args.teacher_steps), initial=start, total=args.teacher_steps, desc="SAC teacher")
    with signals_deferred():
        for step in pbar:
            if step < args.learning_starts:
                a = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
            else:
                with torch.no_grad():
                    a = sac.actor.sample(torch.as_tensor(flatten(obs_space, obs), device=device))[0].cpu().numpy()
            action = to_env_action(act_space, a)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(step, flatten(obs_space, obs), a, reward, flatten(obs_space, next_obs), terminated, truncated)
            add_step(episode, action, next_obs, reward, terminated, truncated)
            obs = next_obs
            if terminated or truncated:
                episodes.append(finish(episode))
                pbar.set_postfix(episodes=len(episodes), last_return=f"{np.sum(episode['rewards']):.1f}")
                obs, _ = env.reset()
                episode = new_episode(obs)
            if step >= args.learning_starts:
                idx = rng.integers(0, min(step + 1, buffer.size), args.batch_size)
                sac.update(buffer.batch(idx, device))
            if STOP.signum is not None or (step + 1) % args.checkpoint_every == 0 or step + 1 == args.teacher_steps:
                save(step + 1)
            if STOP.signum is not None:
                pbar.close()
                STOP.hint = f"Teacher saved at step {step + 1}. Resume with: python collect.py --resume {run_dir}"
                raise Interrupted(STOP.signum)
    return sac.actor.eval(), episodes


def save_teacher(run_dir: Path, actor: SACActor, env: gym.Env, args: Args, dataset_id: str, episodes: list) -> dict:
    """teacher.pt: the actor in the layout iql.py checkpoints use for acting (identity observation normalization,
    action bounds), plus the env spec, so `--policy checkpoint --checkpoint <run>` needs nothing else."""
    obs_dim, space = gym.spaces.flatdim(env.observation_space), env.action_space
    norm = {"obs_mean": torch.zeros(obs_dim), "obs_std": torch.ones(obs_dim)}
    norm |= {"action_low": torch.as_tensor(space.low).float(), "action_high": torch.as_tensor(space.high).float()}
    ckpt = {"algo": ALGO, "env_id": env.spec.id, "env_spec": env.spec.to_json(), "minari_id": dataset_id}
    ckpt |= {"step": args.teacher_steps, "args": dataclasses.asdict(args), "normalization": norm}
    ckpt |= {"actor": {k: v.cpu() for k, v in actor.state_dict().items()}}
    ckpt |= {"train_returns": [float(np.sum(ep["rewards"])) for ep in episodes]}
    try:
        atomic_save(run_dir / "teacher.pt", ckpt)
    except OSError as e:
        raise UserError(f"cannot write the teacher checkpoint in {run_dir}: {e}. Choose another --output.") from e
    return ckpt


# ---- TRY NOT TO MODIFY: arguments, resume, dataset writing ----------------------------------------------------------
def validate(args: Args) -> None:
    sac, noisy = args.policy == "sac", args.action_noise > 0 or args.epsilon > 0
    positive = ["max_episode_steps", "ref_episodes", "teacher_steps", "batch_size", "buffer_size", "actor_lr"]
    positive += ["critic_lr", "hidden_dim", "n_hidden", "threads", "checkpoint_every"]
    errors = [f"{name} must be > 0" for name in positive if (v := getattr(args, name)) is not None and v <= 0]
    checks = [
        (args.episodes > 0 or (sac and args.sac_data == "replay"), "episodes must be > 0"),
        (args.action_noise >= 0 and 0 <= args.epsilon <= 1, "action_noise must be >= 0, epsilon in [0, 1]"),
        (0 <= args.discount <= 1 and 0 < args.tau <= 1, "discount must be in [0, 1], tau in (0, 1]"),
        (args.policy != "checkpoint" or args.checkpoint, "--policy checkpoint needs --checkpoint PATH"),
        (args.policy == "checkpoint" or not args.checkpoint, f"--checkpoint is not used by --policy {args.policy}"),
        (sac or args.checkpoint_every == Args.checkpoint_every, "--checkpoint-every is for --policy sac"),
        (not sac or args.teacher_steps > args.learning_starts >= 0, "learning_starts must be in [0, teacher_steps)"),
        (
            not noisy or args.policy == "checkpoint" or (sac and args.sac_data != "replay"),
            "--action-noise and --epsilon degrade a policy's rollouts; random or replay data has none",
        ),
    ]
    if errors := errors + [message for ok, message in checks if not ok]:
        raise UserError("invalid arguments: " + "; ".join(errors) + ".")


def parse_args(argv: list) -> tuple:
    """Args from the command line; with --resume the run's own (only --device may change), its state and folder."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.resume is None:
        return args, None, None
    what = "the training checkpoint of a collect.py --policy sac run"
    state, path = load_checkpoint(args.resume, (TRAINING_STATE,), (ALGO + "-training",), ("args", "argv"), what)
    try:
        saved = Args(**state["args"])
    except Exception as e:
        raise UserError(f"--resume {args.resume}: its arguments cannot be read ({type(e).__name__}: {e})") from e
    given = tyro.cli(Args, args=argv, default=saved, description=__doc__)
    changed = [f.name for f in dataclasses.fields(Args) if getattr(given, f.name) != getattr(saved, f.name)]
    if changed := [f"--{name.replace('_', '-')}" for name in changed if name not in ("resume", "device")]:
        raise UserError(f"a resumed run keeps its arguments: only --device may be given with --resume, not {changed}")
    return given, state, path.parent


def process_alive(pid: int) -> bool:
    """Whether another process with this id runs (elsewhere than POSIX: assumed so, nothing is cleaned)."""
    if os.name != "posix" or pid == os.getpid():  # our own id: a previous process's (containers reuse ids)
        return os.name != "posix"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def clean_leftovers(path: Path) -> None:
    """What a killed write_dataset left beside the dataset: its staging folder goes, after the dataset it had moved
    aside goes back under the id if the kill came between swap_in's two renames. Folders of running processes stay."""
    for staging in sorted(path.parent.glob(f".{path.name}.new-*")):
        pid = staging.name.rpartition("-")[2]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if not path.exists() and (staging / "replaced").is_dir():
            os.rename(staging / "replaced", path)
            print(f"note: put back dataset {path}, which a killed collect.py (process {pid}) had moved aside")
        shutil.rmtree(staging, ignore_errors=True)
        print(f"note: removed {staging}, the unfinished write of a killed collect.py (process {pid})")
    for backup in sorted(path.parent.glob(f".{path.name}.replaced-*")):  # an earlier collect.py's --overwrite
        if not path.exists():
            os.rename(backup, path)
            print(f"note: put back dataset {path} from {backup.name}, left by an interrupted collect.py --overwrite")
        else:
            print(
                f"warning: {backup} holds the dataset that an interrupted collect.py --overwrite replaced; the one "
                f"at {path} may be incomplete. Keep one of them (check with minari.load_dataset) and delete the other."
            )


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP); False where the
    system or the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform in ("linux", "darwin") else None
    if hasattr(libc, "renameat2"):
        done = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    elif hasattr(libc, "renamex_np"):
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2) == 0  # RENAME_SWAP
    else:
        return False
    if not done and ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))
    return done


def swap_in(staged: Path, path: Path, aside: Path, overwrite: bool) -> None:
    """The whole new dataset under its id in one step: a rename, or an exchange with the old one, so that a kill at
    any moment leaves the old or the new dataset there. Without an exchange (Windows, some file systems) the old
    one moves `aside` (into the staging folder) first, and clean_leftovers puts it back if a kill comes in between."""
    if overwrite and path.exists():
        if exchange(staged, path):
            return
        os.rename(path, aside)
    try:
        os.rename(staged, path)  # fails if another process wrote a dataset under the id meanwhile
    except OSError as e:
        raise UserError(f"dataset {path} was written by another process while this one recorded ({e})") from e


def dataset_bytes(episodes: list) -> int:
    """A generous estimate of a dataset's size on disk: 8 bytes a number, 16 KiB an episode (HDF5's groups)."""
    count = lambda x: sum(map(count, x.values())) if isinstance(x, dict) else np.size(x)  # noqa: E731
    return sum(8 * count({k: v for k, v in ep.items() if k != "seed"}) + 16_384 for ep in episodes)


def write_dataset(dataset_id: str, episodes: list, env: gym.Env, overwrite: bool, **metadata):
    """create_dataset_from_buffers (the env spec as collection and evaluation env) into a hidden staging folder beside
    the dataset's (Minari's listing skips it), flushed to disk, then swap_in: a failed, interrupted or killed write
    leaves the old dataset (or none) under the id, never part of one. A kill leaves the staging folder behind for the
    next run's clean_leftovers."""
    path = minari.storage.get_dataset_path(dataset_id)
    namespace = minari.dataset.minari_dataset.parse_dataset_id(dataset_id)[0]
    with contextlib.suppress(ValueError):  # created by another process meanwhile
        if namespace not in minari.namespace.list_local_namespaces():
            minari.namespace.create_namespace(namespace)  # in the store, not only in the staging folder
    needed, free = dataset_bytes(episodes), shutil.disk_usage(path.parent).free
    if needed > free:  # HDF5 can crash the process when a write fails (h5py 3, a segmentation fault on close)
        raise UserError(
            f"dataset {dataset_id} needs about {needed / 2**20:.0f} MiB and {path.parent} has {free / 2**20:.0f} MiB "
            "free: make room, or record into another store (MINARI_DATASETS_PATH=<folder on a larger disk>)"
        )
    staging, store = path.parent / f".{path.name}.new-{os.getpid()}", os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(staging)
        with warnings.catch_warnings():  # author / email / code permalink are optional metadata
            warnings.simplefilter("ignore")
            buffers = [EpisodeBuffer(**ep, infos={}) for ep in episodes]
            minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env.spec, **metadata)
        for file in (staging / dataset_id).rglob("*"):  # on disk before it replaces the old one
            if file.is_file() and os.name == "posix":
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        with signals_deferred():  # a signal now would only leave the old dataset in the staging folder
            swap_in(staging / dataset_id, path, staging / "replaced", overwrite)
    except OSError as e:  # a full disk, say
        raise UserError(
            f"cannot write dataset {dataset_id} in {path.parent} ({e}); nothing under the id changed"
        ) from e
    finally:
        os.environ.pop("MINARI_DATASETS_PATH") if store is None else os.environ.update(MINARI_DATASETS_PATH=store)
        with signals_deferred():  # a second signal must not cut the clean-up short
            shutil.rmtree(staging, ignore_errors=True)  # what is left of a failed write, or the replaced dataset
    return minari.load_dataset(dataset_id)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv: list) -> minari.MinariDataset:
    STOP.signum, STOP.hint = None, "Nothing was saved; run the same command again."
    args, state, run_dir = parse_args(argv)
    argv = state["argv"] if state else argv  # the dataset's description quotes the original command
    validate(args)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = next(name for name, ok in available.items() if ok) if args.device == "auto" else args.device
    if not available[device]:
        raise UserError(f"--device {device} was asked for but is not available on this machine")
    torch.set_num_threads(args.threads)
    ckpt, ckpt_path = None, None
    exported = args.policy == "checkpoint" and str(args.checkpoint).endswith(".pt2")
    if exported and args.env is None:
        raise UserError(f"{args.checkpoint} is an exported policy: give the env it acts in with --env")
    if args.policy == "checkpoint" and not exported:
        names, what = ("teacher.pt", "checkpoints/last.pt"), "an algorithm script's or collect.py's actor checkpoint"
        ckpt, ckpt_path = load_checkpoint(args.checkpoint, names, None, ("actor", "normalization"), what)
    if args.env is None and ckpt is None:
        raise UserError("give the env to record with --env (e.g. --env Pendulum-v1)")
    env = make_env(args.env if args.env is not None else checkpoint_env_spec(ckpt), args.max_episode_steps)
    default_id = f"local/{env.spec.name.lower()}/{f'sac-{args.sac_data}' if args.policy == 'sac' else args.policy}-v0"
    dataset_id = check_minari_id(args.dataset_id or default_id, "--dataset-id", namespaced=True)
    clean_leftovers(path := minari.storage.get_dataset_path(dataset_id))
    if path.exists() and not args.overwrite:
        raise UserError(
            f"dataset {dataset_id} already exists ({path}). Choose another --dataset-id (e.g. bump the version) "
            "or pass --overwrite to replace it."
        )
    if args.policy == "sac":
        run_dir = run_dir or Path(args.output) / f"{env.spec.id}__{ALGO}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: seeding
    seed_everything(args.seed)

    # Behaviour policy: the best noise-free actor we have (None = uniform; a checkpoint's or a file's is built, and
    # refused, before any episode runs), then the data episodes
    episodes, best, source, data = [], None, "uniform random actions", ""
    if ckpt is not None:
        actor = teacher_policy(ckpt, env, device) if ckpt["algo"] == ALGO else script_policy(str(ckpt_path), env)
        best, source = actor, f"{ckpt['algo']} checkpoint {ckpt_path}"
    elif exported:
        best, source = exported_policy(args.checkpoint, env), f"exported policy {args.checkpoint}"

    # The random policy's mean return (ref_min_score): a --ref-max-score below it fails before any training
    ref_seeds = episode_seeds(args.seed, 1, args.ref_episodes)
    ref_min = float(rollout(env, behaviour(env, seed=args.seed + 1), ref_seeds, "random reference")[1].mean())
    if args.ref_max_score is not None and args.ref_max_score <= ref_min:
        raise UserError(f"--ref-max-score {args.ref_max_score} must exceed the random policy's return {ref_min:.1f}")

    if args.policy == "sac":
        t0 = time.time()
        actor, replay = train_teacher(env, args, device, run_dir, argv, state)
        teacher = save_teacher(run_dir, actor, env, dataclasses.replace(args, resume=None), dataset_id, replay)
        STOP.hint = f"Teacher trained: python collect.py --resume {run_dir} records the dataset without training again."
        best = teacher_policy(teacher, env, device)  # acts exactly as a later --policy checkpoint will
        source = f"SAC teacher ({args.teacher_steps} steps, {run_dir / 'teacher.pt'})"
        print(f"{source}: trained in {time.time() - t0:.0f} s")
        kinds = {"replay": ["its complete training episodes"], "final": ["rollouts of its final policy"]}
        data = ": " + " and ".join(kinds.get(args.sac_data, kinds["replay"] + kinds["final"]))
        episodes += replay if args.sac_data != "final" else []
    if args.policy != "sac" or args.sac_data != "replay":
        policy = behaviour(env, best, args.action_noise, args.epsilon, seed=args.seed)
        print(f"recording {args.episodes} episodes of {env.spec.id}", flush=True)
        episodes += rollout(env, policy, episode_seeds(args.seed, 0, args.episodes), "recording")[0]
    if not episodes:
        raise UserError(f"no complete episode in {args.teacher_steps} teacher steps: raise --teacher-steps")

    # Reference scores for minari.get_normalized_score, measured on the evaluation env (= the collection env)
    best_seeds, best_return = episode_seeds(args.seed, 2, args.ref_episodes), None
    if best is not None:
        best_return = float(rollout(env, behaviour(env, best), best_seeds, "best-policy reference")[1].mean())
    ref_max = args.ref_max_score if args.ref_max_score is not None else best_return
    if ref_max is not None and ref_max <= ref_min:
        print(
            f"warning: the {source} (mean return {ref_max:.1f}) is no better than random ({ref_min:.1f}); the "
            "dataset gets no reference scores. Train longer, or pass --ref-max-score."
        )
        ref_max = None
    elif ref_max is None:
        print("note: random data has no expert reference; pass --ref-max-score to enable normalized scores.")

    # Dataset
    returns = np.array([float(np.sum(ep["rewards"])) for ep in episodes])
    steps = sum(len(ep["rewards"]) for ep in episodes)
    noisy = args.action_noise or args.epsilon
    algorithm_name = source + data + (f", action noise {args.action_noise}, epsilon {args.epsilon}" if noisy else "")
    max_text = "--ref-max-score" if args.ref_max_score is not None else f"the noise-free {source}"
    references = "none" if ref_max is None else f"random policy {ref_min:.2f}, {max_text} {ref_max:.2f}"
    description = args.description or (
        f"{len(episodes)} episodes ({steps} steps) of {env.spec.id} recorded by collect.py with {algorithm_name}. "
        f"Reference scores: {references} (means over {args.ref_episodes} episodes). "
        f"Command: python collect.py {shlex.join(argv)}"
    )
    metadata = {"ref_min_score": None if ref_max is None else ref_min, "ref_max_score": ref_max}
    metadata |= {"num_episodes_average_score": args.ref_episodes, "algorithm_name": f"collect.py: {algorithm_name}"}
    dataset = write_dataset(dataset_id, episodes, env, args.overwrite, description=description, **metadata)
    env.close()
    score = "" if ref_max is None else f" (normalized {100 * (returns.mean() - ref_min) / (ref_max - ref_min):.1f})"
    stats = f"{len(episodes)} episodes, {steps} steps, return {returns.mean():.1f} +- {returns.std():.1f}{score}"
    print(f"dataset {dataset_id}: {stats}; reference returns: {references}; stored in {path}")
    if args.policy == "sac":
        summary = {"dataset_id": dataset_id, "teacher_return": best_return, "random_return": ref_min}
        summary |= {"data_return": float(returns.mean()), "episodes": len(episodes), "steps": steps}
        atomic_save(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return dataset


def cli(argv: list) -> int:
    """main with the exit codes: 0, 2 for a mistake in the input, 128 + signal when interrupted."""
    try:
        main(argv)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"\ninterrupted ({signal.Signals(e.args[0]).name}); no dataset was written. {STOP.hint}", file=sys.stderr)
        return 128 + e.args[0]


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)  # see STOP
    sys.exit(cli(sys.argv[1:]))
