"""Our scripts against reference implementations: the same Minari data, seeds, budget and evaluations.

    python benchmarks/compare.py --datasets local/hopper/sac-noisy-v0 --corl ~/CORL --steps 20000
    python benchmarks/compare.py --algos bc bc10 awac --datasets local/hopper/sac-noisy-v0 --corl ~/CORL --steps 10000
    PYTHONPATH=/path/to/d3rlpy-site python benchmarks/compare.py --algos rebrac --datasets local/hopper/sac-noisy-v0

Algorithms (`--algos`): td3_bc, bc (plain behaviour cloning), bc10 (10 % BC: bc.py --top-fraction 0.1 against
CORL's any_percent_bc.py with its bc_10 configs), awac, sac_n, edac, dt: ours against CORL's script (CORL below);
rebrac: ours against d3rlpy's; dt also against d3rlpy's. dt runs all three with --dt-batch-size, --dt-learning-rate,
--dt-warmup-steps, --dt-embedding-dim and one target return (--dt-target), its other settings CORL's defaults (= its
MuJoCo configs).

Implementations (`--impls`):

    ours     the algorithm's script run as a user runs it (bc10: bc.py --top-fraction 0.1); rebrac.py with
             --batch-size (default 1024, CORL's locomotion batch: a local dataset is domain "other" and would get the
             Args default of 256)
    corl     CORL's algorithms/offline/<script> (--corl: a checkout or a bare clone; for td3_bc also the file itself),
             run unmodified with its defaults (= its locomotion configs) but for the settings in CORL_SCRIPTS below,
             through shim modules written to a temporary folder at run time: d4rl.qlearning_dataset from the Minari
             episodes (every transition, s' the episode's next observation), gym.make returning the dataset's
             evaluation env with the old API (reset -> obs, step -> 4-tuple, env.seed, get_normalized_score from the
             dataset's reference scores), pyrallis parsing --key value into CORL's TrainConfig, and wandb a logger that
             records the normalized scores and the training time (an evaluation starts when CORL's eval_actor seeds
             the env, and ends when its score is logged; steps/s: training steps over training seconds)
    d3rlpy   ReBRAC and DT: d3rlpy's ReBRAC or DecisionTransformer (when `import d3rlpy` works), trained with its
             own fit() on an MDPDataset built from the Minari episodes. ReBRAC configured like CORL's locomotion
             ReBRAC (3 x 256 actor and critics, LayerNorm in the critics, batch --rebrac-batch-size, lr 1e-3, beta1
             --beta1, beta2 --beta2); DT like d3rlpy's reproduction script (standardized states, returns-to-go times
             0.001, context 20, 3 layers, 1 head, a linear state embedding, AdamW with weight decay 1e-4 and a linear
             warm-up) but with CORL's decay on every parameter and clipping at 0.25, the --dt-* settings, acting
             through its stateful wrapper at --dt-target. Evaluated every --eval-every steps on --eval-episodes
             episodes of the dataset's evaluation env, with the seeds our scripts use at that step

Every run is a subprocess with --threads torch threads (OMP_NUM_THREADS); runs go one at a time. Each writes
<out>/<algo>/<impl>/<dataset>/seed<N>.json (and a .log); a run whose .json exists is not run again, so the same
command prints the tables at once. The tables: final (last evaluation) and best (maximum over evaluations)
normalized score, mean ± sample std over the seeds, the mean per evaluation step, and steps/s (the median over
seeds; evaluations excluded).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
# CORL's script for each algorithm and its command line: our run's settings under the names of its TrainConfig (CORL's
# scripts name them differently), plus what makes it the variant compared. SAC-N and EDAC train in epochs and
# evaluate after every eval_every-th epoch: an epoch of --eval-every updates, evaluated after each.
CORL_SCRIPTS = {
    "td3_bc": ("td3_bc.py", "--env {dataset} --seed {seed} --max_timesteps {steps} --eval_freq {eval_every}"
               " --n_episodes {episodes}"),
    "bc": ("any_percent_bc.py", "--env {dataset} --seed {seed} --max_timesteps {steps} --eval_freq {eval_every}"
           " --n_episodes {episodes} --frac 1.0"),  # configs/offline/bc
    "bc10": ("any_percent_bc.py", "--env {dataset} --seed {seed} --max_timesteps {steps} --eval_freq {eval_every}"
             " --n_episodes {episodes} --frac 0.1 --discount 1.0"),  # configs/offline/bc_10: undiscounted returns
    "awac": ("awac.py", "--env_name {dataset} --seed {seed} --num_train_ops {steps} --eval_frequency {eval_every}"
             " --n_test_episodes {episodes} --awac_lambda 0.3333"),  # its locomotion configs' lambda (default: 1.0)
    "sac_n": ("sac_n.py", "--env_name {dataset} --train_seed {seed} --num_epochs {epochs}"
              " --num_updates_on_epoch {eval_every} --eval_every 1 --eval_episodes {episodes}"
              " --num_critics {num_critics} --hidden_dim {hidden_dim}"),
    "edac": ("edac.py", "--env_name {dataset} --train_seed {seed} --num_epochs {epochs}"
             " --num_updates_on_epoch {eval_every} --eval_every 1 --eval_episodes {episodes}"
             " --num_critics {num_critics} --hidden_dim {hidden_dim}"),
    # num_workers 0: its DataLoader samples in the run's own process (CORL's 4 workers would take 4 cores)
    "dt": ("dt.py", "--env_name {dataset} --train_seed {seed} --update_steps {steps} --eval_every {eval_every}"
           " --eval_episodes {episodes} --batch_size {dt_batch_size} --learning_rate {dt_learning_rate}"
           " --warmup_steps {dt_warmup_steps} --target_returns ({dt_target},) --embedding_dim {dt_embedding_dim}"
           " --num_workers 0"),
}  # fmt: skip
# our script and flags where it is not <algo>.py alone
OURS = {"bc10": ("bc", ["--top-fraction", "0.1", "--discount", "1.0"])}
# CORL's dt.py evaluates after its first update too (step 0 of its loop): that evaluation is left out
SKIPPED_EVALUATIONS = {"dt": 1}
IMPLS = {algo: ("ours", "corl") for algo in CORL_SCRIPTS} | {
    "rebrac": ("ours", "d3rlpy"),
    "dt": ("ours", "corl", "d3rlpy"),
}


@dataclass
class Args:
    datasets: tuple[str, ...] = ("local/hopper/sac-noisy-v0",)
    """Minari ids (in $MINARI_DATASETS_PATH) with an evaluation env and reference scores"""
    algos: tuple[str, ...] = ("td3_bc", "rebrac")
    """td3_bc, bc, bc10, awac, sac_n, edac, dt (ours against CORL) and/or rebrac (ours against d3rlpy)"""
    impls: tuple[str, ...] = ("ours", "corl", "d3rlpy")
    """which implementations to run (a reference that is not available is skipped with a message)"""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """seeds of every implementation"""
    steps: int = 20000
    """gradient steps per run"""
    eval_every: int = 5000
    """evaluate every this many steps (the last evaluation is at --steps)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    corl: str | None = None
    """CORL: a checkout or a bare clone (algorithms/offline/<script> is read from it), or td3_bc.py itself"""
    num_critics: int = 10
    """SAC-N's and EDAC's ensemble size N, ours and CORL's (CORL's default; its configs: 10-500)"""
    hidden_dim: int = 256
    """SAC-N's and EDAC's network width, ours and CORL's (CORL: 256)"""
    rebrac_batch_size: int = 1024
    """ReBRAC's batch, ours and d3rlpy's (CORL's locomotion configs: 1024)"""
    beta1: float = 0.05
    """ReBRAC's actor penalty (rebrac.py's default; d3rlpy's actor_beta)"""
    beta2: float = 0.01
    """ReBRAC's critic penalty (rebrac.py's default; d3rlpy's critic_beta)"""
    dt_batch_size: int = 64
    """DT's segments per step, ours and CORL's (CORL's configs: 4096 on MuJoCo, too many for a CPU; 64 its default)"""
    dt_embedding_dim: int = 128
    """DT's token width, ours and CORL's (CORL's: 128)"""
    dt_learning_rate: float = 8e-4
    """DT's learning rate (CORL's MuJoCo configs)"""
    dt_warmup_steps: int = 500
    """DT's warm-up steps (CORL's: 10000 of its 100k steps)"""
    dt_target: float | None = None
    """DT's one target return, ours and CORL's; None: the dataset's best episode return (dt.py's rule)"""
    threads: int = 1
    """torch threads of every run"""
    out: str = "runs/compare"
    """folder of the runs' results"""


