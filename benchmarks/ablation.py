"""Where iql.py and a CORL-style IQL differ, one difference at a time: final and worst evaluations over seeds.

    python benchmarks/ablation.py --env local/hopper/medium-v0 --seeds 1 2 3 4 --total-steps 20000

Every variant is iql.py's own training loop (data, normalization, evaluation, seeds, logging) with its flags set
explicitly and, where no flag exists, one piece replaced in the child process before `iql.main` runs, so a difference
in the table comes from that piece alone. Single changes are made to the official code's choices:

    official       the official IQL code: orthogonal init with gain sqrt 2 of every layer (--orthogonal-init), its
                   update order, log-std clamped to [-5, 2], actor LR cosine-decayed to 0 over --total-steps
    default-init   PyTorch's default initialisation of every layer (CORL), --no-orthogonal-init: iql.py's default
    output-init    orthogonal hidden layers, PyTorch's default on the output layers only
    actor-init     PyTorch's default on the actor only, orthogonal critics and value net
    corl-order     CORL's update order: V(s') and the advantage both from the V before its step, then V, Q, actor
    std-clamp      log-std clamped to [-20, 2] (CORL) instead of [-5, 2]
    constant-lr    no actor LR decay (--no-cosine-actor-lr); the official code decays over a fixed 1e6 steps,
                   which at 20k steps is 0.1% below constant
    corl           CORL: default init, CORL's order and clamp (CORL's cosine over --total-steps is the official one)
    default-init+constant-lr   both changes that helped, together

Runs go to <output>/<variant>/; a finished run is not run again (delete its folder to redo it) and an interrupted one
resumes from its checkpoint, so running the same command again prints the table at once. Run one invocation at a
time per output folder. The table counts a "collapse" when an evaluation falls below a fraction
(--collapse, default 0.25) of the same run's best evaluation (for tasks with positive returns, such as Hopper).
"""

import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
FLAGS = {  # variant -> iql.py flags; patch() below replaces what has no flag
    "official": ["--orthogonal-init"],
    "default-init": ["--no-orthogonal-init"],
    "output-init": ["--orthogonal-init"],
    "actor-init": ["--orthogonal-init"],
    "corl-order": ["--orthogonal-init"],
    "std-clamp": ["--orthogonal-init"],
    "constant-lr": ["--orthogonal-init", "--no-cosine-actor-lr"],
    "corl": ["--no-orthogonal-init"],
    "default-init+constant-lr": ["--no-orthogonal-init", "--no-cosine-actor-lr"],
}
VARIANTS = tuple(FLAGS)


@dataclass
class Args:
    env: str = "local/hopper/medium-v0"
    """dataset (a locomotion one gets the official reward scaling from iql.py's per-domain table)"""
    variants: tuple[str, ...] = VARIANTS
    """which variants to run (see the module docstring)"""
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    """seeds of every variant"""
    total_steps: int = 20_000
    """gradient steps per run"""
    eval_every: int = 5000
    """steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    jobs: int = 2
    """runs at a time, each on one CPU thread"""
    output: str = "runs/ablation"
    """parent folder of the variants' run folders"""
    collapse: float = 0.25
    """an evaluation below this fraction of the run's best return is a collapse"""
    extra: str = ""
    """more iql.py flags for every run, e.g. "--bf16" or "--device cuda" """


# ---- the variants, applied inside the child process ------------------------------------------------------------------
def patch(iql, variant: str) -> None:
    import torch

    import common

    def default_init(layer):  # nn.Linear's default: weights and biases uniform in +-1/sqrt(fan_in)
        if isinstance(layer, common.BatchedLinear):
            bound = layer.weight.shape[-2] ** -0.5
            torch.nn.init.uniform_(layer.weight, -bound, bound)
            torch.nn.init.uniform_(layer.bias, -bound, bound)
        elif isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()

    if variant in ("output-init", "actor-init"):
        make_networks = iql.make_networks

        def networks(args, obs_dim, act_dim):
            nets = make_networks(args, obs_dim, act_dim)
            if variant == "output-init":
                for net in (nets["actor"].net, nets["critic"].net, nets["value"]):
                    default_init(net[-1])
            else:
                nets["actor"].apply(default_init)
            nets["target_critic"].load_state_dict(nets["critic"].state_dict())
            return nets

        iql.make_networks = networks
    if variant in ("std-clamp", "corl"):
        iql.Actor.log_std_min = -20.0  # CORL's lower bound
    if variant in ("corl-order", "corl"):
        iql.make_update = corl_order_update(iql, common, torch)


