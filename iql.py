"""Implicit Q-Learning (IQL), a single-file implementation on Gymnasium + Minari.

IQL learns a Q-function without ever querying actions outside the dataset: an expectile regression of
V(s) towards Q(s, a) over dataset actions approximates a max over in-support actions, Q is trained by TD
against V(s'), and the policy is extracted with advantage-weighted regression (AWR).
Paper: "Offline Reinforcement Learning with Implicit Q-Learning", Ilya Kostrikov, Ashvin Nair, Sergey Levine,
ICLR 2022, arXiv:2110.06169. Usage, metrics and implementation details: README.md, section "IQL".
"""

import dataclasses
import difflib
import io
import json
import math
import os
import re
import signal
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import (
    BatchedLayerNorm,
    BatchedLinear,
    get_rng_states,
    orthogonal_init,
    seed_everything,
    set_rng_states,
    soft_update,
)

ALGO = "iql"


@dataclass
class Args:
    env: str = "door-human-v2"
    """dataset: a D4RL-style name (door-human-v2, antmaze-umaze-v1, ...) or a Minari id (D4RL/door/human-v2)"""
    seed: int = 1
    """seed of python, numpy, torch, batch sampling and evaluation envs"""
    total_steps: int = 1_000_000
    """number of gradient steps"""
    batch_size: int = 256
    """transitions per gradient step"""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """where to train; auto picks cuda, then mps, then cpu"""
    config: str | None = None
    """YAML of hyperparameters; default: configs/iql/<dataset>.yaml beside this script, if it exists"""
    eval_every: int = 5000
    """evaluate the policy every this many steps (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, run in parallel in a vectorized env"""
    log_every: int = 1000
    """log losses to TensorBoard every this many steps (the only host syncs in training)"""
    checkpoint_every: int = 50_000
    """write checkpoints/step_<N>.pt and checkpoints/last.pt every this many steps (and at the end)"""
    keep_checkpoints: int = 3
    """how many step_<N>.pt files to keep (last.pt is always kept)"""
    output: str = "runs"
    """parent folder of the run folder <env>__iql__<seed>__<unix time>"""
    resume: str | None = None
    """continue a run: its run folder or a checkpoint file"""
    track: bool = False
    """log to Weights & Biases (pip install wandb)"""
    wandb_project: str = "single-file-offline-rl"
    """W&B project name"""
    capture_video: bool = False
    """save a GIF of one evaluation episode to <run>/videos/ (MuJoCo needs MUJOCO_GL=egl or osmesa)"""
    compile: bool = False
    """torch.compile the update step"""
    bf16: bool = False
    """bfloat16 autocast of the forward passes (fast on CPUs with AVX-512 BF16/AMX and on GPUs); weights,
    gradients and optimizer states stay float32"""

    # Algorithm hyperparameters (defaults: the official code's MuJoCo locomotion settings)
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics"""
    expectile: float = 0.7
    """expectile tau of the value loss (0.5 = mean, -> 1 = max over dataset actions)"""
    beta: float = 3.0
    """inverse temperature of the AWR actor loss: weights exp(beta * advantage)"""
    max_weight: float = 100.0
    """clamp of the AWR weights exp(beta * advantage)"""
    actor_lr: float = 3e-4
    """actor learning rate (cosine-decayed to 0 unless --no-cosine-actor-lr)"""
    critic_lr: float = 3e-4
    """Q learning rate"""
    value_lr: float = 3e-4
    """V learning rate"""
    hidden_dim: int = 256
    """width of every MLP"""
    n_hidden: int = 2
    """hidden layers of every MLP"""
    deterministic_actor: bool = False
    """deterministic actor trained with advantage-weighted MSE instead of a Gaussian log-likelihood"""
    actor_dropout: float = 0.0
    """dropout rate in the actor's hidden layers (0.1 for Adroit and kitchen)"""
    layer_norm: bool = False
    """LayerNorm in the critics' hidden layers"""
    orthogonal_init: bool = True
    """orthogonal initialisation (gain sqrt 2) of every layer, as in the official code"""
    cosine_actor_lr: bool = True
    """cosine decay of the actor learning rate to 0 over total_steps"""
    normalize_states: bool = True
    """standardize observations with the dataset mean/std (applied identically at evaluation)"""
    reward_transform: Literal["auto", "none", "locomotion", "antmaze"] = "auto"
    """auto: locomotion for mujoco/*, antmaze for D4RL/antmaze/*, none otherwise"""