# ---- the shims CORL's scripts import (written to a temporary folder; none of CORL's code) ----------------------
SHIM_GYM = '''"""gym, as CORL's scripts use it, over Gymnasium and a Minari dataset's evaluation env (old API)."""
import minari
import numpy as np
import wandb


class Env:
    """A Gymnasium env with gym's old API: reset() -> obs, step() -> (obs, reward, done, info), seed()."""

    def __init__(self, env, dataset=None):
        self.env, self.dataset, self._seed = env, dataset, None
        self.observation_space, self.action_space = env.observation_space, env.action_space

    def seed(self, seed=None):
        self._seed = seed  # the next reset is seeded, later ones continue its random stream (old gym)
        wandb.evaluation_starts()  # CORL's eval_actor seeds the env first
        return [seed]

    def reset(self, **kwargs):
        obs, _ = self.env.reset(seed=self._seed)
        self._seed = None
        return obs

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated or truncated, info

    def get_normalized_score(self, score):
        meta = self.dataset.storage.metadata
        return (score - meta["ref_min_score"]) / (meta["ref_max_score"] - meta["ref_min_score"])

    def get_dataset(self):
        """D4RL's dict (CORL's dt.py reads it): T observations per episode, terminals, timeouts at time limits."""
        parts = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
        for episode in self.dataset.iterate_episodes():
            end = np.arange(len(episode.rewards)) == len(episode.rewards) - 1
            parts["observations"].append(np.asarray(episode.observations[:-1], dtype=np.float32))
            parts["actions"].append(np.asarray(episode.actions, dtype=np.float32))
            parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
            parts["terminals"].append(np.asarray(episode.terminations, dtype=bool))
            parts["timeouts"].append(end & ~np.asarray(episode.terminations, dtype=bool))
        return {k: np.concatenate(v) for k, v in parts.items()}

    def __getattr__(self, name):
        return getattr(self.env, name)


class Wrapper(Env):
    def __init__(self, env):
        self.env = env
        self.observation_space, self.action_space = env.observation_space, env.action_space

    def seed(self, seed=None):
        return self.env.seed(seed)

    def reset(self, **kwargs):
        return self.env.reset(**kwargs)

    def step(self, action):
        return self.env.step(action)

    def get_normalized_score(self, score):
        return self.env.get_normalized_score(score)


def make(name, **kwargs):
    """A Minari dataset id: its evaluation env (time limit included), holding the dataset for d4rl."""
    dataset = minari.load_dataset(name)
    return Env(dataset.recover_environment(eval_env=True), dataset)


from . import wrappers  # noqa: E402, F401  (gym.wrappers.TransformObservation; it imports Wrapper from here)
'''

