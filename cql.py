"""Conservative Q-Learning (CQL), a single-file implementation on Gymnasium + Minari.

CQL is Soft Actor-Critic (SAC) trained on a fixed dataset with one change to the critic loss: besides the TD
error, each critic pushes down a soft maximum (log-sum-exp) of its Q-values over actions the policy or a uniform
proposal would pick, and pushes up Q at the dataset's actions. Out-of-distribution actions therefore cannot look
better than the data, which is what breaks naive offline SAC. This file implements the variant used in the
paper's experiments: CQL(H), the log-sum-exp estimated by importance sampling, with SAC's tanh-Gaussian actor,
twin critics and automatic entropy tuning, plus the Lagrange, max-backup and BC-warm-up options of the
reference code. Paper: "Conservative Q-Learning for Offline Reinforcement Learning", Aviral Kumar, Aurick Zhou,
George Tucker, Sergey Levine, NeurIPS 2020, arXiv:2006.04779; SAC: Haarnoja et al. 2018, arXiv:1801.01290 and
arXiv:1812.05905. Usage, metrics and implementation details: README.md, section "CQL".
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
import torch.nn.functional as F
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

ALGO = "cql"


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
    """YAML of hyperparameters; default: configs/cql/<dataset>.yaml beside this script, if it exists"""
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
    """parent folder of the run folder <env>__cql__<seed>__<unix time>"""
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

    # Algorithm hyperparameters (defaults: CORL's CQL, i.e. its MuJoCo locomotion settings)
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics"""
    actor_lr: float = 3e-5
    """policy learning rate (also the entropy temperature's, as in CORL); 1e-4 on Adroit and AntMaze"""
    critic_lr: float = 3e-4
    """critic learning rate (also the Lagrange multiplier's, as in CORL)"""
    hidden_dim: int = 256
    """width of the actor's and the critics' hidden layers"""
    actor_n_hidden: int = 3
    """hidden layers of the actor"""
    critic_n_hidden: int = 3
    """hidden layers of each critic (both critics always have the same depth); 5 on AntMaze"""
    layer_norm: bool = False
    """LayerNorm in the critics' hidden layers"""
    orthogonal_init: bool = True
    """orthogonal initialisation (gain sqrt 2) of every layer of the actor and both critics; with or without
    it, the output layers are then scaled by 1e-2 (CORL)"""
    autotune: bool = True
    """automatic entropy tuning: learn the temperature alpha so that the policy's entropy tracks target_entropy"""
    alpha: float = 1.0
    """entropy temperature: fixed with --no-autotune, else its initial value"""
    target_entropy: float | None = None
    """target entropy of the automatic tuning; default -|A| (minus the action dimension)"""
    backup_entropy: bool = False
    """subtract alpha * log pi(a'|s') in the TD target (soft backup, as in SAC); off in CQL's experiments"""
    cql_alpha: float = 10.0
    """weight alpha of the conservative penalty (Eq. 4); 1.0 on Adroit, 5.0 on AntMaze"""
    cql_n_actions: int = 10
    """N: actions sampled per state from each of Uniform, pi(.|s) and pi(.|s') for the log-sum-exp"""
    cql_temp: float = 1.0
    """temperature T of the log-sum-exp: T * logsumexp(Q / T)"""
    cql_clip_diff_min: float = -math.inf
    """clip the per-state gap logsumexp Q - Q(s, a_data) from below"""
    cql_clip_diff_max: float = math.inf
    """clip the per-state gap logsumexp Q - Q(s, a_data) from above"""
    cql_lagrange: bool = False
    """learn the penalty multiplier alpha' by dual gradient ascent, holding the gap at cql_target_action_gap"""
    cql_target_action_gap: float | None = None
    """threshold tau of --cql-lagrange (required with it; 0.8 on AntMaze)"""
    cql_max_target_backup: bool = False
    """TD target: max over cql_n_actions sampled next actions of the min over critics (AntMaze)"""
    bc_steps: int = 0
    """train the actor by behaviour cloning (alpha log pi - log pi(a_data|s)) for this many first steps"""
    normalize_states: bool = True
    """standardize observations with the dataset mean/std (applied identically at evaluation)"""
    reward_transform: Literal["auto", "none", "locomotion", "antmaze"] = "auto"
    """auto: antmaze ((r - 0.5) * 10, CORL) for D4RL/antmaze/*, none otherwise; locomotion: IQL's return scaling"""
    reward_scale: float = 1.0
    """rewards are multiplied by this after the transform"""
    reward_bias: float = 0.0
    """and then shifted by this"""


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
            f"dataset {dataset.id} has a {type(dataset.action_space).__name__} action space; CQL here needs "
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
    """CORL's CQL transforms AntMaze rewards only; its MuJoCo runs train on raw rewards."""
    return "antmaze" if dataset_id.startswith("D4RL/antmaze/") else "none"


