"""Conservative Q-Learning (CQL), a single-file implementation on Gymnasium + Minari.
CQL is Soft Actor-Critic (SAC) on a fixed dataset whose critics also push down a soft maximum (log-sum-exp) of Q over
actions from a uniform proposal and from the policy, and push up Q at the dataset's actions, so that unseen actions
cannot look better than the data: CQL(H) with importance sampling, as in the paper's experiments, with the reference
code's Lagrange, max-backup and BC-warm-up options. Paper: "Conservative Q-Learning for Offline Reinforcement
Learning", Aviral Kumar, Aurick Zhou, George Tucker, Sergey Levine, NeurIPS 2020, arXiv:2006.04779. Read on: the
algorithm (Args, per-domain settings, networks, losses, update), then data, evaluation, plumbing, training loop."""

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
import torch.nn.functional as F
import tyro
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import common

ALGO = "cql"


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
    run_name: str | None = None  # name of the run folder inside --output; default <env>__cql__<seed>__<unix time>
    resume: str | None = None  # continue a run: its folder or a checkpoint file (only --device may be given with it)
    track: bool = False  # log to Weights & Biases (pip install wandb); project: $WANDB_PROJECT
    capture_video: bool = False  # save a GIF of one evaluation episode to <run>/videos/ (MuJoCo: MUJOCO_GL=egl)
    compile: bool = False  # torch.compile the update step
    bf16: bool = False  # bfloat16 autocast of the hidden layers; output layers, losses, weights, optimizer stay float32

    # Algorithm hyperparameters (defaults: CORL's CQL, i.e. its MuJoCo locomotion settings)
    discount: float = 0.99  # discount factor gamma
    tau: float = 0.005  # Polyak averaging rate of the target critics
    actor_lr: float = 3e-5  # policy learning rate (also the entropy temperature's, as in CORL)
    critic_lr: float = 3e-4  # critic learning rate (also the Lagrange multiplier's, as in CORL)
    hidden_dim: int = 256  # width of every MLP
    actor_n_hidden: int = 3  # hidden layers of the actor
    critic_n_hidden: int = 3  # hidden layers of each critic (both critics always have the same depth)
    layer_norm: bool = False  # LayerNorm in the critics' hidden layers
    orthogonal_init: bool = True  # orthogonal init (gain sqrt 2) of hidden layers; output layers: gain 1e-2 always
    autotune: bool = True  # automatic entropy tuning: learn alpha so that the policy's entropy tracks target_entropy
    alpha: float = 1.0  # entropy temperature: fixed with --no-autotune, else its initial value
    target_entropy: float | None = None  # target entropy of the automatic tuning; default -|A|
    backup_entropy: bool = False  # subtract alpha log pi(a'|s') in the TD target (SAC's soft backup)
    cql_alpha: float = 10.0  # weight alpha of the conservative penalty (Eq. 4)
    cql_n_actions: int = 10  # N: actions per state from each of Uniform, pi(.|s), pi(.|s') for the log-sum-exp
    cql_temp: float = 1.0  # temperature T of the log-sum-exp: T * logsumexp(Q / T)
    cql_clip_diff_min: float = -math.inf  # clip the per-state gap logsumexp Q - Q(s, a_data) from below
    cql_clip_diff_max: float = math.inf  # and from above
    cql_lagrange: bool = False  # learn the penalty's multiplier alpha' so that the gap stays at cql_target_action_gap
    cql_target_action_gap: float | None = None  # threshold tau of --cql-lagrange (required with it, refused without)
    cql_max_target_backup: bool = False  # TD target: max over cql_n_actions next actions of min over target critics
    bc_steps: int = 0  # behaviour cloning (alpha log pi - log pi(a_data|s)) as the actor's loss for the first steps
    normalize_states: bool = True  # standardize observations with the dataset mean/std (also at evaluation)
    reward_transform: Literal["none", "locomotion", "antmaze"] = "none"  # antmaze (r-0.5)*10, locomotion r*1000/spread