SHIM_GYM_WRAPPERS = """from gym import Wrapper


class TransformObservation(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def reset(self, **kwargs):
        return self.f(self.env.reset(**kwargs))

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        return self.f(obs), reward, done, info


class TransformReward(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        return obs, self.f(reward), done, info
"""

SHIM_D4RL = '''"""d4rl.qlearning_dataset from the Minari dataset behind the shim env: every transition."""
import os

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("COMPARE_THREADS", "1")))


def qlearning_dataset(env, **kwargs):
    while not hasattr(env, "dataset"):
        env = env.env
    parts = {k: [] for k in ("observations", "actions", "next_observations", "rewards", "terminals")}
    for episode in env.dataset.iterate_episodes():
        obs = np.asarray(episode.observations, dtype=np.float32)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float32))
        parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
        parts["terminals"].append(np.asarray(episode.terminations, dtype=bool))
    return {k: np.concatenate(v) for k, v in parts.items()}
'''

SHIM_PYRALLIS = '''"""pyrallis.wrap: the config dataclass from --key value / --key=value arguments."""
import dataclasses
import inspect
import sys
import typing


def _parse(kind, text):
    if text in ("None", "null") and type(None) in typing.get_args(kind):
        return None
    if typing.get_origin(kind) is tuple:  # (3600.0, 1800.0)
        return tuple(float(x) for x in text.strip("()[] ").split(",") if x.strip())
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
    if kind is bool:
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def wrap(*args, **kwargs):
    def decorator(fn):
        def wrapped():
            config_class = next(iter(typing.get_type_hints(fn).values()))
            kinds = {f.name: f.type for f in dataclasses.fields(config_class)}
            argv, values = sys.argv[1:], {}
            while argv:
                key = argv.pop(0)[2:]
                key, _, value = key.partition("=")
                values[key] = _parse(kinds[key], value if _ else argv.pop(0))
            return fn(config_class(**values))

        return wrapped

    return decorator


def dump(config, stream):
    for key, value in dataclasses.asdict(config).items():
        stream.write(f"{key}: {value}\\n")
'''

