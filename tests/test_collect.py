"""collect.py: datasets from every behaviour policy load with Minari and hold the right episodes, steps, T+1
observations, termination/truncation flags, reference scores and evaluation env; checkpoints of iql.py, cql.py
and collect.py act as their own scripts do; the SAC teacher learns; the README quickstart runs end to end."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

import collect
import cql
import iql

# The README's offline quickstart, verbatim; the tests append flags that shrink it (later flags win).
QUICKSTART = [
    "python collect.py --env Pendulum-v1 --policy sac --teacher-steps 5000 --episodes 50 --epsilon 0.5 "
    "--dataset-id local/pendulum/medium-v0",
    "python iql.py --env local/pendulum/medium-v0 --total-steps 20000",
]
REDUCED = [
    "--teacher-steps 3500 --learning-starts 500 --hidden-dim 64 --episodes 4 --ref-episodes 4",
    "--total-steps 300 --eval-every 300 --eval-episodes 2 --log-every 100",
]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny networks: a second thread only adds waiting on a busy machine


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record(*argv) -> minari.MinariDataset:
    """collect.py in-process (as `python collect.py ARGV`), returning the new dataset."""
    return collect.main([str(a) for a in argv])


def episodes(dataset: minari.MinariDataset) -> list:
    return list(dataset.iterate_episodes())


def assert_flags_end_each_episode(dataset: minari.MinariDataset) -> None:
    """Every episode ends with a termination or a truncation at its last step, and at no earlier step."""
    for ep in episodes(dataset):
        done = ep.terminations | ep.truncations
        assert done[-1] and not done[:-1].any()


@pytest.fixture(scope="module")
def quickstart(minari_root, tmp_path_factory) -> dict:
    """The quickstart's two commands at a reduced size, run as a user would, in a subprocess each."""
    out = tmp_path_factory.mktemp("quickstart")
    results = []
    for command, reduced in zip(QUICKSTART, REDUCED, strict=True):
        argv = shlex.split(command)[1:] + shlex.split(reduced) + ["--output", str(out)]
        results.append(run_script(*argv, timeout=240, env=ONE_THREAD))
        assert results[-1].returncode == 0, results[-1].stdout + results[-1].stderr
    teacher_run = next(out.glob("Pendulum-v1__collect-sac__*"))
    iql_run = next(out.glob("local-pendulum-medium-v0__iql__*"))
    return {
        "dataset": minari.load_dataset("local/pendulum/medium-v0"),
        "teacher_run": teacher_run,
        "collect_summary": json.loads((teacher_run / "summary.json").read_text()),
        "iql_summary": json.loads((iql_run / "summary.json").read_text()),
        "iql_run": iql_run,
    }


# ---- datasets from each behaviour policy -------------------------------------------------------------------
def test_random_dataset_has_counts_t_plus_one_observations_and_time_limit_truncations(minari_root):
    argv = ["--env", "Pendulum-v1", "--episodes", 3, "--max-episode-steps", 40, "--ref-episodes", 3]
    record(*argv, "--dataset-id", "collect/pendulum/random-v0")
    dataset = minari.load_dataset("collect/pendulum/random-v0")  # read back from disk, not the writer's object
    assert dataset.total_episodes == 3 and dataset.total_steps == 120
    for ep in episodes(dataset):
        assert ep.observations.shape == (41, 3) and ep.actions.shape == (40, 1) and ep.rewards.shape == (40,)
        assert np.all(np.abs(ep.actions) <= 2.0)
        assert not ep.terminations.any() and ep.truncations[-1]  # Pendulum never terminates: time limits only
    assert_flags_end_each_episode(dataset)
    # random data has no expert: no reference scores unless --ref-max-score is given
    assert dataset.storage.metadata.get("ref_max_score") is None
    env = dataset.recover_environment(eval_env=True)
    assert env.spec.id == "Pendulum-v1" and env.spec.max_episode_steps == 40


