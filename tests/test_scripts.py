"""What every training script guarantees, run as a user runs it (subprocesses): end-to-end runs on Box,
dict-observation and Adroit datasets, resume after a real signal, determinism, atomic checkpoints, numerical
faults and clear errors (exit code 2, no traceback) for bad input. Parametrized over the algorithms."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_script
from local_datasets import make_dataset, rollout

import common

ALGOS = ["iql.py", "cql.py"]
FAST = ["--total-steps", "400", "--eval-every", "200", "--eval-episodes", "2", "--log-every", "100"]
BAD_HYPERPARAMETER = {"iql.py": ["--expectile", "1.0"], "cql.py": ["--cql-alpha", "-1"]}


@pytest.fixture(params=ALGOS)
def algo(request):
    return request.param


def small(algo):
    """Small networks (and, for CQL, few sampled actions): these tests are about plumbing, not learning."""
    return ["--hidden-dim", "32"] + (["--cql-n-actions", "2"] if algo == "cql.py" else [])


def run_dir_of(output):
    (run_dir,) = [p for p in output.iterdir() if p.is_dir()]
    return run_dir


def assert_user_error(result, *phrases):
    """Exit code 2, one readable message, no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    for phrase in phrases:
        assert phrase in out, out


def load_params(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return {
        k: v for k, v in ckpt.items() if isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())
    }


