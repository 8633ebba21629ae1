"""Implicit Q-Learning (IQL), a single-file implementation on Gymnasium + Minari.
IQL learns a Q-function without ever querying actions outside the dataset: an expectile regression of V(s) towards
Q(s, a) over dataset actions approximates a max over in-support actions, Q is trained by TD against V(s'), and the
policy is extracted with advantage-weighted regression (AWR). Paper: "Offline Reinforcement Learning with Implicit
Q-Learning", Ilya Kostrikov, Ashvin Nair, Sergey Levine, ICLR 2022, arXiv:2110.06169. Read on: the algorithm (Args,
per-domain settings, networks, losses, update), then data, evaluation, plumbing, training loop. Usage: README.md."""

import copy
import dataclasses
import difflib
import importlib.metadata
import json
import math
import os
import re
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
    run_name: str | None = None  # name of the run folder inside --output; default <env>__iql__<seed>__<unix time>
    resume: str | None = None  # continue a run: its folder or a checkpoint file (only --device may be given with it)
    track: bool = False  # log to Weights & Biases (pip install wandb); project: $WANDB_PROJECT
    capture_video: bool = False  # save a GIF of one evaluation episode to <run>/videos/ (MuJoCo: MUJOCO_GL=egl)
    compile: bool = False  # torch.compile the update step
    bf16: bool = False  # bfloat16 autocast of the hidden layers; output layers, losses, weights, optimizer stay float32

    # Algorithm hyperparameters (defaults: the official code's MuJoCo locomotion settings)
    discount: float = 0.99  # discount factor gamma
    tau: float = 0.005  # Polyak averaging rate of the target critics
    expectile: float = 0.7  # expectile tau of the value loss (0.5 = mean, -> 1 = max over dataset actions)
    beta: float = 3.0  # inverse temperature of the AWR actor loss: weights exp(beta * advantage)
    actor_lr: float = 3e-4  # actor learning rate (cosine-decayed to 0 unless --no-cosine-actor-lr)
    critic_lr: float = 3e-4  # Q learning rate
    value_lr: float = 3e-4  # V learning rate
    hidden_dim: int = 256  # width of every MLP
    n_hidden: int = 2  # hidden layers of every MLP
    deterministic_actor: bool = False  # advantage-weighted MSE of a deterministic actor, not a Gaussian likelihood
    actor_dropout: float = 0.0  # dropout rate in the actor's hidden layers
    layer_norm: bool = False  # LayerNorm in the critics' hidden layers
    orthogonal_init: bool = False  # the official code's orthogonal init (gain sqrt 2); default PyTorch's (see README)
    cosine_actor_lr: bool = True  # cosine decay of the actor learning rate to 0 over total_steps
    normalize_states: bool = True  # standardize observations with the dataset mean/std (also at evaluation)
    reward_transform: Literal["none", "locomotion", "antmaze"] = "none"  # locomotion: r*1000/spread; antmaze: r-1


# Published per-domain settings of the official code (github.com/ikostrikov/implicit_q_learning, configs/*_config.py;
# its README uses kitchen's for Adroit; reward transforms and 100 AntMaze eval episodes: train_offline.py, README).
# Precedence: Args defaults < this table (chosen by --env) < --config FILE.yaml < command-line flags.
DOMAIN_SETTINGS = {
    "locomotion": {"reward_transform": "locomotion"},  # halfcheetah, hopper, walker2d: the official scaling rule
    "antmaze": {"expectile": 0.9, "beta": 10.0, "reward_transform": "antmaze", "eval_episodes": 100},
    "adroit": {"beta": 0.5, "actor_dropout": 0.1},
    "kitchen": {"beta": 0.5, "actor_dropout": 0.1},
}


# -------- ALGO LOGIC: networks ----------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int, dropout: float = 0.0) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        dim = hidden
    return nn.Sequential(*layers, common.OutputLinear(dim, out_dim))


