"""Decision Transformer (DT), a single-file implementation on Gymnasium + Minari.

The Decision Transformer casts offline RL as sequence modelling: a causal GPT reads an episode as tokens (return-to-go,
state, action) per step and is trained to predict each action from the tokens before it, the return still to come
included. Conditioned on a high target return at evaluation, it acts like the episodes that earned it. Chen, Lu,
Rajeswaran, Lee, Grover, Laskin, Abbeel, Srinivas, Mordatch, "Decision Transformer: Reinforcement Learning via Sequence
Modeling", NeurIPS 2021, arXiv:2106.01345; this script follows CORL's offline/dt.py. Docs: docs/dt.md.

Read on: the algorithm (its hyperparameters, checks and settings tables, the transformer, the loss, the update step and
the policy that keeps each episode's context), then the training loop, then the rest of the shared block that every
algorithm script holds word for word (data, evaluation, configuration, checkpoints).
"""

import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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

try:
    import fcntl  # the run folder's lock
except ImportError:  # Windows: no lock
    fcntl = None

ALGO = "dt"
NEEDS_NEXT_ACTION = False  # segments read (s, a, return-to-go) of each step


@dataclasses.dataclass
class Args:
    # Algorithm hyperparameters (CORL's offline/dt.py and configs/offline/dt; per domain and dataset: the tables below)
    embedding_dim: int = 128  # width of the tokens
    num_layers: int = 3  # transformer blocks
    num_heads: int = 1  # attention heads
    seq_len: int = 20  # steps per training segment and of the policy's context (this field makes batches segments)
    episode_len: int = 1000  # timesteps with an embedding of their own (later ones share the last)
    attention_dropout: float = 0.1  # dropout of the attention weights
    residual_dropout: float = 0.1  # dropout of each block's attention and MLP outputs
    embedding_dropout: float = 0.1  # dropout of the token embeddings
    learning_rate: float = 1e-4  # AdamW's, after the warm-up
    weight_decay: float = 1e-4  # AdamW's, on every parameter (as CORL's)
    warmup_steps: int = 10_000  # the learning rate grows linearly to learning_rate over these steps
    clip_grad: float = 0.25  # largest gradient norm
    target_returns: tuple[float, ...] = ()  # returns to condition on, the first the score; (): best episode's and half
    # Read by the shared block (returns-to-go, reward transform, fine-tuning batches)
    discount: float = 1.0  # of the returns-to-go: undiscounted sums, as the paper's
    normalize_states: bool = True  # standardize observations with the dataset mean/std (also at evaluation)
    normalize_reward: bool = False  # must stay off: returns-to-go are scaled by reward_scale only
    reward_scale: float = 0.001  # returns-to-go (and the targets) enter the transformer times this
    reward_bias: float = 0.0  # must stay 0
    mixing_ratio: float | None = None  # fine-tuning's offline share per batch (dt.py does not fine-tune)

    # -------- SHARED BLOCK (args) begins: the same in every algorithm script --------
    env: str = "door-human-v2"  # a D4RL-style name (door-human-v2, hopper-medium-v0) or a Minari id (D4RL/pen/human-v2)
    seed: int = 1  # seed of python, numpy, torch, batch sampling and evaluation envs
    total_steps: int = 1_000_000  # number of gradient steps
    batch_size: int = 256  # transitions per gradient step
    device: str = "auto"  # auto (cuda, then mps, then cpu) or any torch device: cpu, cuda, cuda:1, mps
    config: str | None = None  # YAML of overrides (keys: these fields), applied after the per-domain settings
    eval_every: int = 5000  # evaluate the policy every this many steps (and at the end)
    eval_episodes: int = 10  # episodes per evaluation, run in parallel; 0: train without an environment
    log_every: int = 1000  # log losses to TensorBoard every this many steps (the only host syncs in training)
    checkpoint_every: int = 50_000  # write checkpoints/step_<N>.pt and last.pt every this many steps (and at the end)
    keep_checkpoints: int = 3  # how many step_<N>.pt files to keep (last.pt is always kept)
    output: str = "runs"  # parent folder of the run folder
    run_name: str | None = None  # name of the run folder inside --output; default <env>__<algo>__<seed>__<unix time>
    resume: str | None = None  # continue a run (its folder or checkpoint); with a larger --total-steps: train further
    track: bool = False  # log to Weights & Biases (pip install wandb); project: $WANDB_PROJECT
    capture_video: bool = False  # save a GIF of one evaluation episode to <run>/videos/ (MuJoCo: MUJOCO_GL=egl)
    compile: bool = False  # torch.compile the update step
    bf16: bool = False  # bfloat16 autocast of the hidden layers; output layers, losses, weights, optimizer stay float32
    online_steps: int = 0  # then fine-tune online for this many env steps, one gradient step each (docs/finetuning.md)
    top_fraction: float = 1.0  # train on this fraction of the episodes, those of highest discounted return (x % BC)
    # -------- SHARED BLOCK (args) ends --------


def check_args(args: Args) -> list:
    """DT's own hyperparameters out of range (the shared block checks the run's fields): the problems found."""
    problems = []
    if min(args.embedding_dim, args.num_layers, args.num_heads, args.seq_len, args.episode_len) < 1:
        problems.append("embedding_dim, num_layers, num_heads, seq_len and episode_len must be >= 1")
    elif args.embedding_dim % args.num_heads:
        problems.append("embedding_dim must be a multiple of num_heads")
    if not all(0 <= p < 1 for p in (args.attention_dropout, args.residual_dropout, args.embedding_dropout)):
        problems.append("dropouts must be in [0, 1)")
    if min(args.learning_rate, args.clip_grad, args.warmup_steps) <= 0 or args.weight_decay < 0:
        problems.append("learning_rate, clip_grad and warmup_steps must be > 0, weight_decay >= 0")
    if not 0 <= args.discount <= 1:
        problems.append("discount must be in [0, 1]")
    if args.normalize_reward or args.reward_bias or args.reward_scale <= 0:
        problems.append("returns-to-go are scaled by reward_scale > 0 alone: no normalize_reward, reward_bias 0")
    if args.online_steps or args.mixing_ratio is not None:
        problems.append(
            "dt.py does not fine-tune online (CORL has no DT fine-tuning recipe): no --online-steps or --mixing-ratio"
        )
    return problems


# Published settings of CORL's DT (github.com/tinkoff-ai/CORL, configs/offline/dt/<env>/<dataset>.yaml): 3 layers, 1
# head, embedding 128, seq_len 20, dropouts 0.1, AdamW (betas 0.9, 0.999, weight decay 1e-4) with 10k warm-up steps,
# gradient clipping 0.25, 100k steps (update_steps, in all 30 configs), 100 evaluation episodes per target return.
# "locomotion": what CORL's configs use on D4RL's halfcheetah/hopper/walker2d datasets, which Minari does not host; here
# it applies to Minari's mujoco/<env>/* datasets of those envs, with the targets of the env (CORL's are the same for
# every dataset of an env). Kitchen has no CORL config: the defaults (unverified). Precedence: Args defaults <
# DOMAIN_SETTINGS < DATASET_SETTINGS < --config FILE.yaml < command-line flags.
CORL_RUN = {"total_steps": 100_000, "eval_episodes": 100}
DOMAIN_SETTINGS = {
    "locomotion": {**CORL_RUN, "batch_size": 4096, "learning_rate": 8e-4, "reward_scale": 0.001,
                   "eval_every": 5000},  # halfcheetah|hopper|walker2d/*_v2.yaml
    "adroit": {**CORL_RUN, "batch_size": 4096, "learning_rate": 8e-4, "reward_scale": 1.0,
               "eval_every": 5000},  # {pen,door,hammer,relocate}/*_v1.yaml
    "antmaze": {**CORL_RUN, "batch_size": 64, "learning_rate": 1e-4, "reward_scale": 1.0,
                "eval_every": 10_000},  # antmaze/*_v2.yaml
    "pointmaze": {**CORL_RUN, "batch_size": 4096, "learning_rate": 8e-4, "reward_scale": 1.0,
                  "eval_every": 5000},  # maze2d/*_v1.yaml
}  # fmt: skip
# CORL's target_returns (raw returns; the first gives the run's score), the same for every dataset of an env
DATASET_SETTINGS = {
    f"{env}/{kind}": {"target_returns": targets}
    for env, kinds, targets in [
        ("mujoco/halfcheetah", "simple-v0 medium-v0 expert-v0", (12000.0, 6000.0)),
        ("mujoco/hopper", "simple-v0 medium-v0 expert-v0", (3600.0, 1800.0)),
        ("mujoco/walker2d", "simple-v0 medium-v0 expert-v0", (5000.0, 2500.0)),
        ("D4RL/pen", "human-v2 cloned-v2 expert-v2", (3100.0, 1550.0)),
        ("D4RL/door", "human-v2 cloned-v2 expert-v2", (2900.0, 1450.0)),
        ("D4RL/hammer", "human-v2 cloned-v2 expert-v2", (12800.0, 6400.0)),
        ("D4RL/relocate", "human-v2 cloned-v2 expert-v2", (4300.0, 2150.0)),
        ("D4RL/pointmaze", "umaze-v2 medium-v2 large-v2", (280.0, 140.0)),
        ("D4RL/antmaze", "umaze-v1 medium-play-v1 large-play-v1", (1.0, 0.5)),
        ("D4RL/antmaze", "umaze-diverse-v1 medium-diverse-v1 large-diverse-v1", (1.0, 0.5, 0.25, 0.125, 0.06, 0.03)),
    ]
    for kind in kinds.split()
}
FINETUNE_SETTINGS = {}  # no fine-tuning (check_args refuses --online-steps)