class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


# --------------------------------------------------------------------------------------------------------
# Data: dataset names, Minari loading, flattening, normalization, reward transforms, on-device buffer
# --------------------------------------------------------------------------------------------------------
# D4RL-style name -> Minari id (DESIGN.md section 4). Each domain: (tasks, kinds, versions accepted, id template)
DOMAINS = {
    "adroit": ("pen|door|hammer|relocate", "human|cloned|expert", "012", "D4RL/{task}/{kind}-v2"),
    "antmaze": ("antmaze", "umaze|umaze-diverse|medium-play|medium-diverse|large-play|large-diverse", "012",
                "D4RL/antmaze/{kind}-v1"),
    "pointmaze": ("maze2d|pointmaze", "umaze|medium|large|open|umaze-dense|medium-dense|large-dense|open-dense",
                  "0-9", "D4RL/pointmaze/{kind}-v2"),
    "kitchen": ("kitchen", "complete|partial|mixed", "02", "D4RL/kitchen/{kind}-v2"),
    "mujoco": ("halfcheetah|hopper|walker2d|ant|humanoid|invertedpendulum|inverteddoublependulum|pusher|reacher|"
               "swimmer", "simple|medium|expert", "0", "mujoco/{task}/{kind}-v0"),
}  # fmt: skip
D4RL_LOCOMOTION = (
    r"(?P<task>halfcheetah|hopper|walker2d|ant)-(random|medium|expert|medium-replay|medium-expert|full-replay)-v[0-9]"  # noqa: E501
)
KNOWN_NAMES = [  # for "did you mean" suggestions, with the version Minari hosts
    f"{task}-{kind}-{template[-2:]}"
    for tasks, kinds, _, template in DOMAINS.values() for task in tasks.split("|") for kind in kinds.split("|")
]  # fmt: skip