class TwinQ(nn.Module):
    """Both critics Q1, Q2 in one module: every layer is one batched matmul over the 2 critics."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int, layer_norm: bool):
        super().__init__()
        layers, dim = [], obs_dim + act_dim
        for _ in range(n_hidden):
            norm = [common.BatchedLayerNorm(2, hidden)] if layer_norm else []
            layers += [common.BatchedLinear(2, dim, hidden), *norm, nn.ReLU()]
            dim = hidden
        self.net = nn.Sequential(*layers, common.BatchedOutputLinear(2, dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)  # (2, B)


class Actor(nn.Module):
    """pi(a|s) = N(tanh(MLP(s)), exp(log_std)), the log-std state-independent (official IQL); or the mean alone."""

    log_std_min, log_std_max = -5.0, 2.0  # the official code's bounds (CORL: -20, 2)

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
        return (-0.5 * ((actions - mean) * torch.exp(-log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


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
    """Adam (fused: one kernel per step) for each learner; the actor's LR follows a cosine decay to 0.
    Learning rates are tensors, so that --compile does not recompile when the schedule changes them."""
    adam = lambda net, lr: torch.optim.Adam(net.parameters(), lr=torch.tensor(lr), fused=True)  # noqa: E731
    lrs = {"actor": args.actor_lr, "critic": args.critic_lr, "value": args.value_lr}
    opts = {f"{name}_opt": adam(nets[name], lr) for name, lr in lrs.items()}
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.total_steps) / args.total_steps))  # noqa: E731
    schedule = cosine if args.cosine_actor_lr else lambda s: 1.0
    return opts | {"scheduler": torch.optim.lr_scheduler.LambdaLR(opts["actor_opt"], schedule)}


# -------- ALGO LOGIC: losses (paper equations) and the update step ----------------------------------------------------
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Eq. 5: L_2^tau(u) = |tau - 1(u < 0)| u^2 with u = Q(s,a) - V(s): positive errors weigh tau."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff**2).mean()


def td_loss(q: torch.Tensor, rewards, dones, next_v, discount: float) -> torch.Tensor:
    """Eq. 6: sum over the critics of E[(r + gamma (1 - d) V(s') - Q_i(s, a))^2]; q has shape (2, B)."""
    target = rewards + discount * (1.0 - dones) * next_v
    return ((q - target) ** 2).mean(dim=1).sum()


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float = 100.0) -> torch.Tensor:
    """exp(beta * A(s, a)), clamped at max_weight (100 in the official code) against overflow."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


def awr_actor_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 7: L_pi = -E[exp(beta (Q(s,a) - V(s))) log pi(a|s)]: behaviour cloning weighted by advantage."""
    return -(weights * log_prob).mean()


def make_update(nets: dict, opts: dict, args: Args):
    """One IQL gradient step on a batch, in the official code's order: V, then the actor (advantage from
    the new V), then Q (target from the new V(s')), then Polyak. Returns detached loss tensors (no sync)."""
    actor, critic, target_critic, value = nets["actor"], nets["critic"], nets["target_critic"], nets["value"]

    def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:  # one Adam step on one loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def update(obs, actions, rewards, next_obs, dones):
        with torch.no_grad():
            target_q = target_critic(obs, actions).min(dim=0).values
        value_loss = expectile_loss(target_q - value(obs).squeeze(-1), args.expectile)
        descend(opts["value_opt"], value_loss)

        with torch.no_grad():
            v, next_v = value(torch.cat([obs, next_obs])).squeeze(-1).chunk(2)
            advantage = target_q - v
            weights = awr_weights(advantage, args.beta)
        actor_loss = awr_actor_loss(actor.log_prob(obs, actions), weights)
        descend(opts["actor_opt"], actor_loss)
        opts["scheduler"].step()

        q = critic(obs, actions)
        critic_loss = td_loss(q, rewards, dones, next_v, args.discount)
        descend(opts["critic_opt"], critic_loss)

        common.soft_update(target_critic, critic, args.tau)
        metrics = dict(value_loss=value_loss, actor_loss=actor_loss, critic_loss=critic_loss, q_mean=q.mean(),
                       v_mean=v.mean(), advantage_mean=advantage.mean(), awr_weight_mean=weights.mean())  # fmt: skip
        return {f"losses/{k}": x.detach() for k, x in metrics.items()}

    if args.bf16:  # hidden layers in bfloat16; output layers (common.OutputLinear) and the loss arithmetic in float32
        update = torch.autocast(next(critic.parameters()).device.type, torch.bfloat16)(update)
    return torch.compile(update) if args.compile else update


# -------- Data: dataset names, Minari loading, one on-device buffer (each observation stored once) --------------------
class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


# D4RL-style name -> Minari id, by domain (the keys of DOMAIN_SETTINGS): (tasks, kinds, versions, id template)
DATASET_NAMES = {
    "adroit": ("pen|door|hammer|relocate", "human|cloned|expert", "012", "D4RL/{task}/{kind}-v2"),
    "antmaze": ("antmaze", "umaze|umaze-diverse|medium-play|medium-diverse|large-play|large-diverse", "012",
                "D4RL/antmaze/{kind}-v1"),
    "pointmaze": ("maze2d|pointmaze", "umaze|medium|large|open|umaze-dense|medium-dense|large-dense|open-dense",
                  "0-9", "D4RL/pointmaze/{kind}-v2"),
    "kitchen": ("kitchen", "complete|partial|mixed", "02", "D4RL/kitchen/{kind}-v2"),
    "locomotion": ("halfcheetah|hopper|walker2d", "simple|medium|expert", "0", "mujoco/{task}/{kind}-v0"),
    "mujoco": ("ant|humanoid|invertedpendulum|inverteddoublependulum|pusher|reacher|swimmer", "simple|medium|expert",
               "0", "mujoco/{task}/{kind}-v0"),
}  # fmt: skip


def resolve_dataset_name(name: str) -> tuple[str, str]:
    """(Minari id, DATASET_NAMES domain) of a D4RL-style name (door-human-v2) or a Minari id (containing '/')."""
    for domain, (tasks, kinds, versions, template) in DATASET_NAMES.items():
        if m := re.fullmatch(rf"(?P<task>{tasks})-(?P<kind>{kinds})-v[{versions}]", name):
            return template.format(**m.groupdict()), domain
        if re.match(template.split("{kind}")[0].format(task=f"({tasks})"), name):
            return name, domain
    if "/" in name:
        return name, "other"
    known = [f"{task}-{kind}-{template[-2:]}" for tasks, kinds, _, template in DATASET_NAMES.values()
             for task in tasks.split("|") for kind in kinds.split("|")]  # fmt: skip
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    suggest = f" Did you mean {' or '.join(close)}?" if close else ""
    if d4rl := re.match(r"(halfcheetah|hopper|walker2d|ant)-", name):
        suggest = f" Minari does not host D4RL locomotion; closest: mujoco/{d4rl[1]}/simple-v0, medium-v0, expert-v0."
    raise UserError(f"unknown dataset '{name}'.{suggest} Give a D4RL-style name (door-human-v2, antmaze-umaze-v1, "
                    "kitchen-mixed-v2, hopper-medium-v0) or a Minari id containing '/'.")  # fmt: skip


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy if there is one (minari looks there first), else a download; clear errors otherwise."""
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except ValueError:
        raise UserError(f"'{dataset_id}' is not a valid Minari dataset id: ids look like namespace/name-v<N> "
                        "(D4RL/door/human-v2, mujoco/hopper/medium-v0, local/x/random-v0)") from None  # fmt: skip
    local = Path(minari.storage.get_dataset_path(dataset_id))
    try:
        dataset = minari.load_dataset(dataset_id, download=True)
        next(dataset.iterate_episodes(), None)  # opens main_data.hdf5: a truncated copy fails here, not in training
        return dataset
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        if (local / "data").exists():
            raise UserError(f"the local copy of the dataset at {local} is damaged ({why}), as a partial copy is: "
                            f"delete the folder {local}, then download or copy it again.") from e  # fmt: skip
        raise UserError(f"dataset '{dataset_id}' is not in the local Minari store ({local}) and downloading it failed "
                        f"({why}). Without network: run `minari download {dataset_id}` elsewhere and copy "
                        f"~/.minari/datasets/{dataset_id} to {local} (or set MINARI_DATASETS_PATH to the copy); or "
                        "record a dataset with collect.py (README).") from e  # fmt: skip


def flatten(space: gym.Space, obs) -> np.ndarray:
    """(T, ...) observations -> rows (T, D); Dict keys in order, as gymnasium's FlattenObservation on the eval env."""
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

    def sample(self, batch_size: int) -> tuple:
        i = torch.randint(self.steps.shape[0], (batch_size,), device=self.obs.device, generator=self.generator)
        obs, next_obs = self.obs[self.rows[:, i]]  # (2, B, obs_dim): s and s' in one gather
        steps = self.steps[i]
        return obs, steps[:, :-2], steps[:, -2], next_obs, steps[:, -1]


def load_buffer(dataset: minari.MinariDataset, args: Args, device: torch.device) -> tuple[Buffer, dict]:
    """Read every episode straight into preallocated float32 tensors (host memory peaks near the buffer's own
    size), refuse non-finite values, transform rewards, scale actions and standardize states in place."""
    space, n, n_episodes = dataset.action_space, dataset.total_steps, dataset.total_episodes
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise UserError(f"dataset {dataset.id} has the action space {space}; {ALGO}.py needs bounded continuous (Box) "
                        "actions. For discrete actions use a discrete-action method (e.g. discrete CQL).")  # fmt: skip
    if n_episodes == 0:
        raise UserError(f"dataset {dataset.id} has no episodes")
    low, high = space.low.astype(np.float32).ravel(), space.high.astype(np.float32).ravel()
    # torch's allocator (numpy's huge-page requests made the first fill of a 1.4 GB buffer 4x slower than reading it)
    tensors = (torch.empty(n + n_episodes, gym.spaces.flatdim(dataset.observation_space)),
               torch.empty(n, len(low) + 2), torch.empty(2, n, dtype=torch.int64))  # fmt: skip
    obs, steps, rows = (x.numpy() for x in tensors)
    moments, returns, t = np.zeros((2, obs.shape[1])), [], 0  # moments: sums of s and s^2 (float64) for mean, std
    for k, ep in enumerate(dataset.iterate_episodes()):
        T, row = len(ep.rewards), t + k  # episode k's T + 1 observations start at row t + k
        obs[row : row + T + 1] = flatten(dataset.observation_space, ep.observations)
        steps[t : t + T] = np.column_stack([np.reshape(ep.actions, (T, -1)), ep.rewards, ep.terminations])
        x = obs[row : row + T + 1]
        moments += np.stack([x.sum(0, dtype=float), np.einsum("ij,ij->j", x, x, dtype=float)])  # no temporary
        if not (np.isfinite(moments).all() and np.isfinite(steps[t : t + T]).all()):
            bad = "observations" if not np.isfinite(moments).all() else "actions or rewards"
            raise UserError(f"dataset {dataset.id}: episode {ep.id} has non-finite (NaN/inf) {bad}; repair it or "
                            "leave it out (minari's filter_episodes) before training.")  # fmt: skip
        steps[t : t + T, :-2] = scale_actions(steps[t : t + T, :-2], low, high)  # after the check: inf would clip
        rows[0, t : t + T], t = np.arange(row, row + T), t + T
        returns.append(float(np.sum(ep.rewards, dtype=np.float64)))
    rows[1] = rows[0] + 1
    steps[:, -2] = transform_rewards(steps[:, -2], np.array(returns), args.reward_transform)
    mean = moments[0] / len(obs)
    std = np.sqrt(np.maximum(moments[1] / len(obs) - mean**2, 0.0)) + 1e-3
    mean, std = (mean, std) if args.normalize_states else (np.zeros_like(mean), np.ones_like(std))
    stats = {"obs_mean": torch.tensor(mean, dtype=torch.float32), "obs_std": torch.tensor(std, dtype=torch.float32)}
    torch.addcmul(-stats["obs_mean"] / stats["obs_std"], tensors[0], 1 / stats["obs_std"], out=tensors[0])  # one pass
    buffer = Buffer(*(x.to(device) for x in tensors), torch.Generator(device).manual_seed(args.seed))
    return buffer, stats | {"action_low": torch.from_numpy(low), "action_high": torch.from_numpy(high)}


def transform_rewards(rewards: np.ndarray, episode_returns: np.ndarray, transform: str) -> np.ndarray:
    """Per-domain reward transforms of the official IQL code."""
    if transform == "locomotion":  # scale so that the spread of episode returns is 1000
        spread = episode_returns.max() - episode_returns.min()
        if spread > 1e-3 * max(np.abs(episode_returns).max(), 1.0):
            return rewards * (1000.0 / spread)
        print(f"warning: every episode returns about {episode_returns.max():.4g}: rewards are left unscaled")
    return rewards - 1.0 if transform == "antmaze" else rewards  # antmaze: 0/1 -> -1/0, reaching the goal sooner pays


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map env actions affinely from [low, high] to [-1, 1], where the tanh-mean actor lives; clip to
    +-(1 - 1e-5) like the official code, so log-likelihoods of boundary actions stay finite."""
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1 + 1e-5, 1 - 1e-5)


# -------- Evaluation: vectorized envs, deterministic actions, Minari normalized score ---------------------------------
def make_eval_env(dataset: minari.MinariDataset, **kwargs) -> gym.Env:
    """The dataset's own evaluation env (its episode limit, not gym.make's), observations flattened (Dict spaces)."""
    return gym.wrappers.FlattenObservation(dataset.recover_environment(eval_env=True, **kwargs))


def make_policy(actor: nn.Module, stats: dict, device: torch.device):
    """Env observation -> env action: normalize, deterministic actor mean, map [-1, 1] back to [low, high]."""
    mean, std, low, high = (stats[k].to(device) for k in ("obs_mean", "obs_std", "action_low", "action_high"))

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        action = actor((torch.as_tensor(obs, dtype=torch.float32, device=device) - mean) / std).clamp(-1.0, 1.0)
        return (low + (action + 1.0) * 0.5 * (high - low)).cpu().numpy()

    return policy


def evaluate(envs: gym.vector.VectorEnv, policy, seeds: list) -> tuple:
    """One episode per sub-env, all run in lockstep with one batched policy forward per step. A finished
    sub-env is reset by Gymnasium (on its next step, or at once), so only each sub-env's first episode counts."""
    obs, _ = envs.reset(seed=seeds)
    returns, lengths, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, np.int64), np.zeros(envs.num_envs, bool)
    while not done.all():
        obs, reward, terminated, truncated, _ = envs.step(policy(obs))
        returns += np.where(done, 0.0, reward)
        lengths += ~done
        done |= terminated | truncated
    return returns, lengths