def test_default_dataset_id_is_local_env_policy(minari_root):
    dataset = record("--env", "MountainCarContinuous-v0", "--episodes", 1, "--max-episode-steps", 5)
    assert dataset.id == "local/mountaincarcontinuous/random-v0"


def test_ref_max_score_flag_gives_random_data_normalized_scores(minari_root):
    dataset = record(
        "--env", "Pendulum-v1", "--episodes", 2, "--max-episode-steps", 30, "--ref-episodes", 3,
        "--ref-max-score", -10.0, "--dataset-id", "collect/pendulum/random-ref-v0",
    )  # fmt: skip
    meta = dataset.storage.metadata
    assert meta["ref_max_score"] == -10.0 and meta["ref_min_score"] < -50.0
    assert minari.get_normalized_score(dataset, np.array([meta["ref_min_score"], -10.0])) == pytest.approx([0, 1])


def test_terminations_and_time_limit_truncations_are_stored_apart(minari_root):
    """InvertedPendulum terminates when the pole falls; a time limit of 6 steps truncates the others."""
    dataset = record(
        "--env", "InvertedPendulum-v5", "--episodes", 12, "--max-episode-steps", 6, "--ref-episodes", 2,
        "--dataset-id", "collect/invertedpendulum/random-v0",
    )  # fmt: skip
    assert_flags_end_each_episode(dataset)
    eps = episodes(dataset)
    terminated = [ep for ep in eps if ep.terminations[-1]]
    truncated = [ep for ep in eps if ep.truncations[-1] and not ep.terminations[-1]]
    assert terminated and truncated
    assert all(len(ep.rewards) < 6 or ep.truncations[-1] for ep in terminated)
    assert all(len(ep.rewards) == 6 for ep in truncated)
    assert dataset.total_steps == sum(len(ep.rewards) for ep in eps)


def test_dict_observations_are_stored_per_key_with_t_plus_one_entries(minari_root):
    dataset = record(
        "--env", "PointMaze_UMaze-v3", "--episodes", 2, "--max-episode-steps", 20, "--ref-episodes", 1,
        "--dataset-id", "collect/pointmaze/random-v0",
    )  # fmt: skip
    for ep in episodes(dataset):
        assert set(ep.observations) == {"achieved_goal", "desired_goal", "observation"}
        assert ep.observations["observation"].shape == (21, 4) and ep.actions.shape == (20, 2)
    assert isinstance(dataset.recover_environment(eval_env=True).observation_space, gym.spaces.Dict)


def test_sac_replay_data_is_every_complete_training_episode(minari_root, tmp_path):
    """250 steps with 60-step episodes: 4 complete episodes; the 10 steps of the cut fifth are dropped."""
    dataset = record(
        "--env", "Pendulum-v1", "--policy", "sac", "--sac-data", "replay", "--teacher-steps", 250,
        "--learning-starts", 100, "--batch-size", 32, "--hidden-dim", 16, "--max-episode-steps", 60,
        "--ref-episodes", 2, "--ref-max-score", -1.0, "--dataset-id", "collect/pendulum/replay-v0",
        "--output", tmp_path,
    )  # fmt: skip
    assert dataset.total_episodes == 4 and dataset.total_steps == 240
    assert_flags_end_each_episode(dataset)
    assert all(ep.observations.shape == (61, 3) for ep in episodes(dataset))
    ckpt = torch.load(next(tmp_path.glob("*/teacher.pt")), weights_only=True)
    assert ckpt["algo"] == "collect-sac" and ckpt["env_id"] == "Pendulum-v1" and len(ckpt["train_returns"]) == 4


def test_same_seed_gives_the_same_dataset_and_another_seed_does_not(minari_root, tmp_path):
    def sac_replay(seed, name):
        return record(
            "--env", "Pendulum-v1", "--policy", "sac", "--sac-data", "both", "--teacher-steps", 120,
            "--learning-starts", 40, "--batch-size", 16, "--hidden-dim", 16, "--max-episode-steps", 30,
            "--episodes", 2, "--ref-episodes", 1, "--seed", seed, "--dataset-id", f"collect/pendulum/{name}-v0",
            "--output", tmp_path / name,
        )  # fmt: skip

    a, b, c = (episodes(sac_replay(seed, name)) for seed, name in ((3, "seed-a"), (3, "seed-b"), (4, "seed-c")))
    assert len(a) == len(b) == 6  # 4 training episodes + 2 rollouts of the final teacher
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)
    assert not np.array_equal(a[0].actions, c[0].actions)


