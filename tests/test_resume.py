"""Resume and checkpoints of every algorithm script (subprocesses, parametrized over the scripts): the same seed gives
the same run, a run interrupted by SIGINT or SIGTERM resumes to the uninterrupted result, a resume refuses what would
change the run, only the newest checkpoints are kept, a failed write keeps the previous one, and non-finite losses
stop a run before a checkpoint is written."""

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ALGOS, FAST, ROOT, assert_user_error, run_dir_of, run_script, small

import common


def load_params(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return {
        k: v for k, v in ckpt.items() if isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())
    }


# ---- determinism and resume -----------------------------------------------------------------------------
def resumable(algo):
    return [
        *("--total-steps", "600", "--eval-every", "200", "--eval-episodes", "2", "--log-every", "100"),
        *("--checkpoint-every", "100", *small(algo)),
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


# SIGINT for every script; SIGTERM (handled by the same code in the shared block) for iql.py
INTERRUPTIONS = [(algo, signal.SIGINT) for algo in ALGOS] + [("iql.py", signal.SIGTERM)]


@pytest.mark.parametrize("algo, sig", INTERRUPTIONS)
def test_run_interrupted_by_a_signal_resumes_to_the_uninterrupted_result(algo, sig, reference_runs, pendulum, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / algo), "--env", pendulum, *resumable(algo), "--output", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/checkpoints/step_*.pt")) and time.time() < deadline:
        time.sleep(0.01)
    # somewhere after the first checkpoint, between two of them: a machine would need ~3000 steps/s to finish the
    # remaining 500 steps and 3 evaluations within the 0.15 s
    time.sleep(0.15)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    run_dir = run_dir_of(tmp_path)
    assert f"--resume {run_dir}" in out
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 100 <= stopped_at < 600, stopped_at

    result = run_script(algo, "--resume", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"at step {stopped_at}" in result.stdout
    assert_same_run(reference_runs(algo), run_dir)


def test_resume_refuses_a_checkpoint_of_another_dataset_or_algorithm(algo, reference_runs, pendulum, door, tmp_path):
    run_dir = reference_runs(algo)
    assert_user_error(run_script(algo, "--env", door, "--resume", run_dir), f"cannot change env ({pendulum} -> {door})")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    (tmp_path / "checkpoints").mkdir()
    torch.save({**ckpt, "algo": "other"}, tmp_path / "checkpoints" / "other.pt")
    assert_user_error(run_script(algo, "--resume", tmp_path / "checkpoints" / "other.pt"), "checkpoint of other.py")
    (tmp_path / "checkpoints" / "garbage.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run_script(algo, "--resume", tmp_path / "checkpoints" / "garbage.pt"), "not a readable")


def test_resume_refuses_to_change_hyperparameters(algo, reference_runs):
    assert_user_error(run_script(algo, "--resume", reference_runs(algo), "--batch-size", "64"), "batch_size")


# ---- checkpoints ----------------------------------------------------------------------------------------
def test_only_the_last_keep_checkpoints_files_are_kept(algo, pendulum, tmp_path):
    args = ["--checkpoint-every", "100", "--keep-checkpoints", "2"]
    assert run_script(algo, "--env", pendulum, *FAST, *small(algo), *args, "--output", tmp_path).returncode == 0
    names = sorted(p.name for p in (run_dir_of(tmp_path) / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step_300.pt", "step_400.pt"]


def disk_full(*args):
    raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_write_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    common.save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)}, 1, keep=3)
    monkeypatch.setattr(common.os, "fsync", disk_full)  # the bytes are in the temporary file, then the disk is full
    with pytest.raises(OSError, match="No space left"):
        common.save_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(3)}, 2, keep=3)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_1.pt"]