# ---- end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["pendulum", "pointmaze", "door"])
def test_end_to_end_run_writes_events_checkpoints_summary_and_videos(algo, dataset, request, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset_id = request.getfixturevalue(dataset)
    video = [] if dataset == "pointmaze" else ["--capture-video"]
    result = run_script(algo, "--env", dataset_id, *FAST, *small(algo), *video, "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(tmp_path)
    assert run_dir.name.startswith(f"{dataset_id.replace('/', '-')}__{algo[:-3]}__1__")
    assert (run_dir / "args.yaml").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["algo"] == algo[:-3] and ckpt["minari_id"] == dataset_id and ckpt["step"] == 400
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == algo[:-3] and summary["minari_id"] == dataset_id and summary["steps"] == 400
    assert summary["completed"] and summary["total_steps"] == 400 and summary["eval_episodes"] == 2
    assert summary["args"]["hidden_dim"] == 32 and set(summary["versions"]) >= {"torch", "minari", "mujoco"}
    assert [h["step"] for h in summary["eval_history"]] == [200, 400] and summary["sps"] > 0
    assert np.isfinite(summary["final_return"])
    if dataset == "pointmaze":  # no reference scores in this dataset: raw returns only
        assert summary["final_normalized_score"] is None
    else:
        assert np.isfinite(summary["final_normalized_score"])

    events = EventAccumulator(str(run_dir))  # TensorBoard: the documented tags
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"charts/SPS", "charts/learning_rate", "eval/return", "eval/length"} <= tags
    assert any(t.startswith("losses/") for t in tags) and ("eval/normalized_score" in tags) == (dataset != "pointmaze")
    assert [e.step for e in events.Scalars("charts/SPS")] == [100, 200, 300, 400]

    gifs = sorted(run_dir.glob("videos/step_*.gif"))  # --capture-video
    if dataset == "door":  # MuJoCo renders offscreen here (EGL): one GIF per evaluation
        assert "cannot render" not in result.stdout + result.stderr
        assert [g.name for g in gifs] == ["step_200.gif", "step_400.gif"]
        frames = Image.open(gifs[0])
        assert frames.n_frames == 21 and frames.size[0] >= 64  # T + 1 frames of a 20-step episode
        assert len(frames.convert("L").getcolors(256)) > 10  # a rendered scene, not a blank image
    if dataset == "pendulum":  # renders through pygame, not a dependency: the run goes on and says why
        assert "--capture-video: this env cannot render here" in result.stdout + result.stderr and not gifs


ADROIT_SETTINGS = {"iql.py": {"beta": 0.5, "actor_dropout": 0.1}, "cql.py": {"cql_alpha": 1.0, "actor_lr": 1e-4}}


def test_script_copied_alone_with_common_keeps_the_published_per_domain_settings(algo, door, tmp_path):
    """iql.py + common.py in an empty folder, on a dataset stored as D4RL/door/human-v2: Adroit's settings apply."""
    for name in (algo, "common.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    few = ["--total-steps", "40", "--eval-every", "40", "--log-every", "20", "--eval-episodes", "2", *small(algo)]
    result = run_script(algo, "--env", "door-human-v2", *few, "--output", tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load((run_dir_of(tmp_path / "runs") / "args.yaml").read_text())
    assert {k: resolved[k] for k in ADROIT_SETTINGS[algo]} == ADROIT_SETTINGS[algo]
    assert "per-domain settings for door-human-v2" in result.stdout


# ---- learning -------------------------------------------------------------------------------------------
# Small budgets met with a wide margin: seeds 0-3 all reached return 1000 (the episode limit), IQL from step 400 on,
# CQL at step 800 (646-1000 at step 400)
LEARNING = {
    "iql.py": ["--total-steps", "1000", "--eval-every", "1000"],
    "cql.py": ["--total-steps", "800", "--eval-every", "800", "--hidden-dim", "64", "--actor-lr", "3e-4"],
}


def test_learns_to_beat_random_and_reach_the_behaviour_policy(algo, inverted_pendulum, tmp_path):
    """Noisy balancing-controller data (behaviour mean ~160, random ~5): the learned policy must recover the
    controller, clearly beating random and reaching at least the behaviour policy's mean return."""
    result = run_script(algo, "--env", inverted_pendulum["id"], *LEARNING[algo], "--seed", 0, "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    final = json.loads((run_dir_of(tmp_path) / "summary.json").read_text())["final_return"]
    print(f"{algo} final return {final:.1f}, behaviour {inverted_pendulum['behaviour_return']:.1f}, random ~5")
    assert final > 10 * 5.0  # clearly better than random
    assert final >= inverted_pendulum["behaviour_return"]


# ---- determinism and resume -----------------------------------------------------------------------------
def resumable(algo):
    return [
        *("--total-steps", "1200", "--eval-every", "300", "--eval-episodes", "2", "--log-every", "100"),
        *("--checkpoint-every", "200", *small(algo)),
    ]


@pytest.fixture(scope="session")  # once: every test of this file runs on one worker (--dist loadfile)
def reference_runs(tmp_path_factory, pendulum):
    """Uninterrupted runs, computed once per algorithm: the baseline of the determinism and resume tests."""
    runs = {}

    def get(algo):
        if algo not in runs:
            out = tmp_path_factory.mktemp("reference")
            result = run_script(algo, "--env", pendulum, *resumable(algo), "--seed", 1, "--output", out)
            assert result.returncode == 0, result.stdout + result.stderr
            runs[algo] = run_dir_of(out)
        return runs[algo]

    return get


def assert_same_run(a, b):
    params_a, params_b = load_params(a), load_params(b)
    assert params_a.keys() == params_b.keys() and params_a
    for name in params_a:
        for key in params_a[name]:
            assert torch.equal(params_a[name][key], params_b[name][key]), f"{name}.{key} differs"
    scores = [json.loads((d / "summary.json").read_text())["eval_history"] for d in (a, b)]
    assert [(h["step"], h["return"]) for h in scores[0]] == [(h["step"], h["return"]) for h in scores[1]]


def test_same_seed_gives_identical_parameters_and_scores(algo, reference_runs, pendulum, tmp_path):
    result = run_script(algo, "--env", pendulum, *resumable(algo), "--seed", 1, "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(reference_runs(algo), run_dir_of(tmp_path))


def test_the_seed_sets_the_initial_networks_and_the_batches(algo, pendulum):
    """What main() seeds with --seed: every torch draw (network init) and the buffer's own sampler."""
    module, draws = importlib.import_module(algo[:-3]), []
    dataset = module.load_dataset(pendulum)
    for seed in (1, 1, 2):
        args = module.Args(env=pendulum, seed=seed, hidden_dim=32)
        common.seed_everything(seed)
        actor = module.make_networks(args, 3, 1)["actor"]
        buffer, _ = module.load_buffer(dataset, args, torch.device("cpu"))
        draws.append((actor.net[0].weight.detach(), buffer.sample(16)["obs"]))
    (init_a, batch_a), (init_b, batch_b), (init_c, batch_c) = draws
    assert torch.equal(init_a, init_b) and torch.equal(batch_a, batch_b)
    assert not torch.equal(init_a, init_c) and not torch.equal(batch_a, batch_c)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_by_a_signal_resumes_to_the_uninterrupted_result(algo, sig, reference_runs, pendulum, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / algo), "--env", pendulum, *resumable(algo), "--output", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/checkpoints/step_*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere after the first checkpoint, mid-training
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    run_dir = run_dir_of(tmp_path)
    assert f"--resume {run_dir}" in out
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 200 <= stopped_at < 1200, stopped_at

    result = run_script(algo, "--resume", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"at step {stopped_at}" in result.stdout
    assert_same_run(reference_runs(algo), run_dir)


def test_resume_refuses_a_checkpoint_of_another_dataset_or_algorithm(algo, reference_runs, pendulum, door, tmp_path):
    run_dir = reference_runs(algo)
    assert_user_error(run_script(algo, "--env", door, "--resume", run_dir), f"cannot change env ({pendulum} -> {door})")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ckpt["algo"] = "other"
    torch.save(ckpt, tmp_path / "other.pt")
    assert_user_error(run_script(algo, "--resume", tmp_path / "other.pt"), "checkpoint of other.py")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run_script(algo, "--resume", tmp_path / "garbage.pt"), "not a readable")


def test_resume_refuses_to_change_hyperparameters(algo, reference_runs):
    assert_user_error(run_script(algo, "--resume", reference_runs(algo), "--batch-size", "64"), "batch_size")


# ---- checkpoints ----------------------------------------------------------------------------------------
def test_only_the_last_keep_checkpoints_files_are_kept(algo, pendulum, tmp_path):
    args = ["--checkpoint-every", "100", "--keep-checkpoints", "2"]
    assert run_script(algo, "--env", pendulum, *FAST, *small(algo), *args, "--output", tmp_path).returncode == 0
    names = sorted(p.name for p in (run_dir_of(tmp_path) / "checkpoints").iterdir())
    assert names == ["last.pt", "step_300.pt", "step_400.pt"]


def test_a_failed_checkpoint_write_warns_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    common.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)}, 1, keep=3)

    def disk_full(fd):  # the bytes are in the temporary file, then the disk "fills up" before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", disk_full)
    common.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(3)}, 2, keep=3)
    assert "No space left on device" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_1.pt"]