SHIM_WANDB = '''"""wandb as a recorder: every evaluation's normalized score, and the training time before it."""
import json
import os
import time

SCORES = ("d4rl_normalized_score", "eval/normalized_score_mean", "eval/d4rl_normalized_score")  # CORL's names


class _Run:
    def save(self, *args, **kwargs):
        pass


run = _Run()
_state = {"evals": [], "train_seconds": 0.0, "steps": 0}
_clock = {"phase": "setup"}  # setup, starting (after init), training, evaluating


def init(*args, **kwargs):
    _clock.update(phase="starting", train=0.0)


def evaluation_starts():
    """The gym shim's env.seed(), which CORL's eval_actor calls first: a training window ends."""
    now = time.perf_counter()
    if _clock["phase"] == "training":
        _clock["train"] = now - _clock["start"]
        _state["train_seconds"] += _clock["train"]
        _clock["phase"], _clock["eval_start"] = "evaluating", now


def _score(values):
    """(a logged normalized score, whether it is the run's): dt.py logs one per target return,
    eval/<R>_normalized_score_mean, and the first target's is the run's."""
    for key in SCORES:
        if key in values:
            return values[key], True
    for key, value in values.items():
        if key.startswith("eval/") and key.endswith("_normalized_score_mean"):
            return value, _state.setdefault("score", key) == key
    return None, False


def log(values, step=None):
    """A score ends an evaluation (the k-th is at step k * $COMPARE_EVAL_EVERY: CORL's scripts log steps from 0, from
    1 or not at all; the first $COMPARE_SKIPPED_EVALUATIONS are left out; for dt.py, the first target's scores) and
    starts a training window; so does the first log after init (the first step is done)."""
    now = time.perf_counter()
    score, first = _score(values)
    skipped = first and len(_state.setdefault("skipped", [])) < int(os.environ.get("COMPARE_SKIPPED", "0"))
    if skipped:
        _state["skipped"].append(float(score))
    if score is not None and (skipped or not first):  # not an evaluation of its own; training goes on after it
        _clock["phase"] = "starting"
        score = None
    if score is not None:
        if _clock["phase"] == "training":  # the script evaluated without seeding the env
            evaluation_starts()
        _state["steps"] = (len(_state["evals"]) + 1) * int(os.environ.get("COMPARE_EVAL_EVERY", "1"))
        _state["evals"].append({"step": _state["steps"], "normalized_score": float(score),
                                "seconds": now - _clock.get("eval_start", now), "train_seconds": _clock["train"]})
        with open(os.environ["COMPARE_RESULT"], "w") as f:
            json.dump(_state, f)
    if score is not None or _clock["phase"] == "starting":
        _clock["phase"], _clock["start"] = "training", now


def finish():
    pass
'''

SHIMS = {
    "gym/__init__.py": SHIM_GYM,
    "gym/wrappers.py": SHIM_GYM_WRAPPERS,
    "d4rl/__init__.py": SHIM_D4RL,
    "pyrallis/__init__.py": SHIM_PYRALLIS,
    "wandb/__init__.py": SHIM_WANDB,
}


def write_shims(folder: Path) -> Path:
    for name, text in SHIMS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def corl_script(path: str, folder: Path, script: str = "td3_bc.py") -> Path:
    """CORL's algorithms/offline/<script> from a checkout or a bare clone (git show HEAD:...), or td3_bc.py from the
    file itself, copied into folder as corl_<script>."""
    source, relative = Path(path).expanduser(), f"algorithms/offline/{script}"
    if source.is_file() and script == "td3_bc.py":
        text = source.read_text()
    elif (source / relative).is_file():
        text = (source / relative).read_text()
    else:
        shown = subprocess.run(["git", "-C", str(source), "show", f"HEAD:{relative}"], capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"--corl {path}: no {relative} there (a CORL checkout, bare clone or the file)")
        text = shown.stdout
    (folder / f"corl_{script}").write_text(text)
    return folder / f"corl_{script}"


