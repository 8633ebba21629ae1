"""Implicit Q-Learning (IQL), a single-file implementation on Gymnasium + Minari.

IQL learns a Q-function without ever querying actions outside the dataset: an expectile regression of V(s) towards
Q(s, a) over dataset actions approximates a max over in-support actions, Q is trained by TD against V(s'), and the
policy is extracted with advantage-weighted regression (AWR).
Paper: "Offline Reinforcement Learning with Implicit Q-Learning", Ilya Kostrikov, Ashvin Nair, Sergey Levine,
ICLR 2022, arXiv:2110.06169. Docs: docs/iql.md.

Read on: the algorithm (Args, checks, per-domain settings, networks, losses, the update step), then the shared block
that every algorithm script holds word for word (data, evaluation, configuration, checkpoints, the training loop).
"""

import copy
import dataclasses
import difflib
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import common

ALGO = "iql"


@dataclasses.dataclass
class Args:
    # -------- SHARED BLOCK (args) begins: the same in every algorithm script --------
    env: str = "door-human-v2"  # a D4RL-style name (door-human-v2, hopper-medium-v0) or a Minari id (D4RL/pen/human-v2)
    seed: int = 1  # seed of python, numpy, torch, batch sampling and evaluation envs
    total_steps: int = 1_000_000  # number of gradient steps
    batch_size: int = 256  # transitions per gradient step
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # where to train; auto picks cuda, then mps, then cpu
    config: str | None = None  # YAML of overrides (keys: these fields), applied after the per-domain settings
    eval_every: int = 5000  # evaluate the policy every this many steps (and at the end)
    eval_episodes: int = 10  # episodes per evaluation, run in parallel; 0: train without an environment
    log_every: int = 1000  # log losses to TensorBoard every this many steps (the only host syncs in training)
    checkpoint_every: int = 50_000  # write checkpoints/step_<N>.pt and last.pt every this many steps (and at the end)
    keep_checkpoints: int = 3  # how many step_<N>.pt files to keep (last.pt is always kept)
    output: str = "runs"  # parent folder of the run folder
    run_name: str | None = None  # name of the run folder inside --output; default <env>__<algo>__<seed>__<unix time>
    resume: str | None = None  # continue a run: its folder or a checkpoint file (only --device may be given with it)
    track: bool = False  # log to Weights & Biases (pip install wandb); project: $WANDB_PROJECT
    capture_video: bool = False  # save a GIF of one evaluation episode to <run>/videos/ (MuJoCo: MUJOCO_GL=egl)
    compile: bool = False  # torch.compile the update step
    bf16: bool = False  # bfloat16 autocast of the hidden layers; output layers, losses, weights, optimizer stay float32
    # -------- SHARED BLOCK (args) ends --------

    # Algorithm hyperparameters (defaults: the official code's MuJoCo locomotion settings)
    discount: float = 0.99  # discount factor gamma
    tau: float = 0.005  # Polyak averaging rate of the target critics
    expectile: float = 0.7  # expectile tau of the value loss (0.5 = mean, -> 1 = max over dataset actions)
    beta: float = 3.0  # inverse temperature of the AWR actor loss: weights exp(beta * advantage)
    max_weight: float = 100.0  # AWR weights are clamped at this (the official code's 100) against overflow
    actor_lr: float = 3e-4  # actor learning rate (cosine-decayed to 0 unless --no-cosine-actor-lr)
    critic_lr: float = 3e-4  # Q learning rate
    value_lr: float = 3e-4  # V learning rate
    hidden_dim: int = 256  # width of every MLP
    n_hidden: int = 2  # hidden layers of every MLP
    deterministic_actor: bool = False  # advantage-weighted MSE of a deterministic actor, not a Gaussian likelihood
    actor_dropout: float = 0.0  # dropout rate in the actor's hidden layers
    layer_norm: bool = False  # LayerNorm in the critics' hidden layers
    orthogonal_init: bool = False  # the official code's orthogonal init (gain sqrt 2); default PyTorch's (docs/iql.md)
    cosine_actor_lr: bool = True  # cosine decay of the actor learning rate to 0 over total_steps
    normalize_states: bool = True  # standardize observations with the dataset mean/std (also at evaluation)
    normalize_reward: bool = False  # scale rewards so that the spread of episode returns is 1000 (locomotion)
    reward_scale: float = 1.0  # rewards become r * reward_scale + reward_bias (after normalize_reward)
    reward_bias: float = 0.0  # AntMaze: -1, so that the 0/1 goal reward becomes -1/0


