"""The benchmarks' own code: the straightforward TD3+BC and ReBRAC baselines of benchmarks/throughput.py train (the
losses they log are finite, the actor steps every second step); benchmarks/ensemble.py's loop over critics holds the
batched ensemble's critics and makes its update; the shim modules benchmarks/compare.py writes for CORL's scripts
(gym, d4rl, pyrallis, wandb) give what CORL's scripts read: every transition of the Minari dataset with s' the
episode's next observation, the old gym API, the dataset's normalized score and a logged evaluation, timed apart from
training; the command lines name fields of each CORL script's TrainConfig."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import minari
import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402
import throughput  # noqa: E402


def random_data(n=64, o=5, a=2):
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n + 1, o, generator=g)
    actions = torch.rand(n + 1, a, generator=g) * 2 - 1
    return {
        "obs": obs[:-1],
        "actions": actions[:-1],
        "rewards": torch.randn(n, generator=g),
        "next_obs": obs[1:],
        "dones": (torch.rand(n, generator=g) < 0.1).float(),
        "next_actions": actions[1:],
    }


@pytest.mark.parametrize("algo", ["td3_bc", "rebrac"])
def test_the_baselines_train_and_step_the_actor_every_second_step(algo):
    torch.manual_seed(0)
    step = throughput.BASELINES[algo](random_data(), 5, 2, torch.device("cpu"), batch=16)
    logs = [step() for _ in range(4)]
    actor_steps = [i for i, log in enumerate(logs) if "actor_loss" in log]
    assert actor_steps == ([1, 3] if algo == "td3_bc" else [0, 2])  # CORL: total_it 2, 4 / ReBRAC: from update 0
    assert all(np.isfinite(list(log.values())).all() for log in logs)


CORL_LIKE = """
import dataclasses, json, os
import d4rl, gym, numpy as np, pyrallis, wandb


@dataclasses.dataclass
class TrainConfig:
    env: str = "none"
    seed: int = 0
    eval_freq: int = 5
    name: str = "x"
    checkpoints_path: str | None = None
    normalize: bool = True


@pyrallis.wrap()
def train(config: TrainConfig):
    env = gym.make(config.env)
    data = d4rl.qlearning_dataset(env)
    env = gym.wrappers.TransformObservation(env, lambda s: s * 0)
    env.seed(config.seed)
    first = env.reset()
    obs, reward, done, info = env.step(env.action_space.sample())
    wandb.init(config=dataclasses.asdict(config))
    wandb.log({"critic_loss": 1.0}, step=1)
    wandb.log({"d4rl_normalized_score": env.get_normalized_score(-675.0) * 100.0}, step=1)
    out = {k: v.tolist() for k, v in data.items()}
    out.update(first=first.tolist(), done=bool(done), config=dataclasses.asdict(config))
    print(json.dumps(out))


train()
"""


def test_the_corl_shims_give_the_minari_data_and_the_old_api(pendulum, tmp_path):
    shims = compare.write_shims(tmp_path / "shims")
    (shims / "corl_like.py").write_text(CORL_LIKE)
    env = {"PYTHONPATH": str(shims), "COMPARE_RESULT": str(tmp_path / "result.json"), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(shims / "corl_like.py"), "--env", pendulum, "--seed=3", "--checkpoints_path", "None"]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"]["seed"] == 3 and out["config"]["checkpoints_path"] is None and out["config"]["eval_freq"] == 5
    dataset = minari.load_dataset(pendulum)
    episodes = list(dataset.iterate_episodes())
    assert len(out["rewards"]) == dataset.total_steps  # nothing dropped, time-limited ends included
    first = episodes[0]
    np.testing.assert_allclose(out["observations"][: len(first.rewards)], first.observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(out["next_observations"][: len(first.rewards)], first.observations[1:], rtol=1e-6)
    np.testing.assert_array_equal(out["terminals"], np.concatenate([e.terminations for e in episodes]))
    assert out["first"] == [0.0, 0.0, 0.0] and out["done"] is False  # TransformObservation; a 4-tuple step
    result = json.loads((tmp_path / "result.json").read_text())
    (evaluation,) = result["evals"]
    expected = 100 * (-675.0 - (-1200.0)) / (-150.0 - (-1200.0))  # the dataset's reference scores
    assert evaluation["step"] == 1 and evaluation["normalized_score"] == pytest.approx(expected)


def wandb_shim(tmp_path, monkeypatch):
    """compare.py's wandb shim, imported, on a clock that ticks 1 s per reading, evaluating every 1000 steps."""
    shims = compare.write_shims(tmp_path / "shims")
    spec = importlib.util.spec_from_file_location("wandb_shim", shims / "wandb" / "__init__.py")
    wandb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wandb)
    now = iter(range(100))
    monkeypatch.setattr(wandb, "time", types.SimpleNamespace(perf_counter=lambda: float(next(now))))
    monkeypatch.setenv("COMPARE_RESULT", str(tmp_path / "result.json"))
    monkeypatch.setenv("COMPARE_EVAL_EVERY", "1000")
    return wandb


