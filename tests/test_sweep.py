"""sweep.py, as a user runs it: a grid of 2 algorithms x 1 local dataset x 2 seeds through a local Ray, stopped by
Ctrl-C, relaunched (resuming the interrupted runs, equal to an uninterrupted run) while one script is killed (Ray
retries it from its checkpoint), and launched once more (everything skipped); the task's process handling without
Ray; report.py's numbers on the grid's summaries; clear errors (exit 2, no traceback) for bad grids."""

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_script

import report
import sweep

TOTAL = 400
FLAGS = {
    "all": "--eval-every 200 --eval-episodes 2 --log-every 100 --checkpoint-every 100",
    "iql": "--hidden-dim 32",
    "cql": "--hidden-dim 32 --cql-n-actions 2",
}


def launch(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "sweep.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(condition, proc, timeout=300.0):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"sweep.py exited early or hung:\n{proc.communicate()[0]}")
        time.sleep(0.05)


def script_pids(out: Path):
    markers = (marker.read_text().split() for marker in out.glob(f"*/{sweep.MARKER}"))
    return [int(marker[1]) for marker in markers if len(marker) == 2]


def signal_to(pid, sig):
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:  # the script has just exited
        return False


def told_to_stop(pid):
    """A paused script has SIGINT or SIGTERM pending (or has exited), per /proc/<pid>/status."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except FileNotFoundError:
        return True
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return status["State"].split()[0] == "Z" or bool(pending & (1 << signal.SIGINT - 1 | 1 << signal.SIGTERM - 1))


def step_of(run_dir: Path):
    last = run_dir / "checkpoints" / "last.pt"
    return torch.load(last, weights_only=True)["step"] if last.exists() else None


@pytest.fixture(scope="session")  # once: every test of this file runs on one worker (--dist loadfile)
def grid(pendulum, tmp_path_factory):
    """The grid launched three times; what each launch printed and left behind."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "runs"
    grid_file = tmp / "grid.yaml"
    grid = {"algos": ["iql", "cql"], "envs": [pendulum], "seeds": [0, 1], "total_steps": TOTAL, "output": str(out)}
    # one run at a time: the suite runs on every core already (pytest-xdist), so Ray gets one
    grid_file.write_text(yaml.safe_dump({**grid, "num_cpus": 1, "flags": FLAGS}))
    names = [f"{pendulum.replace('/', '-')}__{a}__{s}" for a in ("iql", "cql") for s in (0, 1)]
    launches = []

    # 1: Ctrl-C (SIGINT to the process group, as a terminal sends it) once a run has written a checkpoint. The
    # running scripts are paused (SIGSTOP) until the stop signal reaches them, so that none can finish in between
    first = launch(grid_file)
    wait_for(lambda: list(out.glob("*/checkpoints/step_*.pt")), first)
    paused = [pid for pid in script_pids(out) if signal_to(pid, signal.SIGSTOP)]
    os.killpg(first.pid, signal.SIGINT)
    wait_for(lambda: all(told_to_stop(pid) for pid in paused), first)
    for pid in paused:
        signal_to(pid, signal.SIGCONT)
    output, _ = first.communicate(timeout=150)
    launches.append({"code": first.returncode, "out": output, "steps": {n: step_of(out / n) for n in names}})

    # 2: relaunch; the first CQL run's script is killed (SIGKILL) once last.pt exists (step_<N>.pt is written just
    # before it): Ray retries it, and the retry resumes
    second = launch(grid_file)
    killed = out / names[2]
    wait_for(lambda: (killed / sweep.MARKER).exists() and (killed / "checkpoints" / "last.pt").exists(), second)
    os.kill(int((killed / sweep.MARKER).read_text().split()[1]), signal.SIGKILL)
    output, _ = second.communicate(timeout=300)
    launches.append({"code": second.returncode, "out": output})

    # 3: everything is complete
    t0 = time.time()
    third = run_script("sweep.py", grid_file)
    launches.append({"code": third.returncode, "out": third.stdout + third.stderr, "seconds": time.time() - t0})
    return {"out": out, "names": names, "launches": launches, "killed": killed, "dataset": pendulum}


def test_ctrl_c_stops_every_run_with_a_checkpoint_and_exit_code_130(grid):
    first = grid["launches"][0]
    assert first["code"] == 130, first["out"]
    assert "stopped. Launch the same command again to resume" in first["out"]
    assert "Traceback" not in first["out"]
    interrupted = [n for n, step in first["steps"].items() if step is not None]
    assert interrupted and all(0 < first["steps"][n] < TOTAL for n in interrupted), first["steps"]
    assert not list(grid["out"].glob(f"*/{sweep.MARKER}"))  # every script has exited


def test_relaunch_resumes_interrupted_runs_retries_a_killed_one_and_completes_the_grid(grid):
    first, second = grid["launches"][:2]
    assert second["code"] == 0, second["out"]
    resumed = sum(step is not None for step in first["steps"].values())
    assert f"{resumed} to resume from their checkpoints, {4 - resumed} to start" in second["out"]
    for name in grid["names"]:
        summary = json.loads((grid["out"] / name / "summary.json").read_text())
        assert summary["completed"] and summary["steps"] == TOTAL
        assert [h["step"] for h in summary["eval_history"]] == [200, 400]
        assert f"done   {name}: final score {summary['final_normalized_score']:.1f}" in second["out"]
    starts = [line for line in (grid["killed"] / "log.txt").read_text().splitlines() if line.startswith("[sweep]")]
    assert len(starts) == 2 and "--run-name" in starts[0] and "--resume" in starts[1]  # retried by Ray, resumed


def test_a_third_launch_skips_every_completed_run_without_starting_ray(grid):
    third = grid["launches"][2]
    assert third["code"] == 0, third["out"]
    assert (
        "4 runs in" in third["out"]
        and "4 completed (skipped), 0 to resume from their checkpoints, 0 to start" in third["out"]
    )
    assert "done" not in third["out"] and third["seconds"] < 20


def test_the_interrupted_and_resumed_run_equals_an_uninterrupted_one(grid, tmp_path):
    name = next(n for n, step in grid["launches"][0]["steps"].items() if step is not None and "__iql__" in n)
    seed = name.rsplit("__", 1)[1]
    flags = f"{FLAGS['all']} {FLAGS['iql']}".split()
    result = run_script(
        "iql.py",
        "--env",
        grid["dataset"],
        "--seed",
        seed,
        "--total-steps",
        TOTAL,
        *flags,
        "--output",
        tmp_path,
        "--run-name",
        name,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    swept, reference = (
        torch.load(d / name / "checkpoints" / "last.pt", weights_only=True) for d in (grid["out"], tmp_path)
    )
    for key in ("actor", "critic", "target_critic", "value"):
        for param, value in reference[key].items():
            assert torch.equal(swept[key][param], value), f"{key}.{param}"
    histories = [json.loads((d / name / "summary.json").read_text())["eval_history"] for d in (grid["out"], tmp_path)]
    assert [(h["step"], h["return"]) for h in histories[0]] == [(h["step"], h["return"]) for h in histories[1]]


def test_report_numbers_match_the_grids_summaries(grid):
    runs = report.select(report.load_runs([str(grid["out"])], print), False, print)
    groups = report.make_groups(runs, print)
    names, domains = report.names_and_domains(runs)
    rows = report.table_rows(groups, ["cql", "iql"], names, domains)
    for algo in ("iql", "cql"):
        summaries = [json.loads((grid["out"] / n / "summary.json").read_text()) for n in grid["names"] if algo in n]
        (row,) = [r for r in rows if r["kind"] == "dataset" and r["algo"] == algo]
        for metric in ("final", "best"):
            values = np.array([s[f"{metric}_normalized_score"] for s in summaries])
            assert row[f"{metric}_mean"] == values.mean() and row[f"{metric}_std"] == values.std()
        assert row["n"] == 2 and row["seeds"] == "0 1"


# ---- the task's process handling, without Ray --------------------------------------------------------------------
FAKE_SCRIPT = """
import signal, sys, time
from pathlib import Path
run = Path(sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else sys.argv[-1])
print("args", sys.argv[1:], flush=True)
if "--user-error" in sys.argv:
    sys.exit(2)
if "--wait" in sys.argv:
    signal.signal(signal.SIGTERM, lambda *_: (Path(run, "stopped").write_text("checkpointed"), sys.exit(143)))
    Path(run, "ready").touch()
    time.sleep(60)
if "--resume" not in sys.argv:  # a crash after the first checkpoint
    Path(run, "checkpoints").mkdir(parents=True)
    Path(run, "checkpoints", "last.pt").touch()
    sys.exit(1)
"""


def fake_run(tmp_path, *flags):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SCRIPT)
    run_dir = tmp_path / "run"
    start, resume = [str(script), *flags, str(run_dir)], [str(script), "--resume", str(run_dir)]
    return sweep.Run("run", str(run_dir), start, resume, {"OMP_NUM_THREADS": "1"})


def test_task_raises_on_a_crash_so_that_ray_retries_and_the_retry_resumes(tmp_path):
    run = fake_run(tmp_path)
    with pytest.raises(RuntimeError, match="exited with code 1"):
        sweep.run_task(run)
    result = sweep.run_task(run)  # what Ray's retry runs: the checkpoint now exists
    assert result["code"] == 0 and "'--resume'" in result["tail"]
    assert not (tmp_path / "run" / sweep.MARKER).exists()


def test_task_reports_a_user_error_without_retrying(tmp_path):
    result = sweep.run_task(fake_run(tmp_path, "--user-error"))
    assert result["code"] == 2 and "--user-error" in result["tail"]


def test_cancelled_task_sends_sigterm_and_waits_for_the_checkpoint_even_if_sigint_was_ignored(tmp_path):
    """Ray's cancel is _thread.interrupt_main() in the worker; a worker started under nohup ignores SIGINT."""
    run, previous = fake_run(tmp_path, "--wait"), signal.signal(signal.SIGINT, signal.SIG_IGN)

    def cancel():
        while not (tmp_path / "run" / "ready").exists():
            time.sleep(0.02)
        _thread.interrupt_main()

    threading.Thread(target=cancel, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_task(run)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "run" / "stopped").read_text() == "checkpointed"
    assert not (tmp_path / "run" / sweep.MARKER).exists()


# ---- command line ----------------------------------------------------------------------------------------------
def test_dry_run_prints_each_runs_command_with_per_algorithm_flags_and_threads(pendulum, tmp_path, capsys):
    grid = {"algos": ["iql", "cql"], "envs": [pendulum], "seeds": [3], "threads": 2, "flags": FLAGS}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    assert (
        sweep.main([str(tmp_path / "g.yaml"), "--output", str(tmp_path / "o"), "--dry-run", "--", "--device=cpu"]) == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "python" in line]
    name = pendulum.replace("/", "-")
    assert lines == [
        f"OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TQDM_MININTERVAL=10 CUDA_VISIBLE_DEVICES='' python {algo}.py --env "
        f"{pendulum} --seed 3 --output {tmp_path / 'o'} --run-name {name}__{algo}__3 {FLAGS['all']} {FLAGS[algo]} "
        "--device=cpu"
        for algo in ("iql", "cql")
    ]


def test_a_dataset_missing_from_the_local_store_is_an_error_unless_on_a_cluster(pendulum):
    args = sweep.Args(envs=["local/nothing/here-v0"])
    with pytest.raises(sweep.UserError, match="is not in the local Minari store .* record it with collect.py"):
        sweep.check_datasets(args, set(args.envs))
    sweep.check_datasets(sweep.Args(envs=args.envs, address="auto"), set(args.envs))  # the nodes' stores count


@pytest.mark.parametrize(
    "grid, flags, phrase",
    [
        ({"algos": ["iql", "ppo"]}, [], "invalid choice 'ppo'"),
        ({"envs": ["door-hman-v2"]}, [], "unknown dataset 'door-hman-v2'. Did you mean door-human-v2"),
        ({}, ["--address", "127.0.0.1:1"], "no Ray cluster at --address 127.0.0.1:1"),
    ],
    ids=["unknown-algo", "unknown-dataset", "unreachable-address"],
)
def test_bad_grids_are_a_clear_error(grid, flags, phrase, pendulum, tmp_path):
    full = {"algos": ["iql"], "envs": [pendulum], "seeds": [0], "output": str(tmp_path / "o"), **grid}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(full))
    t0 = time.time()
    result = run_script("sweep.py", tmp_path / "g.yaml", *flags, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out and phrase in out, out
    assert time.time() - t0 < 30


@pytest.mark.parametrize(
    "content, phrase",
    [
        (b"algos: [iql]\nenvs: [caf\xe9]\n", "is not UTF-8 text (byte 0xe9 at offset 23): save it as UTF-8"),
        (b"flags: {all: 5}\n", "flags: all takes the scripts' flags as a string"),
        (b"flags: {iql: null}\n", "flags: iql takes the scripts' flags as a string"),
        (b"flags: {all: [{hidden_dim: 32}]}\n", "flags: all takes the scripts' flags as a string"),
        (b'flags: {all: "--run-name \'unclosed"}\n', "flags: all cannot be split into flags (No closing quotation)"),
        (b"flags: [--hidden-dim, 32]\n", f"its `flags:` a mapping of {'/'.join(('all', *sweep.ALGOS))}"),
        (b"flags: {dqn: --x}\n", f"its `flags:` a mapping of {'/'.join(('all', *sweep.ALGOS))}"),
        (b"- iql\n- cql\n", "must be a mapping of sweep.py's flags"),
        (b"seeds: {first: 1}\n", "seeds takes a value or a list of values, not {'first': 1}"),
        (b"envs: [[a, b]]\n", "envs takes a value or a list of values"),
        (b"total_steps: 2024-01-01\n", "total_steps takes a value or a list of values"),
        (b"algos: [iql\n", "cannot read the grid file"),
        (b"seeds: !!python/object/apply:os.system [echo]\n", "cannot read the grid file"),
        (b"total_steps: many\n", "its keys are sweep.py's flags"),
    ],
    ids=["latin-1", "flags-5", "flags-null", "flags-dict", "unclosed-quote", "flags-list", "flags-dqn", "a-list"]
    + ["dict-value", "nested-list", "date", "yaml-syntax", "python-tag", "wrong-type"],
)
def test_a_malformed_grid_file_is_one_paragraph_naming_it(content, phrase, tmp_path, capsys):
    """Grid files that are not UTF-8 or YAML, or hold a value of the wrong type anywhere: sweep.py's UserError
    (exit 2) names the file; yaml.safe_load builds no Python object from a tag."""
    (tmp_path / "g.yaml").write_bytes(content)
    with pytest.raises(sweep.UserError) as error:
        sweep.parse_args([str(tmp_path / "g.yaml")])
    message = str(error.value)
    assert phrase in message and str(tmp_path / "g.yaml") in message and "\n" not in message, message


def test_a_grid_file_that_is_not_utf8_exits_2_without_a_traceback(tmp_path):
    (tmp_path / "g.yaml").write_bytes(b"envs: [\xff\xfe]\n")
    result = run_script("sweep.py", tmp_path / "g.yaml", "--dry-run", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: the grid file {tmp_path / 'g.yaml'} is not UTF-8 text")


def test_damaged_run_folders_do_not_stop_a_sweep(tmp_path):
    """A run folder's summary.json that is a list, and its args.yaml that is not UTF-8: the run starts or resumes."""
    run = sweep.Run("r", str(tmp_path), [], [], {})
    (tmp_path / "summary.json").write_text("[1, 2]")
    (tmp_path / "args.yaml").write_bytes(b"total_steps: \xff\n")
    assert sweep.state_of(run, 1000) == "start"
    assert sweep.describe({"final_return": "12", "best_return": None}) == "no evaluation (None steps, 0 s)"