def check_args(args: Args) -> list:
    """IQL's own hyperparameters out of range (the shared block checks the run's fields): the problems found."""
    problems = []
    if not 0 < args.expectile < 1:
        problems.append("expectile must be in (0, 1)")
    if args.beta < 0 or args.max_weight <= 0:
        problems.append("beta must be >= 0 and max_weight > 0")
    if not (0 <= args.discount <= 1 and 0 < args.tau <= 1):
        problems.append("discount must be in [0, 1] and tau in (0, 1]")
    if min(args.actor_lr, args.critic_lr, args.value_lr) <= 0:
        problems.append("learning rates must be > 0")
    if args.hidden_dim < 1 or args.n_hidden < 1:
        problems.append("hidden_dim and n_hidden must be >= 1")
    if not 0 <= args.actor_dropout < 1:
        problems.append("actor_dropout must be in [0, 1)")
    return problems


# Published per-domain settings of the official code (github.com/ikostrikov/implicit_q_learning, configs/*_config.py;
# its README uses kitchen's for Adroit; reward rules and 100 AntMaze evaluation episodes: train_offline.py, README).
# Precedence: Args defaults < this table (chosen by --env) < --config FILE.yaml < command-line flags.
DOMAIN_SETTINGS = {
    "locomotion": {"normalize_reward": True},  # halfcheetah, hopper, walker2d: r * 1000 / (max - min episode return)
    "antmaze": {"expectile": 0.9, "beta": 10.0, "reward_bias": -1.0, "eval_episodes": 100},
    "adroit": {"beta": 0.5, "actor_dropout": 0.1},
    "kitchen": {"beta": 0.5, "actor_dropout": 0.1},
}


# -------- ALGO LOGIC: networks --------
def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int, dropout: float = 0.0) -> nn.Sequential:
    layers = []
    for i in range(n_hidden):
        layers.append(nn.Linear(in_dim if i == 0 else hidden, hidden))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(common.OutputLinear(hidden, out_dim))
    return nn.Sequential(*layers)


class TwinQ(nn.Module):
    """Both critics Q1, Q2 in one module: every layer is one batched matmul over the 2 critics."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int, layer_norm: bool):
        super().__init__()
        layers = []
        for i in range(n_hidden):
            layers.append(common.BatchedLinear(2, obs_dim + act_dim if i == 0 else hidden, hidden))
            if layer_norm:
                layers.append(common.BatchedLayerNorm(2, hidden))
            layers.append(nn.ReLU())
        layers.append(common.BatchedOutputLinear(2, hidden, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)  # (2, B)


class Actor(nn.Module):
    """pi(a|s) = N(tanh(MLP(s)), exp(log_std)), the log-std state-independent (official IQL); or the mean alone."""

    log_std_min = -5.0  # the official code's bounds (CORL: -20, 2)
    log_std_max = 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int, dropout: float, deterministic: bool):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden, n_hidden, dropout)
        self.log_std = None if deterministic else nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean = self(obs)
        if self.log_std is None:  # deterministic: -||mu(s) - a||^2, a unit Gaussian's log-density up to constants
            return -((mean - actions) ** 2).sum(-1)
        log_std = self.log_std.clamp(self.log_std_min, self.log_std_max)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def make_networks(args: Args, obs_dim: int, act_dim: int) -> dict:
    """Actor, twin critics and their Polyak copy, value net. PyTorch's default init, as CORL: the official code's
    orthogonal init (gain sqrt 2, --orthogonal-init) made the actor collapse for thousands of steps on Hopper."""
    actor = Actor(obs_dim, act_dim, args.hidden_dim, args.n_hidden, args.actor_dropout, args.deterministic_actor)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden, args.layer_norm)
    value = mlp(obs_dim, 1, args.hidden_dim, args.n_hidden)
    if args.orthogonal_init:
        common.orthogonal_init(actor, critic, value)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    return {"actor": actor, "critic": critic, "target_critic": target_critic, "value": value}


def make_optimizers(nets: dict, args: Args) -> dict:
    """Adam for each learner; the actor's learning rate follows a cosine decay to 0 over total_steps."""

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, args.total_steps) / args.total_steps))

    opts = {
        "actor_opt": common.adam(nets["actor"], args.actor_lr),
        "critic_opt": common.adam(nets["critic"], args.critic_lr),
        "value_opt": common.adam(nets["value"], args.value_lr),
    }
    schedule = cosine if args.cosine_actor_lr else lambda step: 1.0
    opts["scheduler"] = torch.optim.lr_scheduler.LambdaLR(opts["actor_opt"], schedule)
    return opts


# -------- ALGO LOGIC: losses (paper equations) --------
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Eq. 5: L_2^tau(u) = |tau - 1(u < 0)| u^2 with u = Q(s,a) - V(s): positive errors weigh tau."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff**2).mean()