# Published per-domain settings of CORL's CQL (github.com/tinkoff-ai/CORL, configs/offline/cql/<env>/<dataset>.yaml,
# the same in every file of a domain). Args defaults: its locomotion settings (halfcheetah|hopper|walker2d/*_v2.yaml:
# cql_alpha 10, policy_lr 3e-5, qf_lr 3e-4, 3 hidden layers, normalize_reward false but in hopper/medium_v2.yaml).
# Kitchen has no CORL config: the defaults.
# Precedence: Args defaults < this table (chosen by --env) < --config FILE.yaml < command-line flags.
DOMAIN_SETTINGS = {
    "antmaze": {  # antmaze/*_v2.yaml; rewards: normalize_reward true with reward_scale 10, reward_bias -5
        "cql_alpha": 5.0, "cql_lagrange": True, "cql_target_action_gap": 0.8, "cql_max_target_backup": True,
        "cql_clip_diff_min": -200.0, "critic_n_hidden": 5, "actor_lr": 1e-4, "normalize_states": False,
        "reward_transform": "antmaze", "eval_episodes": 100,
    },
    "adroit": {"cql_alpha": 1.0, "actor_lr": 1e-4},  # {pen,door,hammer,relocate}/*_v1.yaml
    "pointmaze": {"cql_lagrange": True, "cql_target_action_gap": 5.0, "eval_episodes": 100},  # maze2d/*_v1.yaml
}  # fmt: skip


# -------- ALGO LOGIC: networks ----------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden), nn.ReLU()]
        dim = hidden
    return nn.Sequential(*layers, common.OutputLinear(dim, out_dim))


class TwinQ(nn.Module):
    """Both critics Q1, Q2 in one module (the same depth by construction): each layer is one batched matmul."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int, layer_norm: bool):
        super().__init__()
        layers, dim = [], obs_dim + act_dim
        for _ in range(n_hidden):
            norm = [common.BatchedLayerNorm(2, hidden)] if layer_norm else []
            layers += [common.BatchedLinear(2, dim, hidden), *norm, nn.ReLU()]
            dim = hidden
        self.net = nn.Sequential(*layers, common.BatchedOutputLinear(2, dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (B, D) with actions (B, A) -> (2, B); with K actions per state, (K, B, A) -> (2, K, B)."""
        if actions.dim() == 3:  # one forward pass over the K * B rows
            k, b, _ = actions.shape
            return self(obs.repeat(k, 1), actions.reshape(k * b, -1)).view(-1, k, b)
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