def corl_order_update(iql, common, torch):
    """CORL's IQL step: next V and the advantage from the V before its step; V step, Q step, actor step, Polyak."""

    def make_update(nets, opts, args):
        actor, critic, target_critic, value = nets["actor"], nets["critic"], nets["target_critic"], nets["value"]

        def corl_step(batch):
            obs, actions = batch["obs"], batch["actions"]
            with torch.no_grad():
                target_q = target_critic(obs, actions).min(dim=0).values
                next_v = value(batch["next_obs"]).squeeze(-1)
            v = value(obs).squeeze(-1)
            advantage = target_q - v
            value_loss = iql.expectile_loss(advantage, args.expectile)
            common.descend(opts["value_opt"], value_loss)

            q = critic(obs, actions)
            critic_loss = iql.td_loss(q, batch["rewards"], batch["dones"], next_v, args.discount)
            common.descend(opts["critic_opt"], critic_loss)

            weights = iql.awr_weights(advantage.detach(), args.beta, args.max_weight)
            actor_loss = iql.awr_actor_loss(actor.log_prob(obs, actions), weights)
            common.descend(opts["actor_opt"], actor_loss)
            opts["scheduler"].step()

            common.soft_update(target_critic, critic, args.tau)
            losses = dict(value_loss=value_loss, actor_loss=actor_loss, critic_loss=critic_loss)
            return {f"losses/{k}": x.detach() for k, x in losses.items()}

        corl_step = common.accelerate(corl_step, next(critic.parameters()).device.type, args.bf16, args.compile)
        return lambda batch, step: corl_step(batch)

    return make_update


def child(variant: str, argv: list) -> None:
    sys.path.insert(0, str(ROOT))
    import iql

    patch(iql, variant)
    try:
        iql.main(argv)
    except (iql.UserError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, iql.UserError) else 3)


# ---- the runner and the table ----------------------------------------------------------------------------------------
def run(args: Args, variant: str, seed: int) -> dict:
    out = Path(args.output) / variant
    name = f"{args.env.replace('/', '-')}__{seed}"
    summary = out / name / "summary.json"
    if not (summary.exists() and json.loads(summary.read_text())["completed"]):
        argv = [
            "--env",
            args.env,
            "--seed",
            seed,
            "--total-steps",
            args.total_steps,
            "--eval-every",
            args.eval_every,
            "--eval-episodes",
            args.eval_episodes,
            "--output",
            out,
            "--run-name",
            name,
            "--checkpoint-every",
            args.eval_every,
            *FLAGS[variant],
            *args.extra.split(),
        ]
        if (out / name / "checkpoints" / "last.pt").exists():  # interrupted before: go on from its checkpoint
            argv = ["--resume", out / name]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{name}.log", "a") as log:
            cmd = [sys.executable, __file__, "--child", variant, *map(str, argv)]
            code = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"{variant} seed {seed} failed (exit code {code}); see {out / name}.log")
    return json.loads(summary.read_text())


def table(args: Args, results: dict) -> None:
    print(
        f"\n{args.env}, {args.total_steps} steps, {args.eval_episodes} evaluation episodes every {args.eval_every}, "
        f"seeds {list(args.seeds)}; mean return per evaluation (collapse: below {args.collapse:.0%} of the run's "
        "best)\n"
    )
    print(
        "| variant | final return, mean ± sd | per seed | normalized | mean return per evaluation | worst evaluation "
        "(mean length) | runs that collapsed | SPS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, runs in results.items():
        finals = [r["final_return"] for r in runs]
        scores = [r["final_normalized_score"] for r in runs if r["final_normalized_score"] is not None]
        worst = min((h for r in runs for h in r["eval_history"]), key=lambda h: h["return"])
        collapsed = sum(min(h["return"] for h in r["eval_history"]) < args.collapse * r["best_return"] for r in runs)
        sd, score = statistics.stdev(finals) if len(finals) > 1 else 0.0, statistics.mean(scores or [math.nan])
        per_step = zip(*([h["return"] for h in r["eval_history"]] for r in runs), strict=True)
        curve = " / ".join(f"{statistics.mean(x):.0f}" for x in per_step)
        print(
            f"| {variant} | {statistics.mean(finals):.0f} ± {sd:.0f} | {' / '.join(f'{f:.0f}' for f in finals)} | "
            f"{score:.1f} | {curve} | {worst['return']:.0f} ({worst['length']:.0f}) "
            f"| {collapsed} of {len(runs)} | {statistics.median(r['sps'] for r in runs):.0f} |"
        )


def main(args: Args) -> None:
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(lambda job: run(args, *job), jobs))
    results = {v: [s for (variant, _), s in zip(jobs, summaries, strict=True) if variant == v] for v in args.variants}
    table(args, results)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