def test_the_wandb_shim_times_training_apart_from_evaluations_and_steps_them_by_eval_every(tmp_path, monkeypatch):
    """AWAC's pattern (a raw score logged before the normalized one) and SAC-N's score name; evaluations begin when
    CORL's eval_actor seeds the env (the gym shim calls evaluation_starts)."""
    wandb = wandb_shim(tmp_path, monkeypatch)
    wandb.evaluation_starts()  # t = 0: CORL's set_seed(seed, env) before wandb.init: not an evaluation
    wandb.init()
    wandb.log({"critic_loss": 1.0}, step=0)  # 1: the first step is done, training time starts
    wandb.log({"critic_loss": 1.0}, step=1)  # 2
    wandb.evaluation_starts()  # 3: 2 s of training
    wandb.log({"eval_score": 100.0}, step=999)  # 4: still evaluating
    wandb.log({"d4rl_normalized_score": 50.0}, step=999)  # 5: 2 s of evaluation
    wandb.log({"critic_loss": 1.0}, step=1000)  # 6
    wandb.evaluation_starts()  # 7: 2 s of training (from the score)
    wandb.log({"eval/normalized_score_mean": 60.0, "epoch": 1})  # 8: 1 s of evaluation
    result = json.loads((tmp_path / "result.json").read_text())
    assert [(e["step"], e["normalized_score"]) for e in result["evals"]] == [(1000, 50.0), (2000, 60.0)]
    assert [(e["train_seconds"], e["seconds"]) for e in result["evals"]] == [(2.0, 2.0), (2.0, 1.0)]
    assert result["train_seconds"] == 4.0 and result["steps"] == 2000


def test_the_wandb_shim_reads_dts_first_target_and_leaves_out_its_evaluation_after_the_first_update(
    tmp_path, monkeypatch
):
    """CORL's dt.py evaluates after its update of step 0 and then every eval_every steps, each target return in turn
    (env.seed, then eval/<R>_normalized_score_mean): the first target's scores count, from the second evaluation on."""
    wandb = wandb_shim(tmp_path, monkeypatch)
    monkeypatch.setenv("COMPARE_SKIPPED", "1")
    wandb.init()
    for step, score in ((0, 1.0), (1000, 40.0), (1999, 60.0)):
        wandb.log({"train_loss": 1.0}, step=step)  # training time starts (first) or goes on
        for target, offset in (("3600.0", 0.0), ("1800.0", -5.0)):
            wandb.evaluation_starts()
            wandb.log({f"eval/{target}_normalized_score_mean": score + offset}, step=step)
    result = json.loads((tmp_path / "result.json").read_text())
    assert [(e["step"], e["normalized_score"]) for e in result["evals"]] == [(1000, 40.0), (2000, 60.0)]
    assert result["skipped"] == [1.0] and result["score"] == "eval/3600.0_normalized_score_mean"
    # times: each evaluation 1 s, the log before it 1 s of training; the second target's 1 s and its 1 s before
    assert [e["train_seconds"] for e in result["evals"]] == [2.0, 2.0] and result["train_seconds"] == 7.0