def td_loss(q: torch.Tensor, rewards, dones, next_v, discount: float) -> torch.Tensor:
    """Eq. 6: sum over the critics of E[(r + gamma (1 - d) V(s') - Q_i(s, a))^2]; q has shape (2, B)."""
    target = rewards + discount * (1.0 - dones) * next_v
    return ((q - target) ** 2).mean(dim=1).sum()


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """exp(beta * A(s, a)), clamped at max_weight (100 in the official code) against overflow."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


def awr_actor_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 7: L_pi = -E[exp(beta (Q(s,a) - V(s))) log pi(a|s)]: behaviour cloning weighted by advantage."""
    return -(weights * log_prob).mean()


# -------- ALGO LOGIC: the update step --------
def make_update(nets: dict, opts: dict, args: Args):
    """One IQL gradient step, update(batch, step), in the official code's order: V, then the actor (advantage
    from the new V), then Q (target from the new V(s')), then Polyak. Returns detached losses (no host sync)."""
    actor, critic, target_critic, value = nets["actor"], nets["critic"], nets["target_critic"], nets["value"]

    def update_value(obs, actions) -> tuple:
        with torch.no_grad():
            target_q = target_critic(obs, actions).min(dim=0).values
        value_loss = expectile_loss(target_q - value(obs).squeeze(-1), args.expectile)
        common.descend(opts["value_opt"], value_loss)
        return value_loss, target_q

    def update_actor(obs, actions, target_q, v) -> tuple:
        with torch.no_grad():
            advantage = target_q - v
            weights = awr_weights(advantage, args.beta, args.max_weight)
        actor_loss = awr_actor_loss(actor.log_prob(obs, actions), weights)
        common.descend(opts["actor_opt"], actor_loss)
        opts["scheduler"].step()
        return actor_loss, advantage, weights

    def update_critic(obs, actions, rewards, dones, next_v) -> tuple:
        q = critic(obs, actions)
        critic_loss = td_loss(q, rewards, dones, next_v, args.discount)
        common.descend(opts["critic_opt"], critic_loss)
        return critic_loss, q

    def iql_step(batch: dict) -> dict:
        obs, actions = batch["obs"], batch["actions"]
        value_loss, target_q = update_value(obs, actions)
        with torch.no_grad():  # V(s) and V(s') from the V just updated, in one pass
            v, next_v = value(torch.cat([obs, batch["next_obs"]])).squeeze(-1).chunk(2)
        actor_loss, advantage, weights = update_actor(obs, actions, target_q, v)
        critic_loss, q = update_critic(obs, actions, batch["rewards"], batch["dones"], next_v)
        common.soft_update(target_critic, critic, args.tau)
        metrics = {
            "value_loss": value_loss,
            "actor_loss": actor_loss,
            "critic_loss": critic_loss,
            "q_mean": q.mean(),
            "v_mean": v.mean(),
            "advantage_mean": advantage.mean(),
            "awr_weight_mean": weights.mean(),
        }
        return {f"losses/{name}": x.detach() for name, x in metrics.items()}

    iql_step = common.accelerate(iql_step, next(critic.parameters()).device.type, args.bf16, args.compile)
    return lambda batch, step: iql_step(batch)  # the same rule at every step


# ======== SHARED BLOCK begins ========
# The same text in every algorithm script: edit it in iql.py, then `python tools/shared_block.py --fix` copies it.
# The algorithm reaches it through Args, check_args, DOMAIN_SETTINGS, make_networks, make_optimizers, make_update.


# -------- Data: dataset names, Minari loading --------
class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


# D4RL-style names "<task>-<kind>-v<version>" and the Minari ids they stand for, by domain (the keys of the
# per-domain settings). A Minari id given as it is (anything with a '/') takes the domain of its namespace/task.
DATASET_NAMES = {
    # domain: (tasks, kinds, versions of the D4RL-style name, Minari id)
    "adroit": ("pen door hammer relocate", "human cloned expert", "0 1 2", "D4RL/{task}/{kind}-v2"),
    "antmaze": ("antmaze", "umaze umaze-diverse medium-play medium-diverse large-play large-diverse", "0 1 2",
                "D4RL/antmaze/{kind}-v1"),
    "pointmaze": ("maze2d pointmaze", "umaze medium large open umaze-dense medium-dense large-dense open-dense",
                  "0 1 2", "D4RL/pointmaze/{kind}-v2"),
    "kitchen": ("kitchen", "complete partial mixed", "0 2", "D4RL/kitchen/{kind}-v2"),
    "locomotion": ("halfcheetah hopper walker2d", "simple medium expert", "0", "mujoco/{task}/{kind}-v0"),
    "mujoco": ("ant humanoid invertedpendulum inverteddoublependulum pusher reacher swimmer", "simple medium expert",
               "0", "mujoco/{task}/{kind}-v0"),
}  # fmt: skip


