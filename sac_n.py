"""SAC-N, a single-file implementation on Gymnasium + Minari.

SAC-N is Soft Actor-Critic on a fixed dataset with N critics instead of two and nothing else added: the TD target and
the policy take the minimum over all N. Where the data cover an action the N critics agree; elsewhere they disagree,
and with N large enough (10 to 500) the minimum is low there, so the policy stays on actions the ensemble is sure of.
Paper: "Uncertainty-Based Offline Reinforcement Learning with Diversified Q-Ensemble", Gaon An, Seungyong Moon,
Jang-Hyun Kim, Hyun Oh Song, NeurIPS 2021, arXiv:2110.01548 (edac.py is the paper's EDAC). Reference code: CORL's
algorithms/offline/sac_n.py. Docs: docs/sac_n.md.

Read on: the algorithm (Args, checks, per-domain and per-dataset settings, networks, losses, the update step), then
the shared block that every algorithm script holds word for word (data, evaluation, configuration, checkpoints, the
training loop).
"""

import copy
import dataclasses
import difflib
import hashlib
import importlib.metadata
import importlib.util
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

ALGO = "sac_n"
NEEDS_NEXT_ACTION = False  # the update reads (s, a, r, s', done) only: every transition is sampled


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
    online_steps: int = 0  # then fine-tune online for this many env steps, one gradient step each (docs/finetuning.md)
    evaluate: str | None = None  # evaluate a run folder or checkpoint on --eval-episodes (default 100) episodes, exit
    export: str | None = None  # with --evaluate: write its policy to this .pt2 file (torch.export; .onnx too if onnx)
    # -------- SHARED BLOCK (args) ends --------

    # Algorithm hyperparameters (defaults: CORL's sac_n.py; N per domain and dataset: the tables below)
    num_critics: int = 10  # N, the critics of the ensemble: the TD target and the policy use the minimum over all N
    discount: float = 0.99  # discount factor gamma
    tau: float = 0.005  # Polyak averaging rate of the target critics (every step)
    actor_lr: float = 3e-4  # actor learning rate
    critic_lr: float = 3e-4  # critics' learning rate (one Adam over the N critics' batched weights)
    alpha_lr: float = 3e-4  # learning rate of log alpha, SAC's entropy temperature (from alpha 1, target entropy -|A|)
    hidden_dim: int = 256  # width of every MLP
    n_hidden: int = 3  # hidden layers of the actor and of each critic
    normalize_states: bool = False  # standardize observations with the dataset mean/std (CORL's SAC-N does not)
    normalize_reward: bool = False  # scale rewards so that the spread of episode returns is 1000 (CORL: off)
    reward_scale: float = 1.0  # rewards become r * reward_scale + reward_bias (after normalize_reward)
    reward_bias: float = 0.0  # added after the scale
    mixing_ratio: float | None = None  # fine-tuning's offline share of a batch: unused, sac_n.py does not fine-tune


def check_args(args: Args) -> list:
    """SAC-N's own hyperparameters out of range, and fine-tuning, which it does not do: the problems found."""
    problems = []
    if not (0 <= args.discount <= 1 and 0 < args.tau <= 1):
        problems.append("discount must be in [0, 1] and tau in (0, 1]")
    if min(args.actor_lr, args.critic_lr, args.alpha_lr) <= 0:
        problems.append("learning rates must be > 0")
    if min(args.num_critics, args.hidden_dim, args.n_hidden) < 1:
        problems.append("num_critics, hidden_dim and n_hidden must be >= 1")
    if args.online_steps or args.mixing_ratio is not None:
        problems.append(
            f"{ALGO}.py trains offline only: CORL has no fine-tuning recipe for it (no algorithms/finetune/{ALGO}.py), "
            "so --online-steps and --mixing-ratio are not taken"
        )
    return problems


# Published settings of CORL's SAC-N (github.com/corl-team/CORL, configs/offline/sac_n/<env>/<dataset>.yaml). Every
# config: num_epochs 3000 x num_updates_on_epoch 1000 gradient steps, an evaluation every 5 epochs on 10 episodes
# (AntMaze and maze2d too), normalize_reward false (rewards as they are, AntMaze's included), the Args defaults
# otherwise. N is CORL's per domain where every dataset of the domain has the same (Adroit 100, AntMaze and maze2d 25),
# per dataset on locomotion. Kitchen and the other MuJoCo tasks have no CORL config: the defaults (unverified).
# Precedence: Args defaults < DOMAIN_SETTINGS < DATASET_SETTINGS < FINETUNE_SETTINGS (with --online-steps) <
# --config FILE.yaml < command-line flags.
CORL_RUN = {"total_steps": 3_000_000, "eval_every": 5000, "eval_episodes": 10}
DOMAIN_SETTINGS = {
    "locomotion": {**CORL_RUN},  # N: per dataset below; simple-v0 and expert-v0 (no CORL config): N = 10
    "adroit": {**CORL_RUN, "num_critics": 100},  # {pen,door,hammer,relocate}/{human,cloned,expert}_v1.yaml
    "antmaze": {**CORL_RUN, "num_critics": 25},  # antmaze/*_v2.yaml
    "pointmaze": {**CORL_RUN, "num_critics": 25},  # maze2d/{umaze,medium,large}_v1.yaml
}
# CORL's <env>/medium_v2.yaml (D4RL's <env>-medium-v2) under the Minari id of the same name. The data differ: Minari's
# mujoco/<env>/medium-v0 are Minari's own recordings, not D4RL's. (CORL's medium-replay and medium-expert configs:
# halfcheetah 10, hopper 200, walker2d 20; Minari has no datasets of those names.)
DATASET_SETTINGS = {
    "mujoco/halfcheetah/medium-v0": {"num_critics": 10},
    "mujoco/hopper/medium-v0": {"num_critics": 500},
    "mujoco/walker2d/medium-v0": {"num_critics": 20},
}
FINETUNE_SETTINGS = {}  # no fine-tuning (check_args)