# -------- ALGO LOGIC: the transformer --------
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which token i attends to tokens 0..i (nn.MultiheadAttention's projections and
    initialization, CORL's choice, written out with is_causal so that a policy file takes a window of any length)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # nn.MultiheadAttention's in_proj
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, heads, n, d)
        dropout = self.dropout if self.training else 0.0
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm GPT block: x + Dropout(CausalSelfAttention(LN(x))), then x + MLP(LN(x)) (CORL's, after minGPT)."""

    def __init__(self, dim: int, heads: int, attention_dropout: float, residual_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(residual_dropout)
        self.attention = CausalSelfAttention(dim, heads, attention_dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(residual_dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x)))  # minGPT's dropout after the attention's projection
        return x + self.mlp(self.norm2(x))


class DecisionTransformer(nn.Module):
    """Tokens (R_1, s_1, a_1, R_2, s_2, a_2, ...), each an embedding plus its step's timestep embedding; the action
    a_t is read off the output at s_t, so it depends on R_1..R_t, s_1..s_t and a_1..a_{t-1} only."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        dim = args.embedding_dim
        self.seq_len, self.reward_scale, self.target_returns = args.seq_len, args.reward_scale, args.target_returns
        self.timestep_emb = nn.Embedding(args.episode_len + args.seq_len, dim)  # + seq_len: padding past the end
        self.state_emb = nn.Linear(obs_dim, dim)
        self.action_emb = nn.Linear(act_dim, dim)
        self.return_emb = nn.Linear(1, dim)
        self.emb_norm = nn.LayerNorm(dim)
        self.emb_drop = nn.Dropout(args.embedding_dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, args.num_heads, args.attention_dropout, args.residual_dropout)
            for _ in range(args.num_layers)
        )
        self.out_norm = nn.LayerNorm(dim)
        self.action_head = common.OutputLinear(dim, act_dim)
        self.apply(self.init_weights)
        for block in self.blocks:  # nn.MultiheadAttention's own init of its in_proj, which CORL's init does not reach
            nn.init.xavier_uniform_(block.attention.qkv.weight)

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """GPT-2's: N(0, 0.02) weights, zero biases, LayerNorms at identity."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def predict(self, states, actions, returns_to_go, timesteps) -> torch.Tensor:
        """(B, K, ...) inputs, returns-to-go scaled -> the action predicted at every step, (B, K, act_dim) in [-1, 1].
        CORL also masks the padding after an episode's end from attention: under the causal mask no real step attends
        to it anyway, and the loss masks the predictions at padding, so the mask changes nothing that is learned."""
        # the last embedding for timesteps beyond it (CORL's evaluation stops at episode_len instead)
        time_emb = self.timestep_emb(timesteps.clamp(max=self.timestep_emb.num_embeddings - 1))
        tokens = [self.return_emb(returns_to_go[..., None]), self.state_emb(states), self.action_emb(actions)]
        sequence = (torch.stack(tokens, dim=2) + time_emb[:, :, None]).flatten(1, 2)  # R_1, s_1, a_1, R_2, ...
        x = self.emb_drop(self.emb_norm(sequence))  # LayerNorm as the original code
        for block in self.blocks:
            x = block(x)
        return torch.tanh(self.action_head(self.out_norm(x)[:, 1::3]))  # read at the state tokens

    def forward(self, states, actions, returns_to_go, timesteps) -> torch.Tensor:
        """The policy: an episode's last K steps (returns-to-go raw, the last action a placeholder) -> next action."""
        return self.predict(states, actions, returns_to_go * self.reward_scale, timesteps)[:, -1]

    def targets(self, stats: dict) -> tuple:
        """The returns to condition on: target_returns, or the dataset's best episode return and half of it."""
        return self.target_returns or (stats["best_return"], stats["best_return"] / 2)

    def numpy_policies(self, policy: nn.Module, stats: dict, device: torch.device) -> dict:
        """The shared block's acting functions: one per target return, "target_<R>"."""
        act_dim = self.action_emb.in_features
        return {
            f"target_{target:g}": context_policy(policy, target, self.seq_len, act_dim, device)
            for target in self.targets(stats)
        }


def context_policy(policy, target_return: float, seq_len: int, act_dim: int, device: torch.device):
    """act(obs, rewards) on n episodes in lockstep (CORL's eval_rollout, batched): each episode's last seq_len states,
    actions, returns-to-go (the target less the rewards so far) and timesteps, one forward of policy (the Policy, or
    its exported file: collect.py) for all of them per step."""
    window = {}

    @torch.no_grad()
    def act(obs: np.ndarray, rewards: np.ndarray | None = None) -> np.ndarray:
        states = torch.as_tensor(obs, dtype=torch.float32, device=device)[:, None]
        n = len(states)
        if rewards is None:  # new episodes
            window.clear()
            returns_to_go = torch.full((n, 1), float(target_return), device=device)
            timesteps = torch.zeros(n, 1, dtype=torch.long, device=device)
        else:
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
            returns_to_go = window["returns_to_go"][:, -1:] - rewards[:, None]
            timesteps = window["timesteps"][:, -1:] + 1
        placeholder = torch.zeros(n, 1, act_dim, device=device)  # a_t: not seen by the prediction at s_t
        step = {"states": states, "actions": placeholder, "returns_to_go": returns_to_go, "timesteps": timesteps}
        for name, x in step.items():
            window[name] = torch.cat([window[name], x], dim=1)[:, -seq_len:] if name in window else x
        action = policy(window["states"], window["actions"], window["returns_to_go"], window["timesteps"])
        window["actions"][:, -1] = action
        return action.cpu().numpy()

    return act


def make_networks(args: Args, obs_dim: int, act_dim: int) -> dict:
    return {"actor": DecisionTransformer(obs_dim, act_dim, args)}


def make_optimizers(nets: dict, args: Args) -> dict:
    """AdamW (betas 0.9, 0.999) on every parameter, and CORL's warm-up: min((k + 1) / warmup_steps, 1) at step k."""
    params = nets["actor"].parameters()
    opt = torch.optim.AdamW(params, lr=torch.tensor(args.learning_rate), weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / args.warmup_steps, 1.0))
    return {"actor_opt": opt, "scheduler": scheduler}