class Actor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s)^2)), SAC's squashed Gaussian; actions in [-1, 1]. The last layer outputs mu
    and a raw log-std side by side; log sigma = m * raw + c clamped to [-20, 2], with learnable m = 1 and c = -1 at the
    start, as in CORL (algorithms/offline/cql.py, TanhGaussianPolicy) and the port it follows (young-geng/CQL,
    SimpleSAC/model.py): raw ~ 0 at first (output gain 1e-2), so the initial pre-tanh std is exp(-1) = 0.37."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden, n_hidden)
        self.log_std_multiplier, self.log_std_offset = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(-1.0))

    def distribution(self, obs: torch.Tensor) -> tuple:
        mean, raw = self.net(obs).chunk(2, dim=-1)
        return mean, (self.log_std_multiplier * raw + self.log_std_offset).clamp(-20.0, 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action tanh(mu(s)), used for evaluation."""
        return torch.tanh(self.distribution(obs)[0])


def make_networks(args: Args, obs_dim: int, act_dim: int) -> dict:
    """Actor, twin critics and their Polyak copy, log alpha (SAC temperature) and log alpha' (CQL multiplier, 0 at
    the start as in the CQL authors' code; CORL: 1). Output layers: orthogonal, gain 1e-2 (CORL), so Q ~ 0 at first."""
    actor = Actor(obs_dim, act_dim, args.hidden_dim, args.actor_n_hidden)
    critic = TwinQ(obs_dim, act_dim, args.hidden_dim, args.critic_n_hidden, args.layer_norm)
    if args.orthogonal_init:
        common.orthogonal_init(actor, critic)
    common.orthogonal_init(actor.net[-1], critic.net[-1], gain=1e-2)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    # the two learnable numbers as modules (.value), so that they move, optimize and checkpoint like the networks
    log_alpha = nn.ParameterDict({"value": torch.tensor(math.log(args.alpha))}).requires_grad_(args.autotune)
    log_alpha_prime = nn.ParameterDict({"value": torch.tensor(0.0)}).requires_grad_(args.cql_lagrange)
    return {"actor": actor, "critic": critic, "target_critic": target_critic, "log_alpha": log_alpha,
            "log_alpha_prime": log_alpha_prime}  # fmt: skip


def make_optimizers(nets: dict, args: Args) -> dict:
    """Adam (fused: one kernel per step) for each learner; alpha learns at the actor's rate and alpha' at the critics'
    (CORL). Learning rates are tensors, so that --compile does not recompile when they change."""
    adam = lambda net, lr: torch.optim.Adam(net.parameters(), lr=torch.tensor(lr), fused=True)  # noqa: E731
    lrs = {"actor": args.actor_lr, "critic": args.critic_lr, "alpha": args.actor_lr, "alpha_prime": args.critic_lr}
    return {f"{name}_opt": adam(nets[name.replace("alpha", "log_alpha")], lr) for name, lr in lrs.items()}


# -------- ALGO LOGIC: losses (paper equations) and the update step ----------------------------------------------------
def tanh_gaussian_log_prob(u: torch.Tensor, eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)|s), u = mu + sigma eps: log N(u) - log(1 - tanh(u)^2) (SAC, Appendix C), the latter in the
    overflow-free form 2 (log 2 - u - softplus(-2u)); summed over the action dimensions."""
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
    """Proposals of the importance-sampled log-sum-exp (Appendix F), all to be evaluated at s: per state n from
    Uniform[-1, 1]^A (density 0.5^A), n from pi(.|s), n from pi(.|s') carrying log pi(a|s') as in the reference code.
    mean, log_std: (2B, A), s then s'. Returns actions (3n, B, A) and their log-densities log mu (3n, B)."""
    b, act_dim = mean.shape[0] // 2, mean.shape[1]
    policy, policy_log_pi = sample_actions(mean, log_std, n)  # (n, 2B, A): s and s' in one draw
    uniform = torch.rand((n, b, act_dim), device=mean.device) * 2.0 - 1.0
    uniform_log_density = torch.full((n, b), act_dim * math.log(0.5), device=mean.device)
    return torch.cat([uniform, *policy.split(b, dim=1)]), torch.cat([uniform_log_density, *policy_log_pi.split(b, 1)])


def max_target_backup(next_q: torch.Tensor, next_log_pi: torch.Tensor) -> tuple:
    """V(s') = max over n sampled next actions of the min over the target critics (with n = 1: SAC's min-of-two
    backup); next_q (2, n, B), next_log_pi (n, B). Returns V(s') and log pi of the chosen action, each (B,)."""
    value, index = next_q.min(dim=0).values.max(dim=0)
    return value, next_log_pi.gather(0, index[None]).squeeze(0)