# -------- ALGO LOGIC: networks --------
# Init as CORL's ("as in the EDAC paper"): hidden biases 0.1, output layers U(+-1e-3) (actor) and U(+-3e-3) (critics),
# weights and biases; the actor's hidden weights PyTorch's default U(+-1/sqrt(fan_in)). The critics' hidden weights are
# U(+-1/sqrt(fan_out)): CORL's VectorizedLinear applies kaiming_uniform_ to each member's (in, out) weight matrix, and
# PyTorch reads a matrix's fan-in from its second dimension. Kept, as CORL's results come from it: 1/16 for 256 units,
# also in the first layer, where nn.Linear would take 1/sqrt(obs dims + action dims).
@torch.no_grad()
def init_layers(net: nn.Sequential, output_bound: float) -> None:
    """Hidden biases 0.1 (a critic's hidden weights U(+-1/sqrt(fan_out)), see above); the output layer U(+-bound)."""
    *hidden, output = [m for m in net if isinstance(m, nn.Linear | common.BatchedLinear)]
    for layer in hidden:
        if isinstance(layer, common.BatchedLinear):
            bound = layer.weight.shape[-1] ** -0.5
            nn.init.uniform_(layer.weight, -bound, bound)
        layer.bias.fill_(0.1)
    nn.init.uniform_(output.weight, -output_bound, output_bound)
    nn.init.uniform_(output.bias, -output_bound, output_bound)


class Actor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s)^2)), SAC's squashed Gaussian, log sigma clipped to [-5, 2] (the EDAC code's
    range, not SAC's [-20, 2]). One output layer holds mu and log sigma side by side: CORL's two output heads, with the
    same init, are the same parameters split in two (Adam works elementwise)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        self.act_dim = act_dim
        layers = []
        for i in range(n_hidden):
            layers.append(nn.Linear(obs_dim if i == 0 else hidden, hidden))
            layers.append(nn.ReLU())
        layers.append(common.OutputLinear(hidden, 2 * act_dim))
        self.net = nn.Sequential(*layers)
        init_layers(self.net, output_bound=1e-3)

    def distribution(self, obs: torch.Tensor) -> tuple:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action tanh(mu(s)), used for evaluation."""
        return torch.tanh(self.distribution(obs)[0])


class EnsembleQ(nn.Module):
    """The N critics Q_1..Q_N in one module: every layer is one batched matmul over the N members (never a Python loop
    over critics); a state-action batch shared by all members is broadcast to them as a view, not copied N times."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int, n_hidden: int):
        super().__init__()
        layers = []
        for i in range(n_hidden):
            layers.append(common.BatchedLinear(n, obs_dim + act_dim if i == 0 else hidden, hidden))
            layers.append(nn.ReLU())
        layers.append(common.BatchedOutputLinear(n, hidden, 1))
        self.net = nn.Sequential(*layers)
        init_layers(self.net, output_bound=3e-3)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (B, D), actions (B, A) -> Q (N, B)."""
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


def make_networks(args: Args, obs_dim: int, act_dim: int) -> dict:
    """The actor, the N critics and their Polyak copy (equal at the start), and log alpha (0: alpha starts at 1)."""
    critic = EnsembleQ(args.num_critics, obs_dim, act_dim, args.hidden_dim, args.n_hidden)
    return {
        "actor": Actor(obs_dim, act_dim, args.hidden_dim, args.n_hidden),
        "critic": critic,
        "target_critic": copy.deepcopy(critic).requires_grad_(False),
        # a learnable number as a module (.value), so that it moves, optimizes and checkpoints like the networks
        "log_alpha": nn.ParameterDict({"value": torch.tensor(0.0)}),
    }


def make_optimizers(nets: dict, args: Args) -> dict:
    return {
        "actor_opt": common.adam(nets["actor"], args.actor_lr),
        "critic_opt": common.adam(nets["critic"], args.critic_lr),
        "alpha_opt": common.adam(nets["log_alpha"], args.alpha_lr),
    }


# -------- ALGO LOGIC: losses (paper equations) --------
def sample_action(mean: torch.Tensor, log_std: torch.Tensor) -> tuple:
    """a = tanh(u), u = mu + sigma eps, eps ~ N(0, I) (reparameterized), and log pi(a|s) = log N(u; mu, sigma^2) -
    sum_j log(1 - tanh(u_j)^2 + 1e-6): SAC's change of variables (its Appendix C) with the 1e-6 of CORL and of the
    EDAC code, which bounds each dimension's correction where tanh saturates. Returns a (B, A) and log pi (B,)."""
    eps = torch.randn_like(mean)
    u = mean + log_std.exp() * eps
    action = torch.tanh(u)
    log_normal = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    return action, log_normal - torch.log(1 - action**2 + 1e-6).sum(-1)