CORL_FIELDS = {  # the TrainConfig fields of CORL's algorithms/offline/<script>, as of its commit eeeeef2
    "td3_bc.py": "project group name env alpha discount expl_noise tau policy_noise noise_clip policy_freq"
    " max_timesteps buffer_size batch_size normalize normalize_reward eval_freq n_episodes checkpoints_path load_model"
    " seed device",
    "any_percent_bc.py": "project group name env max_timesteps batch_size buffer_size frac max_traj_len normalize"
    " discount eval_freq n_episodes checkpoints_path load_model seed device",
    "awac.py": "project group name env_name hidden_dim learning_rate gamma tau awac_lambda num_train_ops batch_size"
    " buffer_size normalize_reward eval_frequency n_test_episodes checkpoints_path deterministic_torch seed test_seed"
    " device",
    "sac_n.py": "project group name hidden_dim num_critics gamma tau actor_learning_rate critic_learning_rate"
    " alpha_learning_rate max_action buffer_size env_name batch_size num_epochs num_updates_on_epoch normalize_reward"
    " eval_episodes eval_every checkpoints_path deterministic_torch train_seed eval_seed log_every device",
}
CORL_FIELDS["edac.py"] = CORL_FIELDS["sac_n.py"] + " eta"
CORL_FIELDS["dt.py"] = (
    "project group name embedding_dim num_layers num_heads seq_len episode_len attention_dropout residual_dropout"
    " embedding_dropout max_action env_name learning_rate betas weight_decay clip_grad batch_size update_steps"
    " warmup_steps reward_scale num_workers target_returns eval_episodes eval_every checkpoints_path"
    " deterministic_torch train_seed eval_seed device"
)


@pytest.mark.parametrize("algo", sorted(compare.CORL_SCRIPTS))
def test_corl_command_lines_set_fields_of_the_scripts_train_config_with_the_runs_budget(algo, tmp_path):
    args = compare.Args(steps=3000, eval_every=1000, eval_episodes=5, dt_target=350.0)
    cmd = compare.command(args, algo, "corl", "local/x/y-v0", 2, tmp_path / "seed2.json", tmp_path)
    script = compare.CORL_SCRIPTS[algo][0]
    assert cmd[1] == str(tmp_path / f"corl_{script}")
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert {f[2:] for f in flags} <= set(CORL_FIELDS[script].split())
    assert "local/x/y-v0" in flags.values() and flags["--device"] == "cpu"
    if script in ("sac_n.py", "edac.py"):  # epochs of --eval-every updates, evaluated after each
        assert (flags["--num_epochs"], flags["--num_updates_on_epoch"], flags["--eval_every"]) == ("3", "1000", "1")
    else:
        assert "3000" in flags.values() and "1000" in flags.values() and "5" in flags.values()


@pytest.mark.parametrize("algo", ["sac_n", "edac"])
def test_the_ensemble_benchmarks_loop_holds_the_same_critics_and_makes_the_same_update(algo):
    """benchmarks/ensemble.py: its N separate critics in a Python loop give the batched module's values, and the
    script's update with them the same step (its metrics) as with the batched module."""
    import ensemble

    module = importlib.import_module(algo)
    torch.manual_seed(0)
    batched = module.make_networks(module.Args(num_critics=3, hidden_dim=16), 4, 2)["critic"]
    looped = ensemble.LoopEnsemble(batched)
    obs, actions = torch.randn(8, 4), torch.rand(3, 8, 2) * 2 - 1
    torch.testing.assert_close(looped(obs, actions[0]), batched(obs, actions[0]))
    if algo == "edac":  # one action batch per critic, for the action gradients
        torch.testing.assert_close(looped(obs, actions), batched(obs, actions))
    data = {k: v for k, v in random_data(n=32, o=4, a=2).items() if k != "next_actions"}
    metrics = []
    for loop in (False, True):
        update = ensemble.learner(module, ensemble.Args(hidden_dim=16), 3, loop, torch.device("cpu"), 4, 2)
        torch.manual_seed(0)
        metrics.append(update(data, 1))
    for name, value in metrics[0].items():
        torch.testing.assert_close(metrics[1][name], value, rtol=1e-5, atol=1e-6)