def record_video(dataset, policy, seed: int, folder: Path, step: int) -> str | None:
    """Render one deterministic episode to folder/step_<step>.gif; returns why not if the env cannot render."""
    try:
        env = make_eval_env(dataset, render_mode="rgb_array")
        obs, frames, done = env.reset(seed=seed)[0], [Image.fromarray(env.render())], False
        while not done:
            obs, _, terminated, truncated, _ = env.step(policy(obs[None])[0])
            frames.append(Image.fromarray(env.render()))
            done = terminated or truncated
        folder.mkdir(parents=True, exist_ok=True)
        frames[0].save(folder / f"step_{step}.gif", save_all=True, append_images=frames[1:], duration=33, loop=0)
    except Exception as e:
        return (f"--capture-video: this env cannot render here ({type(e).__name__}: {str(e)[:200]}). MuJoCo "
                "envs need an offscreen GL: MUJOCO_GL=egl (GPU) or osmesa (CPU, apt install libosmesa6).")  # fmt: skip


# -------- TRY NOT TO MODIFY: configuration, checkpoints, summary ------------------------------------------------------
def as_flags(settings: dict) -> list:
    """{"beta": 0.5, "layer_norm": True} -> ["--beta", "0.5", "--layer-norm"]: tyro checks them like flags."""
    named = {str(key).replace("_", "-"): value for key, value in settings.items()}
    flags = [[f"--{'' if v else 'no-'}{k}"] if isinstance(v, bool) else [f"--{k}", str(v)] for k, v in named.items()]
    return [x for flag in flags for x in flag]


