"""The benchmarks' own code: the straightforward TD3+BC and ReBRAC baselines of benchmarks/throughput.py train (the
losses they log are finite, the actor steps every second step), and the shim modules benchmarks/compare.py writes for
CORL's scripts (gym, d4rl, pyrallis, wandb) give what CORL's td3_bc.py reads: every transition of the Minari dataset
with s' the episode's next observation, the old gym API, the dataset's normalized score and a logged evaluation."""

import json
import os
import subprocess
import sys

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