def alpha_loss(log_alpha: torch.Tensor, log_pi: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """SAC's temperature objective -E[log alpha (log pi(a|s) + target entropy)] (on log alpha, as CORL): alpha rises
    while the policy's entropy is below the target."""
    return -(log_alpha * (log_pi.detach() + target_entropy)).mean()


def actor_loss(alpha: torch.Tensor, log_pi: torch.Tensor, q_pi: torch.Tensor) -> torch.Tensor:
    """SAC's policy objective with the minimum over all N critics: E[alpha log pi(a|s) - min_i Q_i(s, a)],
    a ~ pi(.|s); q_pi (N, B)."""
    return (alpha * log_pi - q_pi.min(dim=0).values).mean()


def td_target(rewards, dones, next_q, next_log_pi, alpha, discount: float) -> torch.Tensor:
    """The paper's clipped Q-learning over N critics, with SAC's entropy bonus: y = r + gamma (1 - d)
    (min_i Q'_i(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s'); next_q (N, B) from the target critics."""
    return rewards + discount * (1.0 - dones) * (next_q.min(dim=0).values - alpha * next_log_pi)


def td_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the N critics of E[(Q_i(s, a) - y)^2] (no 1/2, as CORL); q (N, B)."""
    return ((q - target) ** 2).mean(dim=1).sum()


# -------- ALGO LOGIC: the update step --------
def make_update(nets: dict, opts: dict, args: Args):
    """One SAC-N gradient step, update(batch, step), in CORL's order (which CORL took from the EDAC code, finding it
    better than SAC's usual critic -> actor -> temperature): the temperature; the actor, with the new alpha; the
    critics, towards a target built with the new actor and alpha; Polyak on the target critics. Random draws, in this
    order: a policy sample at s for the temperature, another for the actor, the next action at s'. The actor's loss
    reaches the actor only (CORL computes the critics' gradients too, then zeroes them). Returns detached metrics (no
    host sync)."""
    actor, critic, target_critic = nets["actor"], nets["critic"], nets["target_critic"]
    log_alpha = nets["log_alpha"].value
    target_entropy = -float(actor.act_dim)

    def sac_n_step(batch: dict) -> dict:
        obs = batch["obs"]
        # --- the temperature, then the actor with the new alpha
        with torch.no_grad():
            log_pi_alpha = sample_action(*actor.distribution(obs))[1]
        loss_alpha = alpha_loss(log_alpha, log_pi_alpha, target_entropy)
        common.descend(opts["alpha_opt"], loss_alpha)
        alpha = log_alpha.exp().detach()
        a_pi, log_pi = sample_action(*actor.distribution(obs))
        frozen = {name: p.detach() for name, p in critic.named_parameters()}
        q_pi = torch.func.functional_call(critic, frozen, (obs, a_pi))
        loss_actor = actor_loss(alpha, log_pi, q_pi)
        common.descend(opts["actor_opt"], loss_actor)
        # --- the critics
        with torch.no_grad():
            next_actions, next_log_pi = sample_action(*actor.distribution(batch["next_obs"]))
            next_q = target_critic(batch["next_obs"], next_actions)
            target = td_target(batch["rewards"], batch["dones"], next_q, next_log_pi, alpha, args.discount)
        q = critic(obs, batch["actions"])
        loss_critic = td_loss(q, target)
        common.descend(opts["critic_opt"], loss_critic)
        common.soft_update(target_critic, critic, args.tau)
        metrics = {
            "alpha_loss": loss_alpha,
            "alpha": alpha,
            "actor_loss": loss_actor,
            "entropy": -log_pi.mean(),
            "q_policy_std": q_pi.std(dim=0).mean(),  # the ensemble's disagreement at the policy's actions (CORL's)
            "critic_loss": loss_critic,
            "q_data": q.mean(),
            "q_target": target.mean(),
        }
        return {f"losses/{name}": x.detach() for name, x in metrics.items()}

    sac_n_step = common.accelerate(sac_n_step, next(critic.parameters()).device.type, args.bf16, args.compile)
    return lambda batch, step: sac_n_step(batch)


def explore(nets: dict, obs: torch.Tensor, args: Args) -> torch.Tensor:
    """SAC's behaviour policy, a sample of pi(.|s): the interface every script defines; never called here, as
    check_args refuses fine-tuning."""
    return sample_action(*nets["actor"].distribution(obs))[0]


# ======== SHARED BLOCK begins ========
# The same text in every algorithm script: edit it in iql.py, then `python tools/shared_block.py --fix` copies it.
# The algorithm reaches it through the names every script defines: Args, check_args, NEEDS_NEXT_ACTION, the settings
# tables (DOMAIN_SETTINGS, DATASET_SETTINGS, FINETUNE_SETTINGS), make_networks, make_optimizers, make_update, explore.


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


def tuned_settings(name: str, online: bool) -> dict:
    """The published settings for a dataset: its domain's row of DOMAIN_SETTINGS, its own row of DATASET_SETTINGS,
    then, for a run that fine-tunes online, FINETUNE_SETTINGS' "all" row and its domain's row."""
    minari_id, domain = resolve_dataset_name(name)
    settings = {**DOMAIN_SETTINGS.get(domain, {}), **DATASET_SETTINGS.get(minari_id, {})}
    if online:
        settings.update(FINETUNE_SETTINGS.get("all", {}))
        settings.update(FINETUNE_SETTINGS.get(domain, {}))
    return settings


def dataset_fingerprint(dataset: minari.MinariDataset) -> dict:
    """Episodes, steps and a digest of the first, middle and last episodes: cheap, and enough to tell a dataset
    re-recorded or re-downloaded under the same id from the one a checkpoint was trained on."""
    digest = hashlib.blake2b(digest_size=8)
    last = dataset.total_episodes - 1
    for episode in dataset.iterate_episodes(sorted({0, last // 2, last}) if last >= 0 else []):
        for part in (flatten(dataset.observation_space, episode.observations), episode.actions, episode.rewards):
            digest.update(np.asarray(part, dtype=np.float64).tobytes())
    return {"episodes": dataset.total_episodes, "steps": dataset.total_steps, "digest": digest.hexdigest()}


def check_dataset(dataset: minari.MinariDataset, ckpt: dict, flag: str) -> None:
    """A checkpoint only goes on with (or is evaluated on) the data it was trained on."""
    now = dataset_fingerprint(dataset)
    if ckpt.get("dataset", now) != now:
        raise UserError(
            f"{flag}: the dataset {dataset.id} is not the one this checkpoint was trained on (then: {ckpt['dataset']}; "
            f"now: {now}): it was re-recorded or re-downloaded under the same id. Use the original copy, or start a "
            "new run."
        )


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
    """Every transition on the device, each observation stored once: an episode's T + 1 observations are consecutive
    rows of `obs`; transition i is s = obs[rows[0, i]], s' = obs[rows[1, i]] (the next row), steps[i] = (a, r, done,
    return-to-go), and the episode's next transition is i + 1. Batches are drawn from `index`: the offline transitions
    first, then the online ones, each online episode's when it ends (its returns-to-go are known then)."""

    obs: torch.Tensor  # (rows, obs_dim), standardized; room for the online phase's observations
    steps: torch.Tensor  # (capacity + 1, act_dim + 3): action in [-1, 1], transformed reward, termination, return-to-go
    rows: torch.Tensor  # (2, capacity) int64: rows of s and s'
    index: torch.Tensor  # (capacity,) int64: the transitions that batches are drawn from
    generator: torch.Generator
    n_offline: int  # index[:n_offline]: offline transitions
    n_index: int  # index[:n_index]: every transition that may be sampled
    n_steps: int  # transitions stored (online ones from steps[n_offline_steps] on)
    n_obs: int  # observation rows used
    episode_start: int = 0  # the first transition of the online episode in progress

    def draw(self, batch_size: int, offline_share: float | None = None) -> torch.Tensor:
        """Transitions drawn uniformly from the sampleable ones; with offline_share (once there is online data), that
        share of them from the offline transitions and the rest from the online ones."""
        draw = dict(device=self.obs.device, generator=self.generator)
        if offline_share is None or self.n_index == self.n_offline:
            return self.index[torch.randint(self.n_index, (batch_size,), **draw)]
        n = round(batch_size * offline_share)
        offline = torch.randint(self.n_offline, (n,), **draw)
        online = torch.randint(self.n_offline, self.n_index, (batch_size - n,), **draw)
        return self.index[torch.cat([offline, online])]

    def sample(self, batch_size: int, offline_share: float | None = None) -> dict:
        i = self.draw(batch_size, offline_share)
        obs, next_obs = self.obs[self.rows[:, i]]  # (2, B, obs_dim): s and s' in one gather
        steps = self.steps[i]
        act_dim = steps.shape[1] - 3
        return {
            "obs": obs,
            "actions": steps[:, :act_dim],
            "rewards": steps[:, -3],
            "next_obs": next_obs,
            "dones": steps[:, -2],
            "returns_to_go": steps[:, -1],
            "next_actions": self.steps[i + 1, :act_dim],  # the episode's next action (meaningless where it ended)
        }

    def start_episode(self, obs: torch.Tensor) -> None:
        """The first observation of an online episode (standardized)."""
        self.obs[self.n_obs] = obs
        self.n_obs += 1
        self.episode_start = self.n_steps

    def add(self, action: torch.Tensor, reward: float, terminated: bool, next_obs: torch.Tensor) -> None:
        """One online transition, from the last observation stored to next_obs (transformed reward, standardized)."""
        i = self.n_steps
        self.steps[i, :-3] = action
        self.steps[i, -3:] = torch.tensor([reward, float(terminated), 0.0])
        self.rows[:, i] = torch.tensor([self.n_obs - 1, self.n_obs])
        self.obs[self.n_obs] = next_obs
        self.n_obs += 1
        self.n_steps += 1

    def end_episode(self, terminated: bool, discount: float, failure_reward: float | None) -> None:
        """The online episode's transitions become sampleable, with their returns-to-go; without a termination its
        last one has no next action, and is left out where the algorithm needs one."""
        first, end = self.episode_start, self.n_steps
        rewards = self.steps[first:end, -3].cpu().numpy()
        self.steps[first:end, -1] = torch.from_numpy(returns_to_go(rewards, [end - first], discount, failure_reward))
        if NEEDS_NEXT_ACTION and not terminated:
            end -= 1
        self.index[self.n_index : self.n_index + end - first] = torch.arange(first, end)
        self.n_index += end - first
        self.episode_start = self.n_steps

    def online_state(self, offline_steps: int, offline_rows: int) -> dict:
        """What the online phase added, for the checkpoint."""
        return {
            "obs": self.obs[offline_rows : self.n_obs].cpu(),
            "steps": self.steps[offline_steps : self.n_steps].cpu(),
            "rows": self.rows[:, offline_steps : self.n_steps].cpu(),
            "index": self.index[self.n_offline : self.n_index].cpu(),
            "episode_start": self.episode_start,
        }

    def load_online_state(self, state: dict, offline_steps: int, offline_rows: int) -> None:
        self.n_obs = offline_rows + len(state["obs"])
        self.n_steps = offline_steps + len(state["steps"])
        self.n_index = self.n_offline + len(state["index"])
        self.obs[offline_rows : self.n_obs] = state["obs"]
        self.steps[offline_steps : self.n_steps] = state["steps"]
        self.rows[:, offline_steps : self.n_steps] = state["rows"]
        self.index[self.n_offline : self.n_index] = state["index"]
        self.episode_start = state["episode_start"]