def transform_rewards(
    rewards: np.ndarray, episode_returns: np.ndarray, family: str, scale: float = 1.0, bias: float = 0.0
) -> np.ndarray:
    """Per-domain reward transform, then r * scale + bias (--reward-scale, --reward-bias)."""
    if family == "locomotion":  # IQL's scaling: the spread of episode returns becomes 1000
        rewards = rewards * (1000.0 / max(episode_returns.max() - episode_returns.min(), 1e-8))
    elif family == "antmaze":  # CORL: 0/1 goal reward -> -5/+5 (reward_scale 10, reward_bias -5)
        rewards = (rewards - 0.5) * 10.0
    return rewards * scale + bias


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map env actions affinely from [low, high] to [-1, 1], where the tanh-squashed actor lives; clip to
    +-(1 - 1e-5) like the official IQL code, so atanh and log pi(a_data|s) of boundary actions stay finite."""
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
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # clamp of the actor's log-std (SAC, CORL)


def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden), nn.ReLU()]
        dim = hidden
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class TwinQ(nn.Module):
    """Both critics Q1, Q2 in one module: every layer is one batched matmul over the 2 critics, so the two
    critics have the same depth and width by construction."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int, layer_norm: bool, n: int = 2):
        super().__init__()
        layers, dim = [], obs_dim + act_dim
        for _ in range(n_hidden):
            layers += [BatchedLinear(n, dim, hidden)] + ([BatchedLayerNorm(n, hidden)] if layer_norm else [])
            layers += [nn.ReLU(inplace=True)]  # in place: one (2, rows, hidden) buffer less per layer
            dim = hidden
        self.net = nn.Sequential(*layers, BatchedLinear(n, dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (B, D) with actions (B, A) -> (2, B); with K actions per state, (K, B, A) -> (2, K, B)."""
        if actions.dim() == 3:  # K actions for each state: one forward over K * B rows
            k, b, _ = actions.shape
            return self(obs.repeat(k, 1), actions.reshape(k * b, -1)).view(-1, k, b)
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1).float()  # float32 also under --bf16


class Actor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s)^2)): SAC's squashed Gaussian with a state-dependent std, actions in
    [-1, 1]. One MLP trunk; its last layer holds the mean and log-std heads side by side."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden, n_hidden)

    def distribution(self, obs: torch.Tensor) -> tuple:
        mean, log_std = self.net(obs).float().chunk(2, dim=-1)  # the Gaussian math in float32, also under --bf16
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action tanh(mu(s)), used for evaluation."""
        return torch.tanh(self.distribution(obs)[0])


class Scalar(nn.Module):
    """One learnable number (log alpha, log alpha') as a module, so it checkpoints like the networks."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self) -> torch.Tensor:
        return self.value


def make_networks(args: Args, obs_dim: int, act_dim: int) -> dict:
    """Actor, twin critics and their Polyak copy, log alpha (SAC temperature), log alpha' (CQL multiplier)."""
    actor = Actor(obs_dim, act_dim, args.hidden_dim, args.actor_n_hidden)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.critic_n_hidden, args.layer_norm)
    for net, last in ((actor, actor.net[-1]), (critic, critic.net[-1])):
        if args.orthogonal_init:
            orthogonal_init(net)
        with torch.no_grad():  # output layers start ~100x smaller (CORL: gain 1e-2): Q ~ 0, pi ~ tanh(N(0, 1))
            last.weight.mul_(1e-2)
            last.bias.mul_(1e-2)
    target_critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.critic_n_hidden, args.layer_norm)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    log_alpha = Scalar(math.log(args.alpha)).requires_grad_(args.autotune)
    log_alpha_prime = Scalar(0.0).requires_grad_(args.cql_lagrange)  # alpha' = exp(0) = 1 at the start
    return {
        "actor": actor,
        "critic": critic,
        "target_critic": target_critic,
        "log_alpha": log_alpha,
        "log_alpha_prime": log_alpha_prime,
    }