# ---- checkpoints: iql.py, cql.py and collect.py actors ---------------------------------------------------
def checkpoint_of(algo: str, actor: torch.nn.Module, env: gym.Env) -> dict:
    """The layout iql.py and cql.py write: algo, args, actor state dict, normalization statistics."""
    return {
        "algo": algo,
        "minari_id": "local/pendulum/random-v0",
        "actor": actor.state_dict(),
        "normalization": {
            "obs_mean": torch.tensor([0.1, -0.2, 0.3]),
            "obs_std": torch.tensor([0.5, 0.7, 2.0]),
            "action_low": torch.as_tensor(env.action_space.low),
            "action_high": torch.as_tensor(env.action_space.high),
        },
        "args": {},
    }


@pytest.mark.parametrize(
    "algo, make_actor",
    [
        ("iql", lambda: iql.Actor(3, 1, 32, 2, dropout=0.0, deterministic=False)),
        ("iql", lambda: iql.Actor(3, 1, 32, 3, dropout=0.1, deterministic=True)),
        ("cql", lambda: cql.Actor(3, 1, 32, 2)),
    ],
    ids=["iql-gaussian", "iql-deterministic-dropout", "cql"],
)
def test_checkpoint_actor_acts_exactly_as_its_own_script(algo, make_actor):
    torch.manual_seed(0)
    env = gym.make("Pendulum-v1")
    actor = make_actor().eval()
    ckpt = checkpoint_of(algo, actor, env)
    norm = {k: v.numpy() for k, v in ckpt["normalization"].items()}
    own = (iql if algo == "iql" else cql).Policy(
        actor, norm["obs_mean"], norm["obs_std"], norm["action_low"], norm["action_high"], "cpu"
    )
    rebuilt = collect.Behaviour(env, collect.checkpoint_policy(ckpt, env, "cpu"))
    for obs in np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32) * 3:
        np.testing.assert_allclose(rebuilt(obs), own(obs[None])[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_env_is_refused(minari_root, quickstart):
    with pytest.raises(collect.UserError, match="trained for another env"):
        record("--env", "InvertedPendulum-v5", "--policy", "checkpoint", "--checkpoint", quickstart["teacher_run"])


def test_checkpoint_with_unknown_actor_layout_is_refused():
    env = gym.make("Pendulum-v1")
    ckpt = checkpoint_of("iql", torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LayerNorm(8)), env)
    with pytest.raises(collect.UserError, match="layout"):
        collect.checkpoint_policy(ckpt, env, "cpu")


def test_noisy_rollouts_of_the_teacher_checkpoint_with_the_env_taken_from_the_checkpoint(minari_root, quickstart):
    dataset = record(
        "--policy", "checkpoint", "--checkpoint", quickstart["teacher_run"], "--episodes", 3, "--ref-episodes", 4,
        "--action-noise", 0.5, "--epsilon", 0.2, "--dataset-id", "collect/pendulum/noisy-teacher-v0",
    )  # fmt: skip
    assert dataset.total_episodes == 3 and dataset.total_steps == 600
    meta = dataset.storage.metadata
    assert meta["ref_max_score"] == pytest.approx(quickstart["collect_summary"]["teacher_return"], abs=1e-6)
    assert "noise 0.5" in meta["algorithm_name"] and "epsilon 0.2" in meta["algorithm_name"]
    assert dataset.recover_environment(eval_env=True).spec.max_episode_steps == 200


def test_iql_run_folder_is_a_checkpoint_policy(minari_root, quickstart, run):
    """The quickstart's IQL student, recorded in turn: --env comes from its dataset's evaluation env."""
    result = run(
        "collect.py", "--policy", "checkpoint", "--checkpoint", quickstart["iql_run"], "--episodes", 2,
        "--ref-episodes", 2, "--dataset-id", "collect/pendulum/student-v0", env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = minari.load_dataset("collect/pendulum/student-v0")
    assert dataset.total_episodes == 2 and "iql checkpoint" in dataset.storage.metadata["algorithm_name"]


# ---- SAC teacher and the quickstart ----------------------------------------------------------------------
def test_sac_teacher_beats_the_random_policy_within_a_small_budget(quickstart):
    summary = quickstart["collect_summary"]
    assert summary["teacher_return"] > summary["random_return"] + 500, summary


def test_quickstart_dataset_is_valid_with_reference_scores(quickstart):
    dataset = quickstart["dataset"]
    assert dataset.total_episodes == 4 and dataset.total_steps == 800
    assert all(ep.observations.shape == (201, 3) for ep in episodes(dataset))
    assert_flags_end_each_episode(dataset)
    meta = dataset.storage.metadata
    assert meta["ref_min_score"] == pytest.approx(quickstart["collect_summary"]["random_return"])
    assert meta["ref_max_score"] == pytest.approx(quickstart["collect_summary"]["teacher_return"])
    assert meta["eval_env_spec"] and dataset.recover_environment(eval_env=True).spec.id == "Pendulum-v1"


def test_quickstart_trains_iql_to_a_normalized_score(quickstart):
    summary = quickstart["iql_summary"]
    assert summary["steps"] == 300 and isinstance(summary["final_normalized_score"], float)


# ---- input errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--env", "CartPole-v1"], "Discrete action space"),
        (["--env", "Pendulm-v1"], "Did you mean Pendulum-v1"),
        (["--env", "Pendulum-v1", "--dataset-id", "pendulum-v0"], "not a namespaced Minari id"),
        (["--env", "Pendulum-v1", "--policy", "checkpoint"], "needs --checkpoint"),
        (["--env", "Pendulum-v1", "--action-noise", "0.1"], "random or replay data has none"),
        (["--policy", "checkpoint", "--checkpoint", "/nonexistent.pt"], "no such file"),
        (["--env", "Pendulum-v1", "--max-episode-steps", "20", "--ref-max-score", "-1e9"], "must exceed the random"),
    ],
)
def test_input_mistakes_are_user_errors(minari_root, argv, message):
    with pytest.raises(collect.UserError, match=message):
        record(*argv)