def load_buffer(dataset: minari.MinariDataset, args: Args, device: torch.device) -> tuple:
    """Read every episode straight into preallocated float32 tensors (host memory peaks near the buffer's own
    size), refuse non-finite values, transform rewards, scale actions and standardize states in place; leave room
    for args.online_steps more transitions."""
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
    capacity = n + args.online_steps
    # each online step adds one observation, each online episode one more (its first): at most 2 per step, and 1
    n_rows = n + dataset.total_episodes + (2 * args.online_steps + 1 if args.online_steps else 0)
    # Allocated by torch, filled through numpy views (numpy's huge-page allocation made the first fill 4x slower)
    obs_tensor = torch.empty(n_rows, gym.spaces.flatdim(dataset.observation_space))
    steps_tensor = torch.zeros(capacity + 1, len(low) + 3)
    rows_tensor = torch.zeros(2, capacity, dtype=torch.int64)
    index_tensor = torch.zeros(capacity, dtype=torch.int64)
    obs, steps, rows = obs_tensor.numpy(), steps_tensor.numpy(), rows_tensor.numpy()
    sums = np.zeros((2, obs.shape[1]))  # sums of s and of s^2 (float64), for the mean and std
    returns, lengths = [], []
    sampled = np.ones(n, bool)  # the transitions batches may be drawn from
    t = 0  # transitions read so far; episode k's T + 1 observations start at row t + k
    for k, episode in enumerate(dataset.iterate_episodes()):
        T = len(episode.rewards)
        x = obs[t + k : t + k + T + 1]
        x[:] = flatten(dataset.observation_space, episode.observations)
        steps[t : t + T, :-3] = np.reshape(episode.actions, (T, -1))
        steps[t : t + T, -3] = episode.rewards
        steps[t : t + T, -2] = episode.terminations
        sums[0] += x.sum(0, dtype=float)
        sums[1] += np.einsum("ij,ij->j", x, x, dtype=float)  # the squares without a temporary array
        if not np.isfinite(sums).all() or not np.isfinite(steps[t : t + T]).all():
            bad = "observations" if not np.isfinite(sums).all() else "actions or rewards"
            raise UserError(
                f"dataset {dataset.id}: episode {episode.id} has non-finite (NaN/inf) {bad}; repair it or leave it "
                "out (minari's filter_episodes) before training."
            )
        steps[t : t + T, :-3] = scale_actions(steps[t : t + T, :-3], low, high)  # after the check: inf would clip
        rows[0, t : t + T] = np.arange(t + k, t + k + T)
        if NEEDS_NEXT_ACTION and not episode.terminations[-1]:  # a time limit: the last step has no next action
            sampled[t + T - 1] = False
        returns.append(float(np.sum(episode.rewards, dtype=np.float64)))
        lengths.append(T)
        t += T
    rows[1, :n] = rows[0, :n] + 1
    reward_scale, reward_bias = reward_transform(np.array(returns), args)
    steps[:n, -3] = steps[:n, -3] * reward_scale + reward_bias
    # AntMaze's 0/1 goal reward: an episode that never reached it earned the failure reward at every step
    failure_reward = reward_bias if resolve_dataset_name(dataset.id)[1] == "antmaze" else None
    steps[:n, -1] = returns_to_go(steps[:n, -3], lengths, args.discount, failure_reward)
    n_index = int(sampled.sum())
    index_tensor[:n_index] = torch.from_numpy(np.flatnonzero(sampled))
    stats = {"action_low": torch.from_numpy(low), "action_high": torch.from_numpy(high)}
    stats.update(reward_scale=reward_scale, reward_bias=reward_bias, failure_reward=failure_reward)
    mean = sums[0] / (n + dataset.total_episodes)
    std = np.sqrt(np.maximum(sums[1] / (n + dataset.total_episodes) - mean**2, 0.0)) + 1e-3
    if not args.normalize_states:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    stats["obs_mean"] = torch.tensor(mean, dtype=torch.float32)
    stats["obs_std"] = torch.tensor(std, dtype=torch.float32)
    # (s - mean) / std as s * (1 / std) - mean / std, in one pass over the dataset's rows
    offline_rows = obs_tensor[: n + dataset.total_episodes]
    torch.addcmul(-stats["obs_mean"] / stats["obs_std"], offline_rows, 1 / stats["obs_std"], out=offline_rows)
    tensors = (x.to(device) for x in (obs_tensor, steps_tensor, rows_tensor, index_tensor))
    generator = torch.Generator(device).manual_seed(args.seed)
    return Buffer(*tensors, generator, n_index, n_index, n, n + dataset.total_episodes), stats