def make_optimizers(nets: dict, args: Args) -> dict:
    """Adam for each learner; the temperatures use the actor's / critic's learning rate like CORL."""
    return {
        "actor_opt": torch.optim.Adam(nets["actor"].parameters(), lr=args.actor_lr),
        "critic_opt": torch.optim.Adam(nets["critic"].parameters(), lr=args.critic_lr),
        "alpha_opt": torch.optim.Adam(nets["log_alpha"].parameters(), lr=args.actor_lr),
        "alpha_prime_opt": torch.optim.Adam(nets["log_alpha_prime"].parameters(), lr=args.critic_lr),
    }


# --------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the squashed Gaussian, losses (paper equations) and the update step
# --------------------------------------------------------------------------------------------------------
def tanh_gaussian_log_prob(u: torch.Tensor, eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)|s) for u = mu + sigma * eps: the Gaussian log-density of u minus the log-Jacobian of
    tanh, log(1 - tanh(u)^2) (SAC, Appendix C), in the overflow-free form 2 (log 2 - u - softplus(-2u)).
    Sums over the action dimensions."""
    log_normal = -0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)
    return (log_normal - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


def sample_actions(mean: torch.Tensor, log_std: torch.Tensor, n: int) -> tuple:
    """n reparameterized samples a = tanh(mu + sigma * eps) per state: actions (n, B, A), log pi(a|s) (n, B)."""
    eps = torch.randn((n, *mean.shape), device=mean.device, dtype=mean.dtype)
    u = mean + log_std.exp() * eps
    return torch.tanh(u), tanh_gaussian_log_prob(u, eps, log_std)


def log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of given actions in (-1, 1) (dataset actions are clipped to +-(1 - 1e-5): atanh is finite)."""
    u = torch.atanh(actions)
    return tanh_gaussian_log_prob(u, (u - mean) * torch.exp(-log_std), log_std)


def ood_actions(mean: torch.Tensor, log_std: torch.Tensor, n: int) -> tuple:
    """The proposal actions of the importance-sampled log-sum-exp (Appendix F) and their log-densities.
    mean, log_std: pi(.|s) for the B states s, then pi(.|s') for their B next states, shape (2B, A). Per state
    s: n actions from Uniform[-1, 1]^|A| (density 0.5^|A|), n from pi(.|s) and n from pi(.|s'), all to be
    evaluated at s. Returns actions (3n, B, A) and log-densities (3n, B); pi(.|s') samples carry log pi(a|s'),
    as in the reference code."""
    b, act_dim = mean.shape[0] // 2, mean.shape[1]
    policy, policy_log_pi = sample_actions(mean, log_std, n)  # (n, 2B, A): s and s' in one draw
    uniform = torch.rand((n, b, act_dim), device=mean.device) * 2.0 - 1.0
    uniform_log_density = torch.full((n, b), act_dim * math.log(0.5), device=mean.device)
    actions = torch.cat([uniform, policy[:, :b], policy[:, b:]])
    return actions, torch.cat([uniform_log_density, policy_log_pi[:, :b], policy_log_pi[:, b:]])


def max_target_backup(next_q: torch.Tensor, next_log_pi: torch.Tensor) -> tuple:
    """V(s') from n sampled next actions: max over the actions of the min over the two target critics
    (--cql-max-target-backup; with n = 1 this is SAC's min-of-two backup). next_q (2, n, B), next_log_pi (n, B).
    Returns V(s') (B,) and log pi of the chosen action (B,), for --backup-entropy."""
    value, index = next_q.min(dim=0).values.max(dim=0)
    return value, next_log_pi.gather(0, index[None]).squeeze(0)