def dataset_names() -> dict:
    """Every D4RL-style name -> (Minari id, domain), e.g. door-human-v2 -> (D4RL/door/human-v2, adroit)."""
    names = {}
    for domain, (tasks, kinds, versions, minari_id) in DATASET_NAMES.items():
        for task in tasks.split():
            for kind in kinds.split():
                for version in versions.split():
                    names[f"{task}-{kind}-v{version}"] = (minari_id.format(task=task, kind=kind), domain)
    return names


def resolve_dataset_name(name: str) -> tuple:
    """(Minari id, domain) of a D4RL-style name (door-human-v2) or of a Minari id (containing '/')."""
    names = dataset_names()
    if name in names:
        return names[name]
    if "/" in name:
        for minari_id, domain in names.values():
            if minari_id.rsplit("/", 1)[0] == name.rsplit("/", 1)[0]:  # the same namespace/task
                return name, domain
        return name, "other"
    task = name.split("-")[0]
    if task in ("halfcheetah", "hopper", "walker2d", "ant"):
        hint = f" Minari does not host D4RL locomotion; closest: mujoco/{task}/simple-v0, medium-v0, expert-v0."
    else:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UserError(
        f"unknown dataset '{name}'.{hint} Give a D4RL-style name (door-human-v2, antmaze-umaze-v1, "
        "kitchen-mixed-v2, hopper-medium-v0) or a Minari id containing '/'."
    )


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy if there is one, else a download; clear errors otherwise."""
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except ValueError:
        raise UserError(
            f"'{dataset_id}' is not a valid Minari dataset id: ids look like namespace/name-v<N> "
            "(D4RL/door/human-v2, mujoco/hopper/medium-v0, local/x/random-v0)"
        ) from None
    local = Path(minari.storage.get_dataset_path(dataset_id))
    try:
        dataset = minari.load_dataset(dataset_id, download=True)
        next(dataset.iterate_episodes(), None)  # opens main_data.hdf5: a truncated copy fails here, not in training
        return dataset
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        if (local / "data").exists():
            raise UserError(
                f"the dataset at {local} is damaged ({why}): delete the folder {local}, then get it again."
            ) from e
        raise UserError(
            f"dataset '{dataset_id}' is not in the local Minari store ({local}) and downloading it failed ({why}). "
            f"Without network: `minari download {dataset_id}` elsewhere, then copy the folder to {local} (or set "
            "MINARI_DATASETS_PATH to the copy); or record a dataset with collect.py."
        ) from e


# -------- Data: one on-device buffer, each observation stored once --------
def flatten(space: gym.Space, obs) -> np.ndarray:
    """(T, ...) observations -> rows (T, D); Dict keys in order, as gymnasium's FlattenObservation."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten(space[key], obs[key]) for key in space.spaces], axis=1)
    if not isinstance(space, gym.spaces.Box):
        raise UserError(f"unsupported observation space {space}: only Box and Dict of Box are handled")
    return np.reshape(obs, (len(obs), -1))


@dataclasses.dataclass
class Buffer:
    """The whole dataset on the device, each observation stored once: an episode's T + 1 observations are consecutive
    rows of `obs`; transition i is s = obs[rows[0, i]], s' = obs[rows[1, i]] (the next row), steps[i] = (a, r, done)."""

    obs: torch.Tensor  # (N + episodes, obs_dim), standardized
    steps: torch.Tensor  # (N, act_dim + 2): action in [-1, 1], transformed reward, termination
    rows: torch.Tensor  # (2, N) int64: rows of s and s'
    generator: torch.Generator

    def sample(self, batch_size: int) -> dict:
        i = torch.randint(self.steps.shape[0], (batch_size,), device=self.obs.device, generator=self.generator)
        obs, next_obs = self.obs[self.rows[:, i]]  # (2, B, obs_dim): s and s' in one gather
        steps = self.steps[i]
        return {
            "obs": obs,
            "actions": steps[:, :-2],
            "rewards": steps[:, -2],
            "next_obs": next_obs,
            "dones": steps[:, -1],
        }