def returns_to_go(rewards: np.ndarray, lengths: list, discount: float, failure_reward: float | None) -> np.ndarray:
    """G_t = r_t + discount * G_(t+1) within each episode (the rewards of consecutive episodes of these lengths), no
    bootstrap at its end: Cal-QL's Monte-Carlo lower bound. Its rule for sparse rewards: an episode whose every reward
    is the failure reward (never reached the goal) is treated as endless, G = failure_reward / (1 - discount)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    ends = np.cumsum(lengths)
    to_end = np.repeat(ends, lengths) - 1 - np.arange(len(rewards))  # steps left in the episode after t
    order = np.argsort(to_end, kind="stable")
    bounds = np.searchsorted(to_end[order], np.arange(max(lengths, default=0) + 1))
    g = rewards.copy()
    for k in range(1, len(bounds) - 1):  # backwards through every episode at once: all t with k steps left
        t = order[bounds[k] : bounds[k + 1]]
        g[t] += discount * g[t + 1]
    if failure_reward is not None:
        failed = np.logical_and.reduceat(rewards == failure_reward, ends - np.asarray(lengths))
        g[np.repeat(failed, lengths)] = failure_reward / (1 - discount)
    return g.astype(np.float32)


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


def scale_actions(actions, low, high):
    """Map env actions affinely from [low, high] to [-1, 1], where the tanh actors live; clip to +-(1 - 1e-5)
    like the official IQL code, so log-likelihoods of boundary actions stay finite."""
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1 + 1e-5, 1 - 1e-5)


# -------- Evaluation: vectorized envs, deterministic actions, Minari normalized score --------
def make_eval_env(dataset: minari.MinariDataset, **kwargs) -> gym.Env:
    """The dataset's own evaluation env (its episode limit, not gym.make's), observations flattened (Dict spaces)."""
    return gym.wrappers.FlattenObservation(dataset.recover_environment(eval_env=True, **kwargs))


class Policy(nn.Module):
    """The deterministic policy as the environment sees it: a raw (flattened) observation in, an action within the
    env's bounds out; the observation standardization and the action rescaling inside (what --export writes)."""

    def __init__(self, actor: nn.Module, stats: dict):
        super().__init__()
        self.actor = actor
        for name in ("obs_mean", "obs_std", "action_low", "action_high"):
            self.register_buffer(name, stats[name].clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        action = self.actor((obs - self.obs_mean) / self.obs_std).clamp(-1.0, 1.0)
        return self.action_low + (action + 1.0) * 0.5 * (self.action_high - self.action_low)


def numpy_policy(policy: nn.Module, device: torch.device):
    """A batch of env observations (numpy) -> env actions (numpy)."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        return policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()

    return act


def evaluate(envs: gym.vector.VectorEnv, policy, seeds: list) -> tuple:
    """One episode per sub-env, all run in lockstep with one batched policy forward per step. A finished
    sub-env is reset by Gymnasium (on its next step, or at once), so only each sub-env's first episode counts.
    Returns, lengths, and success (an episode succeeded if its env reported success at any step; None if the env
    never reports it)."""
    obs, _ = envs.reset(seed=seeds)
    returns = np.zeros(envs.num_envs)
    lengths = np.zeros(envs.num_envs, np.int64)
    done = np.zeros(envs.num_envs, bool)
    success = None
    while not done.all():
        obs, reward, terminated, truncated, info = envs.step(policy(obs))
        returns += np.where(done, 0.0, reward)
        lengths += ~done
        if "success" in info:  # Adroit (goal achieved), the mazes
            reported = info["success"].astype(bool) & info["_success"] & ~done
            success = reported if success is None else success | reported
        done |= terminated | truncated
    return returns, lengths, success


def evaluation_seeds(seed: int, step: int, episodes: int) -> list:
    """The evaluation episodes' seeds at a step: the same for a run, a resumed run and --evaluate."""
    return [int(s) for s in np.random.SeedSequence([seed, step]).generate_state(episodes)]


def record_video(dataset, policy, seed: int, file: Path) -> str | None:
    """One deterministic episode as a GIF; returns why not if the env cannot render."""
    try:
        env = make_eval_env(dataset, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [Image.fromarray(env.render())]
        done = False
        while not done:
            obs, _, terminated, truncated, _ = env.step(policy(obs[None])[0])
            frames.append(Image.fromarray(env.render()))
            done = terminated or truncated
        file.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(file, save_all=True, append_images=frames[1:], duration=33, loop=0)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        return f"--capture-video: this env cannot render here ({why}). MuJoCo needs MUJOCO_GL=egl or osmesa."


def mean_and_interval(values: np.ndarray, seed: int) -> dict:
    """Mean, std and a 95 % bootstrap interval of the mean (10,000 resamples, percentile method)."""
    means = np.random.default_rng(seed).choice(values, (10_000, len(values))).mean(axis=1)
    interval = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {"mean": float(values.mean()), "std": float(values.std()), "ci95": interval}


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
    """(args, checkpoint): Args defaults < the settings tables for --env < --config YAML < flags, validated. With
    --resume or --evaluate, the arguments of the checkpoint's run."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.resume:
        return checkpoint_args(argv, args.resume, "--resume")
    if args.evaluate:
        return checkpoint_args(argv, args.evaluate, "--evaluate")
    config = config_flags(args.config)
    settings = tuned_settings(args.env, tyro.cli(Args, args=[*config, *argv]).online_steps > 0)
    print(f"per-domain settings for {args.env}: {settings or 'none (Args defaults)'}")
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


# What a flag may change of the arguments of a checkpoint's run
CHANGEABLE = {
    "--resume": ("resume", "device"),
    "--evaluate": ("evaluate", "export", "eval_episodes", "seed", "device", "capture_video"),
}


def checkpoint_args(argv: list, path: str, flag: str) -> tuple:
    """The arguments of a checkpoint's run, to resume it (only --device may change) or to evaluate its policy
    (on 100 episodes unless --eval-episodes; --seed, --device, --capture-video, --export may be given)."""
    ckpt, file = load_checkpoint(path, flag)
    saved = Args(**ckpt["args"])
    if flag == "--evaluate":
        saved = dataclasses.replace(saved, eval_episodes=100, capture_video=False, resume=None)
    given = tyro.cli(Args, args=argv, default=saved)
    changed = []
    for key, value in dataclasses.asdict(saved).items():
        if getattr(given, key) != value and key not in CHANGEABLE[flag]:
            changed.append(f"{key} ({value} -> {getattr(given, key)})")
    if changed:
        raise UserError(f"{flag} keeps the run's dataset and hyperparameters; cannot change {', '.join(changed)}")
    if flag == "--resume":
        return dataclasses.replace(saved, resume=str(file.parent.parent), device=given.device), ckpt
    return validate(dataclasses.replace(given, evaluate=str(file))), ckpt


def validate(args: Args) -> Args:
    """Out-of-range settings (the run's, then the algorithm's) fail here, before any data is loaded."""
    problems = []
    if args.total_steps <= 0 or args.batch_size <= 0 or args.online_steps < 0:
        problems.append("total_steps and batch_size must be > 0, online_steps >= 0")
    if args.eval_episodes < 0:
        problems.append("eval_episodes must be >= 0")
    if min(args.eval_every, args.log_every, args.checkpoint_every, args.keep_checkpoints) <= 0:
        problems.append("eval_every, log_every, checkpoint_every and keep_checkpoints must be > 0")
    if args.capture_video and args.eval_episodes == 0:
        problems.append("--capture-video needs evaluation episodes")
    if args.mixing_ratio is not None and not 0 <= args.mixing_ratio <= 1:
        problems.append("mixing_ratio must be in [0, 1] (or None: uniform)")
    if args.export and not args.evaluate:
        problems.append("--export writes the policy of a checkpoint: name it with --evaluate RUN_OR_CHECKPOINT")
    problems += check_args(args)
    if problems:
        raise UserError(f"invalid hyperparameters: {'; '.join(problems)}.")
    return args


def git_commit() -> str | None:
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]
    return subprocess.run(git, capture_output=True, text=True).stdout.strip() or None


def write_summary(run_dir: Path, args: Args, dataset, history: list, step: int, clock: dict, online: dict) -> None:
    """summary.json, what sweep.py and report.py read, written atomically with every checkpoint and at the end."""
    scores = [h["normalized_score"] for h in history if h["normalized_score"] is not None]
    returns = [h["return"] for h in history]
    offline = [h for h in history if h["step"] == args.total_steps and args.online_steps]  # before fine-tuning
    packages = ("torch", "minari", "gymnasium", "gymnasium_robotics", "mujoco")
    summary = {
        "algo": ALGO,
        "env": args.env,
        "minari_id": dataset.id,
        "domain": resolve_dataset_name(dataset.id)[1],
        "seed": args.seed,
        "steps": step,
        "total_steps": args.total_steps,
        "online_steps": args.online_steps,
        "completed": step == args.total_steps + args.online_steps,
        "eval_episodes": args.eval_episodes,
        "wall_seconds": round(clock["wall"], 2),
        "sps": round(step / max(clock["train_seconds"], 1e-9), 2),
        "final_return": returns[-1] if returns else None,
        "best_return": max(returns, default=None),
        "final_normalized_score": scores[-1] if scores else None,
        "best_normalized_score": max(scores, default=None),
        "offline_return": offline[0]["return"] if offline else None,
        "offline_normalized_score": offline[0]["normalized_score"] if offline else None,
        "online": online,
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
            "loaded, so the optimization diverged. Lower the learning rates, or add LayerNorm to the critics."
        )


class OnlinePhase:
    """Online fine-tuning: a training env built like the evaluation env (each episode seeded from --seed and its
    number), one env step per step of the loop with the algorithm's explore(); each transition goes into the buffer
    at once and becomes sampleable when its episode ends. A resumed run closes the episode that was in progress as
    cut off (an env's state cannot be saved in general) and starts a new one."""

    def __init__(self, dataset, buffer: Buffer, stats: dict, args: Args, device: torch.device, state: dict | None):
        self.env = make_eval_env(dataset)
        self.buffer, self.stats, self.args, self.device = buffer, stats, args, device
        self.offline_steps = dataset.total_steps  # the online transitions and observations are stored after these
        self.offline_rows = dataset.total_steps + dataset.total_episodes
        self.episodes = [] if state is None else state["episodes"]  # return, length, success of each episode
        if state is not None:
            buffer.load_online_state(state["buffer"], self.offline_steps, self.offline_rows)
            if buffer.n_steps > buffer.episode_start:
                buffer.end_episode(False, args.discount, stats["failure_reward"])
        self.start_episode()

    def start_episode(self) -> None:
        seed = int(np.random.SeedSequence([self.args.seed, len(self.episodes), 1]).generate_state(1)[0])
        self.obs = self.standardize(self.env.reset(seed=seed)[0])
        self.buffer.start_episode(self.obs)
        self.episode = {"return": 0.0, "length": 0, "success": None}

    def standardize(self, obs: np.ndarray) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return (obs - self.stats["obs_mean"].to(self.device)) / self.stats["obs_std"].to(self.device)

    @torch.no_grad()
    def step(self, nets: dict) -> dict | None:
        """One env step; the episode's return, length and success when it ends."""
        nets["actor"].eval()
        action = explore(nets, self.obs[None], self.args)[0].clamp(-1 + 1e-5, 1 - 1e-5)  # as the data's actions
        nets["actor"].train()
        low, high = self.stats["action_low"], self.stats["action_high"]
        env_action = low + (action.cpu() + 1.0) * 0.5 * (high - low)
        obs, reward, terminated, truncated, info = self.env.step(env_action.numpy())
        self.obs = self.standardize(obs)
        self.buffer.add(action, reward * self.stats["reward_scale"] + self.stats["reward_bias"], terminated, self.obs)
        self.episode["return"] += float(reward)
        self.episode["length"] += 1
        if "success" in info:
            self.episode["success"] = bool(self.episode["success"] or info["success"])
        if not (terminated or truncated):
            return None
        self.buffer.end_episode(terminated, self.args.discount, self.stats["failure_reward"])
        self.episodes.append(self.episode)
        ended = self.episode
        self.start_episode()
        return ended

    def summary(self) -> dict:
        """Episodes so far, their success rate and the cumulative regret, 1 - the success rate (as CORL)."""
        successes = [e["success"] for e in self.episodes if e["success"] is not None]
        rate = float(np.mean(successes)) if successes else None
        regret = None if rate is None else 1.0 - rate
        return {
            "episodes": len(self.episodes),
            "env_steps": self.buffer.n_steps - self.offline_steps,  # the episode in progress included
            "success_rate": rate,
            "regret": regret,
        }

    def state(self) -> dict:
        return {"buffer": self.buffer.online_state(self.offline_steps, self.offline_rows), "episodes": self.episodes}


def export_policy(policy: Policy, file: str) -> list:
    """The policy as one file made by torch.export (.pt2): raw observations in (any batch size), env actions out.
    torch.export.load(file).module() runs it where only torch is installed. With onnx and onnxscript installed,
    an .onnx file beside it too. Returns the files written."""
    policy = copy.deepcopy(policy).cpu().eval().requires_grad_(False)
    example = torch.zeros(2, len(policy.obs_mean))
    batch = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(policy, (example,), dynamic_shapes=batch)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, file)
    written = [file]
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        onnx_file = str(Path(file).with_suffix(".onnx"))
        torch.onnx.export(policy, (example,), onnx_file, dynamo=True, dynamic_shapes=batch, input_names=["obs"])
        written.append(onnx_file)
    return written


def evaluate_checkpoint(args: Args, ckpt: dict) -> None:
    """--evaluate: the checkpoint's deterministic policy on --eval-episodes seeded episodes (the seeds of the run's
    own evaluation at that step); mean, std and 95 % intervals printed and written to <run>/evaluations/. With
    --export, the exported file is what gets evaluated."""
    device = pick_device(args.device)
    dataset = load_dataset(ckpt["minari_id"])
    check_dataset(dataset, ckpt, "--evaluate")
    stats = ckpt["normalization"]
    obs_dim, act_dim = len(stats["obs_mean"]), len(stats["action_low"])
    actor = make_networks(args, obs_dim, act_dim)["actor"]
    actor.load_state_dict(ckpt["actor"])
    policy = Policy(actor.eval(), stats).to(device)
    if args.export:
        for file in export_policy(policy, args.export):
            print(f"wrote {file}")
        policy = torch.export.load(args.export).module()
        device = torch.device("cpu")
    if args.eval_episodes == 0:
        return
    envs = make_eval_envs(dataset, args, obs_dim, act_dim)
    seeds = evaluation_seeds(args.seed, ckpt["step"], args.eval_episodes)
    returns, lengths, success = evaluate(envs, numpy_policy(policy, device), seeds)
    result = {"algo": ALGO, "minari_id": dataset.id, "checkpoint": args.evaluate, "step": ckpt["step"]}
    result.update(seed=args.seed, episodes=args.eval_episodes, exported=args.export)
    result["return"] = mean_and_interval(returns, args.seed)
    result["normalized_score"] = None
    if dataset.storage.metadata.get("ref_min_score") is not None:
        scores = np.asarray(minari.get_normalized_score(dataset, returns)) * 100
        result["normalized_score"] = mean_and_interval(scores, args.seed)
    result["success_rate"] = None if success is None else float(success.mean())
    result["length"] = float(lengths.mean())
    result["returns"] = returns.tolist()
    print(f"{ALGO}.py, {dataset.id}, step {ckpt['step']}: {args.eval_episodes} episodes, seed {args.seed}")
    for name in ("return", "normalized_score"):
        if result[name] is not None:
            low, high = result[name]["ci95"]
            mean, std = result[name]["mean"], result[name]["std"]
            print(f"  {name:<17} {mean:9.2f} ± {std:.2f}  (95 % CI {low:.2f} to {high:.2f})")
    if success is not None:
        print(f"  {'success rate':<17} {result['success_rate']:9.2f}")
    checkpoint = Path(args.evaluate)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    out = run_dir / "evaluations" / f"step_{ckpt['step']}__seed_{args.seed}__{args.eval_episodes}_episodes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.capture_video:
        problem = record_video(dataset, numpy_policy(policy, device), seeds[0], out.with_suffix(".gif"))
        print(problem or f"wrote {out.with_suffix('.gif')}")


def main(argv: list) -> None:
    args, ckpt = parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")  # --capture-video: MuJoCo renders offscreen through EGL by default
    if args.evaluate:
        return evaluate_checkpoint(args, ckpt)
    device = pick_device(args.device)
    common.seed_everything(args.seed)  # TRY NOT TO MODIFY: seeding

    dataset = load_dataset(resolve_dataset_name(args.env)[0])
    no_env = dataset.env_spec is None and dataset.storage.metadata.get("eval_env_spec") is None
    if no_env and args.online_steps:
        raise UserError(f"dataset {dataset.id} has no environment to fine-tune in: --online-steps needs one")
    if args.eval_episodes and no_env:
        print(f"dataset {dataset.id} has no environment: training without evaluation (--eval-episodes 0)")
        args = dataclasses.replace(args, eval_episodes=0, capture_video=False)
    if ckpt is not None:
        check_dataset(dataset, ckpt, "--resume")
    buffer, stats = load_buffer(dataset, args, device)
    obs_dim = buffer.obs.shape[1]
    act_dim = len(stats["action_low"])
    print(f"{dataset.id}: {buffer.n_steps} transitions, {dataset.total_episodes} episodes, device {device}")
    envs = make_eval_envs(dataset, args, obs_dim, act_dim) if args.eval_episodes else None
    has_scores = dataset.storage.metadata.get("ref_min_score") is not None  # else no normalized score
    run_dir = make_run_dir(args, resuming=ckpt is not None)

    nets = {name: net.to(device) for name, net in make_networks(args, obs_dim, act_dim).items()}
    opts = make_optimizers(nets, args)
    update = make_update(nets, opts, args)
    start, history, clock = 0, [], {"wall": 0.0, "train_seconds": 0.0}
    online = None  # the online phase, once it has begun
    if ckpt is not None:
        for name, obj in {**nets, **opts}.items():
            obj.load_state_dict(ckpt[name])
        common.set_rng_states(ckpt["rng"], buffer.generator)
        start, history, clock = ckpt["step"], ckpt["eval_history"], ckpt["clock"]
        if ckpt.get("online") is not None:
            online = OnlinePhase(dataset, buffer, stats, args, device, ckpt["online"])
        print(f"resumed {run_dir} at step {start}")
    if args.track:
        import wandb  # optional: pip install wandb

        project = os.environ.get("WANDB_PROJECT", "single-file-offline-rl")
        config = dataclasses.asdict(args)
        wandb.init(
            project=project, name=run_dir.name, id=run_dir.name, config=config, sync_tensorboard=True, resume="allow"
        )
    writer = SummaryWriter(str(run_dir), purge_step=start + 1 if start else None)
    policy = numpy_policy(Policy(nets["actor"], stats).to(device), device)
    stop = []  # signals received: finish the step, checkpoint, exit with a resume hint
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    # The wall clock counts the whole run (across resumes); SPS counts training steps only, evaluations excluded
    t_start = time.time() - clock["wall"]
    t_window = time.time()
    last_check = start  # the step of the last host sync (logging)
    last_score = None
    last_step = args.total_steps + args.online_steps
    progress = tqdm(range(start + 1, last_step + 1), initial=start, total=last_step)
    for step in progress:
        if step > args.total_steps:  # online: one env step, then a gradient step on offline and online data
            if online is None:
                online = OnlinePhase(dataset, buffer, stats, args, device, None)
            episode = online.step(nets)
            if episode is not None:
                writer.add_scalar("online/episode_return", episode["return"], step)
                writer.add_scalar("online/episode_length", episode["length"], step)
                if episode["success"] is not None:
                    writer.add_scalar("online/success", episode["success"], step)
                    writer.add_scalar("online/regret", online.summary()["regret"], step)
            metrics = update(buffer.sample(args.batch_size, args.mixing_ratio), step)
        else:
            metrics = update(buffer.sample(args.batch_size), step)
        final = step == last_step
        end_of_phase = final or step == args.total_steps
        checkpoint_now = step % args.checkpoint_every == 0 or end_of_phase or stop

        if step % args.log_every == 0 or checkpoint_now:
            values = {name: value.item() for name, value in metrics.items()}  # the only host sync of training
            check_finite(values, last_check, step)
            seconds = time.time() - t_window
            clock["train_seconds"] += seconds
            values["charts/SPS"] = (step - last_check) / max(seconds, 1e-9)
            values["charts/learning_rate"] = float(opts["actor_opt"].param_groups[0]["lr"])
            if online is not None:
                values["charts/env_steps"] = online.summary()["env_steps"]
            for name, value in values.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(sps=f"{values['charts/SPS']:.0f}", score=last_score)
            t_window = time.time()
            last_check = step

        t_pause = time.time()
        if args.eval_episodes and (step % args.eval_every == 0 or end_of_phase):
            nets["actor"].eval()
            seeds = evaluation_seeds(args.seed, step, args.eval_episodes)
            returns, lengths, success = evaluate(envs, policy, seeds)
            score = float(np.mean(minari.get_normalized_score(dataset, returns)) * 100) if has_scores else None
            history.append(
                {
                    "step": step,
                    "return": float(returns.mean()),
                    "return_std": float(returns.std()),
                    "length": float(lengths.mean()),
                    "normalized_score": score,
                    "success": None if success is None else float(success.mean()),
                    "seconds": round(time.time() - t_pause, 3),
                }
            )
            for tag in ("return", "length", "normalized_score", "success"):
                if history[-1][tag] is not None:
                    writer.add_scalar(f"eval/{tag}", history[-1][tag], step)
            last_score = f"{returns.mean() if score is None else score:.1f}"
            if args.capture_video:
                problem = record_video(dataset, policy, seeds[0], run_dir / "videos" / f"step_{step}.gif")
                if problem:
                    tqdm.write(problem)
                    args.capture_video = False
            nets["actor"].train()

        if checkpoint_now:
            clock["wall"] = time.time() - t_start
            state = {name: obj.state_dict() for name, obj in {**nets, **opts}.items()}
            state.update(algo=ALGO, minari_id=dataset.id, dataset=dataset_fingerprint(dataset), step=step)
            state.update(args=dataclasses.asdict(args), clock=clock, normalization=stats, eval_history=history)
            state.update(rng=common.get_rng_states(buffer.generator), online=None if online is None else online.state())
            common.save_checkpoint(run_dir, state, step, args.keep_checkpoints)
            online_summary = None if online is None else online.summary()
            write_summary(run_dir, args, dataset, history, step, clock, online_summary)
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