# ---- d3rlpy's ReBRAC and DecisionTransformer: a worker process ---------------------------------------------
def d3rlpy_worker(spec: dict) -> None:
    """Train d3rlpy's ReBRAC or DecisionTransformer with fit() on the Minari dataset; evaluate every --eval-every
    steps on our scripts' evaluation seeds at that step."""
    import d3rlpy
    import gymnasium as gym
    import minari
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    d3rlpy.seed(spec["seed"])
    dataset = minari.load_dataset(spec["dataset"])
    parts = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for episode in dataset.iterate_episodes():
        T = len(episode.rewards)
        last = np.zeros(T, np.float32)
        last[-1] = 1.0
        terminated = bool(episode.terminations[-1])
        parts["observations"].append(np.asarray(episode.observations[:-1], np.float32))  # the final one has no action
        parts["actions"].append(np.asarray(episode.actions, np.float32))
        parts["rewards"].append(np.asarray(episode.rewards, np.float32))
        parts["terminals"].append(last * terminated)
        parts["timeouts"].append(last * (not terminated))
    mdp = d3rlpy.dataset.MDPDataset(
        **{k: np.concatenate(v) for k, v in parts.items()}, action_space=d3rlpy.ActionSpace.CONTINUOUS
    )
    low, high = dataset.action_space.low, dataset.action_space.high
    scaler = None
    if not (np.all(low == -1) and np.all(high == 1)):
        scaler = d3rlpy.preprocessing.MinMaxActionScaler(minimum=low, maximum=high)
    env = gym.wrappers.FlattenObservation(dataset.recover_environment(eval_env=True))
    meta = dataset.storage.metadata
    result = {"evals": [], "train_seconds": 0.0, "steps": 0}
    clock = {"window": time.perf_counter()}

    def evaluate(algo, total_step):
        t = time.perf_counter()
        result["train_seconds"] += t - clock["window"]
        seeds = np.random.SeedSequence([spec["seed"], total_step]).generate_state(spec["eval_episodes"])
        returns = []
        for seed in seeds:  # our scripts' evaluation seeds at this step
            obs, _ = env.reset(seed=int(seed))
            act = episode_policy(algo)
            done, total, reward = False, 0.0, 0.0
            while not done:
                obs, reward, terminated, truncated, _ = env.step(act(obs.astype(np.float32), reward))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
        score = 100 * (np.mean(returns) - meta["ref_min_score"]) / (meta["ref_max_score"] - meta["ref_min_score"])
        result["evals"].append(
            {"step": total_step, "normalized_score": float(score), "seconds": time.perf_counter() - t}
        )
        result["steps"] = total_step
        Path(spec["result"]).write_text(json.dumps(result))
        print(f"step {total_step}: normalized score {score:.1f}", flush=True)
        clock["window"] = time.perf_counter()

    fit = dict(n_steps=spec["steps"], logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=False)
    if spec["algo"] == "dt":  # d3rlpy's reproduction settings; CORL's decay and clipping, the sizes shared with ours
        optim = d3rlpy.optimizers.AdamWFactory(
            weight_decay=1e-4,
            clip_grad_norm=0.25,
            lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=spec["warmup_steps"]),
        )
        config = d3rlpy.algos.DecisionTransformerConfig(
            batch_size=spec["batch_size"],
            learning_rate=spec["learning_rate"],
            optim_factory=optim,
            encoder_factory=d3rlpy.models.VectorEncoderFactory([spec["embedding_dim"]], exclude_last_activation=True),
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
            reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(0.001),
            action_scaler=scaler,
            context_size=20,
            max_timestep=1000,
            num_heads=1,
            num_layers=3,
        )

        def episode_policy(algo):
            wrapper = algo.as_stateful_wrapper(target_return=spec["target"])  # a new context per episode
            return lambda obs, reward: wrapper.predict(obs, float(reward))

        def every_step(algo, epoch, total_step):
            if total_step % spec["eval_every"] == 0:
                evaluate(algo, total_step)

        algo = config.create(device="cpu:0")
        algo.fit(mdp, n_steps_per_epoch=spec["eval_every"], callback=every_step, **fit)
        return
    config = d3rlpy.algos.ReBRACConfig(
        batch_size=spec["batch_size"],
        actor_learning_rate=1e-3,
        critic_learning_rate=1e-3,
        actor_encoder_factory=d3rlpy.models.VectorEncoderFactory([256, 256, 256]),
        critic_encoder_factory=d3rlpy.models.VectorEncoderFactory([256, 256, 256], use_layer_norm=True),
        gamma=0.99,
        tau=0.005,
        n_critics=2,
        target_smoothing_sigma=0.2,
        target_smoothing_clip=0.5,
        actor_beta=spec["beta1"],
        critic_beta=spec["beta2"],
        update_actor_interval=2,
        action_scaler=scaler,
    )

    def episode_policy(algo):
        return lambda obs, reward: algo.predict(obs[None])[0]

    algo = config.create(device="cpu:0")
    algo.fit(mdp, n_steps_per_epoch=spec["eval_every"], epoch_callback=lambda a, e, step: evaluate(a, step), **fit)


