"""Shared fixtures: one temporary Minari store for the whole session, with small local datasets built on first use,
and a helper that runs a script as a user would (argv, exit code, output; the algorithm scripts in the test's own
process, everything else in a subprocess). Every test runs with one torch thread (the suite runs in parallel, one
worker per core) and leaves no global state behind."""

import contextlib
import copy
import io
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from local_datasets import inverted_pendulum_controller, make_dataset

ROOT = Path(__file__).resolve().parent.parent
PENDULUM = "local/pendulum/random-v0"  # Box observations, reference scores set
POINTMAZE = "local/pointmaze/umaze-random-v0"  # dict observations (gymnasium-robotics point maze)
DOOR = "D4RL/door/human-v2"  # an Adroit door dataset under the real D4RL id (random actions, 20-step episodes)
INVERTED = "local/invertedpendulum/noisy-v0"  # known behaviour policy: linear controller + N(0, 2.5^2) noise
INVERTED_REF = (5.0, 1000.0)  # random policy ~5, perfect balancing 1000


# The slowest files first (about 150, 130, 100 and 70 s of one core each at commit 4a69d03): pytest-xdist hands whole
# files to its workers in this order (--dist loadfile --no-loadscope-reorder), so that no long file starts last while
# the other worker sits idle. Every other file keeps pytest's order, after these.
SLOWEST_FILES = ["test_finetuning.py", "test_scripts.py", "test_resume.py", "test_sweep.py", "test_collect.py"]
SLOWEST_FILES += ["test_policies.py", "test_report.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: the tests of a file keep their order


@contextlib.contextmanager
def process_state_kept():
    """Whatever the body changes of the process (signal handlers, environment variables, working directory, argv,
    torch's thread count) is put back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    environ, cwd, argv, threads = dict(os.environ), os.getcwd(), sys.argv, torch.get_num_threads()
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.argv = argv
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_global_state():
    """No test depends on the ones that ran before it in its worker: what a test changes of the process is put back."""
    torch.set_num_threads(1)  # pytest-xdist runs one worker per core: a second thread per worker only waits
    with process_state_kept():
        yield


@pytest.fixture(scope="session", autouse=True)
def minari_root(tmp_path_factory) -> Path:
    """The Minari store of this test session (each pytest-xdist worker has its own). Autouse: it is set before any
    test's snapshot of the environment, so that restoring a snapshot never removes it."""
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as session_env:
        session_env.setenv("MINARI_DATASETS_PATH", str(root))
        session_env.setenv("HF_HUB_OFFLINE", "1")  # never try the network from tests
        yield root


@pytest.fixture(scope="session")
def pendulum(minari_root) -> str:
    make_dataset(PENDULUM, "Pendulum-v1", 5, ref=(-1200.0, -150.0))
    return PENDULUM


@pytest.fixture(scope="session")
def pointmaze(minari_root) -> str:
    make_dataset(POINTMAZE, "PointMaze_UMaze-v3", 4, max_episode_steps=50)
    return POINTMAZE


@pytest.fixture(scope="session")
def door(minari_root) -> str:
    make_dataset(DOOR, "AdroitHandDoor-v1", 3, max_episode_steps=20, ref=(-50.0, 3000.0))
    return DOOR


@pytest.fixture(scope="session")
def inverted_pendulum(minari_root) -> dict:
    """30 episodes of a noisy balancing controller; returns the id and the behaviour policy's mean return."""
    returns = make_dataset(INVERTED, "InvertedPendulum-v5", 30, inverted_pendulum_controller(2.5), ref=INVERTED_REF)
    return {"id": INVERTED, "behaviour_return": float(returns.mean())}


@pytest.fixture(scope="session")
def inverted_pendulum_random(minari_root) -> str:
    """200 episodes of uniform random actions (mean return ~5): offline training cannot learn to balance from them."""
    make_dataset("local/invertedpendulum/random-v0", "InvertedPendulum-v5", 200, ref=INVERTED_REF)
    return "local/invertedpendulum/random-v0"


def run_script(script: str, *args, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None):
    """Run `python <script> <args>` as a user would; returns a CompletedProcess (exit code, stdout, stderr).

    An algorithm script (or policy.py) runs in this test's process (`run_in_process`): its `__main__` block, argument
    parsing, messages and exit codes exactly as on the command line, without the ~4 s that a new interpreter spends
    starting and importing torch, gymnasium and minari (most of a small run's time). A real subprocess runs every other
    tool, a script run from another folder (a copied script) and a run with its own PYTHONPATH. (Every script also runs
    as a process of its own in the tests that stop it with a signal, and as a copied script.) `timeout` bounds a
    subprocess; an in-process run has none."""
    env = env or {}
    if script in [*ALGOS, "policy.py"] and cwd == ROOT and "PYTHONPATH" not in env:
        return run_in_process(script, args, env)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(
        [sys.executable, str(cwd / script), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_process(script: str, args: tuple, env: dict) -> subprocess.CompletedProcess:
    """`python <script> <args>` inside this process, from the repository root: the script runs as `__main__` with that
    argv and environment; its output is captured, SystemExit gives the exit code and an uncaught exception prints its
    traceback and gives 1, as Python would. What the run changes of the process is put back."""
    argv = [str(ROOT / script), *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with process_state_kept():
        os.environ.update({"OMP_NUM_THREADS": "1", **env})
        os.chdir(ROOT)
        sys.argv = argv
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore does for a subprocess
            returncode = run_main(argv[0])
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def run_main(path: str) -> int:
    """Run a file as `__main__` and return the exit code Python would give it."""
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


@pytest.fixture
def run():
    return run_script


# ---- the algorithm scripts, run as a user runs them --------------------------------------------------------------
ALGOS = sorted(p.name for p in ROOT.glob("*.py") if "SHARED BLOCK begins" in p.read_text())  # iql.py, cql.py, ...
FAST = ["--total-steps", "400", "--eval-every", "200", "--eval-episodes", "2", "--log-every", "100"]


# The scripts whose policy acts on an observation alone (dt.py's reads its episode's last steps: tests/test_dt.py)
OBSERVATION_POLICIES = [algo for algo in ALGOS if algo != "dt.py"]


@pytest.fixture(params=ALGOS)
def algo(request):
    return request.param


# Small networks (and few sampled actions for CQL, few critics for SAC-N and EDAC, short segments for DT): for tests
# of the plumbing, not of learning
SMALL = {"cql.py": ["--hidden-dim", "32", "--cql-n-actions", "2"], "dt.py": ["--embedding-dim", "16", "--seq-len", "5"]}
SMALL |= {name: ["--hidden-dim", "32", "--num-critics", "4"] for name in ("sac_n.py", "edac.py")}


def small(algo: str) -> list:
    return SMALL.get(algo, ["--hidden-dim", "32"])


def run_dir_of(output: Path) -> Path:
    """The one run folder in an --output folder."""
    (run_dir,) = [p for p in output.iterdir() if p.is_dir()]
    return run_dir


def script_checkpoint(algo: str, file: Path, obs_dim: int, low: list, high: list, **args):
    """A checkpoint file of an algorithm script, as its runs write one for acting: its actor with random weights (its
    own make_networks; Args(hidden_dim=16, **args), DT's embedding_dim=16, seq_len=5), asymmetric normalization
    statistics. Returns the script's Policy around it too."""
    import dataclasses
    import importlib

    module = importlib.import_module(algo)
    torch.manual_seed(0)
    size = {"embedding_dim": 16, "seq_len": 5} if algo == "dt" else {"hidden_dim": 16}
    args = module.Args(**{**size, "env": PENDULUM, **args})
    actor = module.make_networks(args, obs_dim, len(low))["actor"].eval()
    stats = {
        "obs_mean": torch.randn(obs_dim),
        "obs_std": torch.rand(obs_dim) + 0.5,
        "action_low": torch.tensor(low, dtype=torch.float32),
        "action_high": torch.tensor(high, dtype=torch.float32),
    }
    ckpt = {"algo": algo, "args": dataclasses.asdict(args), "actor": actor.state_dict(), "normalization": stats}
    ckpt.update(minari_id=args.env, step=0)
    torch.save(ckpt, file)
    return module.Policy(actor, stats)


def assert_user_error(result, *phrases):
    """Exit code 2, one readable message, no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    for phrase in phrases:
        assert phrase in out, out


def assert_same_networks(nets: dict, ref: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every parameter and buffer of every network equal to the reference's, to float32 precision."""
    for name in nets:
        for (key, p), p_ref in zip(nets[name].state_dict().items(), ref[name].state_dict().values(), strict=True):
            torch.testing.assert_close(p, p_ref, rtol=rtol, atol=atol, msg=f"{name}.{key}")


def seeded_steps(update, batch: dict, steps: int) -> dict:
    """update(batch, step) for steps 1..steps after torch.manual_seed(1): the last step's metrics."""
    torch.manual_seed(1)
    for step in range(1, steps + 1):
        metrics = update(batch, step)
    return metrics


def assert_steps_equal_reference(nets: dict, update, batch: dict, steps: int, reference, names=None) -> None:
    """steps of update(batch, step) against reference() -> (its networks, its metrics), written out sequentially from
    the same weights and torch seed: the networks, and the metrics in names (default: every metric it gives)."""
    torch.manual_seed(1)
    ref, expected = reference()
    metrics = seeded_steps(update, batch, steps)
    assert_same_networks(nets, ref)
    for name in expected if names is None else names:
        torch.testing.assert_close(metrics[f"losses/{name}"], expected[name], rtol=1e-5, atol=1e-6)


def fixed_batch(size: int, obs_dim: int, act_dim: int, next_actions: bool) -> dict:
    """A fixed random batch (generator seed 42) as update(batch, step) reads it; the next actions NaN for an algorithm
    that must never read them."""
    g = torch.Generator().manual_seed(42)
    batch = {
        "obs": torch.randn(size, obs_dim, generator=g),
        "actions": torch.rand(size, act_dim, generator=g) * 2 - 1,
        "rewards": torch.randn(size, generator=g),
        "next_obs": torch.randn(size, obs_dim, generator=g),
        "dones": (torch.rand(size, generator=g) < 0.2).float(),
        "next_actions": torch.full((size, act_dim), float("nan")),
    }
    if next_actions:
        batch["next_actions"] = torch.rand(size, act_dim, generator=g) * 2 - 1
    return batch


def metrics_and_moved_networks(nets: dict, update, batch: dict, steps: int) -> tuple:
    """update(batch, step) for steps 1..steps: each step's metrics (the same keys every step, all detached) and the
    set of networks whose first layer it changed."""
    all_metrics, moved = [], []
    for step in range(1, steps + 1):
        before = copy.deepcopy(nets)
        metrics = update(batch, step)
        assert all(not m.requires_grad for m in metrics.values())
        assert not all_metrics or set(metrics) == set(all_metrics[0])
        all_metrics.append(metrics)
        moved.append({name for name in nets if not torch.equal(nets[name].net[0].weight, before[name].net[0].weight)})
    return all_metrics, moved


def compiled_and_eager_updates(build, steps: int = 6) -> dict:
    """{compile: (nets, last metrics, dynamo's unique-graph count before step 1 and after each step)} for the learner
    build(compile) returns as (args, nets, update, batch); both draw the same random numbers."""
    from torch._dynamo.utils import counters

    runs = {}
    for compile in (False, True):
        _, nets, update, batch = build(compile)
        torch.manual_seed(1)
        graphs = [counters["stats"]["unique_graphs"]]
        with torch._inductor.config.patch(fallback_random=True):  # the same random numbers as eager
            for step in range(1, steps + 1):
                metrics = update(batch, step)
                graphs.append(counters["stats"]["unique_graphs"])
        runs[compile] = nets, metrics, graphs
    return runs


def assert_compiled_equals_eager(runs: dict) -> None:
    """The compiled run's metrics and networks equal the eager run's, to compilation's float tolerance."""
    (eager_nets, m_eager, _), (compiled_nets, m_compiled, _) = runs[False], runs[True]
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-4, atol=1e-5)
    assert_same_networks(compiled_nets, eager_nets, rtol=1e-4, atol=1e-5)


def assert_invalid(script, flags: dict, message: str) -> None:
    """The script's validate refuses Args(**flags): a UserError about invalid hyperparameters that names the problem."""
    with pytest.raises(script.UserError, match="invalid hyperparameters") as error:
        script.validate(script.Args(**flags))
    assert message in str(error.value)


def assert_bf16_close(fp32, bf16, batch: dict, steps: int, ran: str, names: tuple) -> None:
    """The same steps of a float32 and a bf16 update (torch seeded alike): the bf16 run's metric `ran` differs (bf16
    really ran), and its metrics in names are float32 and within 3 % of the float32 run's (absolute 3e-4 near zero)."""
    m32, m16 = seeded_steps(fp32, batch, steps), seeded_steps(bf16, batch, steps)
    assert m16[f"losses/{ran}"].item() != m32[f"losses/{ran}"].item()
    for k in names:
        m, ref = m16[f"losses/{k}"], m32[f"losses/{k}"]
        assert m.dtype == torch.float32
        assert abs(m.item() - ref.item()) / max(abs(ref.item()), 1e-2) < 0.03, (k, m.item(), ref.item())
