"""Grids of offline RL runs (algorithms x datasets x seeds) as Ray tasks, on this machine or on a Ray cluster.

Each run is one Ray task that starts the unchanged script (iql.py, cql.py, td3_bc.py, rebrac.py, bc.py, awac.py, dt.py)
as a subprocess; the scripts never import Ray. Run folders are fixed by the grid, <output>/<env>__<algo>__<seed>, so
launching the same grid again skips completed runs and resumes interrupted ones from their checkpoints/last.pt. Without
--address Ray starts on this machine; with --address the same command runs on a Ray cluster (`ray start`, SLURM,
Kubernetes). Ctrl-C stops every run cleanly: each script gets SIGTERM, writes its checkpoint and exits. Results: `python
report.py <output>`. README section "Running many experiments".

    python sweep.py --algos iql cql --envs door-human-v2 pen-human-v2 --seeds 0 1 2 3 -- --eval-every 10000
    python sweep.py configs/grids/adroit.yaml [--dry-run]
"""

import ctypes
import dataclasses
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
ALGOS = ("iql", "cql", "td3_bc", "rebrac", "bc", "awac", "sac_n", "edac", "dt")
MARKER = ".sweep_running"  # "<host> <pid>" of the script while a task runs it; removed when the script has exited
FORWARDED_ENV = ("MINARI_DATASETS_PATH", "MUJOCO_GL", "HF_HUB_OFFLINE", "WANDB_PROJECT")  # driver -> every run


@dataclass
class Args:
    # YAML grid file: values of the flags below, plus `flags:` {all: ..., iql: ..., td3_bc: ...}, extra flags of the
    # scripts for every run and per algorithm; flags on the command line override the file
    grid: Annotated[str | None, tyro.conf.Positional, tyro.conf.arg(metavar="[GRID.yaml]")] = None
    # the scripts
    algos: list[Literal[ALGOS]] = field(default_factory=lambda: ["iql"])
    envs: list[str] = field(default_factory=list)  # datasets as --env takes them (door-human-v2, local/pendulum/...)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # seeds (CORL's protocol: 4)
    total_steps: int | None = None  # gradient steps of every run; default: the scripts' own (1M)
    output: str = "runs"  # parent of the run folders <env>__<algo>__<seed>; on a cluster, on a shared filesystem
    threads: int = 1  # CPU threads per run: its Ray CPU request and OMP_NUM_THREADS
    gpus_per_run: float = 0.0  # GPUs per run: 0.25 packs four runs on a GPU; 0 hides GPUs (CUDA_VISIBLE_DEVICES="")
    address: str | None = None  # Ray cluster to join ("auto" on a cluster node, or host:6379); default: a local Ray
    num_cpus: int | None = None  # CPUs of the local Ray (default: all of this machine's); ignored with --address
    max_retries: int = 3  # times Ray restarts a crashed or preempted run (it resumes from its last checkpoint)
    dry_run: bool = False  # print what each run would do (skip, or its resume/start command), start nothing


class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


@dataclass(frozen=True)
class Run:
    name: str
    dir: str
    start: list  # script and flags of a fresh start
    resume: list  # script --resume <dir> [--device X]: a resumed run takes everything else from its checkpoint
    env: dict  # environment variables of the script


# -------- The grid: arguments, validation, runs -----------------------------------------------------------------------
def as_flags(grid: dict) -> list:
    """{"algos": ["iql"], "total_steps": 1000} -> ["--algos", "iql", "--total-steps", "1000"]: a grid file goes
    through tyro like flags, so its keys and types are checked by the same rules."""
    flags = []
    for key, value in grid.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return flags