def load_buffer(dataset: minari.MinariDataset, args: Args, device: torch.device) -> tuple:
    """Read every episode straight into preallocated float32 tensors (host memory peaks near the buffer's own
    size), refuse non-finite values, transform rewards, scale actions and standardize states in place."""
    space = dataset.action_space
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise UserError(
            f"dataset {dataset.id} has the action space {space}; {ALGO}.py needs bounded continuous (Box) actions"
        )
    if dataset.total_episodes == 0:
        raise UserError(f"dataset {dataset.id} has no episodes")
    low = space.low.astype(np.float32).ravel()
    high = space.high.astype(np.float32).ravel()
    n = dataset.total_steps
    # Allocated by torch, filled through numpy views (numpy's huge-page allocation made the first fill 4x slower)
    obs_tensor = torch.empty(n + dataset.total_episodes, gym.spaces.flatdim(dataset.observation_space))
    steps_tensor = torch.empty(n, len(low) + 2)
    rows_tensor = torch.empty(2, n, dtype=torch.int64)
    obs, steps, rows = obs_tensor.numpy(), steps_tensor.numpy(), rows_tensor.numpy()
    sums = np.zeros((2, obs.shape[1]))  # sums of s and of s^2 (float64), for the mean and std
    returns = []
    t = 0  # transitions read so far; episode k's T + 1 observations start at row t + k
    for k, episode in enumerate(dataset.iterate_episodes()):
        T = len(episode.rewards)
        x = obs[t + k : t + k + T + 1]
        x[:] = flatten(dataset.observation_space, episode.observations)
        steps[t : t + T, :-2] = np.reshape(episode.actions, (T, -1))
        steps[t : t + T, -2] = episode.rewards
        steps[t : t + T, -1] = episode.terminations
        sums[0] += x.sum(0, dtype=float)
        sums[1] += np.einsum("ij,ij->j", x, x, dtype=float)  # the squares without a temporary array
        if not np.isfinite(sums).all() or not np.isfinite(steps[t : t + T]).all():
            bad = "observations" if not np.isfinite(sums).all() else "actions or rewards"
            raise UserError(
                f"dataset {dataset.id}: episode {episode.id} has non-finite (NaN/inf) {bad}; repair it or leave it "
                "out (minari's filter_episodes) before training."
            )
        steps[t : t + T, :-2] = scale_actions(steps[t : t + T, :-2], low, high)  # after the check: inf would clip
        rows[0, t : t + T] = np.arange(t + k, t + k + T)
        returns.append(float(np.sum(episode.rewards, dtype=np.float64)))
        t += T
    rows[1] = rows[0] + 1
    reward_scale, reward_bias = reward_transform(np.array(returns), args)
    steps[:, -2] = steps[:, -2] * reward_scale + reward_bias
    stats = {"action_low": torch.from_numpy(low), "action_high": torch.from_numpy(high)}
    mean = sums[0] / len(obs)
    std = np.sqrt(np.maximum(sums[1] / len(obs) - mean**2, 0.0)) + 1e-3
    if not args.normalize_states:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    stats["obs_mean"] = torch.tensor(mean, dtype=torch.float32)
    stats["obs_std"] = torch.tensor(std, dtype=torch.float32)
    # (s - mean) / std as s * (1 / std) - mean / std, in one pass over the buffer
    torch.addcmul(-stats["obs_mean"] / stats["obs_std"], obs_tensor, 1 / stats["obs_std"], out=obs_tensor)
    generator = torch.Generator(device).manual_seed(args.seed)
    buffer = Buffer(obs_tensor.to(device), steps_tensor.to(device), rows_tensor.to(device), generator)
    return buffer, stats


def reward_transform(episode_returns: np.ndarray, args: Args) -> tuple:
    """(scale, bias) of r -> r * scale + bias: reward_scale and reward_bias, the scale times 1000 / (max - min
    episode return) with normalize_reward (the official IQL locomotion rule)."""
    if not args.normalize_reward:
        return args.reward_scale, args.reward_bias
    spread = episode_returns.max() - episode_returns.min()
    if spread <= 1e-3 * max(np.abs(episode_returns).max(), 1.0):
        print(f"warning: every episode returns about {episode_returns.max():.4g}: rewards are not normalized")
        return args.reward_scale, args.reward_bias
    return 1000.0 / spread * args.reward_scale, args.reward_bias


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map env actions affinely from [low, high] to [-1, 1], where the tanh actors live; clip to +-(1 - 1e-5)
    like the official IQL code, so log-likelihoods of boundary actions stay finite."""
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1 + 1e-5, 1 - 1e-5)


# -------- Evaluation: vectorized envs, deterministic actions, Minari normalized score --------
def make_eval_env(dataset: minari.MinariDataset, **kwargs) -> gym.Env:
    """The dataset's own evaluation env (its episode limit, not gym.make's), observations flattened (Dict spaces)."""
    return gym.wrappers.FlattenObservation(dataset.recover_environment(eval_env=True, **kwargs))


def make_policy(actor: nn.Module, stats: dict, device: torch.device):
    """Env observation -> env action: normalize, deterministic actor, map [-1, 1] back to [low, high]."""
    mean, std = stats["obs_mean"].to(device), stats["obs_std"].to(device)
    low, high = stats["action_low"].to(device), stats["action_high"].to(device)

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        action = actor((obs - mean) / std).clamp(-1.0, 1.0)
        return (low + (action + 1.0) * 0.5 * (high - low)).cpu().numpy()

    return policy


def evaluate(envs: gym.vector.VectorEnv, policy, seeds: list) -> tuple:
    """One episode per sub-env, all run in lockstep with one batched policy forward per step. A finished
    sub-env is reset by Gymnasium (on its next step, or at once), so only each sub-env's first episode counts."""
    obs, _ = envs.reset(seed=seeds)
    returns = np.zeros(envs.num_envs)
    lengths = np.zeros(envs.num_envs, np.int64)
    done = np.zeros(envs.num_envs, bool)
    while not done.all():
        obs, reward, terminated, truncated, _ = envs.step(policy(obs))
        returns += np.where(done, 0.0, reward)
        lengths += ~done
        done |= terminated | truncated
    return returns, lengths