def td_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4, second term: sum over both critics of E[(Q_i(s, a) - B^pi Q_target(s, a))^2] (no 1/2, as in CORL)."""
    return ((q - target) ** 2).mean(dim=1).sum()


def cql_penalty(q_ood, log_density, q_data, temp: float, clip_min: float, clip_max: float) -> torch.Tensor:
    """Eq. 4, first term (CQL(H)) before its weight alpha, per critic: E_s[log sum_a exp Q(s, a) - Q(s, a_data)], the
    per-state gap clipped to [clip_min, clip_max], the log-sum-exp estimated by importance sampling (Appendix F):
        T * logsumexp_j((Q(s, a_j) - log mu(a_j)) / T),  a_j ~ mu in {Uniform, pi(.|s), pi(.|s')}
    (its constant log 3N dropped as in the reference code). q_ood (2, 3N, B), log_density (3N, B), q_data (2, B)."""
    soft_max = temp * torch.logsumexp((q_ood - log_density) / temp, dim=1)
    return (soft_max - q_data).clamp(clip_min, clip_max).mean(dim=1)


def lagrange_loss(alpha_prime: torch.Tensor, gap: torch.Tensor, cql_alpha: float, target_gap: float) -> torch.Tensor:
    """Appendix F, Lagrange form: min_Q max_{alpha' >= 0} alpha' alpha (gap - tau). Descending this loss is ascent on
    alpha' = exp(log alpha') clamped to [0, 1e6]: it grows while the gap exceeds tau. Mean over both critics."""
    return -(alpha_prime * cql_alpha * (gap.detach() - target_gap)).mean()


def policy_loss(alpha: torch.Tensor, log_pi: torch.Tensor, q_pi: torch.Tensor) -> torch.Tensor:
    """SAC's E[alpha log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s); in the BC warm-up q_pi = log pi(a_data|s)."""
    return (alpha * log_pi - q_pi).mean()


def alpha_loss(log_alpha: torch.Tensor, log_pi: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """SAC's -E[log alpha (log pi(a|s) + target entropy)]: alpha rises while the entropy is below the target."""
    return -(log_alpha * (log_pi.detach() + target_entropy)).mean()


def make_update(nets: dict, opts: dict, args: Args):
    """One CQL gradient step on a batch. As in the reference code, every loss is computed from the same (pre-step)
    parameters; each reaches only its own parameters (the detaches below), so one backward pass gives the gradients
    of CORL's separate alpha, actor and critic steps. Random draws in this order: the policy action, the next
    actions, the proposals from pi(.|s) and pi(.|s'), the uniform ones. Returns detached diagnostics (no sync)."""
    actor, critic, target_critic = nets["actor"], nets["critic"], nets["target_critic"]
    log_alpha, log_alpha_prime = nets["log_alpha"].value, nets["log_alpha_prime"].value
    n, n_next = args.cql_n_actions, args.cql_n_actions if args.cql_max_target_backup else 1
    target_entropy = -actor.net[-1].out_features / 2 if args.target_entropy is None else args.target_entropy
    params = [p for opt in opts.values() for group in opt.param_groups for p in group["params"]]

    def update(obs, actions, rewards, next_obs, dones, bc_phase: bool = False):
        b = obs.shape[0]
        mean, log_std = actor.distribution(torch.cat([obs, next_obs]))  # pi(.|s) and pi(.|s') in one pass
        a_pi, log_pi = (x[0] for x in sample_actions(mean[:b], log_std[:b], 1))
        alpha = log_alpha.exp().detach()

        # Critics, Eq. 4: TD error towards the SAC backup + alpha * conservative penalty
        with torch.no_grad():  # the target and the proposals carry no gradient (to the actor or anything)
            next_actions, next_log_pi = sample_actions(mean[b:], log_std[b:], n_next)
            next_v, next_log_pi = max_target_backup(target_critic(next_obs, next_actions), next_log_pi)
            next_v = next_v - alpha * next_log_pi if args.backup_entropy else next_v
            target = rewards + args.discount * (1.0 - dones) * next_v
            proposals, log_density = ood_actions(mean, log_std, n)
        q_all = critic(obs, torch.cat([actions[None], proposals]))  # the data action and all 3N proposals at once
        q_data, q_ood = q_all[:, 0], q_all[:, 1:]
        critic_td_loss = td_loss(q_data, target)
        gap = cql_penalty(q_ood, log_density, q_data, args.cql_temp, args.cql_clip_diff_min, args.cql_clip_diff_max)
        # Lagrange form (Appendix F): alpha' alpha (gap - tau), alpha' holding the gap at tau; else alpha' = 1, tau = 0
        alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6) if args.cql_lagrange else torch.ones_like(alpha)
        gap_target = args.cql_target_action_gap if args.cql_lagrange else 0.0
        penalty = (alpha_prime.detach() * args.cql_alpha * (gap - gap_target)).sum()
        alpha_prime_loss = (
            lagrange_loss(alpha_prime, gap, args.cql_alpha, gap_target) if args.cql_lagrange else 0 * alpha
        )

        # Actor (SAC policy improvement, or behaviour cloning during the first --bc-steps) and temperature
        if bc_phase:
            q_pi = log_prob(mean[:b], log_std[:b], actions)
        else:  # through frozen critics: the policy loss moves the actor, never the critics
            frozen = {name: p.detach() for name, p in critic.named_parameters()}
            q_pi = torch.func.functional_call(critic, frozen, (obs, a_pi)).min(dim=0).values
        actor_loss = policy_loss(alpha, log_pi, q_pi)
        temperature_loss = alpha_loss(log_alpha, log_pi, target_entropy) if args.autotune else 0 * alpha

        for p in params:  # zero_grad(set_to_none=True) of all four optimizers, without a graph break under --compile
            p.grad = None
        (critic_td_loss + penalty + actor_loss + temperature_loss + alpha_prime_loss).backward()
        for opt in opts.values():  # an optimizer whose parameter got no gradient skips its step
            opt.step()
        common.soft_update(target_critic, critic, args.tau)
        metrics = dict(td_loss=critic_td_loss, cql_penalty=penalty, cql_gap=gap.mean(), q_data=q_data.mean(),
                       q_random=q_ood[:, :n].mean(), q_policy=q_ood[:, n : 2 * n].mean(), q_target=target.mean(),
                       actor_loss=actor_loss, entropy=-log_pi.mean(), alpha=alpha, alpha_loss=temperature_loss,
                       alpha_prime=alpha_prime, alpha_prime_loss=alpha_prime_loss)  # fmt: skip
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
    """Per-domain reward transforms: AntMaze (r - 0.5) * 10, the 0/1 goal reward -> -5/+5 (CORL: reward_scale 10,
    reward_bias -5); locomotion: r * 1000 / (max - min episode return) (CORL's normalize_reward, as in IQL)."""
    if transform == "locomotion":  # scale so that the spread of episode returns is 1000
        spread = episode_returns.max() - episode_returns.min()
        if spread > 1e-3 * max(np.abs(episode_returns).max(), 1.0):
            return rewards * (1000.0 / spread)
        print(f"warning: every episode returns about {episode_returns.max():.4g}: rewards are left unscaled")
    return (rewards - 0.5) * 10.0 if transform == "antmaze" else rewards


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
    """Out-of-range hyperparameters, and flags that would have no effect, fail here, before any data is loaded."""
    checks = [
        (args.total_steps > 0 and args.batch_size > 0, "total_steps and batch_size must be > 0"),
        (0 <= args.discount <= 1 and 0 < args.tau <= 1, "discount must be in [0, 1] and tau in (0, 1]"),
        (min(args.actor_lr, args.critic_lr, args.alpha, args.cql_temp) > 0 and args.cql_alpha >= 0, "learning rates, "
         "alpha and cql_temp must be > 0, cql_alpha >= 0"),
        (min(args.hidden_dim, args.actor_n_hidden, args.critic_n_hidden, args.cql_n_actions) >= 1 and args.bc_steps
         >= 0, "hidden_dim, actor_n_hidden, critic_n_hidden and cql_n_actions must be >= 1, bc_steps >= 0"),
        (args.cql_clip_diff_min <= args.cql_clip_diff_max, "cql_clip_diff_min must be <= cql_clip_diff_max"),
        (args.eval_episodes >= 0 and min(args.eval_every, args.log_every, args.checkpoint_every, args.keep_checkpoints)
         > 0, "eval_episodes must be >= 0; eval_every, log_every, checkpoint_every, keep_checkpoints > 0"),
        (args.eval_episodes > 0 or not args.capture_video, "--capture-video needs evaluation episodes"),
        # flags that would have no effect
        (args.cql_lagrange == (args.cql_target_action_gap is not None), "--cql-lagrange needs its threshold "
         "--cql-target-action-gap, which does nothing without it (unset: --cql-target-action-gap None)"),
        (args.autotune or args.target_entropy is None, "--target-entropy does nothing with --no-autotune"),
        (args.cql_n_actions > 1 or not args.cql_max_target_backup, "--cql-max-target-backup needs --cql-n-actions > 1"),
        (args.cql_alpha > 0 or not args.cql_lagrange and (args.cql_temp, args.cql_clip_diff_min, args.cql_clip_diff_max)
         == (1, -math.inf, math.inf), "--cql-alpha 0 turns the penalty off: --cql-lagrange, --cql-temp and "
         "--cql-clip-diff-* would do nothing"),
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
        metrics = update(*buffer.sample(args.batch_size), bc_phase=step <= args.bc_steps)
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
