"""What growing data costs: time to the first training step, peak memory and steps/s at 100k, 1M (and 3M)
transitions, for iql.py and cql.py, next to the buffer's bytes and the time to read the raw arrays.

    python benchmarks/scale.py                 # 100k and 1M transitions, Humanoid-v5-shaped (obs 348, actions 17)
    python benchmarks/scale.py --sizes 100000 1000000 3000000 --store /big/disk/minari

Datasets are synthetic (random observations, 1000-step episodes) but real Minari datasets, built once in `--store`
and reused. Each script runs as a user runs it (a subprocess, `--eval-episodes 0`), and its own peak resident
memory is read from the kernel (`os.wait4`). Time to first step: from the process start to its "dataset ..."
line, printed after the buffer is built and before the networks (the networks take milliseconds). Loading is
also timed in-process against reading the same arrays straight from the HDF5 file with h5py, both from the page
cache and (as root, which can drop the cache) both from the disk.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
import tyro
from minari.data_collector import EpisodeBuffer

ROOT = Path(__file__).resolve().parent.parent
OBS_DIM, ACT_DIM, EPISODE = 348, 17, 1000  # Humanoid-v5's spaces


@dataclass
class Args:
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    """dataset sizes in transitions (3_000_000 needs ~8.5 GB of disk and ~5 GB of memory per run)"""
    algos: tuple[str, ...] = ("iql", "cql")
    """which scripts to run"""
    steps: int = 1000
    """training steps per run (steps/s is the script's own, evaluation excluded)"""
    store: str = ""
    """MINARI_DATASETS_PATH for the synthetic datasets; default: a folder under the system temp dir"""
    threads: int = 2
    """torch/OpenMP threads of the training runs"""


def build(dataset_id: str, transitions: int) -> None:
    """A Humanoid-shaped dataset written 50 episodes at a time, so building it never holds it all in memory."""
    if dataset_id in minari.list_local_datasets():
        return
    env, rng = gym.make("Humanoid-v5"), np.random.default_rng(0)
    episodes = []
    for i in range(transitions // EPISODE):
        episodes.append(
            EpisodeBuffer(
                id=i,
                observations=rng.standard_normal((EPISODE + 1, OBS_DIM)),
                actions=rng.uniform(-0.4, 0.4, (EPISODE, ACT_DIM)).astype(np.float32),
                rewards=rng.standard_normal(EPISODE),
                terminations=np.zeros(EPISODE, bool),
                truncations=np.arange(EPISODE) == EPISODE - 1,
                infos={},
            )
        )
        if len(episodes) == 50 or i == transitions // EPISODE - 1:
            if dataset_id in minari.list_local_datasets():
                minari.load_dataset(dataset_id).update_dataset_from_buffer(episodes)
            else:
                minari.create_dataset_from_buffers(dataset_id, episodes, env=env, algorithm_name="synthetic")
            episodes = []


def raw_read_seconds(dataset_id: str) -> float:
    """Every episode's arrays read straight from main_data.hdf5: the floor for any loader."""
    path = Path(minari.load_dataset(dataset_id).storage.data_path) / "main_data.hdf5"
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        for group in f.values():
            for key in ("observations", "actions", "rewards", "terminations"):
                group[key][()]
    return time.perf_counter() - start


def load_seconds(dataset_id: str) -> tuple[float, int]:
    """iql.py's own loader (load_buffer) in this process, and the bytes of the buffer it builds."""
    sys.path.insert(0, str(ROOT))
    import iql

    dataset = iql.load_dataset(dataset_id)
    start = time.perf_counter()
    buffer, _ = iql.load_buffer(dataset, iql.Args(), torch.device("cpu"))
    seconds = time.perf_counter() - start
    return seconds, sum(t.numel() * t.element_size() for t in (buffer.obs, buffer.steps, buffer.rows))


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that the next read comes from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def read_and_load_seconds(dataset_id: str) -> dict:
    """The raw read and load_buffer side by side under the same conditions: from the page cache (the fastest of
    two alternated repeats after a warm-up read) and, where the cache can be dropped, each from the disk."""
    raw_read_seconds(dataset_id)
    warm = [(raw_read_seconds(dataset_id), load_seconds(dataset_id)) for _ in range(2)]
    times = {"raw": min(r for r, _ in warm), "load": min(load for _, (load, _) in warm), "bytes": warm[0][1][1]}
    if drop_page_cache():
        times["raw_cold"] = raw_read_seconds(dataset_id)
        drop_page_cache()
        times["load_cold"] = load_seconds(dataset_id)[0]
    return times


def run_script(algo: str, dataset_id: str, args: Args, out: Path) -> dict:
    """One training run; returns seconds to the first step, peak RSS (bytes) and the script's steps/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        str(ROOT / f"{algo}.py"),
        "--env",
        dataset_id,
        "--total-steps",
        str(args.steps),
        "--log-every",
        str(args.steps // 4),
        "--eval-episodes",
        "0",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--run-name",
        algo,
    ]
    start, first_step = time.perf_counter(), None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if first_step is None and line.startswith("dataset "):
            first_step = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{algo}.py failed on {dataset_id} (status {status})")
    summary = json.loads((out / algo / "summary.json").read_text())
    return {"first_step_s": first_step, "peak_rss": usage.ru_maxrss * 1024, "sps": summary["sps"]}


def main(args: Args) -> None:
    store = Path(args.store or Path(tempfile.gettempdir()) / "minari-scale")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    rows = []
    for n in args.sizes:
        dataset_id = f"bench/humanoid/synthetic-{n // 1000}k-v0"
        t = time.perf_counter()
        build(dataset_id, n)
        print(f"{dataset_id}: ready in {time.perf_counter() - t:.0f} s", flush=True)
        times = read_and_load_seconds(dataset_id)
        with tempfile.TemporaryDirectory() as out:
            runs = {algo: run_script(algo, dataset_id, args, Path(out)) for algo in args.algos}
        rows.append((n, times, runs))
        print(f"{n}: {times}, {runs}", flush=True)

    where = "cached, from disk" if all("raw_cold" in t for _, t, _ in rows) else "cached (from disk needs root)"
    header = ["transitions", "buffer", f"raw read: {where}", f"load_buffer (x raw): {where}"]
    header += [f"{a}: first step, peak RSS (x buffer), steps/s" for a in args.algos]
    print("\n| " + " | ".join(header) + " |")
    print("|---" * (4 + len(args.algos)) + "|")
    for n, t, runs in rows:
        cells = [
            f"{r['first_step_s']:.1f} s, {r['peak_rss'] / 2**30:.2f} GiB ({r['peak_rss'] / t['bytes']:.2f}x), "
            f"{r['sps']:.0f}"
            for r in runs.values()
        ]
        raw, load = f"{t['raw']:.1f} s", f"{t['load']:.1f} s ({t['load'] / t['raw']:.2f}x)"
        if "raw_cold" in t:
            raw, load = (
                f"{raw}, {t['raw_cold']:.1f} s",
                f"{load}, {t['load_cold']:.1f} s ({t['load_cold'] / t['raw_cold']:.2f}x)",
            )
        print(f"| {n:,} | {t['bytes'] / 2**30:.2f} GiB | {raw} | {load} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args))