# -------- ALGO LOGIC: the loss and the update step --------
def dt_loss(predicted: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E[(pi(R_<=t, s_<=t, a_<t) - a_t)^2 m_t]: the squared error on actions, padding masked (m_t = 0), averaged over
    every step and action dimension, padding included (CORL's)."""
    return ((predicted - actions) ** 2 * mask[..., None]).mean()


def make_update(nets: dict, opts: dict, args: Args):
    """One gradient step on a batch of segments, update(batch, step): the loss, gradients clipped to norm clip_grad,
    AdamW, the warm-up. Returns detached metrics (no host sync)."""
    model = nets["actor"]

    def update_step(batch: dict) -> dict:
        predicted = model.predict(batch["obs"], batch["actions"], batch["returns_to_go"], batch["timesteps"])
        loss = dt_loss(predicted, batch["actions"], batch["mask"])
        opts["actor_opt"].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opts["actor_opt"].step()
        opts["scheduler"].step()
        return {"losses/actor_loss": loss.detach()}

    update_step = common.accelerate(update_step, next(model.parameters()).device.type, args.bf16, args.compile)
    return lambda batch, step: update_step(batch)


def explore(nets: dict, obs: torch.Tensor, args: Args) -> torch.Tensor:
    """The shared block's fine-tuning policy: never called (check_args refuses --online-steps)."""
    raise NotImplementedError("dt.py does not fine-tune online")


# ======== SHARED BLOCK (loop) begins ========
# The loop and the shared block after the algorithm are the same in every script: edit them in iql.py, then run
# `python tools/shared_block.py --fix`. They use of the algorithm: ALGO, NEEDS_NEXT_ACTION (batches carry the next
# action), Args (with discount, normalize_states, normalize_reward, reward_scale, reward_bias, mixing_ratio; a sequence
# model's seq_len: batches of segments), check_args, DOMAIN_SETTINGS, DATASET_SETTINGS, FINETUNE_SETTINGS, make_networks
# (a dict of modules; "actor": states to actions in [-1, 1]; a sequence model's has numpy_policies), make_optimizers (a
# dict; "actor_opt" is the actor's), make_update (update(batch, step) -> a dict of detached tensors) and explore (the
# online behaviour policy).
def train(args: Args, ckpt: dict | None = None) -> None:
    """Sample a batch, update, log, evaluate, checkpoint; online (after total_steps), an env step first."""
    # data, networks, optimizers, envs and the run folder; on --resume, as the checkpoint left them
    with Run(args, ckpt) as run:
        args = run.args  # a dataset without an environment: no evaluation
        update = make_update(run.nets, run.opts, args)
        for step in range(run.step + 1, args.total_steps + args.online_steps + 1):
            if step <= args.total_steps:
                batch = run.buffer.sample(args.batch_size)
            else:
                run.online_step(step)
                batch = run.buffer.sample(args.batch_size, args.mixing_ratio)
            metrics = update(batch, step)

            phase_ends = step in (args.total_steps, args.total_steps + args.online_steps)
            checkpoint_now = step % args.checkpoint_every == 0 or phase_ends or run.stop
            if step % args.log_every == 0 or checkpoint_now:
                run.log(step, metrics)  # the only host sync of training
            if args.eval_episodes and (step % args.eval_every == 0 or phase_ends):
                run.evaluate(step)  # and checkpoints/best.pt when it is the best so far
            if checkpoint_now:
                run.checkpoint(step)
            if run.stop:
                break
        run.finish()


# ======== SHARED BLOCK (loop) ends ========


# ======== SHARED BLOCK begins ========
class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


# -------- The run: set up, log, evaluate, checkpoint --------
class Run:
    """What the loop works with; the run folder is locked while it trains."""

    def __init__(self, args: Args, ckpt: dict | None):
        self.device = pick_device(args.device)
        common.seed_everything(args.seed)  # TRY NOT TO MODIFY: seeding
        self.dataset = load_dataset(resolve_dataset_name(args.env)[0])
        if ckpt is not None:
            check_dataset(self.dataset, ckpt, "--resume")
        args = check_environment(self.dataset, args)
        self.args = args
        self.buffer, self.stats = load_buffer(self.dataset, args, self.device)
        obs_dim, act_dim = self.buffer.obs.shape[1], len(self.stats["action_low"])
        print(f"{self.dataset.id}: {self.buffer.n_steps} transitions, {self.dataset.total_episodes} episodes")
        if args.top_fraction < 1:
            print(f"training on the {args.top_fraction:.0%} of highest return: {self.buffer.n_offline} transitions")
        self.envs = make_eval_envs(self.dataset, args.eval_episodes, obs_dim, act_dim) if args.eval_episodes else None
        self.run_dir, self.lock = make_run_dir(args)
        self.nets = {name: net.to(self.device) for name, net in make_networks(args, obs_dim, act_dim).items()}
        self.opts = make_optimizers(self.nets, args)
        self.policies = numpy_policies(Policy(self.nets["actor"], self.stats).to(self.device), self.stats, self.device)
        self.step, self.history, self.clock, self.online = 0, [], {"wall": 0.0, "train_seconds": 0.0}, None
        if ckpt is not None:
            for name, obj in {**self.nets, **self.opts}.items():
                obj.load_state_dict(ckpt[name])
            common.set_rng_states(ckpt["rng"], self.buffer.generator)
            self.step, self.history, self.clock = ckpt["step"], ckpt["eval_history"], ckpt["clock"]
            if ckpt["online"] is not None:
                self.online = OnlinePhase(self.dataset, self.buffer, self.stats, args, self.device, ckpt["online"])
            print(f"resumed {self.run_dir} at step {self.step} of {args.total_steps + args.online_steps}")
        if args.track:
            import wandb

            config = dataclasses.asdict(args)
            project = os.environ.get("WANDB_PROJECT", "single-file-offline-rl")
            name = self.run_dir.name
            wandb.init(project=project, name=name, id=name, config=config, sync_tensorboard=True, resume="allow")
        self.writer = SummaryWriter(str(self.run_dir), purge_step=self.step + 1 if self.step else None)
        self.stop = []  # signals: finish the step, checkpoint, exit
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.stop.append(signum))
        self.started = time.time() - self.clock["wall"]
        self.window = {"since": time.time(), "step": self.step, "sps": None}  # SPS counts training time only
        self.progress = tqdm(initial=self.step, total=args.total_steps + args.online_steps, desc=self.phase(self.step))

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        self.progress.close()
        self.writer.close()
        self.lock.close()

    def phase(self, step: int) -> str:
        return "offline" if step <= self.args.total_steps else "online"

    def online_step(self, step: int) -> None:
        if self.online is None:
            self.online = OnlinePhase(self.dataset, self.buffer, self.stats, self.args, self.device, None)
            self.progress.set_description("online")
        episode = self.online.step(self.nets)
        if episode is not None:
            self.writer.add_scalar("online/episode_return", episode["return"], step)
            self.writer.add_scalar("online/episode_length", episode["length"], step)
            if episode["success"] is not None:
                self.writer.add_scalar("online/success", episode["success"], step)
                self.writer.add_scalar("online/regret", self.online.summary()["regret"], step)

    def log(self, step: int, metrics: dict) -> None:
        values = {name: value.item() for name, value in metrics.items()}
        check_finite(values, self.window["step"], step)
        seconds = time.time() - self.window["since"]
        self.clock["train_seconds"] += seconds
        values["charts/SPS"] = (step - self.window["step"]) / max(seconds, 1e-9)
        values["charts/learning_rate"] = float(self.opts["actor_opt"].param_groups[0]["lr"])
        if self.online is not None:
            values["charts/env_steps"] = self.online.summary()["env_steps"]
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.progress.update(step - self.progress.n)
        self.progress.set_postfix(sps=f"{values['charts/SPS']:.0f}")
        self.window = {"since": time.time(), "step": step, "sps": values["charts/SPS"]}

    def evaluate(self, step: int) -> None:
        started = time.time()
        self.nets["actor"].eval()
        seeds = evaluation_seeds(self.args.seed, step, self.args.eval_episodes)
        # one per condition (dt.py: target return); the first is the run's score
        outcomes = {name: evaluate(self.envs, act, seeds) for name, act in self.policies.items()}
        returns, lengths, success = next(iter(outcomes.values()))
        scores = normalized_scores(self.dataset, returns)
        result = {"step": step, "return": float(returns.mean()), "return_std": float(returns.std())}
        result["length"] = float(lengths.mean())
        result["normalized_score"] = None if scores is None else float(scores.mean())
        result["success"] = None if success is None else float(success.mean())
        for tag in ("return", "length", "normalized_score", "success"):
            if result[tag] is not None:
                self.writer.add_scalar(f"eval/{tag}", result[tag], step)
        if len(outcomes) > 1:  # each condition's mean score (return without reference scores)
            result["conditions"] = {}
            for name, (r, _, _) in outcomes.items():
                result["conditions"][name] = float((r if scores is None else normalized_scores(self.dataset, r)).mean())
                tag = f"eval/{name}/{'return' if scores is None else 'normalized_score'}"
                self.writer.add_scalar(tag, result["conditions"][name], step)
        if self.args.capture_video:
            act = next(iter(self.policies.values()))
            problem = record_video(self.dataset, act, seeds[0], self.run_dir / "videos" / f"step_{step}.gif")
            if problem:
                tqdm.write(problem)
                self.args.capture_video = False
        if result["return"] > max((h["return"] for h in self.history), default=-math.inf):
            best = {"algo": ALGO, "minari_id": self.dataset.id, "dataset": dataset_fingerprint(self.dataset)}
            best.update(step=step, args=dataclasses.asdict(self.args), normalization=self.stats)
            best.update(actor=self.nets["actor"].state_dict(), evaluation=result)  # what policy.py reads
            self.save(self.run_dir / "checkpoints" / "best.pt", best, step)
        self.nets["actor"].train()
        self.history.append(result)
        x = returns if scores is None else scores
        line = f"{'return' if scores is None else 'normalized score'} {x.mean():.1f} ± {x.std():.1f}"
        line += "" if success is None else f", success {success.mean():.2f}"
        for name, value in result.get("conditions", {}).items():
            line += f", {name} {value:.1f}"
        line += "" if self.window["sps"] is None else f", {self.window['sps']:.0f} steps/s"
        elapsed = datetime.timedelta(seconds=round(time.time() - self.started))
        total = self.args.total_steps + self.args.online_steps
        tqdm.write(f"step {step}/{total} {self.phase(step)}: {line}, {elapsed} elapsed")
        result["seconds"] = round(time.time() - started, 3)
        self.window["since"] += time.time() - started

    def checkpoint(self, step: int) -> None:
        started = time.time()
        self.clock["wall"] = time.time() - self.started
        state = {name: obj.state_dict() for name, obj in {**self.nets, **self.opts}.items()}
        state.update(algo=ALGO, minari_id=self.dataset.id, dataset=dataset_fingerprint(self.dataset), step=step)
        state.update(args=dataclasses.asdict(self.args), clock=self.clock, normalization=self.stats)
        state.update(eval_history=self.history, rng=common.get_rng_states(self.buffer.generator))
        state.update(online=None if self.online is None else self.online.state())
        self.save(None, state, step)
        self.step = step
        self.save(self.run_dir / "summary.json", summary(self), step)
        self.window["since"] += time.time() - started

    def save(self, file: Path | None, state: dict, step: int) -> None:
        """The checkpoint (file None), best.pt or summary.json, whole or not at all; a failure stops the run."""
        try:
            if file is None:
                common.save_checkpoint(self.run_dir, state, step, self.args.keep_checkpoints)
            elif file.suffix == ".json":
                common.atomic_write(file, json.dumps(state, indent=2).encode())
            else:
                common.atomic_write(file, common.serialize(state))
        except OSError as e:
            last = f"step {self.step}" if self.step else "none"
            raise UserError(
                f"could not write {file or 'the checkpoint'} at step {step} ({e}); the run stops. Its last checkpoint: "
                f"{last}. Make room, then continue with --resume {self.run_dir}."
            ) from None

    def finish(self) -> None:
        self.progress.close()
        if self.stop:
            print(
                f"interrupted at step {self.step}; checkpoint saved. Resume: python {ALGO}.py --resume {self.run_dir}"
            )
            sys.exit(128 + self.stop[0])
        print(f"done: {self.run_dir}")
        if self.history:
            name = "return" if self.history[-1]["normalized_score"] is None else "normalized_score"
            best = max(self.history, key=lambda h: h["return"])
            final = f"final {self.history[-1][name]:.1f}, best {best[name]:.1f} at step {best['step']}"
            print(f"{name.replace('_', ' ')}: {final} (means over {self.args.eval_episodes} episodes)")
            print(f"best policy: {self.run_dir / 'checkpoints' / 'best.pt'}")


class Console(io.TextIOBase):
    """stdout, and a copy: in memory until the run folder exists, then its console.log."""

    def __init__(self, stdout):
        self.stdout = stdout
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stdout.write(text)

    def flush(self) -> None:
        self.copy.flush()
        self.stdout.flush()

    def keep_in(self, file: Path) -> None:
        log = open(file, "a")
        log.write(self.copy.getvalue())
        self.copy = log


def pick_device(name: str) -> torch.device:
    """auto: cuda, mps or cpu; or any torch device this machine has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {name} is not available on this machine ({str(e)[:200]})") from None
    return device


def check_environment(dataset: minari.MinariDataset, args: Args) -> Args:
    """No environment: no evaluation, and no fine-tuning."""
    if dataset.env_spec is not None or dataset.storage.metadata.get("eval_env_spec") is not None:
        return args
    if args.online_steps:
        raise UserError(f"dataset {dataset.id} has no environment to fine-tune in: --online-steps needs one")
    if args.eval_episodes:
        print(f"dataset {dataset.id} has no environment: training without evaluation (--eval-episodes 0)")
    return dataclasses.replace(args, eval_episodes=0, capture_video=False)


def make_run_dir(args: Args) -> tuple:
    """(folder, lock): the new run's folder, with args.yaml, or the resumed one; locked for this process."""
    name = args.run_name or f"{args.env.replace('/', '-')}__{ALGO}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume) if args.resume else Path(args.output) / name
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "w")
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not args.resume and (run_dir / "checkpoints" / "last.pt").exists():
            raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick a new name")
        (run_dir / "args.yaml").write_text(yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
        if isinstance(sys.stdout, Console):
            sys.stdout.keep_in(run_dir / "console.log")
    except BlockingIOError:
        raise UserError(f"another process is training in {run_dir} right now: one run per folder") from None
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir}: {e}. Choose another with --output.") from None
    return run_dir, lock


