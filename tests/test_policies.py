"""Using a trained policy: --evaluate reproduces the run's own evaluation and writes its numbers, --export writes a
torch.export file that acts as the script's policy in a process that has only torch, wrong checkpoints and datasets
re-recorded under the same id are refused, and collect.py records with an exported policy."""

import importlib
import json
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_dir_of, run_script
from local_datasets import make_dataset

FAST = [
    "--total-steps",
    "300",
    "--eval-every",
    "300",
    "--eval-episodes",
    "3",
    "--log-every",
    "100",
    "--hidden-dim",
    "32",
]


@pytest.fixture(scope="module")
def trained(pendulum, tmp_path_factory):
    """A short iql.py run on the Pendulum dataset."""
    out = tmp_path_factory.mktemp("trained")
    result = run_script("iql.py", "--env", pendulum, *FAST, "--output", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir_of(out)


def test_evaluate_reproduces_the_runs_own_evaluation_and_writes_mean_std_and_intervals(trained):
    logged = json.loads((trained / "summary.json").read_text())["eval_history"][-1]
    result = run_script("iql.py", "--evaluate", trained, "--eval-episodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    (file,) = (trained / "evaluations").glob("step_300__seed_1__3_episodes.json")
    report = json.loads(file.read_text())
    assert report["step"] == 300 and report["episodes"] == 3 and len(report["returns"]) == 3
    assert report["return"]["mean"] == logged["return"]  # the same seeds and weights: the same episodes, exactly
    assert report["normalized_score"]["mean"] == pytest.approx(logged["normalized_score"])
    low, high = report["return"]["ci95"]
    assert min(report["returns"]) <= low <= report["return"]["mean"] <= high <= max(report["returns"])
    assert report["return"]["std"] == pytest.approx(np.std(report["returns"]))
    assert report["success_rate"] is None  # Pendulum does not report success
    assert "95 % CI" in result.stdout and "normalized_score" in result.stdout


def test_evaluate_runs_100_episodes_by_default(trained):
    result = run_script("iql.py", "--evaluate", trained / "checkpoints" / "last.pt")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((trained / "evaluations" / "step_300__seed_1__100_episodes.json").read_text())
    assert len(report["returns"]) == 100 and len(set(report["returns"])) > 50  # 100 differently seeded episodes


def test_wrong_checkpoints_and_changed_settings_are_refused(trained, door, tmp_path):
    assert_user_error(run_script("cql.py", "--evaluate", trained), "checkpoint of iql.py")
    assert_user_error(run_script("iql.py", "--evaluate", trained, "--env", door), "cannot change env")
    assert_user_error(run_script("iql.py", "--evaluate", trained, "--beta", "1.0"), "cannot change beta")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run_script("iql.py", "--evaluate", tmp_path / "garbage.pt"), "not a readable iql.py checkpoint")
    assert_user_error(run_script("iql.py", "--export", tmp_path / "p.pt2"), "--export", "--evaluate")


def test_a_dataset_re_recorded_under_the_same_id_is_refused_on_resume_and_evaluate(minari_root, tmp_path):
    dataset_id = "local/pendulum/rerecorded-v0"
    make_dataset(dataset_id, "Pendulum-v1", 3, seed=0)
    result = run_script("iql.py", "--env", dataset_id, *FAST, "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(tmp_path)
    minari.delete_dataset(dataset_id)
    make_dataset(dataset_id, "Pendulum-v1", 3, seed=1)  # the same id, other episodes
    for flag in ("--resume", "--evaluate"):
        assert_user_error(run_script("iql.py", flag, run_dir), f"{flag}: the dataset {dataset_id} is not the one")


def policy_module(algo, obs_dim, act_dim, low, high, seed=0, **args):
    """The script's own Policy around an actor with random weights (Args(hidden_dim=16, **args)), and asymmetric
    normalization statistics."""
    module = importlib.import_module(algo)
    torch.manual_seed(seed)
    args = module.Args(**{"hidden_dim": 16} | args)
    actor = module.make_networks(args, obs_dim, act_dim)["actor"].eval()
    stats = {
        "obs_mean": torch.randn(obs_dim),
        "obs_std": torch.rand(obs_dim) + 0.5,
        "action_low": torch.tensor(low, dtype=torch.float32),
        "action_high": torch.tensor(high, dtype=torch.float32),
    }
    return module, module.Policy(actor, stats)


LOAD_AND_ACT = """
import sys, numpy, torch
policy = torch.export.load(sys.argv[1]).module()
obs = torch.from_numpy(numpy.load(sys.argv[2]))
with torch.no_grad():
    numpy.save(sys.argv[3], policy(obs).numpy())
    numpy.save(sys.argv[4], policy(obs[:1]).numpy())
"""


def test_the_exported_policy_acts_as_the_scripts_policy_in_a_process_with_only_torch(algo, tmp_path):
    """100 random observations, an asymmetric action range; loaded with `python -I` from an empty folder (no access
    to the repository), at batch sizes 100 and 1."""
    module, policy = policy_module(algo[:-3], 5, 2, low=[-3.0, 0.0], high=[1.0, 0.5])
    file = tmp_path / "policy.pt2"
    assert module.export_policy(policy, str(file))[0] == str(file)
    obs = (np.random.default_rng(0).normal(size=(100, 5)) * 3).astype(np.float32)
    np.save(tmp_path / "obs.npy", obs)
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_ACT)
    outputs = [tmp_path / "actions.npy", tmp_path / "one.npy"]
    cmd = [sys.executable, "-I", str(script), str(file), str(tmp_path / "obs.npy"), *map(str, outputs)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = policy(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(np.load(outputs[0]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(outputs[1]), expected[:1], rtol=1e-5, atol=1e-6)
    assert (expected >= [-3.0, 0.0]).all() and (expected <= [1.0, 0.5]).all()  # within the env's own bounds


def test_an_exported_dict_observation_policy_reads_gymnasiums_flattened_observation(pointmaze, tmp_path):
    """Point maze observations are dicts: the exported policy takes them flattened as FlattenObservation does."""
    result = run_script("iql.py", "--env", pointmaze, *FAST, "--output", tmp_path / "runs")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(tmp_path / "runs")
    file = tmp_path / "maze.pt2"
    result = run_script("iql.py", "--evaluate", run_dir, "--export", file, "--eval-episodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {file}" in result.stdout
    iql = importlib.import_module("iql")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    actor = iql.make_networks(iql.Args(**ckpt["args"]), 8, 2)["actor"]
    actor.load_state_dict(ckpt["actor"])
    policy = iql.Policy(actor.eval(), ckpt["normalization"])
    env = iql.make_eval_env(minari.load_dataset(pointmaze))
    observations = [env.reset(seed=0)[0]]
    for _ in range(20):
        observations.append(env.step(env.action_space.sample())[0])
    obs = torch.as_tensor(np.stack(observations), dtype=torch.float32)
    exported = torch.export.load(str(file)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(obs), policy(obs), rtol=1e-5, atol=1e-6)
    assert isinstance(env.observation_space, gym.spaces.Box) and obs.shape[1] == 8  # flattened: 4 + 2 + 2


def test_collect_records_a_dataset_with_an_exported_policy(trained, minari_root, tmp_path):
    import collect

    file = tmp_path / "pendulum.pt2"
    result = run_script("iql.py", "--evaluate", trained, "--export", file, "--eval-episodes", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    argv = ["--env", "Pendulum-v1", "--policy", "checkpoint", "--checkpoint", file, "--episodes", 2]
    argv += ["--ref-episodes", 1, "--dataset-id", "local/pendulum/exported-v0"]
    dataset = collect.main([str(a) for a in argv])
    assert dataset.total_episodes == 2 and "exported policy" in dataset.storage.metadata["description"]
    policy = torch.export.load(str(file)).module()
    episode = dataset[0]
    with torch.no_grad():
        actions = policy(torch.as_tensor(episode.observations[:-1], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(episode.actions, actions, rtol=1e-5, atol=1e-5)  # noise-free: the policy's own actions
    assert collect.cli(["--policy", "checkpoint", "--checkpoint", str(file)]) == 2  # no --env: refused


def test_with_onnx_installed_the_export_writes_an_onnx_file_that_onnxruntime_runs_to_the_same_actions(tmp_path):
    ort = pytest.importorskip("onnxruntime")  # the export extra, part of the test extra
    module, policy = policy_module("iql", 4, 3, low=[-1.0, -2.0, 0.0], high=[1.0, 2.0, 5.0])
    files = module.export_policy(policy, str(tmp_path / "policy.pt2"))
    assert files == [str(tmp_path / "policy.pt2"), str(tmp_path / "policy.onnx")]
    session = ort.InferenceSession(files[1])
    obs = np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32)
    (actions,) = session.run(None, {"obs": obs})
    with torch.no_grad():
        np.testing.assert_allclose(actions, policy(torch.from_numpy(obs)).numpy(), rtol=1e-5, atol=1e-5)