def parse_args(argv: list) -> tuple:
    """Args defaults < DOMAIN_SETTINGS[domain of --env] < --config YAML < flags, validated; on --resume, the
    checkpoint's arguments (a flag that would change them is refused; only --device may differ)."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.resume:
        path = Path(args.resume) / "checkpoints" / "last.pt" if Path(args.resume).is_dir() else Path(args.resume)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt["algo"] != ALGO:
                raise ValueError(f"it is a checkpoint of {ckpt['algo']}.py")
            saved = Args(**ckpt["args"])
        except Exception as e:
            raise UserError(f"--resume {args.resume}: not a readable {ALGO}.py checkpoint ({e})") from e
        given = dataclasses.asdict(tyro.cli(Args, args=argv, default=saved))
        if changed := [f"{k} ({v} -> {given[k]})" for k, v in dataclasses.asdict(saved).items()
                       if given[k] != v and k not in ("resume", "device")]:  # fmt: skip
            raise UserError(f"a resumed run keeps its dataset and hyperparameters; cannot change {', '.join(changed)}")
        return dataclasses.replace(saved, resume=str(path.parent.parent), device=given["device"]), ckpt

    settings = DOMAIN_SETTINGS.get(resolve_dataset_name(args.env)[1], {})
    print(f"per-domain settings for {args.env}: {settings or 'none (Args defaults)'}")
    try:  # a config file's keys are read like flags: alone first, so that the error (printed by tyro) names it
        config = as_flags(yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else []
        tyro.cli(Args, args=config)
    except (OSError, yaml.YAMLError, AttributeError, SystemExit) as e:
        raise UserError(f"in --config {args.config}: expected a YAML mapping of Args fields, read like flags"
                        f"{'' if isinstance(e, SystemExit) else f' ({e})'}") from None  # fmt: skip
    return validate(tyro.cli(Args, args=[*as_flags(settings), *config, *argv])), None


def validate(args: Args) -> Args:
    """Out-of-range hyperparameters fail here, before any data is loaded."""
    checks = [
        (args.total_steps > 0 and args.batch_size > 0, "total_steps and batch_size must be > 0"),
        (0 < args.expectile < 1 and args.beta >= 0, "expectile must be in (0, 1) and beta >= 0"),
        (0 <= args.discount <= 1 and 0 < args.tau <= 1, "discount must be in [0, 1] and tau in (0, 1]"),
        (min(args.actor_lr, args.critic_lr, args.value_lr) > 0, "learning rates must be > 0"),
        (args.hidden_dim > 0 and args.n_hidden >= 1 and 0 <= args.actor_dropout < 1, "hidden_dim must be > 0, "
         "n_hidden >= 1, actor_dropout in [0, 1)"),
        (args.eval_episodes >= 0 and min(args.eval_every, args.log_every, args.checkpoint_every, args.keep_checkpoints)
         > 0, "eval_episodes must be >= 0; eval_every, log_every, checkpoint_every, keep_checkpoints > 0"),
        (args.eval_episodes > 0 or not args.capture_video, "--capture-video needs evaluation episodes"),
    ]  # fmt: skip
    if errors := [msg for ok, msg in checks if not ok]:
        raise UserError(f"invalid hyperparameters: {'; '.join(errors)}.")
    return args


def write_summary(run_dir: Path, args: Args, dataset, history: list, step: int, clock: dict) -> None:
    """summary.json, what sweep.py and report.py read, written atomically with every checkpoint and at the end."""
    scores = [h["normalized_score"] for h in history if h["normalized_score"] is not None]
    returns, packages = [h["return"] for h in history], ("torch", "minari", "gymnasium", "gymnasium_robotics", "mujoco")
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]
    summary = {"algo": ALGO, "env": args.env, "minari_id": dataset.id, "domain": resolve_dataset_name(dataset.id)[1],
               "seed": args.seed, "steps": step, "total_steps": args.total_steps, "completed": step == args.total_steps,
               "eval_episodes": args.eval_episodes, "wall_seconds": round(clock["wall"], 2),
               "sps": round(step / max(clock["train_seconds"], 1e-9), 2), "final_return": (returns or [None])[-1],
               "best_return": max(returns, default=None), "final_normalized_score": (scores or [None])[-1],
               "best_normalized_score": max(scores, default=None),
               **{k: dataset.storage.metadata.get(k) for k in ("ref_min_score", "ref_max_score")},
               "versions": {name: importlib.metadata.version(name) for name in packages},
               "git_commit": subprocess.run(git, capture_output=True, text=True).stdout.strip() or None,
               "args": dataclasses.asdict(args), "eval_history": history}  # fmt: skip
    (run_dir / "summary.json.tmp").write_text(json.dumps(summary, indent=2))
    os.replace(run_dir / "summary.json.tmp", run_dir / "summary.json")


# -------- main: set up, then the training loop ------------------------------------------------------------------------
def main(argv: list) -> None:
    args, ckpt = parse_args(argv)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = torch.device(next(d for d in available if available[d]) if args.device == "auto" else args.device)
    if not available[device.type]:
        raise UserError(f"--device {args.device} was asked for but is not available on this machine")
    os.environ.setdefault("MUJOCO_GL", "egl")  # --capture-video: MuJoCo renders offscreen through EGL by default
    common.seed_everything(args.seed)  # TRY NOT TO MODIFY: seeding

    dataset = load_dataset(resolve_dataset_name(args.env)[0])
    if args.eval_episodes and dataset.env_spec is None and dataset.storage.metadata.get("eval_env_spec") is None:
        print(f"dataset {dataset.id} has no environment: training without evaluation (--eval-episodes 0)")
        args = dataclasses.replace(args, eval_episodes=0, capture_video=False)
    buffer, stats = load_buffer(dataset, args, device)
    obs_dim, act_dim = buffer.obs.shape[1], len(stats["action_low"])
    print(f"dataset {dataset.id}: {len(buffer.steps)} transitions, {dataset.total_episodes} episodes, "
          f"obs {obs_dim}, actions {act_dim}, rewards '{args.reward_transform}', device {device}")  # fmt: skip
    if args.eval_episodes:  # evaluation envs, built once
        envs = gym.vector.SyncVectorEnv([lambda: make_eval_env(dataset)] * args.eval_episodes)
        env_sizes = (gym.spaces.flatdim(envs.single_observation_space), *envs.single_action_space.shape)
        if env_sizes != (obs_dim, act_dim):
            raise UserError(f"the evaluation env of {dataset.id} has observation and action sizes {env_sizes}, "
                            f"the dataset {(obs_dim, act_dim)}: they do not match")  # fmt: skip
    has_scores = None not in map(dataset.storage.metadata.get, ("ref_min_score", "ref_max_score"))  # normalized score

    name = args.run_name or f"{args.env.replace('/', '-')}__{ALGO}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.output) / name if ckpt is None else Path(args.resume)  # a resumed run stays in its folder
    if ckpt is None and (run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick a new name")
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "args.yaml").write_text(yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir}: {e}. Choose another with --output.") from e

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

        wandb.init(project=os.environ.get("WANDB_PROJECT", "single-file-offline-rl"), name=run_dir.name,
                   id=run_dir.name, config=dataclasses.asdict(args), sync_tensorboard=True, resume="allow")  # fmt: skip
    writer = SummaryWriter(str(run_dir), purge_step=start + 1 if start else None)
    policy, stop = make_policy(nets["actor"], stats, device), []  # stop: signals received
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, checkpoint, exit with a resume hint
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    # wall clock of the whole run (across resumes); SPS over the training steps only, evaluations/checkpoints excluded
    t_start, t_window, last_check, last_score = time.time() - clock["wall"], time.time(), start, None
    for step in (pbar := tqdm(range(start + 1, args.total_steps + 1), initial=start, total=args.total_steps)):
        metrics = update(*buffer.sample(args.batch_size))
        final = step == args.total_steps

        if step % args.log_every == 0 or step % args.checkpoint_every == 0 or final or stop:
            values = {k: v.item() for k, v in metrics.items()}  # the only host sync of training, never per step
            if bad := [k for k, v in values.items() if not math.isfinite(v)]:  # stop before a checkpoint is written
                raise FloatingPointError(f"{', '.join(bad)} became non-finite between steps {last_check} and {step}: "
                                         "the data was checked when loaded, so the optimization diverged. Lower the "
                                         "learning rates, or try --layer-norm.")  # fmt: skip
            clock["train_seconds"] += (seconds := time.time() - t_window)
            values["charts/SPS"] = (step - last_check) / max(seconds, 1e-9)
            values["charts/learning_rate"] = float(opts["actor_opt"].param_groups[0]["lr"])
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            pbar.set_postfix(sps=f"{values['charts/SPS']:.0f}", score=last_score)
            t_window, last_check = time.time(), step

        t_pause = time.time()
        if args.eval_episodes and (step % args.eval_every == 0 or final):
            nets["actor"].eval()
            seeds = [int(s) for s in np.random.SeedSequence([args.seed, step]).generate_state(args.eval_episodes)]
            returns, lengths = evaluate(envs, policy, seeds)
            score = float(np.mean(minari.get_normalized_score(dataset, returns)) * 100) if has_scores else None
            history.append({"step": step, "return": float(returns.mean()), "return_std": float(returns.std()),
                            "length": float(lengths.mean()), "normalized_score": score,
                            "seconds": round(time.time() - t_pause, 3)})  # fmt: skip
            for tag in ("return", "length") + (("normalized_score",) if has_scores else ()):
                writer.add_scalar(f"eval/{tag}", history[-1][tag], step)
            last_score = f"{returns.mean() if score is None else score:.1f}"
            if args.capture_video and (message := record_video(dataset, policy, seeds[0], run_dir / "videos", step)):
                tqdm.write(message)
                args.capture_video = False
            nets["actor"].train()

        if step % args.checkpoint_every == 0 or final or stop:
            clock["wall"] = time.time() - t_start
            state = {name: obj.state_dict() for name, obj in {**nets, **opts}.items()} | dict(
                algo=ALGO, minari_id=dataset.id, step=step, args=dataclasses.asdict(args), clock=clock,
                normalization=stats, eval_history=history, rng=common.get_rng_states(buffer.generator))  # fmt: skip
            common.save_checkpoint(run_dir, state, step, args.keep_checkpoints)
            write_summary(run_dir, args, dataset, history, step, clock)
        t_window += time.time() - t_pause
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