def check_finite(values: dict, since: int, step: int) -> None:
    """A NaN or infinite loss stops the run before a checkpoint is written."""
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(
            f"{', '.join(bad)} became non-finite between steps {since} and {step}: the data was checked when "
            "loaded, so the optimization diverged. Lower the learning rates, or add LayerNorm to the critics."
        )


def summary(run: Run) -> dict:
    """summary.json, what sweep.py and report.py read (docs/usage.md)."""
    args, history, dataset = run.args, run.history, run.dataset
    scores = [h["normalized_score"] for h in history if h["normalized_score"] is not None]
    returns = [h["return"] for h in history]
    offline = [h for h in history if h["step"] == args.total_steps and args.online_steps]
    packages = ("torch", "minari", "gymnasium", "gymnasium_robotics", "mujoco")
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]
    return {
        "algo": ALGO,
        "env": args.env,
        "minari_id": dataset.id,
        "domain": resolve_dataset_name(dataset.id)[1],
        "seed": args.seed,
        "steps": run.step,
        "total_steps": args.total_steps,
        "online_steps": args.online_steps,
        "completed": run.step == args.total_steps + args.online_steps,
        "eval_episodes": args.eval_episodes,
        "wall_seconds": round(run.clock["wall"], 2),
        "sps": round(run.step / max(run.clock["train_seconds"], 1e-9), 2),
        "final_return": returns[-1] if returns else None,
        "best_return": max(returns, default=None),
        "final_normalized_score": scores[-1] if scores else None,
        "best_normalized_score": max(scores, default=None),
        "offline_return": offline[0]["return"] if offline else None,
        "offline_normalized_score": offline[0]["normalized_score"] if offline else None,
        "online": None if run.online is None else run.online.summary(),
        "ref_min_score": dataset.storage.metadata.get("ref_min_score"),
        "ref_max_score": dataset.storage.metadata.get("ref_max_score"),
        "versions": {name: importlib.metadata.version(name) for name in packages},
        "git_commit": subprocess.run(git, capture_output=True, text=True).stdout.strip() or None,
        "args": dataclasses.asdict(args),
        "eval_history": history,
    }