def record_video(dataset, policy, seed: int, folder: Path, step: int) -> str | None:
    """One deterministic episode as folder/step_<step>.gif; returns why not if the env cannot render."""
    try:
        env = make_eval_env(dataset, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [Image.fromarray(env.render())]
        done = False
        while not done:
            obs, _, terminated, truncated, _ = env.step(policy(obs[None])[0])
            frames.append(Image.fromarray(env.render()))
            done = terminated or truncated
        folder.mkdir(parents=True, exist_ok=True)
        frames[0].save(folder / f"step_{step}.gif", save_all=True, append_images=frames[1:], duration=33, loop=0)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        return f"--capture-video: this env cannot render here ({why}). MuJoCo needs MUJOCO_GL=egl or osmesa."


# -------- TRY NOT TO MODIFY: configuration, checkpoints, summary --------
def as_flags(settings: dict) -> list:
    """{"beta": 0.5, "layer_norm": True} -> ["--beta", "0.5", "--layer-norm"]: tyro checks them like flags."""
    flags = []
    for key, value in settings.items():
        name = str(key).replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def parse_args(argv: list) -> tuple:
    """(args, checkpoint): Args defaults < DOMAIN_SETTINGS[domain of --env] < --config YAML < flags, validated; on
    --resume, the checkpoint's own."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.resume:
        return resumed_args(argv, args.resume)
    settings = DOMAIN_SETTINGS.get(resolve_dataset_name(args.env)[1], {})
    print(f"per-domain settings for {args.env}: {settings or 'none (Args defaults)'}")
    config = config_flags(args.config)
    return validate(tyro.cli(Args, args=[*as_flags(settings), *config, *argv])), None


def config_flags(path: str | None) -> list:
    """A --config YAML file as flags, first parsed alone, so that tyro's error names the file."""
    if path is None:
        return []
    try:
        flags = as_flags(yaml.safe_load(Path(path).read_text()) or {})
        tyro.cli(Args, args=flags)
    except (OSError, yaml.YAMLError, AttributeError, SystemExit) as e:
        detail = "" if isinstance(e, SystemExit) else f" ({e})"
        raise UserError(
            f"in --config {path}: expected a YAML mapping of Args fields, read like flags{detail}"
        ) from None
    return flags


def load_checkpoint(path: str, flag: str) -> tuple:
    """(checkpoint, file) of this script's run folder (its checkpoints/last.pt) or checkpoint file; weights only."""
    file = Path(path) / "checkpoints" / "last.pt" if Path(path).is_dir() else Path(path)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        if ckpt["algo"] != ALGO:
            raise ValueError(f"it is a checkpoint of {ckpt['algo']}.py")
        Args(**ckpt["args"])
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable {ALGO}.py checkpoint ({e})") from e
    return ckpt, file


def resumed_args(argv: list, path: str) -> tuple:
    """The arguments of the run to resume; a flag that would change them is refused."""
    ckpt, file = load_checkpoint(path, "--resume")
    saved = Args(**ckpt["args"])
    given = dataclasses.asdict(tyro.cli(Args, args=argv, default=saved))
    changed = []
    for key, value in dataclasses.asdict(saved).items():
        if given[key] != value and key not in ("resume", "device"):
            changed.append(f"{key} ({value} -> {given[key]})")
    if changed:
        raise UserError(f"a resumed run keeps its dataset and hyperparameters; cannot change {', '.join(changed)}")
    return dataclasses.replace(saved, resume=str(file.parent.parent), device=given["device"]), ckpt


def validate(args: Args) -> Args:
    """Out-of-range settings (the run's, then the algorithm's) fail here, before any data is loaded."""
    problems = []
    if args.total_steps <= 0 or args.batch_size <= 0:
        problems.append("total_steps and batch_size must be > 0")
    if args.eval_episodes < 0:
        problems.append("eval_episodes must be >= 0")
    if min(args.eval_every, args.log_every, args.checkpoint_every, args.keep_checkpoints) <= 0:
        problems.append("eval_every, log_every, checkpoint_every and keep_checkpoints must be > 0")
    if args.capture_video and args.eval_episodes == 0:
        problems.append("--capture-video needs evaluation episodes")
    problems += check_args(args)
    if problems:
        raise UserError(f"invalid hyperparameters: {'; '.join(problems)}.")
    return args


def git_commit() -> str | None:
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]
    return subprocess.run(git, capture_output=True, text=True).stdout.strip() or None