# ---- running and reading the runs --------------------------------------------------------------------------
def command(args: Args, algo: str, impl: str, dataset: str, seed: int, result: Path, shims: Path | None) -> list:
    """The run's command line; result: its .json (ours: the run folder is beside it, the others write a partial
    record next to it as they go)."""
    if impl == "ours":
        run_dir = result.with_suffix("")
        script, flags = OURS.get(algo, (algo, []))
        cmd = [sys.executable, str(ROOT / f"{script}.py"), "--env", dataset, "--seed", str(seed), *flags]
        cmd += ["--total-steps", str(args.steps), "--eval-every", str(args.eval_every)]
        cmd += ["--eval-episodes", str(args.eval_episodes), "--device", "cpu"]
        cmd += ["--checkpoint-every", str(args.steps), "--output", str(run_dir.parent), "--run-name", run_dir.name]
        if algo == "rebrac":
            cmd += ["--batch-size", str(args.rebrac_batch_size), "--beta1", str(args.beta1), "--beta2", str(args.beta2)]
        if algo in ("sac_n", "edac"):
            cmd += ["--num-critics", str(args.num_critics), "--hidden-dim", str(args.hidden_dim)]
        if algo == "dt":
            cmd += ["--batch-size", str(args.dt_batch_size), "--learning-rate", str(args.dt_learning_rate)]
            cmd += ["--warmup-steps", str(args.dt_warmup_steps), "--target-returns", str(dt_target(args, dataset))]
            cmd += ["--embedding-dim", str(args.dt_embedding_dim)]
        return cmd
    if impl == "corl":
        script, flags = CORL_SCRIPTS[algo]
        values = dict(dataset=dataset, seed=seed, steps=args.steps, eval_every=args.eval_every)
        values.update(episodes=args.eval_episodes, epochs=args.steps // args.eval_every)
        values.update(num_critics=args.num_critics, hidden_dim=args.hidden_dim)
        values.update(dt_batch_size=args.dt_batch_size, dt_learning_rate=args.dt_learning_rate)
        values.update(dt_warmup_steps=args.dt_warmup_steps, dt_target=dt_target(args, dataset) if algo == "dt" else 0)
        values.update(dt_embedding_dim=args.dt_embedding_dim)
        return [sys.executable, str(shims / f"corl_{script}"), *flags.format(**values).split(), "--device", "cpu"]
    spec = {"algo": algo, "dataset": dataset, "seed": seed, "steps": args.steps, "eval_every": args.eval_every}
    spec.update(eval_episodes=args.eval_episodes, threads=args.threads, result=str(result.with_suffix(".partial.json")))
    if algo == "dt":
        spec.update(batch_size=args.dt_batch_size, learning_rate=args.dt_learning_rate, target=dt_target(args, dataset))
        spec.update(warmup_steps=args.dt_warmup_steps, embedding_dim=args.dt_embedding_dim)
    else:
        spec.update(batch_size=args.rebrac_batch_size, beta1=args.beta1, beta2=args.beta2)
    return [sys.executable, str(Path(__file__).resolve()), "_d3rlpy_worker", json.dumps(spec)]


def dt_target(args: Args, dataset: str) -> float:
    """--dt-target, or the dataset's best episode return (dt.py's rule where no CORL row applies)."""
    if args.dt_target is not None:
        return args.dt_target
    import minari
    import numpy as np

    return max(float(np.sum(episode.rewards)) for episode in minari.load_dataset(dataset).iterate_episodes())


def run(args: Args, algo: str, impl: str, dataset: str, seed: int, shims: Path | None) -> None:
    result = Path(args.out) / algo / impl / dataset.replace("/", "_") / f"seed{seed}.json"
    if result.exists():
        return
    result.parent.mkdir(parents=True, exist_ok=True)
    partial = result.with_suffix(".partial.json")
    cmd = command(args, algo, impl, dataset, seed, result, shims)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "COMPARE_THREADS": str(args.threads)}
    env.update(COMPARE_RESULT=str(partial), COMPARE_EVAL_EVERY=str(args.eval_every), PYTHONWARNINGS="ignore")
    env.update(COMPARE_SKIPPED=str(SKIPPED_EVALUATIONS.get(algo, 0) if impl == "corl" else 0))
    if impl == "corl":
        env["PYTHONPATH"] = os.pathsep.join([str(shims), env.get("PYTHONPATH", "")])
    print(f"{algo} {impl} {dataset} seed {seed}: {' '.join(cmd[:2])} ...", flush=True)
    start = time.time()
    with open(result.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"the run failed (exit {code}); see {result.with_suffix('.log')}")
    if impl == "ours":
        summary = json.loads((result.with_suffix("") / "summary.json").read_text())
        evals = [{k: h[k] for k in ("step", "normalized_score", "seconds")} for h in summary["eval_history"]]
        record = {"evals": evals, "sps": summary["sps"], "steps": summary["steps"]}
    else:
        record = json.loads(partial.read_text())
        record["sps"] = record["steps"] / max(record.pop("train_seconds"), 1e-9)
        partial.unlink()
    record.update(wall_seconds=round(time.time() - start, 1), command=cmd)
    result.write_text(json.dumps(record, indent=1))