# -------- Data: dataset names, Minari loading --------
# D4RL-style names and their Minari ids, by domain (the keys of the settings tables); a Minari id takes its task's.
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
    """Every D4RL-style name -> (Minari id, domain)."""
    names = {}
    for domain, (tasks, kinds, versions, minari_id) in DATASET_NAMES.items():
        for task in tasks.split():
            for kind in kinds.split():
                for version in versions.split():
                    names[f"{task}-{kind}-v{version}"] = (minari_id.format(task=task, kind=kind), domain)
    return names


def resolve_dataset_name(name: str) -> tuple:
    """(Minari id, domain) of a D4RL-style name or of a Minari id."""
    names = dataset_names()
    if name in names:
        return names[name]
    if "/" in name:
        for minari_id, domain in names.values():
            if minari_id.rsplit("/", 1)[0] == name.rsplit("/", 1)[0]:
                return name, domain
        return name, "other"
    local = minari.list_local_datasets()
    task = name.split("-")[0]
    if name in gym.registry:
        recorded = [i for i, meta in local.items() if json.loads(meta.get("env_spec") or "{}").get("id") == name]
        found = f"local datasets recorded in it: {', '.join(recorded)}" if recorded else "no local dataset is from it"
        raise UserError(
            f"'{name}' is a Gymnasium environment, not a dataset ({found}). Record one with `python collect.py --env "
            f"{name} --dataset-id local/{name.split('-')[0].lower()}/medium-v0 ...` (docs/collect.md)."
        )
    if task in ("halfcheetah", "hopper", "walker2d", "ant") and re.fullmatch(r"[a-z0-9]+-[a-z-]+-v\d+", name):
        hint = f" Minari does not host D4RL locomotion; closest: mujoco/{task}/simple-v0, medium-v0, expert-v0."
    else:
        close = difflib.get_close_matches(name, [*names, *local], n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UserError(
        f"unknown dataset '{name}'.{hint} Give a D4RL-style name (door-human-v2, antmaze-umaze-v1, "
        "kitchen-mixed-v2, hopper-medium-v0) or a Minari id containing '/' (`minari list local` lists yours)."
    )


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy, else a download (never for local/ ids or near misses of local ones)."""
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except ValueError:
        raise UserError(
            f"'{dataset_id}' is not a valid Minari dataset id: ids look like namespace/name-v<N> "
            "(D4RL/door/human-v2, mujoco/hopper/medium-v0, local/x/random-v0)"
        ) from None
    local = Path(minari.storage.get_dataset_path(dataset_id))
    close = [] if (local / "data").exists() else local_typos(dataset_id)
    if close or not (local / "data").exists() and dataset_id.startswith("local/"):
        hint = f"Did you mean {' or '.join(close)}? " if close else ""
        raise UserError(
            f"dataset '{dataset_id}' is not in the local Minari store (no {local}). {hint}`minari list local` "
            "lists the local datasets; collect.py records new ones."
        )
    try:
        dataset = minari.load_dataset(dataset_id, download=True)
        next(dataset.iterate_episodes(), None)  # a truncated copy fails here, not in training
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


def local_typos(dataset_id: str) -> list:
    """Local ids that dataset_id nearly spells (for ids outside local/, not another version of it)."""
    close = difflib.get_close_matches(dataset_id, minari.list_local_datasets(), cutoff=0.9)
    versions = dataset_id.startswith("local/")
    return [c for c in close if versions or c.rsplit("-v", 1)[0] != dataset_id.rsplit("-v", 1)[0]]


def dataset_fingerprint(dataset: minari.MinariDataset) -> dict:
    """Episodes, steps and a digest of three episodes: tells a dataset re-recorded under the same id."""
    digest = hashlib.blake2b(digest_size=8)
    last = dataset.total_episodes - 1
    for episode in dataset.iterate_episodes(sorted({0, last // 2, last}) if last >= 0 else []):
        for part in (flatten(dataset.observation_space, episode.observations), episode.actions, episode.rewards):
            digest.update(np.asarray(part, dtype=np.float64).tobytes())
    return {"episodes": dataset.total_episodes, "steps": dataset.total_steps, "digest": digest.hexdigest()}


def check_dataset(dataset: minari.MinariDataset, ckpt: dict, what: str) -> None:
    now = dataset_fingerprint(dataset)
    if ckpt.get("dataset", now) != now:
        raise UserError(
            f"{what}: the dataset {dataset.id} is not the one this checkpoint was trained on (then: {ckpt['dataset']}; "
            f"now: {now}): it was re-recorded or re-downloaded under the same id. Use the original copy, or start a "
            "new run."
        )


# -------- Data: one on-device buffer, each observation stored once --------
def flatten(space: gym.Space, obs) -> np.ndarray:
    """(T, ...) observations -> (T, D), Dict keys in order, as gymnasium's FlattenObservation."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([flatten(space[key], obs[key]) for key in space.spaces], axis=1)
    if not isinstance(space, gym.spaces.Box):
        raise UserError(f"unsupported observation space {space}: only Box and Dict of Box are handled")
    return np.reshape(obs, (len(obs), -1))


@dataclasses.dataclass
class Buffer:
    """Every transition on the device; each observation stored once (docs/performance.md#large-datasets): s and s' are
    rows rows[:, i] of obs, steps[i] = (a, r, done, return-to-go). Batches come from index[:n_index]."""

    obs: torch.Tensor  # (rows, obs_dim), standardized, with room for the online phase
    steps: torch.Tensor  # (capacity + 1, act_dim + 3): action in [-1, 1], transformed reward, done, return-to-go
    rows: torch.Tensor  # (2, capacity): rows of s and s'
    index: torch.Tensor  # (capacity,): the transitions batches are drawn from
    generator: torch.Generator
    n_offline: int  # index[:n_offline]: the offline transitions
    n_index: int
    n_steps: int  # transitions stored: the offline ones, then the online ones
    n_obs: int
    offline_steps: int
    offline_rows: int
    episode_starts: torch.Tensor  # (episodes + 1,): the first transition of each offline episode, then offline_steps
    segment: torch.Tensor  # arange(args.seq_len): sample() draws segments of seq_len steps (dt.py); else empty
    episode_start: int = 0  # the first transition of the online episode in progress

    def draw(self, batch_size: int, offline_share: float | None = None) -> torch.Tensor:
        """Uniform; or offline_share of them from the offline transitions, once there are online ones."""
        draw = dict(device=self.obs.device, generator=self.generator)
        if offline_share is None or self.n_index == self.n_offline:
            return self.index[torch.randint(self.n_index, (batch_size,), **draw)]
        n = round(batch_size * offline_share)
        offline = torch.randint(self.n_offline, (n,), **draw)
        online = torch.randint(self.n_offline, self.n_index, (batch_size - n,), **draw)
        return self.index[torch.cat([offline, online])]

    def sample(self, batch_size: int, offline_share: float | None = None) -> dict:
        if len(self.segment):
            return self.sample_segments(batch_size)
        i = self.draw(batch_size, offline_share)
        obs, next_obs = self.obs[self.rows[:, i]]
        steps = self.steps[i]
        act_dim = steps.shape[1] - 3
        return {
            "obs": obs,
            "actions": steps[:, :act_dim],
            "rewards": steps[:, -3],
            "next_obs": next_obs,
            "dones": steps[:, -2],
            "returns_to_go": steps[:, -1],
            "next_actions": self.steps[i + 1, :act_dim],  # meaningless where the episode ended
        }

    def sample_segments(self, batch_size: int) -> dict:
        """seq_len steps from a uniform transition on (episodes in proportion to their length), zeros past its episode's
        end, with timesteps and the mask of real steps."""
        i = self.draw(batch_size)
        episode = self.rows[0, i] - i  # episode k's observations start at row first + k
        first, end = self.episode_starts[episode, None], self.episode_starts[episode + 1, None]
        t = i[:, None] + self.segment
        mask = t < end
        steps = self.steps[torch.minimum(t, end - 1)] * mask[..., None]
        obs = self.obs[self.rows[0, torch.minimum(t, end - 1)]] * mask[..., None]
        return {
            "obs": obs,
            "actions": steps[..., :-3],
            "returns_to_go": steps[..., -1],
            "timesteps": t - first,
            "mask": mask.float(),
        }

    def start_episode(self, obs: torch.Tensor) -> None:
        self.obs[self.n_obs] = obs
        self.n_obs += 1
        self.episode_start = self.n_steps

    def add(self, action: torch.Tensor, reward: float, terminated: bool, next_obs: torch.Tensor) -> None:
        i = self.n_steps
        self.steps[i, :-3] = action
        self.steps[i, -3:] = torch.tensor([reward, float(terminated), 0.0])
        self.rows[:, i] = torch.tensor([self.n_obs - 1, self.n_obs])
        self.obs[self.n_obs] = next_obs
        self.n_obs += 1
        self.n_steps += 1

    def end_episode(self, terminated: bool, discount: float, failure_reward: float | None) -> None:
        """The episode's transitions become sampleable, with their returns-to-go."""
        first, end = self.episode_start, self.n_steps
        rewards = self.steps[first:end, -3].cpu().numpy()
        self.steps[first:end, -1] = torch.from_numpy(returns_to_go(rewards, [end - first], discount, failure_reward))
        if NEEDS_NEXT_ACTION and not terminated:
            end -= 1
        self.index[self.n_index : self.n_index + end - first] = torch.arange(first, end)
        self.n_index += end - first
        self.episode_start = self.n_steps

    def online_state(self) -> dict:
        return {
            "obs": self.obs[self.offline_rows : self.n_obs].cpu(),
            "steps": self.steps[self.offline_steps : self.n_steps].cpu(),
            "rows": self.rows[:, self.offline_steps : self.n_steps].cpu(),
            "index": self.index[self.n_offline : self.n_index].cpu(),
            "episode_start": self.episode_start,
        }

    def load_online_state(self, state: dict) -> None:
        self.n_obs = self.offline_rows + len(state["obs"])
        self.n_steps = self.offline_steps + len(state["steps"])
        self.n_index = self.n_offline + len(state["index"])
        self.obs[self.offline_rows : self.n_obs] = state["obs"]
        self.steps[self.offline_steps : self.n_steps] = state["steps"]
        self.rows[:, self.offline_steps : self.n_steps] = state["rows"]
        self.index[self.n_offline : self.n_index] = state["index"]
        self.episode_start = state["episode_start"]


def load_buffer(dataset: minari.MinariDataset, args: Args, device: torch.device) -> tuple:
    """(buffer, statistics): the episodes read and checked, rewards transformed, actions in [-1, 1], states
    standardized; room for args.online_steps more transitions."""
    space = dataset.action_space
    if not isinstance(space, gym.spaces.Box) or not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise UserError(
            f"dataset {dataset.id} has the action space {space}; {ALGO}.py needs bounded continuous (Box) actions"
        )
    if dataset.total_episodes == 0:
        raise UserError(f"dataset {dataset.id} has no episodes")
    low = space.low.astype(np.float32).ravel()
    high = space.high.astype(np.float32).ravel()
    obs_dim, act_dim = gym.spaces.flatdim(dataset.observation_space), len(low)
    n = dataset.total_steps
    n_offline_rows = n + dataset.total_episodes
    capacity = n + args.online_steps
    # an online step adds one observation, an online episode one more (its first): at most 2 per step, and 1
    n_rows = n_offline_rows + (2 * args.online_steps + 1 if args.online_steps else 0)
    numbers = n_rows * obs_dim + (capacity + 1) * (act_dim + 3) + 4 * capacity  # float32 and int64 (2 each)
    check_memory(numbers, args.batch_size * (2 * obs_dim + 2 * act_dim + 4), device)
    # allocated by torch, filled through numpy views (numpy's allocation made the first fill 4x slower)
    obs_tensor = torch.empty(n_rows, obs_dim)
    steps_tensor = torch.zeros(capacity + 1, act_dim + 3)
    rows_tensor = torch.zeros(2, capacity, dtype=torch.int64)
    index_tensor = torch.zeros(capacity, dtype=torch.int64)
    obs, steps, rows = obs_tensor.numpy(), steps_tensor.numpy(), rows_tensor.numpy()
    returns, lengths = [], []
    sampled = np.ones(n, bool)
    t = 0  # transitions so far; episode k's observations start at row t + k
    for k, episode in enumerate(read_episodes(dataset)):
        T = len(episode.rewards)
        x = flatten(dataset.observation_space, episode.observations)
        actions = np.asarray(episode.actions)
        if x.shape != (T + 1, obs_dim) or len(actions) != T or actions.size != T * act_dim or t + T > n:
            raise UserError(
                f"dataset {dataset.id}: episode {episode.id} does not match its spaces or size ({T} rewards, "
                f"observations {x.shape}, actions {actions.shape}; expected ({T + 1}, {obs_dim}) and ({T}, {act_dim}), "
                f"{n} steps in all)"
            )
        obs[t + k : t + k + T + 1] = x
        steps[t : t + T, :-3] = actions.reshape(T, act_dim)
        steps[t : t + T, -3] = episode.rewards
        steps[t : t + T, -2] = episode.terminations
        if not np.isfinite(x).all() or not np.isfinite(steps[t : t + T]).all():
            bad = "observations" if not np.isfinite(x).all() else "actions or rewards"
            raise UserError(
                f"dataset {dataset.id}: episode {episode.id} has non-finite (NaN/inf) {bad}; repair it or leave it "
                "out (minari's filter_episodes) before training."
            )
        steps[t : t + T, :-3] = scale_actions(steps[t : t + T, :-3], low, high)
        rows[0, t : t + T] = np.arange(t + k, t + k + T)
        if NEEDS_NEXT_ACTION and not episode.terminations[-1]:  # a time limit: the last step has no next action
            sampled[t + T - 1] = False
        returns.append(float(np.sum(episode.rewards, dtype=np.float64)))
        lengths.append(T)
        t += T
    rows[1, :n] = rows[0, :n] + 1
    kept = best_episodes(steps[:n, -3], lengths, args.discount, args.top_fraction)
    sampled &= np.repeat(kept, lengths)
    reward_scale, reward_bias = reward_transform(np.array(returns), args)
    steps[:n, -3] = steps[:n, -3] * reward_scale + reward_bias
    # AntMaze's 0/1 goal reward: an episode that never reached it earned the failure reward at every step
    failure_reward = reward_bias if resolve_dataset_name(dataset.id)[1] == "antmaze" and args.discount < 1 else None
    steps[:n, -1] = returns_to_go(steps[:n, -3], lengths, args.discount, failure_reward)
    n_index = int(sampled.sum())
    index_tensor[:n_index] = torch.from_numpy(np.flatnonzero(sampled))
    offline = obs_tensor[:n_offline_rows]
    var, mean = torch.var_mean(offline[torch.from_numpy(np.repeat(kept, np.add(lengths, 1)))], dim=0, correction=0)
    stats = {"obs_mean": mean, "obs_std": var.sqrt() + 1e-3}
    if not args.normalize_states:
        stats = {"obs_mean": torch.zeros_like(mean), "obs_std": torch.ones_like(mean)}
    stats.update(action_low=torch.from_numpy(low), action_high=torch.from_numpy(high))
    stats.update(reward_scale=reward_scale, reward_bias=reward_bias, failure_reward=failure_reward)
    stats["best_return"] = max(returns)  # of an episode, raw (dt.py's default target return)
    # (s - mean) / std as s * (1 / std) - mean / std, in place
    torch.addcmul(-stats["obs_mean"] / stats["obs_std"], offline, 1 / stats["obs_std"], out=offline)
    tensors = (x.to(device) for x in (obs_tensor, steps_tensor, rows_tensor, index_tensor))
    generator = torch.Generator(device).manual_seed(args.seed)
    starts = torch.from_numpy(np.cumsum([0, *lengths])).to(device)
    segment = torch.arange(getattr(args, "seq_len", 0), device=device)  # a sequence model's segments (dt.py)
    buffer = Buffer(*tensors, generator, n_index, n_index, n, n_offline_rows, n, n_offline_rows, starts, segment)
    return buffer, stats


def best_episodes(rewards: np.ndarray, lengths: list, discount: float, fraction: float) -> np.ndarray:
    """All episodes, or the fraction (at least one) of highest discounted raw return: CORL's any_percent_bc.py, but
    by episode, not cut at every 1000 steps."""
    kept = np.ones(len(lengths), bool)
    if fraction < 1:
        starts = np.cumsum(lengths) - np.asarray(lengths)
        order = np.argsort(-returns_to_go(rewards, lengths, discount, None)[starts], kind="stable")
        kept[order[max(1, int(fraction * len(lengths))) :]] = False
    return kept


def read_episodes(dataset: minari.MinariDataset):
    """The episodes; one that cannot be read is a clear error."""
    episodes = dataset.iterate_episodes()
    for k in range(dataset.total_episodes):
        try:
            yield next(episodes)
        except (KeyError, ValueError, TypeError, OSError, StopIteration) as e:
            why = f"{type(e).__name__}: {str(e)[:200]}"
            raise UserError(
                f"dataset {dataset.id}: episode {k} cannot be read ({why}); the dataset is damaged"
            ) from None


def check_memory(buffer_numbers: int, batch_numbers: int, device: torch.device) -> None:
    """The buffer and a batch must fit in memory: refused before anything is allocated."""
    try:
        if device.type == "cuda":
            memory = torch.cuda.mem_get_info(device)[0]
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no way to tell here (Windows)
        return
    if 4 * (buffer_numbers + batch_numbers) > memory:
        sizes = f"{4 * buffer_numbers / 2**30:.1f} GiB of data and {4 * batch_numbers / 2**30:.1f} GiB per batch"
        raise UserError(
            f"{sizes} do not fit in the {memory / 2**30:.1f} GiB of {device}: lower --batch-size or --online-steps"
        )


def returns_to_go(rewards: np.ndarray, lengths: list, discount: float, failure_reward: float | None) -> np.ndarray:
    """Discounted returns-to-go within each episode (Cal-QL's bound); an episode of failure rewards only counts as
    endless: failure_reward / (1 - discount)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    ends = np.cumsum(lengths)
    to_end = np.repeat(ends, lengths) - 1 - np.arange(len(rewards))  # steps left in the episode after t
    order = np.argsort(to_end, kind="stable")
    bounds = np.searchsorted(to_end[order], np.arange(max(lengths, default=0) + 1))
    g = rewards.copy()
    for k in range(1, len(bounds) - 1):  # every episode at once, backwards: all t with k steps left
        t = order[bounds[k] : bounds[k + 1]]
        g[t] += discount * g[t + 1]
    if failure_reward is not None:
        failed = np.logical_and.reduceat(rewards == failure_reward, ends - np.asarray(lengths))
        g[np.repeat(failed, lengths)] = failure_reward / (1 - discount)
    return g.astype(np.float32)


def reward_transform(episode_returns: np.ndarray, args: Args) -> tuple:
    """(scale, bias) of the rewards; normalize_reward: 1000 / (max - min episode return), IQL's locomotion rule."""
    if not args.normalize_reward:
        return args.reward_scale, args.reward_bias
    spread = episode_returns.max() - episode_returns.min()
    if spread <= 1e-3 * max(np.abs(episode_returns).max(), 1.0):
        print(f"warning: every episode returns about {episode_returns.max():.4g}: rewards are not normalized")
        return args.reward_scale, args.reward_bias
    return 1000.0 / spread * args.reward_scale, args.reward_bias


def scale_actions(actions, low, high):
    """[low, high] -> [-1, 1], clipped to 1 - 1e-5 (finite log-likelihoods at the bounds)."""
    return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1 + 1e-5, 1 - 1e-5)


