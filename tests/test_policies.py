"""Using a trained policy with policy.py: `evaluate` reproduces the run's own evaluation and writes its numbers,
`export` writes a torch.export file (and a self-contained ONNX file) that acts as the script's own policy in a process
that has only torch, for every algorithm script and for a copied one; wrong checkpoints and datasets re-recorded under
the same id are refused; collect.py records with an exported policy."""

import json
import pathlib
import shutil
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import OBSERVATION_POLICIES, ROOT, assert_user_error, run_dir_of, run_script, script_checkpoint
from local_datasets import make_dataset

FAST = ["--total-steps", "300", "--eval-every", "300", "--eval-episodes", "3", "--log-every", "100"]
FAST += ["--hidden-dim", "32"]


@pytest.fixture(scope="module")
def trained(pendulum, tmp_path_factory):
    """A short iql.py run on the Pendulum dataset."""
    out = tmp_path_factory.mktemp("trained")
    result = run_script("iql.py", "--env", pendulum, *FAST, "--output", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir_of(out)


def test_evaluate_reproduces_the_runs_own_evaluation_and_writes_mean_std_and_intervals(trained):
    logged = json.loads((trained / "summary.json").read_text())["eval_history"][-1]
    result = run_script("policy.py", "evaluate", trained, "--episodes", "3")
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


def test_evaluate_on_storage_it_cannot_write_prints_the_results_and_says_so(trained, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    result = run_script("policy.py", "evaluate", trained, "--episodes", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "95 % CI" in result.stdout and "could not write the results" in result.stdout
    assert "Read-only file system" in result.stdout
    assert_user_error(run_script("policy.py", "evaluate", trained, "--episodes", "0"), "--episodes must be at least 1")


def test_evaluate_runs_100_episodes_by_default(trained):
    result = run_script("policy.py", "evaluate", trained / "checkpoints" / "last.pt")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((trained / "evaluations" / "step_300__seed_1__100_episodes.json").read_text())
    assert len(report["returns"]) == 100 and len(set(report["returns"])) > 50  # 100 differently seeded episodes


def test_wrong_checkpoints_scripts_and_files_are_refused(trained, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run_script("policy.py", "evaluate", tmp_path / "garbage.pt"), "not a readable checkpoint")
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**ckpt, "algo": "other"}, tmp_path / "other.pt")
    assert_user_error(run_script("policy.py", "evaluate", tmp_path / "other.pt"), "other.py", "--script")
    wrong = run_script("policy.py", "evaluate", trained, "--script", ROOT / "cql.py")
    assert_user_error(wrong, "is cql.py", "iql.py's")
    last = trained / "checkpoints" / "last.pt"
    assert_user_error(run_script("policy.py", "export", trained, last), "a .pt2 file")
    assert_user_error(run_script("policy.py", "export", trained, tmp_path / "p.pt2", "--episodes", "3"), "--episodes")


def test_a_dataset_re_recorded_under_the_same_id_is_refused_on_resume_and_evaluate(minari_root, tmp_path):
    dataset_id = "local/pendulum/rerecorded-v0"
    make_dataset(dataset_id, "Pendulum-v1", 3, seed=0)
    result = run_script("iql.py", "--env", dataset_id, *FAST, "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(tmp_path)
    minari.delete_dataset(dataset_id)
    make_dataset(dataset_id, "Pendulum-v1", 3, seed=1)  # the same id, other episodes
    message = f"the dataset {dataset_id} is not the one"
    assert_user_error(run_script("iql.py", "--resume", run_dir, "--total-steps", 600), f"--resume: {message}")
    assert_user_error(run_script("policy.py", "evaluate", run_dir), f"policy.py evaluate: {message}")


LOAD_AND_ACT = """
import sys, numpy, torch
policy = torch.export.load(sys.argv[1]).module()
obs = torch.from_numpy(numpy.load(sys.argv[2]))
with torch.no_grad():
    numpy.save(sys.argv[3], policy(obs).numpy())
    numpy.save(sys.argv[4], policy(obs[:1]).numpy())
"""


def assert_acts_as_policy_with_only_torch(file, policy, obs_dim, folder):
    """The exported file, loaded with `python -I` from an empty folder (no access to the repository), gives the
    policy's actions on 100 random observations, at batch sizes 100 and 1."""
    obs = (np.random.default_rng(0).normal(size=(100, obs_dim)) * 3).astype(np.float32)
    np.save(folder / "obs.npy", obs)
    (folder / "load.py").write_text(LOAD_AND_ACT)
    outputs = [folder / "actions.npy", folder / "one.npy"]
    cmd = [sys.executable, "-I", str(folder / "load.py"), str(file), str(folder / "obs.npy"), *map(str, outputs)]
    result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = policy(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(np.load(outputs[0]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(outputs[1]), expected[:1], rtol=1e-5, atol=1e-6)
    return expected


@pytest.mark.parametrize("algo", OBSERVATION_POLICIES)
def test_the_exported_policy_of_every_script_acts_as_its_policy_in_a_process_with_only_torch(algo, tmp_path):
    """A checkpoint with an asymmetric action range: policy.py builds the script's own policy and exports it."""
    policy = script_checkpoint(algo[:-3], tmp_path / "c.pt", 5, low=[-3.0, 0.0], high=[1.0, 0.5])
    result = run_script("policy.py", "export", tmp_path / "c.pt", tmp_path / "policy.pt2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {tmp_path / 'policy.pt2'}" in result.stdout and "actions match" in result.stdout
    assert "Warning" not in result.stdout + result.stderr  # torch.export's own messages stay off the console
    expected = assert_acts_as_policy_with_only_torch(tmp_path / "policy.pt2", policy, 5, tmp_path)
    assert (expected >= [-3.0, 0.0]).all() and (expected <= [1.0, 0.5]).all()  # within the env's own bounds


def test_policy_py_next_to_a_copied_script_or_given_the_script_builds_its_policy(tmp_path):
    """A script copied into another repository with common.py and policy.py; and the repository's policy.py pointed
    at the copy with --script."""
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in ("iql.py", "common.py", "policy.py"):
        shutil.copy(ROOT / name, copy / name)
    policy = script_checkpoint("iql", tmp_path / "c.pt", 4, low=[-1.0], high=[1.0])
    beside = run_script("policy.py", "export", tmp_path / "c.pt", tmp_path / "a.pt2", cwd=copy)
    assert beside.returncode == 0, beside.stdout + beside.stderr
    given = run_script("policy.py", "export", tmp_path / "c.pt", tmp_path / "b.pt2", "--script", copy / "iql.py")
    assert given.returncode == 0, given.stdout + given.stderr
    for file in ("a.pt2", "b.pt2"):
        assert_acts_as_policy_with_only_torch(tmp_path / file, policy, 4, tmp_path)


def test_an_exported_dict_observation_policy_reads_gymnasiums_flattened_observation(pointmaze, tmp_path):
    """Point maze observations are dicts: the exported policy takes them flattened as FlattenObservation does."""
    import policy as policy_tool

    result = run_script("iql.py", "--env", pointmaze, *FAST, "--output", tmp_path / "runs")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(tmp_path / "runs")
    file = tmp_path / "maze.pt2"
    result = run_script("policy.py", "export", run_dir, file)
    assert result.returncode == 0, result.stdout + result.stderr
    policy, _, _, module = policy_tool.load_policy(str(run_dir))
    env = module.make_eval_env(minari.load_dataset(pointmaze))
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
    result = run_script("policy.py", "export", trained, file)
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


def test_onnx_export_is_one_self_contained_file_that_onnxruntime_runs_to_the_same_actions(tmp_path):
    ort = pytest.importorskip("onnxruntime")  # the export extra, part of the test extra
    policy = script_checkpoint("iql", tmp_path / "c.pt", 4, low=[-1.0, -2.0, 0.0], high=[1.0, 2.0, 5.0])
    result = run_script("policy.py", "export", tmp_path / "c.pt", tmp_path / "out" / "policy.pt2", "--onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[torch.onnx]" not in result.stdout + result.stderr  # the exporter's progress stays off the console
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["policy.onnx", "policy.pt2"]  # no .onnx.data
    moved = tmp_path / "alone" / "policy.onnx"  # weights inside: the file works copied alone
    moved.parent.mkdir()
    shutil.move(tmp_path / "out" / "policy.onnx", moved)
    session = ort.InferenceSession(str(moved))
    obs = np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32)
    (actions,) = session.run(None, {"obs": obs})
    with torch.no_grad():
        np.testing.assert_allclose(actions, policy(torch.from_numpy(obs)).numpy(), rtol=1e-5, atol=1e-5)