def test_existing_dataset_is_kept_unless_overwrite(minari_root):
    argv = ["--env", "Pendulum-v1", "--episodes", 1, "--max-episode-steps", 5, "--ref-episodes", 1]
    argv += ["--dataset-id", "collect/pendulum/twice-v0"]
    record(*argv)
    with pytest.raises(collect.UserError, match="already exists.*--overwrite"):
        record(*argv)
    assert record(*argv, "--episodes", 2, "--overwrite").total_episodes == 2


def test_a_user_error_exits_with_code_2_and_one_paragraph(minari_root, run):
    result = run("collect.py", "--env", "CartPole-v1", env=ONE_THREAD)
    assert result.returncode == 2
    assert result.stderr.startswith("error: env CartPole-v1 has a Discrete action space")
    assert result.stderr.strip().count("\n") == 0  # one paragraph: no traceback, no library notices


# ---- interruption: SIGINT/SIGTERM, --resume, no partial datasets -------------------------------------------
def start_collect(*argv) -> subprocess.Popen:
    """collect.py in a subprocess whose merged output the test reads while it runs."""
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "collect.py"), *map(str, argv)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigint_mid_training_checkpoints_and_resume_makes_the_uninterrupted_dataset(minari_root, tmp_path):
    """SIGINT after the first periodic teacher checkpoint: exit 130 with a resume hint; --resume finishes the
    training and records a dataset identical to an uninterrupted run's (Pendulum's state is saved exactly)."""
    argv = [
        "--env", "Pendulum-v1", "--policy", "sac", "--sac-data", "both", "--teacher-steps", 1500,
        "--learning-starts", 100, "--batch-size", 32, "--hidden-dim", 16, "--max-episode-steps", 50,
        "--episodes", 2, "--ref-episodes", 1, "--checkpoint-every", 100,
    ]  # fmt: skip
    proc = start_collect(*argv, "--dataset-id", "collect/pendulum/resumed-v0", "--output", tmp_path / "resumed")
    deadline = time.time() + 120
    while not list((tmp_path / "resumed").glob("*/teacher_training.pt")):
        assert proc.poll() is None and time.time() < deadline, "training never wrote its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    run_dir = next((tmp_path / "resumed").glob("Pendulum-v1__collect-sac__*"))
    assert f"python collect.py --resume {run_dir}" in output
    ckpt = torch.load(run_dir / "teacher_training.pt", weights_only=True)
    assert 100 <= ckpt["step"] < 1500 and len(ckpt["buffer"]["obs"]) == ckpt["step"]
    assert "collect/pendulum/resumed-v0" not in minari.list_local_datasets()

    result = run_script("collect.py", "--resume", run_dir, timeout=240, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = minari.load_dataset("collect/pendulum/resumed-v0")
    assert resumed.total_episodes == 1500 // 50 + 2 and (run_dir / "teacher.pt").is_file()
    assert_flags_end_each_episode(resumed)

    uninterrupted = record(*argv, "--dataset-id", "collect/pendulum/uninterrupted-v0", "--output", tmp_path / "u")
    for x, y in zip(episodes(uninterrupted), episodes(resumed), strict=True):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.rewards, y.rewards)