# -------- Evaluation: vectorized envs, deterministic actions, Minari normalized score --------
def make_eval_env(dataset: minari.MinariDataset, **kwargs) -> gym.Env:
    """The dataset's evaluation env (its episode limit), flattened; made only as gymnasium registered it."""
    spec = getattr(dataset, "_eval_env_spec", None) or dataset.env_spec
    if spec.id not in gym.registry:
        importlib.import_module("gymnasium_robotics")  # registers Adroit, the mazes, kitchen
    registered = gym.registry.get(spec.id)
    if registered is None or spec.entry_point != registered.entry_point or spec.additional_wrappers:
        raise UserError(
            f"dataset {dataset.id} makes its env {spec.id} with {spec.entry_point!r}, not as gymnasium registered it: "
            "that would run a function the dataset names (docs/trust.md)"
        )
    return gym.wrappers.FlattenObservation(dataset.recover_environment(eval_env=True, **kwargs))


def make_eval_envs(dataset: minari.MinariDataset, n: int, obs_dim: int, act_dim: int) -> gym.vector.VectorEnv:
    envs = gym.vector.SyncVectorEnv([lambda: make_eval_env(dataset)] * n)
    env_sizes = (gym.spaces.flatdim(envs.single_observation_space), *envs.single_action_space.shape)
    if env_sizes != (obs_dim, act_dim):
        raise UserError(
            f"the evaluation env of {dataset.id} has observation and action sizes {env_sizes}, the dataset "
            f"{(obs_dim, act_dim)}: they do not match"
        )
    return envs