def write_summary(run_dir: Path, args: Args, dataset, history: list, step: int, clock: dict) -> None:
    """summary.json, what sweep.py and report.py read, written atomically with every checkpoint and at the end."""
    scores = [h["normalized_score"] for h in history if h["normalized_score"] is not None]
    returns = [h["return"] for h in history]
    packages = ("torch", "minari", "gymnasium", "gymnasium_robotics", "mujoco")
    summary = {
        "algo": ALGO,
        "env": args.env,
        "minari_id": dataset.id,
        "domain": resolve_dataset_name(dataset.id)[1],
        "seed": args.seed,
        "steps": step,
        "total_steps": args.total_steps,
        "completed": step == args.total_steps,
        "eval_episodes": args.eval_episodes,
        "wall_seconds": round(clock["wall"], 2),
        "sps": round(step / max(clock["train_seconds"], 1e-9), 2),
        "final_return": returns[-1] if returns else None,
        "best_return": max(returns, default=None),
        "final_normalized_score": scores[-1] if scores else None,
        "best_normalized_score": max(scores, default=None),
        "ref_min_score": dataset.storage.metadata.get("ref_min_score"),
        "ref_max_score": dataset.storage.metadata.get("ref_max_score"),
        "versions": {name: importlib.metadata.version(name) for name in packages},
        "git_commit": git_commit(),
        "args": dataclasses.asdict(args),
        "eval_history": history,
    }
    (run_dir / "summary.json.tmp").write_text(json.dumps(summary, indent=2))
    os.replace(run_dir / "summary.json.tmp", run_dir / "summary.json")


# -------- main: set up, then the training loop --------
def pick_device(name: str) -> torch.device:
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name != "auto" and not available[name]:
        raise UserError(f"--device {name} was asked for but is not available on this machine")
    return torch.device(name if name != "auto" else next(kind for kind in available if available[kind]))


def make_run_dir(args: Args, resuming: bool) -> Path:
    """<output>/<env>__<algo>__<seed>__<unix time> (or --run-name), with args.yaml; a resumed run keeps its own."""
    if resuming:
        return Path(args.resume)
    name = args.run_name or f"{args.env.replace('/', '-')}__{ALGO}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.output) / name
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick a new name")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "args.yaml").write_text(yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir}: {e}. Choose another with --output.") from e
    return run_dir


def make_eval_envs(dataset, args: Args, obs_dim: int, act_dim: int) -> gym.vector.VectorEnv:
    """The evaluation envs, built once, checked against the dataset's sizes."""
    envs = gym.vector.SyncVectorEnv([lambda: make_eval_env(dataset)] * args.eval_episodes)
    env_sizes = (gym.spaces.flatdim(envs.single_observation_space), *envs.single_action_space.shape)
    if env_sizes != (obs_dim, act_dim):
        raise UserError(
            f"the evaluation env of {dataset.id} has observation and action sizes {env_sizes}, the dataset "
            f"{(obs_dim, act_dim)}: they do not match"
        )
    return envs


def check_finite(values: dict, since: int, step: int) -> None:
    """Stop before a checkpoint is written if a logged value is NaN or infinite."""
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(
            f"{', '.join(bad)} became non-finite between steps {since} and {step}: the data was checked when "
            "loaded, so the optimization diverged. Lower the learning rates, or try --layer-norm."
        )


