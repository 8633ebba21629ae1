"""The shared block's refusals of bad input, run as a user runs a script (subprocesses): unknown names, a missing
dataset, data that cannot be trained on, bad config files, an unwritable output folder, bad data, a dataset without an
environment, a run folder that already holds a run. Every algorithm script holds the same shared block
(tools/shared_block.py checks it), so these run iql.py; each script's own hyperparameter checks are in
test_scripts.py."""

import importlib.util
import json
import shutil
import time

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
    assert_user_error(run_script(ALGO, "--env", "hopper-medium"), "Did you mean hopper-medium-v0")


def test_an_environment_id_is_not_a_dataset_and_its_local_datasets_are_named(pendulum):
    result = run_script(ALGO, "--env", "Pendulum-v1")
    assert_user_error(result, "'Pendulum-v1' is a Gymnasium environment, not a dataset", pendulum, "collect.py")
    assert "pen-human" not in result.stderr


def test_a_local_id_with_a_typo_never_goes_to_the_network_and_names_the_local_match(pendulum):
    """local/... ids, and ids a local one nearly matches, are answered from the local store at once."""
    for typo in ("local/pendulum/randon-v0", "local/pendulum/random-v1", "local/pendulm/random-v0"):
        started = time.time()
        result = run_script(ALGO, "--env", typo)
        assert_user_error(result, "not in the local Minari store", f"Did you mean {pendulum}", "minari list local")
        assert "minari download" not in result.stderr and time.time() - started < 10  # no network retries


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


def test_run_names_stay_inside_the_output_folder(pendulum, tmp_path):
    for name in ("../x", str(tmp_path / "abs"), "a/b", ".."):
        result = run_script(ALGO, "--env", pendulum, "--output", tmp_path / "runs", "--run-name", name)
        assert_user_error(result, "run_name must be a folder name")
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()


def test_flags_that_need_what_is_not_there_are_refused_before_anything_is_loaded(pendulum, tmp_path):
    """--track without wandb, a device this machine lacks, a batch that cannot fit in memory, a non-UTF-8 config:
    exit code 2 and nothing written."""
    out = ["--env", pendulum, "--output", tmp_path / "runs"]
    if importlib.util.find_spec("wandb") is None:
        assert_user_error(run_script(ALGO, *out, "--track"), "pip install wandb")
    if not torch.cuda.is_available():
        assert_user_error(run_script(ALGO, *out, "--device", "cuda:1"), "--device cuda:1 is not available")
    assert_user_error(run_script(ALGO, *out, "--device", "gpu"), "--device gpu is not available")
    assert_user_error(run_script(ALGO, *out, "--batch-size", 10**9), "per batch do not fit", "--batch-size")
    (tmp_path / "latin1.yaml").write_bytes("# caf\xe9\nseed: 2\n".encode("latin-1"))
    assert_user_error(run_script(ALGO, *out, "--config", tmp_path / "latin1.yaml"), "UTF-8", "latin1.yaml")
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def inconsistent_datasets(minari_root, pendulum):
    """Copies of the pendulum dataset with one HDF5 array edited: actions of the wrong width, one observation too few,
    a missing rewards array."""
    import h5py

    ids = {}
    for key in ("actions", "observations", "rewards"):
        ids[key] = f"local/pendulum/bad-{key}-v0"
        folder = minari.storage.get_dataset_path(ids[key])
        shutil.copytree(minari.storage.get_dataset_path(pendulum), folder)
        metadata = json.loads((folder / "data" / "metadata.json").read_text())
        (folder / "data" / "metadata.json").write_text(json.dumps({**metadata, "dataset_id": ids[key]}))
        with h5py.File(folder / "data" / "main_data.hdf5", "r+") as f:
            episode = f["episode_1"]
            data = episode[key][()]
            del episode[key]
            if key == "actions":
                episode.create_dataset(key, data=np.zeros((len(data), 2), np.float32))
            elif key == "observations":
                episode.create_dataset(key, data=data[:-2])
    return ids


def test_data_inconsistent_with_its_spaces_is_refused_with_what_and_where(inconsistent_datasets, tmp_path):
    out = ["--output", tmp_path]
    for key, phrase in (("actions", "actions (200, 2)"), ("observations", "observations (199, 3)"), ("rewards", "")):
        result = run_script(ALGO, "--env", inconsistent_datasets[key], *out)
        assert_user_error(result, f"dataset {inconsistent_datasets[key]}: episode 1", phrase)


def test_a_dataset_whose_env_spec_names_another_function_is_refused_before_it_runs(minari_root, tmp_path):
    """A dataset's evaluation env spec names the function gym.make calls: os:system with a command is never called."""
    from test_collect import crafted_env_spec

    marker = tmp_path / "marker"
    make_dataset("local/crafted/env-v0", "Pendulum-v1", 1, max_episode_steps=5)
    metadata_file = minari.storage.get_dataset_path("local/crafted/env-v0") / "data" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps(metadata | {"eval_env_spec": crafted_env_spec(marker)}))
    result = run_script(ALGO, "--env", "local/crafted/env-v0", "--output", tmp_path / "runs")
    assert_user_error(result, "with 'os:system', not as gymnasium registered it")
    assert not marker.exists()