def resolve_dataset_id(name: str) -> str:
    """Map a D4RL-style name to its Minari id; a name containing '/' already is one."""
    if "/" in name:
        return name
    for tasks, kinds, versions, template in DOMAINS.values():
        if m := re.fullmatch(rf"(?P<task>{tasks})-(?P<kind>{kinds})-v[{versions}]", name):
            return template.format(**m.groupdict())
    if m := re.fullmatch(D4RL_LOCOMOTION, name):
        raise UserError(
            f"'{name}' is a D4RL locomotion dataset, which Minari does not host (D4RL's gym-mujoco datasets "
            f"were not ported). Minari's own MuJoCo datasets are the closest: mujoco/{m['task']}/simple-v0, "
            f"mujoco/{m['task']}/medium-v0 and mujoco/{m['task']}/expert-v0 (or {m['task']}-medium-v0)."
        )
    close = difflib.get_close_matches(name, KNOWN_NAMES, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UserError(
        f"unknown dataset '{name}'.{hint} Give a D4RL-style name (door-human-v2, antmaze-umaze-v1, "
        "pointmaze-medium-v2, kitchen-mixed-v2, hopper-medium-v0) or any Minari id containing '/', "
        "e.g. D4RL/door/human-v2 or a dataset you recorded with collect.py."
    )


def config_name(dataset_id: str) -> str:
    """D4RL/door/human-v2 -> door-human-v2: the file name of its configs/<algo>/*.yaml."""
    return "-".join(dataset_id.split("/")[1:]) if dataset_id.startswith(("D4RL/", "mujoco/")) else ""


def load_minari_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy if there is one, else a download (`download=True`), with a clear error offline."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    except Exception as e:  # a broken local copy
        raise UserError(f"the local copy of Minari dataset '{dataset_id}' cannot be read: {e}") from e
    print(f"dataset {dataset_id} is not in the local Minari store; downloading it ...")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return minari.load_dataset(dataset_id, download=True)
    except Exception as e:
        local = os.environ.get("MINARI_DATASETS_PATH", str(Path.home() / ".minari" / "datasets"))
        raise UserError(
            f"dataset '{dataset_id}' is not in the local Minari store ({local}) and downloading it failed "
            f"({type(e).__name__}: {str(e)[:200]}). If this machine has no network, run "
            f"`minari download {dataset_id}` on one that has, copy its folder "
            f"~/.minari/datasets/{dataset_id} to {local}/{dataset_id} here (or point MINARI_DATASETS_PATH at "
            "the copy), and run again. To build a dataset locally instead, see collect.py in the README."
        ) from e


def flatten_observations(space: gym.Space, obs) -> np.ndarray:
    """(T, ...) observations -> (T, D) float32, dict keys in the space's order, the order of
    gymnasium's FlattenObservation wrapper used on the evaluation env."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten_observations(space[k], obs[k]) for k in space.spaces], axis=-1)
    if isinstance(space, gym.spaces.Box):
        return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
    raise UserError(f"unsupported observation space {space}: only Box and Dict of Box are handled")


def load_transitions(dataset: minari.MinariDataset) -> dict:
    """All transitions of all episodes as flat float32 arrays; `terminations` is the TD done mask
    (truncations are time limits: the next state still has value)."""
    if not isinstance(dataset.action_space, gym.spaces.Box):
        raise UserError(
            f"dataset {dataset.id} has a {type(dataset.action_space).__name__} action space; IQL here needs "
            "continuous (Box) actions. For discrete actions use a discrete-action method (e.g. discrete CQL)."
        )
    if dataset.total_episodes == 0:
        raise UserError(f"dataset {dataset.id} has no episodes")
    parts = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "dones", "returns")}
    for ep in dataset.iterate_episodes():
        obs = flatten_observations(dataset.observation_space, ep.observations)  # T + 1 observations
        parts["obs"].append(obs[:-1])
        parts["next_obs"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, dtype=np.float32).reshape(len(ep.rewards), -1))
        parts["rewards"].append(np.asarray(ep.rewards, dtype=np.float32))
        parts["dones"].append(np.asarray(ep.terminations, dtype=np.float32))
        parts["returns"].append(float(np.sum(ep.rewards)))
    return {k: np.array(v) if k == "returns" else np.concatenate(v) for k, v in parts.items()}


def reward_family(dataset_id: str) -> str:
    if dataset_id.startswith("mujoco/"):
        return "locomotion"
    if dataset_id.startswith("D4RL/antmaze/"):
        return "antmaze"
    return "none"


def transform_rewards(rewards: np.ndarray, episode_returns: np.ndarray, family: str) -> np.ndarray:
    """Per-domain reward transforms of the official IQL code."""
    if family == "locomotion":  # scale so that the spread of episode returns is 1000
        return rewards * (1000.0 / max(episode_returns.max() - episode_returns.min(), 1e-8))
    if family == "antmaze":  # 0/1 goal reward -> -1/0, so reaching the goal sooner pays
        return rewards - 1.0
    return rewards


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map env actions affinely from [low, high] to [-1, 1], where the tanh-mean actor lives; clip to
    +-(1 - 1e-5) like the official code, so log-likelihoods of boundary actions stay finite."""
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1 + 1e-5, 1 - 1e-5)