def mean_std(values: list) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def tables(args: Args) -> None:
    for algo in args.algos:
        print(f"\n{algo}: normalized score, mean ± sample std over seeds; steps/s median over seeds")
        print("\n| dataset | implementation | seeds | final | best | mean per evaluation (steps) | steps/s |")
        print("|---|---|---|---|---|---|---|")
        for dataset in args.datasets:
            for impl in IMPLS[algo]:
                folder = Path(args.out) / algo / impl / dataset.replace("/", "_")
                records = [
                    json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json")) if "partial" not in p.name
                ]
                records = [r for r in records if r["steps"] == args.steps]
                if not records:
                    continue
                final = [r["evals"][-1]["normalized_score"] for r in records]
                best = [max(e["normalized_score"] for e in r["evals"]) for r in records]
                steps = sorted({e["step"] for r in records for e in r["evals"]})
                at = {s: [e["normalized_score"] for r in records for e in r["evals"] if e["step"] == s] for s in steps}
                curve = " / ".join(f"{statistics.mean(at[s]):.1f}" for s in steps)
                sps = statistics.median(r["sps"] for r in records)
                cells = [dataset, impl, str(len(records)), mean_std(final), mean_std(best)]
                cells += [f"{curve} ({', '.join(f'{s / 1000:g}k' for s in steps)})", f"{sps:.1f}"]
                print(f"| {' | '.join(cells)} |")


def available(impl: str, args: Args) -> str | None:
    """Why an implementation cannot run here (None: it can)."""
    if impl == "corl" and args.corl is None:
        return "CORL's scripts need --corl PATH"
    if impl == "d3rlpy":
        import importlib.util

        if importlib.util.find_spec("d3rlpy") is None:
            return "d3rlpy is not importable (pip install d3rlpy, or put it on PYTHONPATH)"
    return None


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shims = None
        if args.corl is not None and "corl" in args.impls:
            shims = write_shims(Path(tmp))
            for script in {CORL_SCRIPTS[algo][0] for algo in args.algos if algo in CORL_SCRIPTS}:
                corl_script(args.corl, shims, script)
        for algo in args.algos:
            impls = [impl for impl in IMPLS[algo] if impl in args.impls]
            for impl in impls:
                if available(impl, args):
                    print(f"skipping {algo} {impl}: {available(impl, args)}")
            impls = [impl for impl in impls if not available(impl, args)]
            for dataset in args.datasets:
                for seed in args.seeds:
                    for impl in impls:  # interleaved: a machine's slow spell hits every implementation alike
                        run(args, algo, impl, dataset, seed, shims)
    tables(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_d3rlpy_worker"]:
        d3rlpy_worker(json.loads(sys.argv[2]))
    else:
        main(tyro.cli(Args))