def main(argv: list) -> None:
    args, ckpt = parse_args(argv)
    device = pick_device(args.device)
    os.environ.setdefault("MUJOCO_GL", "egl")  # --capture-video: MuJoCo renders offscreen through EGL by default
    common.seed_everything(args.seed)  # TRY NOT TO MODIFY: seeding

    dataset = load_dataset(resolve_dataset_name(args.env)[0])
    no_env = dataset.env_spec is None and dataset.storage.metadata.get("eval_env_spec") is None
    if args.eval_episodes and no_env:
        print(f"dataset {dataset.id} has no environment: training without evaluation (--eval-episodes 0)")
        args = dataclasses.replace(args, eval_episodes=0, capture_video=False)
    buffer, stats = load_buffer(dataset, args, device)
    obs_dim = buffer.obs.shape[1]
    act_dim = len(stats["action_low"])
    print(f"{dataset.id}: {len(buffer.steps)} transitions, {dataset.total_episodes} episodes, device {device}")
    envs = make_eval_envs(dataset, args, obs_dim, act_dim) if args.eval_episodes else None
    has_scores = dataset.storage.metadata.get("ref_min_score") is not None  # else no normalized score
    run_dir = make_run_dir(args, resuming=ckpt is not None)

    nets = {name: net.to(device) for name, net in make_networks(args, obs_dim, act_dim).items()}
    opts = make_optimizers(nets, args)
    update = make_update(nets, opts, args)
    start, history, clock = 0, [], {"wall": 0.0, "train_seconds": 0.0}
    if ckpt is not None:
        for name, obj in {**nets, **opts}.items():
            obj.load_state_dict(ckpt[name])
        common.set_rng_states(ckpt["rng"], buffer.generator)
        start, history, clock = ckpt["step"], ckpt["eval_history"], ckpt["clock"]
        print(f"resumed {run_dir} at step {start}")
    if args.track:
        import wandb  # optional: pip install wandb

        project = os.environ.get("WANDB_PROJECT", "single-file-offline-rl")
        wandb.init(
            project=project, id=run_dir.name, config=dataclasses.asdict(args), sync_tensorboard=True, resume="allow"
        )
    writer = SummaryWriter(str(run_dir), purge_step=start + 1 if start else None)
    policy = make_policy(nets["actor"], stats, device)
    stop = []  # signals received: finish the step, checkpoint, exit with a resume hint
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    # The wall clock counts the whole run (across resumes); SPS counts training steps only, evaluations excluded
    t_start = time.time() - clock["wall"]
    t_window = time.time()
    last_check = start  # the step of the last host sync (logging)
    last_score = None
    progress = tqdm(range(start + 1, args.total_steps + 1), initial=start, total=args.total_steps)
    for step in progress:
        metrics = update(buffer.sample(args.batch_size), step)
        final = step == args.total_steps
        checkpoint_now = step % args.checkpoint_every == 0 or final or stop

        if step % args.log_every == 0 or checkpoint_now:
            values = {name: value.item() for name, value in metrics.items()}  # the only host sync of training
            check_finite(values, last_check, step)
            seconds = time.time() - t_window
            clock["train_seconds"] += seconds
            values["charts/SPS"] = (step - last_check) / max(seconds, 1e-9)
            values["charts/learning_rate"] = float(opts["actor_opt"].param_groups[0]["lr"])
            for name, value in values.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(sps=f"{values['charts/SPS']:.0f}", score=last_score)
            t_window = time.time()
            last_check = step

        t_pause = time.time()
        if args.eval_episodes and (step % args.eval_every == 0 or final):
            nets["actor"].eval()
            seeds = [int(s) for s in np.random.SeedSequence([args.seed, step]).generate_state(args.eval_episodes)]
            returns, lengths = evaluate(envs, policy, seeds)
            score = float(np.mean(minari.get_normalized_score(dataset, returns)) * 100) if has_scores else None
            history.append(
                {
                    "step": step,
                    "return": float(returns.mean()),
                    "return_std": float(returns.std()),
                    "length": float(lengths.mean()),
                    "normalized_score": score,
                    "seconds": round(time.time() - t_pause, 3),
                }
            )
            for tag in ("return", "length", "normalized_score"):
                if history[-1][tag] is not None:
                    writer.add_scalar(f"eval/{tag}", history[-1][tag], step)
            last_score = f"{returns.mean() if score is None else score:.1f}"
            if args.capture_video:
                problem = record_video(dataset, policy, seeds[0], run_dir / "videos", step)
                if problem:
                    tqdm.write(problem)
                    args.capture_video = False
            nets["actor"].train()

        if checkpoint_now:
            clock["wall"] = time.time() - t_start
            state = {name: obj.state_dict() for name, obj in {**nets, **opts}.items()}
            state.update(algo=ALGO, minari_id=dataset.id, step=step, args=dataclasses.asdict(args), clock=clock)
            state.update(normalization=stats, eval_history=history, rng=common.get_rng_states(buffer.generator))
            common.save_checkpoint(run_dir, state, step, args.keep_checkpoints)
            write_summary(run_dir, args, dataset, history, step, clock)
        t_window += time.time() - t_pause  # evaluation and checkpoint time is not training time
        if stop:
            break

    writer.close()
    if stop:
        print(f"\ninterrupted at step {step}; checkpoint saved. Resume with: python {ALGO}.py --resume {run_dir}")
        sys.exit(128 + stop[0])
    print(f"done: {run_dir} (final score {last_score})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 3)
# ======== SHARED BLOCK ends ========