def td_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4, second term: sum over both critics of E[(Q_i(s, a) - B^pi Q_target(s, a))^2] (the 1/2 is
    dropped as in the reference code); q (2, B)."""
    return ((q - target) ** 2).mean(dim=1).sum()


def cql_penalty(q_ood, log_density, q_data, temp: float, clip_min: float, clip_max: float) -> torch.Tensor:
    """Eq. 4, first term (CQL(H)), before the weight alpha: E_s[log sum_a exp Q(s, a) - Q(s, a_data)], with the
    log-sum-exp over actions estimated by importance sampling (Appendix F), at temperature T:
        T * logsumexp_j((Q(s, a_j) - log mu(a_j)) / T),  a_j ~ mu in {Uniform, pi(.|s), pi(.|s')}.
    (The constant log(3N) of the sample mean is dropped, as in the reference code.) q_ood (2, 3N, B),
    log_density (3N, B), q_data (2, B). The per-state gap is clipped to [clip_min, clip_max]; one value per
    critic, shape (2,)."""
    soft_max = temp * torch.logsumexp((q_ood - log_density) / temp, dim=1)
    return (soft_max - q_data).clamp(clip_min, clip_max).mean(dim=1)


def lagrange_loss(log_alpha_prime: torch.Tensor, gap: torch.Tensor, cql_alpha: float, target_gap: float):
    """Appendix F, Lagrange form: min_Q max_{alpha' >= 0} alpha' * alpha * (gap - tau). Descending this loss is
    ascent on alpha': alpha' grows while the gap exceeds tau and shrinks below it. The multiplier is
    alpha' = exp(log alpha') clamped to [0, 1e6]; averaged over both critics."""
    alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)
    return -(alpha_prime * cql_alpha * (gap.detach() - target_gap)).mean()


def policy_loss(alpha: torch.Tensor, log_pi: torch.Tensor, q_pi: torch.Tensor) -> torch.Tensor:
    """SAC's policy objective E[alpha log pi(a|s) - Q(s, a)], a ~ pi(.|s) reparameterized. During the BC warm-up
    (--bc-steps) q_pi is log pi(a_data|s), the dataset action's log-likelihood, instead of min_i Q_i(s, a)."""
    return (alpha * log_pi - q_pi).mean()


def alpha_loss(log_alpha: torch.Tensor, log_pi: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """SAC's temperature objective E[-alpha (log pi(a|s) + target entropy)] (arXiv:1812.05905), on log alpha as
    in the reference code: alpha rises while the entropy -log pi is below the target, falls above it."""
    return -(log_alpha * (log_pi.detach() + target_entropy)).mean()


def make_update(nets: dict, optimizers: dict, args: Args):
    """One CQL gradient step on a batch. All losses are computed from the same parameters (as in the reference
    code) and each reaches only its own parameters (the detaches below see to that), so one backward pass
    serves all four optimizers. Returns detached diagnostics (no host sync)."""
    actor, critic, target_critic = nets["actor"], nets["critic"], nets["target_critic"]
    log_alpha, log_alpha_prime = nets["log_alpha"], nets["log_alpha_prime"]
    n, act_dim = args.cql_n_actions, actor.net[-1].out_features // 2
    target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy

    def compute_losses(obs, actions, rewards, next_obs, dones, bc_phase: bool):
        b = obs.shape[0]
        # One actor pass over the B states and the B next states; samples are drawn from it below
        mean, log_std = actor.distribution(torch.cat([obs, next_obs]))
        a_pi, log_pi = (x[0] for x in sample_actions(mean[:b], log_std[:b], 1))  # with gradient: policy loss
        alpha = log_alpha().exp().detach()

        # Critic objective, Eq. 4: TD error towards the SAC backup + alpha * conservative penalty
        with torch.no_grad():  # the target and the OOD actions carry no gradient (to the actor or anything)
            next_actions, next_log_pi = sample_actions(mean[b:], log_std[b:], n if args.cql_max_target_backup else 1)
            next_v, next_log_pi = max_target_backup(target_critic(next_obs, next_actions), next_log_pi)
            if args.backup_entropy:
                next_v = next_v - alpha * next_log_pi
            target = rewards + args.discount * (1.0 - dones) * next_v
            proposals, log_density = ood_actions(mean, log_std, n)
        # Both critics at the data actions and all 3N proposals of every state: one batched forward pass
        q_all = critic(obs, torch.cat([actions[None], proposals]))  # (2, 1 + 3N, B)
        q_data, q_ood = q_all[:, 0], q_all[:, 1:]
        critic_td_loss = td_loss(q_data, target)
        gap = cql_penalty(q_ood, log_density, q_data, args.cql_temp, args.cql_clip_diff_min, args.cql_clip_diff_max)
        if args.cql_lagrange:  # alpha' * alpha * (gap - tau): alpha' holds the gap at tau (Appendix F)
            alpha_prime = log_alpha_prime().exp().clamp(0.0, 1e6).detach()
            penalty = (alpha_prime * args.cql_alpha * (gap - args.cql_target_action_gap)).sum()
            alpha_prime_loss = lagrange_loss(log_alpha_prime(), gap, args.cql_alpha, args.cql_target_action_gap)
        else:
            alpha_prime, penalty = torch.ones_like(alpha), args.cql_alpha * gap.sum()
            alpha_prime_loss = torch.zeros_like(alpha)

        # Policy improvement (SAC), or behaviour cloning during the first --bc-steps
        if bc_phase:
            q_pi = log_prob(mean[:b], log_std[:b], actions)
        else:
            frozen = {name: p.detach() for name, p in critic.named_parameters()}  # moves the actor, not the critics
            q_pi = torch.func.functional_call(critic, frozen, (obs, a_pi)).min(dim=0).values
        actor_loss = policy_loss(alpha, log_pi, q_pi)
        temperature_loss = alpha_loss(log_alpha(), log_pi, target_entropy) if args.autotune else torch.zeros_like(alpha)

        loss = critic_td_loss + penalty + actor_loss + temperature_loss + alpha_prime_loss
        return loss, {
            "losses/td_loss": critic_td_loss.detach(),
            "losses/cql_penalty": penalty.detach(),
            "losses/cql_gap": gap.detach().mean(),
            "losses/q_data": q_data.detach().mean(),
            "losses/q_random": q_ood[:, :n].detach().mean(),
            "losses/q_policy": q_ood[:, n : 2 * n].detach().mean(),
            "losses/q_target": target.mean(),
            "losses/actor_loss": actor_loss.detach(),
            "losses/entropy": -log_pi.detach().mean(),
            "losses/alpha": alpha,
            "losses/alpha_loss": temperature_loss.detach(),
            "losses/alpha_prime": alpha_prime,
            "losses/alpha_prime_loss": alpha_prime_loss.detach(),
        }

    if args.bf16:  # matmuls in bfloat16; the networks return float32, so the losses are float32
        compute_losses = torch.autocast(next(critic.parameters()).device.type, torch.bfloat16)(compute_losses)
    if args.compile:  # the forward and its backward; the optimizer steps stay eager
        compute_losses = torch.compile(compute_losses)

    def update(obs, actions, rewards, next_obs, dones, bc_phase: bool = False):
        loss, metrics = compute_losses(obs, actions, rewards, next_obs, dones, bc_phase)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers.values():  # an optimizer whose parameter got no gradient skips its step
            opt.step()
        soft_update(target_critic, critic, args.tau)
        return metrics

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
        (0 <= args.discount <= 1, "discount must be in [0, 1]"),
        (0 < args.tau <= 1, "tau must be in (0, 1]"),
        (min(args.actor_lr, args.critic_lr) > 0, "learning rates must be > 0"),
        (args.hidden_dim > 0, "hidden_dim must be > 0"),
        (min(args.actor_n_hidden, args.critic_n_hidden) >= 1, "actor_n_hidden and critic_n_hidden must be >= 1"),
        (args.alpha > 0, "alpha must be > 0 (it is learned as log alpha)"),
        (args.cql_alpha >= 0, "cql_alpha must be >= 0"),
        (args.cql_n_actions >= 1, "cql_n_actions must be >= 1"),
        (args.cql_temp > 0, "cql_temp must be > 0"),
        (args.cql_clip_diff_min <= args.cql_clip_diff_max, "cql_clip_diff_min must be <= cql_clip_diff_max"),
        (
            not args.cql_lagrange or args.cql_target_action_gap is not None,
            "--cql-lagrange needs the threshold --cql-target-action-gap (0.8 on AntMaze)",
        ),
        (args.bc_steps >= 0, "bc_steps must be >= 0"),
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
    rewards = transform_rewards(data["rewards"], data["returns"], family, args.reward_scale, args.reward_bias)
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
    nets = {name: net.to(device) for name, net in make_networks(args, obs_dim, act_dim).items()}
    optimizers = make_optimizers(nets, args)
    update = make_update(nets, optimizers, args)  # torch.compile'd inside with --compile
    actor, modules = nets["actor"], nets

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
        metrics = update(*buffer.sample(args.batch_size), bc_phase=step <= args.bc_steps)

        if step % args.log_every == 0 or step == args.total_steps:
            values = check_finite(metrics, step)
            seconds = time.time() - t_window
            sps = (step - window_start) / max(seconds, 1e-9)
            clock["train_seconds"] += seconds
            clock["train_steps"] += step - window_start
            for k, v in values.items():
                writer.add_scalar(k, v, step)
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("charts/learning_rate", optimizers["actor_opt"].param_groups[0]["lr"], step)
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