class Buffer:
    """The whole dataset as one (N, D) tensor on the device; a batch is one `randint` and one gather."""

    def __init__(self, obs, actions, rewards, next_obs, dones, device, seed):
        columns = [obs, actions, rewards[:, None], next_obs, dones[:, None]]
        self.sizes = [c.shape[1] for c in columns]
        self.data = torch.as_tensor(np.concatenate(columns, axis=1), device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self, batch_size: int):
        idx = torch.randint(len(self.data), (batch_size,), device=self.data.device, generator=self.generator)
        obs, actions, rewards, next_obs, dones = torch.split(self.data[idx], self.sizes, dim=1)
        return obs, actions, rewards.squeeze(1), next_obs, dones.squeeze(1)


# --------------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int, dropout: float = 0.0) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        dim = hidden
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class TwinQ(nn.Module):
    """Both critics Q1, Q2 in one module: every layer is one batched matmul over the 2 critics."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int, layer_norm: bool, n: int = 2):
        super().__init__()
        layers, dim = [], obs_dim + act_dim
        for _ in range(n_hidden):
            layers += [BatchedLinear(n, dim, hidden)] + ([BatchedLayerNorm(n, hidden)] if layer_norm else [])
            layers += [nn.ReLU()]
            dim = hidden
        self.net = nn.Sequential(*layers, BatchedLinear(n, dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)  # (2, B)


class Actor(nn.Module):
    """pi(a|s) = N(tanh(MLP(s)), exp(log_std)) with a state-independent log-std (official IQL), or the
    deterministic mean alone. Dropout, if any, is active in train() mode only."""

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
        log_std = self.log_std.clamp(-5.0, 2.0)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


# --------------------------------------------------------------------------------------------------------
# ALGO LOGIC: losses (paper equations) and the update step
# --------------------------------------------------------------------------------------------------------
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


def make_update(actor, critic, target_critic, value, actor_opt, critic_opt, value_opt, scheduler, args):
    """One IQL gradient step on a batch, in the official code's order: V, then the actor (advantage from
    the new V), then Q (target from the new V(s')), then Polyak. Returns detached loss tensors (no sync)."""

    device_type = next(critic.parameters()).device.type
    autocast = lambda: torch.autocast(device_type, torch.bfloat16, enabled=args.bf16)  # noqa: E731

    def update(obs, actions, rewards, next_obs, dones):
        with torch.no_grad(), autocast():
            target_q = target_critic(obs, actions).min(dim=0).values

        with autocast():
            value_loss = expectile_loss(target_q - value(obs).squeeze(-1), args.expectile)
        value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        value_opt.step()

        with torch.no_grad(), autocast():
            v, next_v = value(torch.cat([obs, next_obs])).squeeze(-1).float().chunk(2)
            advantage = target_q - v
            weights = awr_weights(advantage, args.beta, args.max_weight)
        with autocast():
            actor_loss = awr_actor_loss(actor.log_prob(obs, actions), weights)
        actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_opt.step()
        scheduler.step()

        with autocast():
            q = critic(obs, actions)
            critic_loss = td_loss(q, rewards, dones, next_v, args.discount)
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()

        soft_update(target_critic, critic, args.tau)
        return {
            "losses/value_loss": value_loss.detach(),
            "losses/actor_loss": actor_loss.detach(),
            "losses/critic_loss": critic_loss.detach(),
            "losses/q_mean": q.detach().mean(),
            "losses/v_mean": v.mean(),
            "losses/advantage_mean": advantage.mean(),
            "losses/awr_weight_mean": weights.mean(),
        }

    return update


# --------------------------------------------------------------------------------------------------------
# Evaluation: vectorized envs, deterministic actions, Minari normalized score
# --------------------------------------------------------------------------------------------------------
def make_eval_env(dataset: minari.MinariDataset, **kwargs) -> gym.Env:
    """The dataset's own evaluation env (its episode limit, not gym.make's), dict observations flattened."""
    env = dataset.recover_environment(eval_env=True, **kwargs)
    return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env


class Policy:
    """Env observation -> env action: normalize, deterministic actor mean, map [-1, 1] back to [low, high]."""

    def __init__(self, actor, obs_mean, obs_std, low, high, device):
        self.actor, self.device = actor, device
        self.obs_mean, self.obs_std, self.low, self.high = obs_mean, obs_std, low, high

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor((obs - self.obs_mean) / self.obs_std, dtype=torch.float32, device=self.device)
        action = self.actor(obs).clamp(-1.0, 1.0).cpu().numpy()
        return self.low + (action + 1.0) * 0.5 * (self.high - self.low)


def evaluate(envs: gym.vector.VectorEnv, policy: Policy, seeds: list) -> tuple:
    """One episode per sub-env, all run in lockstep with one batched policy forward per step. Gymnasium >= 1
    resets a finished sub-env on its next step, so only each sub-env's first episode is counted."""
    obs, _ = envs.reset(seed=seeds)
    returns, lengths = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=np.int64)
    done = np.zeros(envs.num_envs, dtype=bool)
    while not done.all():
        obs, reward, terminated, truncated, _ = envs.step(policy(obs))
        returns += np.where(done, 0.0, reward)
        lengths += ~done
        done |= terminated | truncated
    return returns, lengths


def normalized_score(dataset: minari.MinariDataset, returns: np.ndarray) -> float | None:
    """Minari's (return - random) / (expert - random) x 100, or None if the dataset has no reference scores."""
    if dataset.storage.metadata.get("ref_min_score") is None or dataset.storage.metadata.get("ref_max_score") is None:
        return None
    return float(np.mean(minari.get_normalized_score(dataset, returns)) * 100.0)


def record_video(dataset, policy: Policy, seed: int, path: Path) -> str | None:
    """Render one deterministic episode to a GIF; returns an explanation instead if the env cannot render."""
    try:
        env = make_eval_env(dataset, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames, done = [env.render()], False
        while not done:
            obs, _, terminated, truncated, _ = env.step(policy(obs[None])[0])
            frames.append(env.render())
            done = terminated or truncated
        env.close()
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // 30, loop=0)
    except Exception as e:
        return (
            f"--capture-video: this env cannot render here ({type(e).__name__}: {str(e)[:200]}). MuJoCo envs need "
            "an offscreen GL: set MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (CPU, apt install libosmesa6)."
        )
    return None


# --------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: config, checkpoints, run folder
# --------------------------------------------------------------------------------------------------------
def _type_ok(value, tp) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def load_config(path: Path) -> dict:
    """A YAML mapping of Args fields; unknown keys and wrong types are errors, not silently ignored."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise UserError(f"config {path} must be a mapping of hyperparameter: value, not {type(cfg).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(Args)}
    out = {}
    for key, value in cfg.items():
        name = str(key).replace("-", "_")
        if name not in fields or name in ("config", "resume"):
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"config {path}: unknown key '{key}'.{hint} Keys are the fields of Args (see --help).")
        if fields[name] is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, fields[name]):
            raise UserError(f"config {path}: '{key}' should be {fields[name]}, got {value!r}")
        out[name] = float(value) if fields[name] is float else value
    return out


def validate(args: Args) -> None:
    """Out-of-range hyperparameters fail here, before any data is loaded."""
    checks = [
        (args.total_steps > 0, "total_steps must be > 0"),
        (args.batch_size > 0, "batch_size must be > 0"),
        (0 < args.expectile < 1, "expectile must be in (0, 1)"),
        (args.beta >= 0, "beta must be >= 0"),
        (args.max_weight > 0, "max_weight must be > 0"),
        (0 <= args.discount <= 1, "discount must be in [0, 1]"),
        (0 < args.tau <= 1, "tau must be in (0, 1]"),
        (min(args.actor_lr, args.critic_lr, args.value_lr) > 0, "learning rates must be > 0"),
        (args.hidden_dim > 0 and args.n_hidden >= 1, "hidden_dim must be > 0 and n_hidden >= 1"),
        (0 <= args.actor_dropout < 1, "actor_dropout must be in [0, 1)"),
        (args.eval_episodes > 0 and args.eval_every > 0, "eval_episodes and eval_every must be > 0"),
        (args.log_every > 0 and args.checkpoint_every > 0, "log_every and checkpoint_every must be > 0"),
        (args.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise UserError("invalid hyperparameters: " + "; ".join(errors) + ".")


def explicit_flags(argv: list) -> set:
    """Field names given on the command line (--foo, --foo=1, --no-foo)."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return names | {n[3:] for n in names if n.startswith("no_")}


def parse_args(argv: list) -> tuple:
    """CLI > config file > defaults. On --resume, the checkpoint's arguments (only --device may change)."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.resume:
        ckpt_path = Path(args.resume)
        ckpt_path = ckpt_path / "checkpoints" / "last.pt" if ckpt_path.is_dir() else ckpt_path
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            saved = Args(**ckpt["args"])
        except Exception as e:
            raise UserError(f"--resume {args.resume}: not a readable {ALGO}.py checkpoint ({e})") from e
        if ckpt.get("algo") != ALGO:
            raise UserError(f"--resume {args.resume} is a checkpoint of {ckpt.get('algo')}.py, not of {ALGO}.py")
        given = explicit_flags(argv) - {"resume", "device"}
        if "env" in given and resolve_dataset_id(args.env) != ckpt["minari_id"]:
            raise UserError(f"--resume {args.resume} is a checkpoint for dataset {ckpt['minari_id']}, not {args.env}")
        changed = [n for n in given if n != "env" and getattr(args, n) != getattr(saved, n)]
        if changed:
            raise UserError(f"a resumed run keeps its hyperparameters; cannot change {', '.join(sorted(changed))}")
        return dataclasses.replace(saved, resume=args.resume, device=args.device), ckpt
    dataset_id = resolve_dataset_id(args.env)
    default_cfg = Path(__file__).resolve().parent / "configs" / ALGO / f"{config_name(dataset_id)}.yaml"
    cfg_path = Path(args.config) if args.config else (default_cfg if default_cfg.is_file() else None)
    if cfg_path is not None:
        cfg = load_config(cfg_path)
        print(f"config: {cfg_path} {cfg}")
        args = tyro.cli(Args, args=argv, default=Args(**{**dataclasses.asdict(Args()), **cfg}))
    else:
        print("config: none (defaults)")
    return args, None


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


def save_checkpoint(run_dir: Path, state: dict, step: int, keep: int) -> None:
    """checkpoints/step_<N>.pt and last.pt, written atomically; a failed write warns, training goes on."""
    ckpt_dir = run_dir / "checkpoints"
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(ckpt_dir / f"step_{step}.pt", buffer.getvalue())
        atomic_write(ckpt_dir / "last.pt", buffer.getvalue())
        old = sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for p in old[:-keep]:
            p.unlink()
    except OSError as e:
        tqdm.write(f"warning: checkpoint at step {step} not written ({e}); the previous one is kept")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name} was asked for but is not available on this machine")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def main(argv: list) -> None:
    args, ckpt = parse_args(argv)
    validate(args)
    device = pick_device(args.device)
    dataset_id = resolve_dataset_id(args.env)
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")

    # TRY NOT TO MODIFY: seeding
    seed_everything(args.seed)
    torch.backends.cudnn.deterministic = True

    # Data
    dataset = load_minari_dataset(dataset_id)
    data = load_transitions(dataset)
    low, high = dataset.action_space.low.astype(np.float32), dataset.action_space.high.astype(np.float32)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise UserError(f"dataset {dataset_id} has an unbounded action space {dataset.action_space}")
    obs_mean, obs_std = data["obs"].mean(0), data["obs"].std(0) + 1e-3
    if not args.normalize_states:
        obs_mean, obs_std = np.zeros_like(obs_mean), np.ones_like(obs_std)
    family = reward_family(dataset_id) if args.reward_transform == "auto" else args.reward_transform
    rewards = transform_rewards(data["rewards"], data["returns"], family)
    buffer = Buffer(
        (data["obs"] - obs_mean) / obs_std,
        scale_actions(data["actions"], low, high),
        rewards,
        (data["next_obs"] - obs_mean) / obs_std,
        data["dones"],
        device,
        args.seed,
    )
    obs_dim, act_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(
        f"dataset {dataset_id}: {len(rewards)} transitions, {len(data['returns'])} episodes, obs {obs_dim}, "
        f"actions {act_dim}, reward transform '{family}', device {device}"
    )

    # Evaluation envs: built once, reused at every evaluation
    envs = gym.vector.SyncVectorEnv([lambda: make_eval_env(dataset)] * args.eval_episodes)
    env_obs_dim = gym.spaces.flatdim(envs.single_observation_space)
    if env_obs_dim != obs_dim or envs.single_action_space.shape != (act_dim,):
        raise UserError(
            f"the evaluation env of {dataset_id} has observations of size {env_obs_dim} and actions "
            f"{envs.single_action_space.shape}, the dataset {obs_dim} and ({act_dim},): they do not match"
        )

    # Run folder: a resumed run continues in its own folder
    if ckpt is not None:
        run_dir = Path(args.resume)
        run_dir = run_dir if run_dir.is_dir() else run_dir.parent.parent
    else:
        run_dir = Path(args.output) / f"{args.env.replace('/', '-')}__{ALGO}__{args.seed}__{int(time.time())}"
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "args.yaml").write_text(yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir}: {e}. Choose another with --output.") from e

    # Networks and optimizers
    actor = Actor(obs_dim, act_dim, args.hidden_dim, args.n_hidden, args.actor_dropout, args.deterministic_actor)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden, args.layer_norm)
    value = mlp(obs_dim, 1, args.hidden_dim, args.n_hidden)
    if args.orthogonal_init:
        for net in (actor, critic, value):
            orthogonal_init(net)
    actor, critic, value = actor.to(device), critic.to(device), value.to(device)
    target_critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.n_hidden, args.layer_norm).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    # fused=True: one kernel per optimizer step instead of a python loop over parameters (CPU, CUDA, MPS)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    value_opt = torch.optim.Adam(value.parameters(), lr=args.value_lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        actor_opt,
        lambda s: (
            0.5 * (1 + math.cos(math.pi * min(s, args.total_steps) / args.total_steps)) if args.cosine_actor_lr else 1.0
        ),
    )
    update = make_update(actor, critic, target_critic, value, actor_opt, critic_opt, value_opt, scheduler, args)
    if args.compile:
        update = torch.compile(update)
    modules = {"actor": actor, "critic": critic, "target_critic": target_critic, "value": value}
    optimizers = {"actor_opt": actor_opt, "critic_opt": critic_opt, "value_opt": value_opt, "scheduler": scheduler}

    start_step, history, clock = 0, [], {"wall": 0.0, "train_seconds": 0.0, "train_steps": 0}
    if ckpt is not None:
        for name, obj in {**modules, **optimizers}.items():
            obj.load_state_dict(ckpt[name])
        set_rng_states(ckpt["rng"], buffer.generator)
        start_step, history, clock = ckpt["step"], ckpt["eval_history"], ckpt["clock"]
        print(f"resumed {run_dir} at step {start_step}")

    if args.track:
        try:
            import wandb
        except ImportError as e:
            raise UserError("--track needs Weights & Biases: pip install wandb") from e
        wandb.init(
            project=args.wandb_project,
            config=dataclasses.asdict(args),
            name=run_dir.name,
            sync_tensorboard=True,
            resume="allow",
            id=run_dir.name.replace("/", "-"),
        )
    writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if start_step else None)
    policy = Policy(actor, obs_mean, obs_std, low, high, device)

    def checkpoint_state(step):
        return {
            "algo": ALGO,
            "minari_id": dataset_id,
            "step": step,
            "args": dataclasses.asdict(args),
            **{name: obj.state_dict() for name, obj in {**modules, **optimizers}.items()},
            "rng": get_rng_states(buffer.generator),
            "normalization": {
                "obs_mean": torch.from_numpy(obs_mean),
                "obs_std": torch.from_numpy(obs_std),
                "action_low": torch.from_numpy(low),
                "action_high": torch.from_numpy(high),
                "reward_transform": family,
            },
            "eval_history": history,
            "clock": clock,
        }

    def write_summary(step):
        scores = [h["normalized_score"] for h in history if h["normalized_score"] is not None]
        returns = [h["return"] for h in history]
        summary = {
            "algo": ALGO,
            "env": args.env,
            "minari_id": dataset_id,
            "seed": args.seed,
            "steps": step,
            "wall_seconds": round(clock["wall"] + time.time() - t_session, 2),
            "sps": round(clock["train_steps"] / max(clock["train_seconds"], 1e-9), 2),
            "final_normalized_score": scores[-1] if scores else None,
            "best_normalized_score": max(scores) if scores else None,
            "final_return": returns[-1] if returns else None,
            "best_return": max(returns) if returns else None,
            "eval_history": history,
        }
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2).encode())

    def check_finite(metrics, step):
        """The only host sync of training: at logging and checkpoint points, never per step."""
        values = {k: v.item() for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            last = run_dir / "checkpoints" / "last.pt"
            kept = f"the last finite checkpoint is kept: {last}" if last.exists() else "no checkpoint was written yet"
            raise FloatingPointError(
                f"{', '.join(bad)} became non-finite between step {last_check[0]} and step {step}. The run is "
                f"stopped; {kept}. Lower the learning rates, or try --layer-norm against diverging critics."
            )
        last_check[0] = step
        return values

    # Stop cleanly on SIGINT/SIGTERM: finish the current step, checkpoint, exit non-zero with a resume hint
    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    t_session, last_check, last_score = time.time(), [start_step], None
    t_window, window_start = time.time(), start_step  # SPS window; evaluation/checkpoint time is excluded
    actor.train()
    pbar = tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps)
    for step in pbar:
        metrics = update(*buffer.sample(args.batch_size))

        if step % args.log_every == 0 or step == args.total_steps:
            values = check_finite(metrics, step)
            seconds = time.time() - t_window
            sps = (step - window_start) / max(seconds, 1e-9)
            clock["train_seconds"] += seconds
            clock["train_steps"] += step - window_start
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("charts/learning_rate", actor_opt.param_groups[0]["lr"], step)
            pbar.set_postfix(sps=f"{sps:.0f}", score=last_score)
            t_window, window_start = time.time(), step

        t_pause = time.time()
        if step % args.eval_every == 0 or step == args.total_steps:
            actor.eval()
            seeds = [int(s) for s in np.random.SeedSequence([args.seed, step]).generate_state(args.eval_episodes)]
            returns, lengths = evaluate(envs, policy, seeds)
            score = normalized_score(dataset, returns)
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
            writer.add_scalar("eval/return", returns.mean(), step)
            writer.add_scalar("eval/length", lengths.mean(), step)
            if score is not None:
                writer.add_scalar("eval/normalized_score", score, step)
            last_score = f"{returns.mean() if score is None else score:.1f}"
            if args.capture_video:
                message = record_video(dataset, policy, seeds[0], run_dir / "videos" / f"step_{step}.gif")
                if message:
                    tqdm.write(message)
                    args.capture_video = False
            actor.train()
            write_summary(step)

        if step % args.checkpoint_every == 0 or step == args.total_steps or stop_signal:
            check_finite(metrics, step)
            clock["wall"] += time.time() - t_session
            t_session = time.time()
            save_checkpoint(run_dir, checkpoint_state(step), step, args.keep_checkpoints)
        t_window += time.time() - t_pause
        if stop_signal:
            writer.close()
            print(f"\ninterrupted at step {step}; checkpoint saved. Resume with: python {ALGO}.py --resume {run_dir}")
            sys.exit(128 + stop_signal[0])

    writer.close()
    envs.close()
    write_summary(args.total_steps)
    print(f"done: {run_dir} (final score {last_score})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