def test_resume_refuses_other_flags_and_non_checkpoints(minari_root, tmp_path):
    with pytest.raises(collect.UserError, match="not a collect.py --policy sac run folder"):
        record("--resume", tmp_path)
    torch.save({"algo": "collect-sac-training", "args": {}}, tmp_path / "teacher_training.pt")
    with pytest.raises(collect.UserError, match="only --device may be given"):
        record("--resume", tmp_path, "--episodes", 3)


def test_sigint_while_recording_leaves_no_dataset_and_a_rerun_needs_no_overwrite(minari_root):
    dataset_id = "collect/pendulum/interrupted-v0"
    proc = start_collect("--env", "Pendulum-v1", "--episodes", 100_000, "--ref-episodes", 1, "--dataset-id", dataset_id)
    for line in proc.stdout:
        if "recording 100000 episodes" in line:
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "interrupted (SIGINT); no dataset was written" in output
    assert dataset_id not in minari.list_local_datasets()
    assert not minari.storage.get_dataset_path(dataset_id).exists()
    assert record("--env", "Pendulum-v1", "--episodes", 1, "--ref-episodes", 1, "--dataset-id", dataset_id)


def test_interruption_while_writing_removes_the_partial_dataset_and_keeps_the_replaced_one(minari_root, monkeypatch):
    argv = ["--env", "Pendulum-v1", "--max-episode-steps", 5, "--ref-episodes", 1]
    argv += ["--dataset-id", "collect/pendulum/cut-write-v0"]
    path = minari.storage.get_dataset_path("collect/pendulum/cut-write-v0")
    create = minari.create_dataset_from_buffers

    def create_then_interrupt(*a, **k):
        create(*a, **k)  # the whole dataset is on disk: the signal arrives just before it would be kept
        raise collect.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(minari, "create_dataset_from_buffers", create_then_interrupt)
    with pytest.raises(collect.Interrupted):
        record(*argv, "--episodes", 2)
    assert not path.exists()
    monkeypatch.setattr(minari, "create_dataset_from_buffers", create)
    record(*argv, "--episodes", 2)
    monkeypatch.setattr(minari, "create_dataset_from_buffers", create_then_interrupt)
    with pytest.raises(collect.Interrupted):
        record(*argv, "--episodes", 3, "--overwrite")
    assert minari.load_dataset("collect/pendulum/cut-write-v0").total_episodes == 2  # the old one, whole
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())