def test_a_run_whose_checkpoint_cannot_be_written_stops_and_is_not_marked_complete(pendulum, tmp_path, monkeypatch):
    """The disk fills up after the checkpoint at step 100: the run stops at step 200 with exit code 2, naming the last
    checkpoint, and its summary.json (of step 100) does not say completed."""
    save = common.save_checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda *args: disk_full() if args[2] > 100 else save(*args))
    result = run_script("iql.py", "--env", pendulum, *resumable("iql.py"), "--output", tmp_path)
    assert_user_error(
        result, "could not write the checkpoint at step 200", "No space left", "last checkpoint: step 100"
    )
    assert "done" not in result.stdout and "checkpoint saved" not in result.stdout
    run_dir = run_dir_of(tmp_path)
    assert not json.loads((run_dir / "summary.json").read_text())["completed"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 100


def test_a_run_whose_summary_cannot_be_written_stops(pendulum, tmp_path, monkeypatch):
    write = common.atomic_write
    monkeypatch.setattr(
        common, "atomic_write", lambda path, data: disk_full() if path.suffix == ".json" else write(path, data)
    )
    result = run_script("iql.py", "--env", pendulum, *resumable("iql.py"), "--output", tmp_path)
    assert_user_error(result, "could not write", "summary.json at step 100", "No space left")
    assert not (run_dir_of(tmp_path) / "summary.json").exists()


# ---- extending, locking, damaged checkpoints --------------------------------------------------------------
def test_a_finished_run_extended_with_more_steps_equals_a_longer_run(pendulum, tmp_path):
    """td3_bc.py has no schedule that depends on the total: 400 steps, then --total-steps 600, is the 600-step run."""
    flags = [*resumable("td3_bc.py"), "--env", pendulum]
    straight = run_script("td3_bc.py", *flags, "--output", tmp_path / "straight")
    short = run_script("td3_bc.py", *flags, "--total-steps", 400, "--output", tmp_path / "extended")
    assert straight.returncode == short.returncode == 0, straight.stderr + short.stderr
    run_dir = run_dir_of(tmp_path / "extended")
    finished = run_script("td3_bc.py", "--resume", run_dir)
    assert (
        finished.returncode == 0
        and "is finished (step 400)" in finished.stdout
        and "--total-steps N" in finished.stdout
    )
    assert_user_error(run_script("td3_bc.py", "--resume", run_dir, "--total-steps", 300), "total_steps (400 -> 300)")
    extended = run_script("td3_bc.py", "--resume", run_dir, "--total-steps", 600)
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert "resumed" in extended.stdout and "at step 400 of 600" in extended.stdout
    assert_same_run(run_dir_of(tmp_path / "straight"), run_dir)
    assert "total_steps: 600" in (run_dir / "args.yaml").read_text()


def test_a_run_folder_belongs_to_one_process_at_a_time(pendulum, tmp_path):
    """A second run in the same folder is refused while the first holds it; a lock that dies with its process
    (closed here) leaves nothing stuck."""
    fcntl = pytest.importorskip("fcntl")
    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    holder = open(run_dir / ".lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    flags = ["--env", pendulum, *FAST, *small("iql.py"), "--output", tmp_path, "--run-name", "shared"]
    assert_user_error(run_script("iql.py", *flags), "another process is training in", "shared")
    assert not (run_dir / "args.yaml").exists()
    holder.close()
    assert run_script("iql.py", *flags).returncode == 0


def test_a_damaged_last_checkpoint_names_the_newest_readable_one(algo, reference_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_runs(algo), run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    for damage in (b"", b"random bytes", last.read_bytes()[:1000]):
        last.write_bytes(damage)
        result = run_script(algo, "--resume", run_dir)
        assert_user_error(result, "not a readable", f"--resume {run_dir / 'checkpoints' / 'step_600.pt'}")
        assert "weights_only" not in result.stdout + result.stderr
    assert_user_error(run_script(algo, "--resume", run_dir / "checkpoints" / "best.pt"), "give a run folder")
    finished = run_script(algo, "--resume", run_dir / "checkpoints" / "step_600.pt")
    assert finished.returncode == 0 and "is finished" in finished.stdout


def test_non_finite_losses_stop_the_run_naming_the_loss_and_step_range(algo, pendulum, tmp_path):
    fields = dataclasses.fields(importlib.import_module(algo[:-3]).Args)
    rates = [f.name for f in fields if f.type is float and (f.name.endswith("_lr") or f.name == "learning_rate")]
    lrs = [x for name in rates for x in (f"--{name.replace('_', '-')}", "1e30")]  # every rate (dt.py's too)
    result = run_script(algo, "--env", pendulum, *FAST, *small(algo), *lrs, "--output", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 3 and "Traceback" not in out, out
    assert "losses/" in out and "became non-finite between steps 0 and 100" in out