class Policy(nn.Module):
    """The deterministic policy as the env sees it: raw flat observations in, env actions out. dt.py's obs are its
    episode's last states (B, K, obs_dim), the context the actions taken (env units), then what else its actor reads."""

    def __init__(self, actor: nn.Module, stats: dict):
        super().__init__()
        self.actor = actor
        for name in ("obs_mean", "obs_std", "action_low", "action_high"):
            self.register_buffer(name, stats[name].clone())

    def forward(self, obs: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        if context:  # the actions taken, in the actor's [-1, 1]
            context = (2.0 * (context[0] - self.action_low) / (self.action_high - self.action_low) - 1.0, *context[1:])
        action = self.actor((obs - self.obs_mean) / self.obs_std, *context).clamp(-1.0, 1.0)
        return self.action_low + (action + 1.0) * 0.5 * (self.action_high - self.action_low)


def numpy_policies(policy: Policy, stats: dict, device: torch.device) -> dict:
    """{condition: act}, act(obs, rewards of the step before, None at new episodes) -> actions, on numpy arrays."""
    if hasattr(policy.actor, "numpy_policies"):  # a sequence model's, which keep each episode's context (dt.py)
        return policy.actor.numpy_policies(policy, stats, device)

    @torch.no_grad()
    def act(obs: np.ndarray, rewards: np.ndarray | None = None) -> np.ndarray:
        return policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()

    return {"": act}


def evaluate(envs: gym.vector.VectorEnv, policy, seeds: list) -> tuple:
    """One episode per sub-env, all in lockstep (a finished sub-env's later episodes do not count): returns,
    lengths, success (None if the env never reports it)."""
    obs, _ = envs.reset(seed=seeds)
    returns = np.zeros(envs.num_envs)
    lengths = np.zeros(envs.num_envs, np.int64)
    done = np.zeros(envs.num_envs, bool)
    success, reward = None, None
    while not done.all():
        obs, reward, terminated, truncated, info = envs.step(policy(obs, reward))
        returns += np.where(done, 0.0, reward)
        lengths += ~done
        if "success" in info:
            reported = info["success"].astype(bool) & info["_success"] & ~done
            success = reported if success is None else success | reported
        done |= terminated | truncated
    return returns, lengths, success


def normalized_scores(dataset: minari.MinariDataset, returns: np.ndarray) -> np.ndarray | None:
    """Normalized scores (D4RL's, x 100); None without reference scores."""
    if dataset.storage.metadata.get("ref_min_score") is None:
        return None
    return np.asarray(minari.get_normalized_score(dataset, returns)) * 100


def evaluation_seeds(seed: int, step: int, episodes: int) -> list:
    """The same for a run, its resumed run and policy.py."""
    return [int(s) for s in np.random.SeedSequence([seed, step]).generate_state(episodes)]


def record_video(dataset, policy, seed: int, file: Path) -> str | None:
    """One episode as a GIF; or why not."""
    try:
        env = make_eval_env(dataset, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [Image.fromarray(env.render())]
        done, rewards = False, None
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs[None], rewards)[0])
            rewards = np.array([reward])
            frames.append(Image.fromarray(env.render()))
            done = terminated or truncated
        file.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(file, save_all=True, append_images=frames[1:], duration=33, loop=0)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        hint = "pip install pygame (it draws the classic-control envs)" if "pygame" in why else "MuJoCo: MUJOCO_GL=egl"
        return f"--capture-video: this env cannot render here ({why}). {hint}; the run goes on without videos."