def test_non_finite_losses_stop_the_run_naming_the_loss_and_step_range(algo, pendulum, tmp_path):
    lrs = ["--actor-lr", "1e30", "--critic-lr", "1e30"] + (["--value-lr", "1e30"] if algo == "iql.py" else [])
    result = run_script(algo, "--env", pendulum, *FAST, *small(algo), *lrs, "--output", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 3 and "Traceback" not in out, out
    assert "losses/" in out and "became non-finite between steps 0 and 100" in out


# ---- bad input ------------------------------------------------------------------------------------------
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


def test_unknown_dataset_names_suggest_close_matches(algo, minari_root):
    assert_user_error(run_script(algo, "--env", "door-humen-v2"), "unknown dataset", "door-human-v2")
    assert_user_error(run_script(algo, "--env", "hopper-medium-v2"), "Minari does not host", "mujoco/hopper/")


def test_missing_dataset_without_network_explains_how_to_get_it(algo, minari_root):
    result = run_script(algo, "--env", "pen-expert-v2", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(result, "D4RL/pen/expert-v2", "minari download", "MINARI_DATASETS_PATH")


def test_datasets_that_cannot_be_trained_on_are_refused(algo, odd_datasets, tmp_path):
    out = ["--output", tmp_path]
    assert_user_error(run_script(algo, "--env", odd_datasets["discrete"], *out), "Discrete(2)", "continuous")
    assert_user_error(run_script(algo, "--env", odd_datasets["empty"], *out), "has no episodes")
    assert_user_error(run_script(algo, "--env", odd_datasets["padded"], *out), "do not match")


def test_out_of_range_hyperparameters_are_refused(algo, pendulum):
    assert_user_error(run_script(algo, "--env", pendulum, "--batch-size", "0"), "batch_size must be > 0")
    assert_user_error(run_script(algo, "--env", pendulum, "--discount", "1.5"), "discount")
    assert_user_error(run_script(algo, "--env", pendulum, *BAD_HYPERPARAMETER[algo]), "invalid hyperparameters")


def test_bad_config_files_are_refused(algo, pendulum, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("batch_sise: 128\n")  # tyro checks config keys like flags: the error names the close match
    assert_user_error(run_script(algo, "--env", pendulum, "--config", config), "--batch-sise", "--batch-size", "config")
    config.write_text("batch_size: [1, 2]\n")
    assert_user_error(run_script(algo, "--env", pendulum, "--config", config), "--batch-size", "config.yaml")
    config.write_text("seed: 3\nbatch_size: 64\n")
    result = run_script(
        algo, "--env", pendulum, "--config", config, "--batch-size", 32, *FAST, *small(algo), "--output", tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = (run_dir_of(tmp_path) / "args.yaml").read_text()
    assert "batch_size: 32" in resolved and "seed: 3" in resolved  # the CLI overrides the config file


def test_unwritable_output_folder_is_refused(algo, pendulum, tmp_path):
    (tmp_path / "a_file").write_text("")
    assert_user_error(run_script(algo, "--env", pendulum, "--output", tmp_path / "a_file" / "runs"), "--output")


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


def test_bad_data_is_refused_at_load_with_what_to_do(algo, bad_datasets, tmp_path):
    out = ["--output", tmp_path]
    assert_user_error(run_script(algo, "--env", bad_datasets["nan"], *out), "episode 1", "non-finite", "observations")
    assert_user_error(
        run_script(algo, "--env", bad_datasets["truncated"], *out), "damaged", "truncated-v0", "delete the folder"
    )
    assert_user_error(run_script(algo, "--env", "../../x", *out), "not a valid Minari dataset id", "namespace/name-v")


def test_a_dataset_without_an_environment_trains_without_evaluation(algo, bad_datasets, tmp_path):
    result = run_script(algo, "--env", bad_datasets["noenv"], *FAST, *small(algo), "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "has no environment: training without evaluation" in result.stdout
    run_dir = run_dir_of(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["eval_history"] == [] and summary["final_return"] is None
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 400


def test_run_name_fixes_the_folder_and_an_existing_run_is_not_overwritten(algo, pendulum, tmp_path):
    args = ["--env", pendulum, *FAST, *small(algo), "--output", tmp_path, "--run-name", "grid__cell"]
    assert run_script(algo, *args).returncode == 0
    assert (tmp_path / "grid__cell" / "checkpoints" / "last.pt").is_file()
    assert_user_error(run_script(algo, *args), "already holds a run", f"--resume {tmp_path / 'grid__cell'}")
