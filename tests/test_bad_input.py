"""The shared block's refusals of bad input, run as a user runs a script (subprocesses): unknown names, a missing
dataset, data that cannot be trained on, bad config files, an unwritable output folder, bad data, a dataset without an
environment, a run folder that already holds a run. Every algorithm script holds the same shared block
(tools/shared_block.py checks it), so these run iql.py; each script's own hyperparameter checks are in
test_scripts.py."""

import json
import shutil

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import FAST, assert_user_error, run_dir_of, run_script, small
from local_datasets import make_dataset, rollout

ALGO = "iql.py"


@pytest.fixture(scope="module")
def odd_datasets(minari_root):
    """A discrete-action dataset, an empty one, and one whose stored observations do not fit its eval env."""
    make_dataset("local/cartpole/random-v0", "CartPole-v1", 2)
    env = gym.make("Pendulum-v1")
    describe = {"algorithm_name": "random", "description": "test dataset", "eval_env": env.spec}
    minari.create_dataset_from_buffers("local/pendulum/empty-v0", [], env=env, **describe)
    episodes, _ = rollout(env, lambda obs, rng: env.action_space.sample(), 2, seed=0)
    for ep in episodes:  # pad observations to 4 numbers: the eval env (Pendulum, 3) no longer matches
        object.__setattr__(ep, "observations", np.pad(ep.observations, ((0, 0), (0, 1))))
    space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    minari.create_dataset_from_buffers(
        "local/pendulum/padded-v0", episodes, env=env, observation_space=space, **describe
    )
    return {
        "discrete": "local/cartpole/random-v0",
        "empty": "local/pendulum/empty-v0",
        "padded": "local/pendulum/padded-v0",
    }


def test_unknown_dataset_names_suggest_close_matches(minari_root):
    assert_user_error(run_script(ALGO, "--env", "door-humen-v2"), "unknown dataset", "door-human-v2")
    assert_user_error(run_script(ALGO, "--env", "hopper-medium-v2"), "Minari does not host", "mujoco/hopper/")


def test_missing_dataset_without_network_explains_how_to_get_it(minari_root):
    result = run_script(ALGO, "--env", "pen-expert-v2", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "D4RL/pen/expert-v2", "minari download", "MINARI_DATASETS_PATH")


def test_datasets_that_cannot_be_trained_on_are_refused(odd_datasets, tmp_path):
    out = ["--output", tmp_path]
    assert_user_error(run_script(ALGO, "--env", odd_datasets["discrete"], *out), "Discrete(2)", "continuous")
    assert_user_error(run_script(ALGO, "--env", odd_datasets["empty"], *out), "has no episodes")
    assert_user_error(run_script(ALGO, "--env", odd_datasets["padded"], *out), "do not match")


def test_bad_config_files_are_refused(pendulum, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("batch_sise: 128\n")  # tyro checks config keys like flags: the error names the close match
    assert_user_error(run_script(ALGO, "--env", pendulum, "--config", config), "--batch-sise", "--batch-size", "config")
    config.write_text("batch_size: [1, 2]\n")
    assert_user_error(run_script(ALGO, "--env", pendulum, "--config", config), "--batch-size", "config.yaml")
    config.write_text("seed: 3\nbatch_size: 64\n")
    result = run_script(
        ALGO, "--env", pendulum, "--config", config, "--batch-size", 32, *FAST, *small(ALGO), "--output", tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = (run_dir_of(tmp_path) / "args.yaml").read_text()
    assert "batch_size: 32" in resolved and "seed: 3" in resolved  # the CLI overrides the config file


def test_unwritable_output_folder_is_refused(pendulum, tmp_path):
    (tmp_path / "a_file").write_text("")
    assert_user_error(run_script(ALGO, "--env", pendulum, "--output", tmp_path / "a_file" / "runs"), "--output")


@pytest.fixture(scope="module")
def bad_datasets(minari_root, pendulum):
    """A dataset with one NaN observation, a truncated copy of the pendulum dataset, and one with no env at all."""
    env = gym.make("Pendulum-v1")
    episodes, _ = rollout(env, lambda obs, rng: env.action_space.sample(), 2, seed=0)
    episodes[1].observations[7, 1] = np.nan
    minari.create_dataset_from_buffers("local/pendulum/nan-v0", episodes, env=env, algorithm_name="random")
    episodes[1].observations[7, 1] = 0.0
    spaces = {"observation_space": env.observation_space, "action_space": env.action_space}
    minari.create_dataset_from_buffers("local/real/noenv-v0", episodes, algorithm_name="logged", **spaces)
    truncated = minari_root / "local" / "pendulum" / "truncated-v0"
    shutil.copytree(minari_root / "local" / "pendulum" / "random-v0", truncated)
    with open(truncated / "data" / "main_data.hdf5", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    return {"nan": "local/pendulum/nan-v0", "truncated": "local/pendulum/truncated-v0", "noenv": "local/real/noenv-v0"}


def test_bad_data_is_refused_at_load_with_what_to_do(bad_datasets, tmp_path):
    out = ["--output", tmp_path]
    assert_user_error(run_script(ALGO, "--env", bad_datasets["nan"], *out), "episode 1", "non-finite", "observations")
    assert_user_error(
        run_script(ALGO, "--env", bad_datasets["truncated"], *out), "damaged", "truncated-v0", "delete the folder"
    )
    assert_user_error(run_script(ALGO, "--env", "../../x", *out), "not a valid Minari dataset id", "namespace/name-v")


def test_a_dataset_without_an_environment_trains_without_evaluation(bad_datasets, tmp_path):
    result = run_script(ALGO, "--env", bad_datasets["noenv"], *FAST, *small(ALGO), "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "has no environment: training without evaluation" in result.stdout
    run_dir = run_dir_of(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["eval_history"] == [] and summary["final_return"] is None
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 400


def test_run_name_fixes_the_folder_and_an_existing_run_is_not_overwritten(pendulum, tmp_path):
    args = ["--env", pendulum, *FAST, *small(ALGO), "--output", tmp_path, "--run-name", "grid__cell"]
    assert run_script(ALGO, *args).returncode == 0
    assert (tmp_path / "grid__cell" / "checkpoints" / "last.pt").is_file()
    assert_user_error(run_script(ALGO, *args), "already holds a run", f"--resume {tmp_path / 'grid__cell'}")