def read_grid(file: str) -> dict:
    """A grid file: UTF-8 YAML (yaml.safe_load: data only), a mapping of sweep.py's flags to a value or a list of
    values, and `flags:`, a mapping of all/iql/cql/td3_bc/rebrac to a string of the scripts' flags or a list of them.
    Anything else is a UserError that names the file."""
    try:
        grid = yaml.safe_load(Path(file).read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        where = f"byte {e.object[e.start]:#x} at offset {e.start}"
        raise UserError(f"the grid file {file} is not UTF-8 text ({where}): save it as UTF-8") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the grid file {file}: {' '.join(str(e).split())}") from None
    extra = grid.get("flags", {}) if isinstance(grid, dict) else None
    if not isinstance(extra, dict) or set(extra) - {"all", *ALGOS}:
        raise UserError(
            f"the grid file {file} must be a mapping of sweep.py's flags, its `flags:` a mapping of "
            f"{'/'.join(('all', *ALGOS))} to extra flags of the scripts (see configs/grids/)"
        )

    def plain(value) -> bool:  # a string, number or boolean, or a list of them
        return all(isinstance(v, str | int | float) for v in (value if isinstance(value, list) else [value]))

    for key, value in grid.items():
        if key != "flags" and not plain(value):
            raise UserError(f"in the grid file {file}: {key} takes a value or a list of values, not {value!r:.100}")
    for key, value in extra.items():
        if not isinstance(value, str | list) or not plain(value):
            raise UserError(
                f'in the grid file {file}: flags: {key} takes the scripts\' flags as a string ("--hidden-dim 32") '
                f"or a list of strings, not {value!r:.100}"
            )
        try:
            shlex.split(value if isinstance(value, str) else "")
        except ValueError as e:  # an unclosed quote
            problem = f"cannot be split into flags ({e}): {value!r:.100}"
            raise UserError(f"in the grid file {file}: flags: {key} {problem}") from None
    return grid


def parse_args(argv: list) -> tuple:
    """Grid file < flags. Returns Args and, per algorithm, the extra flags of its runs (grid `flags:` all, the
    algorithm's own, then everything after `--` on the command line)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = tyro.cli(Args, args=argv, description=__doc__)
    grid = read_grid(args.grid) if args.grid else {}
    if args.grid:
        try:  # the file alone first, so that an error in it names it
            from_grid = tyro.cli(Args, args=as_flags({k: v for k, v in grid.items() if k != "flags"}))
        except SystemExit:
            raise UserError(f"in the grid file {args.grid}: its keys are sweep.py's flags (see above)") from None
        args = tyro.cli(Args, args=argv, default=dataclasses.replace(from_grid, grid=args.grid))
    flags = {k: shlex.split(v) if isinstance(v, str) else list(map(str, v)) for k, v in grid.get("flags", {}).items()}
    return args, {algo: [*flags.get("all", []), *flags.get(algo, []), *passthrough] for algo in ALGOS}


def validate(args: Args) -> None:
    where = f"in {args.grid}: " if args.grid else ""
    checks = [
        (args.algos and args.envs and args.seeds, "give algorithms, datasets and seeds (--algos, --envs, --seeds)"),
        (len(set(args.seeds)) == len(args.seeds), f"seeds must be distinct, got {args.seeds}"),
        (args.total_steps is None or args.total_steps > 0, "total_steps must be > 0"),
        (args.threads > 0 and args.max_retries >= 0, "threads must be > 0 and max_retries >= 0"),
        (0 <= args.gpus_per_run <= 1 or args.gpus_per_run.is_integer(), "gpus_per_run: a fraction or whole GPUs"),
    ]
    if errors := [msg for ok, msg in checks if not ok]:
        raise UserError(where + "; ".join(errors) + ".")


def check_datasets(args: Args, envs: set) -> None:
    """The scripts' own name resolution (importing a script runs nothing); on this machine, a local dataset."""
    store = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    for algo in args.algos:
        script = importlib.import_module(algo)
        for env in sorted(envs):
            try:
                dataset_id = script.resolve_dataset_name(env)[0]
            except script.UserError as e:
                raise UserError(f"{'in ' + args.grid + ': ' if args.grid else ''}{e}") from None
            if not args.address and not (store / dataset_id).is_dir():
                how = (
                    (
                        f"download it once before the sweep, so that parallel runs do not each fetch it: `minari "
                        f"download {dataset_id}`"
                    )
                    if dataset_id.startswith(("D4RL/", "mujoco/"))
                    else 'record it with collect.py (README, "Offline quickstart")'
                )
                message = f"dataset {env} ({dataset_id}) is not in the local Minari store {store}: {how}"
                if not args.dry_run:
                    raise UserError(message)
                print(f"warning: {message}")


def make_runs(args: Args, flags: dict) -> list:
    """One Run per (env, algo, seed), in this order."""
    output = Path(args.output).resolve()
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TQDM_MININTERVAL": "10"}
    if not args.gpus_per_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a run that asked Ray for no GPU must not take one
    runs = []
    for env_name in args.envs:
        for algo in args.algos:
            extra = flags[algo]
            device = [f for i, f in enumerate(extra) if f.startswith("--device") or extra[i - 1 : i] == ["--device"]]
            for seed in args.seeds:
                name = f"{env_name.replace('/', '-')}__{algo}__{seed}"
                start = [f"{algo}.py", "--env", env_name, "--seed", str(seed), "--output", str(output)]
                start += ["--run-name", name] + (["--total-steps", str(args.total_steps)] if args.total_steps else [])
                resume = [f"{algo}.py", "--resume", str(output / name), *device]
                runs.append(Run(name, str(output / name), start + extra, resume, env))
    return runs


# -------- State of a run folder ---------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    """A JSON object, or None for a missing, damaged or other file."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def state_of(run: Run, total_steps: int | None) -> str:
    """completed, resume or start; a run folder of other --total-steps is a user error (resuming keeps them)."""
    run_dir = Path(run.dir)
    try:
        saved = yaml.safe_load((run_dir / "args.yaml").read_text()) if (run_dir / "args.yaml").exists() else None
    except (OSError, ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        print(f"warning: {run_dir / 'args.yaml'} is damaged ({type(e).__name__}); its --total-steps is not checked")
        saved = None
    saved = saved if isinstance(saved, dict) else None
    if total_steps and (saved or {}).get("total_steps", total_steps) != total_steps:
        raise UserError(
            f"{run_dir} was started with --total-steps {saved['total_steps']}, the grid asks for "
            f"{total_steps}. A resumed run keeps its settings: use another --output, or delete it."
        )
    if (read_json(run_dir / "summary.json") or {}).get("completed"):
        return "completed"
    return "resume" if (run_dir / "checkpoints" / "last.pt").exists() else "start"


def alive(run: Run, anywhere: bool = False) -> bool:
    """Does a task run it? Its marker names the script's host and pid: here, the process must be alive (not a
    zombie); on another host (anywhere=True) the marker stands until the task removes it."""
    try:
        host, pid = (Path(run.dir) / MARKER).read_text().split()
        if host != socket.gethostname():
            return anywhere
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # state after "(name)"
    except (OSError, ValueError, IndexError):
        return False


# -------- One run: a Ray task that starts the script ------------------------------------------------------------------
def run_task(run: Run) -> dict:
    """Start the script (resuming when a checkpoint exists: also on Ray's retries), wait, report. A crash raises,
    so that Ray retries; exit 0 (done), 2 (user error) and 3 (non-finite losses) do not: a retry cannot help."""
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *(run.resume if (run_dir / "checkpoints" / "last.pt").exists() else run.start)]
    libc = ctypes.CDLL(None) if sys.platform == "linux" else None
    # Ray's cancel raises KeyboardInterrupt through SIGINT's Python handler: a worker that inherited an ignored
    # SIGINT (sweep.py started with nohup or `&`) would never see it
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def child_setup():  # in the child, before exec
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # Ray workers block SIGINT; the script needs its signals
        if libc is not None:
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: if this worker dies, the script is told to stop

    with open(run_dir / "log.txt", "a") as log:
        log.write(f"\n[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **run.env}, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup
        )
        (run_dir / MARKER).write_text(f"{socket.gethostname()} {proc.pid}")
        try:
            while (code := proc.poll()) is None:  # short sleeps, not a blocking wait: Ray's cancel must get through
                time.sleep(0.2)
        except BaseException:  # cancelled (Ctrl-C on sweep.py): SIGTERM makes the script checkpoint and exit
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            (run_dir / MARKER).unlink(missing_ok=True)
    lines = [line for line in re.split(r"[\r\n]+", (run_dir / "log.txt").read_text(errors="replace")) if line.strip()]
    tail = "\n".join(lines[-15:])  # split at \r too: progress bars are one line each
    if code not in (0, 2, 3):
        raise RuntimeError(f"{run.name}: {shlex.join(cmd[1:])} exited with code {code}\n{tail}")
    return {"name": run.name, "code": code, "summary": read_json(run_dir / "summary.json"), "tail": tail}


# -------- The driver --------------------------------------------------------------------------------------------------
def start_ray(args: Args):
    try:
        import ray
    except ImportError:
        raise UserError("sweep.py needs Ray: pip install 'ray>=2.9' (or pip install -e '.[sweep]')") from None
    if args.address and args.address != "auto":  # ray.init waits minutes for an unreachable cluster: ask first
        host, _, port = args.address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise UserError(
                f"no Ray cluster at --address {args.address} ({e}). Start one with `ray start --head` "
                "and pass the address it prints (host:6379), or leave --address out."
            ) from None
    local = {} if args.address else {"num_cpus": args.num_cpus}
    try:
        ray.init(
            address=args.address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            **local,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        hint = " A cluster with token authentication (recent Ray) also needs RAY_AUTH_MODE=token here and its token "
        hint += "(~/.ray/auth_token or RAY_AUTH_TOKEN); --address auto on a cluster node finds both."
        where = f"join Ray at --address {args.address}" if args.address else "start Ray on this machine"
        raise UserError(f"cannot {where}: {e}.{hint if args.address else ''}") from None
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    biggest = {k: max(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    if args.threads > biggest["CPU"] or args.gpus_per_run > biggest["GPU"]:
        message = (
            f"each run asks for {args.threads} CPUs and {args.gpus_per_run} GPUs, but the largest node has "
            f"{biggest['CPU']:g} CPUs and {biggest['GPU']:g} GPUs: Ray would wait forever"
        )
        if not args.address:
            ray.shutdown()
            raise UserError(message)
        print(f"warning: {message} (unless the cluster scales up)")
    if biggest["GPU"] and not args.gpus_per_run:
        print(f"note: the cluster has GPUs but --gpus-per-run is 0: the runs train on CPUs ({args.threads} threads)")
    return ray


def describe(summary: dict | None) -> str:
    """final and best normalized score (raw return without reference scores), steps, wall time."""
    s = summary or {}
    kind = "score" if s.get("final_normalized_score") is not None else "return"
    final, best = (s.get(f"{w}_normalized_score" if kind == "score" else f"{w}_return") for w in ("final", "best"))
    numeric = all(isinstance(x, int | float) for x in (final, best))
    numbers = f"final {kind} {final:.1f}, best {best:.1f}" if numeric else "no evaluation"
    return f"{numbers} ({s.get('steps')} steps, {s.get('wall_seconds') or 0:.0f} s)"


def main(argv: list) -> int:
    args, flags = parse_args(argv)
    validate(args)
    runs = make_runs(args, flags)
    states = {run.name: state_of(run, args.total_steps) for run in runs}
    for run in runs:
        if alive(run):
            raise UserError(f"{run.name} is being run by another process here (another sweep?); stop it first")
        (Path(run.dir) / MARKER).unlink(missing_ok=True)  # left behind by a killed worker
    todo = [run for run in runs if states[run.name] != "completed"]
    check_datasets(args, {run.start[2] for run in todo})
    counts = {s: list(states.values()).count(s) for s in ("completed", "resume", "start")}
    print(
        f"{len(runs)} runs in {args.output}: {counts['completed']} completed (skipped), {counts['resume']} to "
        f"resume from their checkpoints, {counts['start']} to start"
    )
    if args.dry_run:
        for run in runs:
            cmd = run.resume if states[run.name] == "resume" else run.start
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items() if k not in FORWARDED_ENV)
            print(f"# {run.name}: completed" if states[run.name] == "completed" else f"{env} python {shlex.join(cmd)}")
        return 0
    if not todo:
        return 0

    ray = start_ray(args)
    options = {
        "num_cpus": args.threads,
        "num_gpus": args.gpus_per_run,
        "max_retries": args.max_retries,
        "retry_exceptions": True,
    }
    task = ray.remote(run_task)
    pending = {task.options(name=run.name, **options).remote(run): run for run in todo}
    failed, status = [], None
    bar = tqdm(total=len(runs), initial=counts["completed"], unit="run", dynamic_ncols=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (e.g. from SLURM) stops runs like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with `&`, which ignores SIGINT
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                run = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # crashed at every retry
                    result = {"name": run.name, "code": None, "tail": str(e).split("\n", 1)[-1]}
                if result["code"] == 0:
                    tqdm.write(f"done   {run.name}: {describe(result['summary'])}")
                else:
                    failed.append(result)
                    tqdm.write(f"FAILED {run.name} (exit code {result['code']}); log: {run.dir}/log.txt")
                bar.update(1)
            running = sum(alive(run, anywhere=True) for run in pending.values())
            if status != (status := f"running {running}, failed {len(failed)}"):  # redraw on changes only
                bar.set_postfix_str(status)
    except KeyboardInterrupt:
        bar.close()
        print("\ninterrupted: stopping the runs (each script writes its checkpoint) ...", flush=True)
        for ref in pending:
            try:
                ray.cancel(ref)
            except Exception:  # Ctrl-C in a terminal also reaches the local Ray, whose workers may be gone already
                pass
        deadline = time.time() + 120
        while time.time() < deadline and any(alive(run, anywhere=True) for run in pending.values()):
            time.sleep(0.2)
        ray.shutdown()
        print(f"stopped. Launch the same command again to resume: python sweep.py {shlex.join(argv)}")
        return 130
    bar.close()
    ray.shutdown()
    for result in failed:
        print(f"\n---- {result['name']} failed (exit code {result['code']}); the end of its log:\n{result['tail']}")
    if failed:
        print(
            f"\n{len(failed)} of {len(runs)} runs failed: {', '.join(r['name'] for r in failed)}. Launching the same "
            "command again retries them (completed runs are skipped)."
        )
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