# -------- Online fine-tuning --------
class OnlinePhase:
    """Online steps with explore() in an env built like the evaluation env; a resumed run starts a new episode."""

    def __init__(self, dataset, buffer: Buffer, stats: dict, args: Args, device: torch.device, state: dict | None):
        self.env = make_eval_env(dataset)
        self.buffer, self.stats, self.args, self.device = buffer, stats, args, device
        self.episodes = [] if state is None else state["episodes"]  # return, length, success of each
        if state is not None:
            buffer.load_online_state(state["buffer"])
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
        """Episodes, success rate and the cumulative regret, 1 - success rate (CORL's)."""
        successes = [e["success"] for e in self.episodes if e["success"] is not None]
        rate = float(np.mean(successes)) if successes else None
        return {
            "episodes": len(self.episodes),
            "env_steps": self.buffer.n_steps - self.buffer.offline_steps,
            "success_rate": rate,
            "regret": None if rate is None else 1.0 - rate,
        }

    def state(self) -> dict:
        return {"buffer": self.buffer.online_state(), "episodes": self.episodes}


# -------- TRY NOT TO MODIFY: configuration and resume --------
def parse_args(argv: list) -> tuple:
    """(args, checkpoint): Args defaults < settings tables < --config < flags; or a resumed run's."""
    args = tyro.cli(Args, args=argv, description=__doc__)
    if args.resume:
        return resume_args(argv, args.resume)
    config = config_flags(args.config)
    online = tyro.cli(Args, args=[*config, *argv]).online_steps > 0
    settings = tuned_settings(args.env, online)
    tables = "DOMAIN_SETTINGS, DATASET_SETTINGS" + (", FINETUNE_SETTINGS" if online else "")
    print(f"settings for {args.env} ({tables}): {settings or 'none (Args defaults)'}")
    return validate(tyro.cli(Args, args=[*as_flags(settings), *config, *argv])), None


def tuned_settings(name: str, online: bool) -> dict:
    """The rows of the settings tables for a dataset (FINETUNE_SETTINGS for a run that fine-tunes)."""
    minari_id, domain = resolve_dataset_name(name)
    settings = {**DOMAIN_SETTINGS.get(domain, {}), **DATASET_SETTINGS.get(minari_id, {})}
    if online:
        settings.update(FINETUNE_SETTINGS.get("all", {}))
        settings.update(FINETUNE_SETTINGS.get(domain, {}))
    return settings


def as_flags(settings: dict) -> list:
    """{"beta": 0.5, "layer_norm": True} -> ["--beta", "0.5", "--layer-norm"], checked by tyro like flags."""
    flags = []
    for key, value in settings.items():
        name = str(key).replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list | tuple) and isinstance(getattr(Args, str(key), None), tuple):
            flags += [f"--{name}", *map(str, value)]  # a tuple field's items (dt.py's target_returns)
        else:
            flags += [f"--{name}", str(value)]
    return flags


def config_flags(path: str | None) -> list:
    """A --config YAML file as flags, parsed alone first, so that an error names the file."""
    if path is None:
        return []
    flags = None
    try:
        flags = as_flags(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
        tyro.cli(Args, args=flags)
    except (OSError, ValueError, yaml.YAMLError, AttributeError, SystemExit) as e:
        detail = f" ({' '.join(flags)[:200]})" if isinstance(e, SystemExit) else f" ({str(e)[:200]})"
        raise UserError(
            f"in --config {path}: expected a UTF-8 YAML mapping of Args fields, read like flags{detail}"
        ) from None
    return flags


def validate(args: Args) -> Args:
    """The run's settings, then the algorithm's (check_args), before any data is loaded."""
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UserError("--track logs to Weights & Biases, which is not installed: pip install wandb (or drop --track)")
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
    if not 0 < args.top_fraction <= 1:
        problems.append("top_fraction must be in (0, 1]")
    if args.run_name is not None and (Path(args.run_name).name != args.run_name or args.run_name in ("", ".", "..")):
        problems.append("run_name must be a folder name, inside --output (no '/' or '..')")
    problems += check_args(args)
    if problems:
        raise UserError(f"invalid hyperparameters: {'; '.join(problems)}.")
    return args


def resume_args(argv: list, path: str) -> tuple:
    """(args, checkpoint) of a run to resume: only --device may change, and --total-steps (--online-steps) grow."""
    file = Path(path) / "checkpoints" / "last.pt" if Path(path).is_dir() else Path(path)
    if file.parent.name != "checkpoints" or file.name == "best.pt":
        raise UserError(f"--resume {path}: give a run folder, or a last.pt or step_<N>.pt in its checkpoints/ folder")
    ckpt = read_checkpoint(file)
    saved = Args(**ckpt["args"])
    given = tyro.cli(Args, args=argv, default=saved)
    extend = "online_steps" if saved.online_steps else "total_steps"
    changed = []
    for key, value in dataclasses.asdict(saved).items():
        grows = key == extend and getattr(given, key) > value
        if getattr(given, key) != value and key not in ("resume", "device") and not grows:
            changed.append(f"{key} ({value} -> {getattr(given, key)})")
    if changed:
        raise UserError(
            f"--resume keeps the run's dataset and hyperparameters; cannot change {', '.join(changed)} (only --device, "
            f"and a larger --{extend.replace('_', '-')} to train further)"
        )
    args = dataclasses.replace(given, resume=str(file.parent.parent))
    if ckpt["step"] >= args.total_steps + args.online_steps:
        print(
            f"{file.parent.parent} is finished (step {ckpt['step']}). To train further: --resume {file.parent.parent} "
            f"--{extend.replace('_', '-')} N, with N larger than {getattr(saved, extend)}."
        )
        sys.exit(0)
    return validate(args), ckpt


def read_checkpoint(file: Path) -> dict:
    """This script's checkpoint, weights-only (it cannot run code); a damaged one names the newest readable."""
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        if ckpt["algo"] != ALGO:
            raise UserError(f"--resume {file}: it is a checkpoint of {ckpt['algo']}.py, not of {ALGO}.py")
        Args(**ckpt["args"])
        return ckpt
    except UserError:
        raise
    except Exception as e:
        why = "it needs code to load" if "weights_only" in str(e) else f"{type(e).__name__}: {str(e)[:200]}"
        hint = ""
        for older in sorted(file.parent.glob("step_*.pt"), key=lambda p: -int(p.stem[5:])):
            if older != file and not hint and older.stat().st_size > 0:
                with contextlib.suppress(Exception):
                    torch.load(older, map_location="cpu", weights_only=True)
                    hint = f" The newest readable checkpoint: --resume {older}"
        raise UserError(f"--resume {file}: not a readable {ALGO}.py checkpoint ({why}).{hint}") from None


def main(argv: list) -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")  # --capture-video: MuJoCo renders offscreen
    sys.stdout = Console(sys.stdout)  # and into <run>/console.log
    try:
        args, ckpt = parse_args(argv)
        train(args, ckpt)
    finally:
        sys.stdout.copy.close()
        sys.stdout = sys.stdout.stdout


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 3)
# ======== SHARED BLOCK ends ========
