"""Results tables, learning curves and aggregate statistics from the summary.json files of many runs.

    python report.py runs/ [more folders] [--out report/]

Reads every summary.json that an algorithm script (iql.py, cql.py, ...) wrote under the given folders (no TensorBoard
parsing), groups the runs by (algorithm, dataset) and writes, following CORL's protocol (final score = the last
evaluation, best = the maximum over evaluations; mean and standard deviation over seeds, numpy's population std,
ddof=0):
  report.md             final and best normalized score as mean ± std (seeds), per-domain averages, warnings
  results.csv           the same numbers unrounded, one row per (algorithm, dataset) and per domain average
  curves_<dataset>.png  normalized score against gradient steps per algorithm: the mean at each evaluation (a
                        marker, so that a single evaluation shows too) and a ±std band
  aggregate.png         with rliable (the [report] extra): IQM and optimality gap with 95% stratified-bootstrap
                        confidence intervals, and performance profiles, over all datasets with reference scores

A dataset without reference scores is reported in raw return (marked †). Docs: docs/sweeps.md.
"""

import csv
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

# Settings that do not change what a run learns: runs may differ in them without a warning
BOOKKEEPING = {
    "env",
    "seed",
    "device",
    "config",
    "output",
    "run_name",
    "resume",
    "track",
    "capture_video",
    "compile",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "wandb_project",
}
PROTOCOL = (
    "Final = the last evaluation, best = the maximum over evaluations; mean ± std over seeds (population std, "
    "ddof=0), the number of seeds in parentheses. Normalized score = 100 · (return − random) / (expert − random) "
    "with the dataset's reference scores; † = raw return (the dataset has none). Domain average = the mean of the "
    "dataset means."
)
# The project is not published on PyPI: its extras install from a checkout of the repository
RLIABLE_HINT = 'pip install -e ".[report]" in the repository (or: pip install rliable "arch<8" "pandas<3")'


@dataclass
class Args:
    # folders holding run folders (searched recursively for summary.json), e.g. runs/ or runs/adroit
    runs: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="FOLDER")]
    out: str = "report"  # where report.md, results.csv and the PNGs go
    include_incomplete: bool = False  # also count unfinished runs (their last evaluation stands in as final)
    reps: int = 50_000  # bootstrap resamples of rliable's confidence intervals (rliable's default)


class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


@dataclass
class Group:
    """The runs of one algorithm on one dataset, with the numbers of the table."""

    algo: str
    dataset: str  # minari id
    runs: list = field(default_factory=list)
    unit: str = "normalized"  # or "return": the dataset has no reference scores
    final: np.ndarray = None
    best: np.ndarray = None
    offline: np.ndarray = None  # fine-tuning runs: the score at the end of the offline phase
    regret: np.ndarray = None  # fine-tuning runs in envs that report success: 1 - the online success rate


# -------- Reading the runs --------------------------------------------------------------------------------------------
def load_runs(folders: list, warn) -> list:
    """Every summary.json of a training run (collect.py's teacher summaries are not), with its folder."""
    runs = []
    if not folders:
        raise UserError("give the folder(s) of the runs: python report.py runs/ [--out report/]")
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{folder} is not a folder: give the --output folder of the runs (e.g. runs/)")
        for path in sorted(Path(folder).rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                warn(f"{path} is not readable JSON ({e}): skipped")
                continue
            if isinstance(summary, dict) and {"algo", "minari_id", "seed", "eval_history"} <= summary.keys():
                runs.append({**summary, "path": str(path.parent), "mtime": path.stat().st_mtime})
    if not runs:
        raise UserError(
            f"no summary.json of an algorithm script's run under {', '.join(folders)}: runs write it with "
            "every checkpoint, into <--output>/<run>/summary.json"
        )
    return runs


def select(runs: list, include_incomplete: bool, warn) -> list:
    """One run per (algo, dataset, seed); incomplete runs and runs without evaluations left out, with warnings."""
    by_seed = defaultdict(list)
    for run in runs:
        by_seed[run["algo"], run["minari_id"], run["seed"]].append(run)
    kept = []
    for (algo, dataset, seed), same in sorted(by_seed.items(), key=str):
        same.sort(key=lambda r: (r["steps"], r["mtime"]), reverse=True)
        if len(same) > 1:
            paths = ", ".join(r["path"] for r in same)
            warn(
                f"duplicate seed: {algo} on {dataset} seed {seed} is in {len(same)} runs ({paths}); kept "
                f"{same[0]['path']} (most steps, then newest)"
            )
        kept.append(same[0])
    incomplete = [r for r in kept if not r.get("completed", r["steps"] >= r.get("total_steps", 0))]
    if incomplete:
        listed = ", ".join(f"{Path(r['path']).name} ({r['steps']}/{r.get('total_steps')} steps)" for r in incomplete)
        action = (
            "included: their last evaluation stands in as final"
            if include_incomplete
            else "left out (--include-incomplete keeps them)"
        )
        warn(f"{len(incomplete)} incomplete runs, {action}: {listed}")
        kept = kept if include_incomplete else [r for r in kept if r not in incomplete]
    if unevaluated := [r for r in kept if r.get("final_return") is None]:
        warn(f"runs without any evaluation, left out: {', '.join(r['path'] for r in unevaluated)}")
    return [r for r in kept if r.get("final_return") is not None]


def make_groups(runs: list, warn) -> dict:
    """(algo, minari id) -> Group with final/best arrays over seeds; warns when runs differ in hyperparameters."""
    groups = {}
    for run in runs:
        groups.setdefault((run["algo"], run["minari_id"]), Group(run["algo"], run["minari_id"])).runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: r["seed"])
        normalized = all(r.get("final_normalized_score") is not None for r in group.runs)
        group.unit = "normalized" if normalized else "return"
        key = ("final_normalized_score", "best_normalized_score") if normalized else ("final_return", "best_return")
        group.final = np.array([r[key[0]] for r in group.runs], dtype=float)
        group.best = np.array([r[key[1]] for r in group.runs], dtype=float)
        offline = [r.get("offline_normalized_score" if normalized else "offline_return") for r in group.runs]
        if all(r.get("online_steps") for r in group.runs) and None not in offline:
            group.offline = np.array(offline, dtype=float)
            regret = [(r.get("online") or {}).get("regret") for r in group.runs]
            group.regret = None if None in regret else np.array(regret, dtype=float)
        values = defaultdict(Counter)
        for run in group.runs:
            for name, value in (run.get("args") or {}).items():
                values[name][json.dumps(value)] += 1
        differ = {
            n: c
            for n, c in values.items()
            if n not in BOOKKEEPING and (len(c) > 1 or sum(c.values()) < len(group.runs))
        }
        if differ:
            details = "; ".join(f"{n}: " + ", ".join(f"{v} in {k}" for v, k in c.items()) for n, c in differ.items())
            warn(f"{group.algo} on {group.dataset}: the runs differ in hyperparameters ({details})")
    return groups


# -------- Tables ------------------------------------------------------------------------------------------------------
def names_and_domains(runs: list) -> tuple:
    """Display name (the --env most runs used) and domain of each dataset."""
    names, domains = defaultdict(Counter), {}
    for run in runs:
        names[run["minari_id"]][run.get("env", run["minari_id"])] += 1
        domains[run["minari_id"]] = run.get("domain") or "other"
    return {d: c.most_common(1)[0][0] for d, c in names.items()}, domains


def table_rows(groups: dict, algos: list, names: dict, domains: dict) -> list:
    """CSV rows, domain by domain: one per (algo, dataset), then per algo the average of its dataset means."""
    rows = []
    for domain in sorted(set(domains.values())):
        datasets = sorted((d for d in domains if domains[d] == domain), key=lambda d: names[d])
        for dataset in datasets:
            for algo in [a for a in algos if (a, dataset) in groups]:
                g = groups[algo, dataset]
                rows.append(
                    {
                        "kind": "dataset",
                        "algo": algo,
                        "dataset": names[dataset],
                        "minari_id": dataset,
                        "domain": domain,
                        "unit": g.unit,
                        "seeds": " ".join(str(r["seed"]) for r in g.runs),
                        "n": len(g.runs),
                        "final_mean": g.final.mean(),
                        "final_std": g.final.std(),
                        "best_mean": g.best.mean(),
                        "best_std": g.best.std(),
                        "offline_mean": None if g.offline is None else g.offline.mean(),
                        "offline_std": None if g.offline is None else g.offline.std(),
                        "regret_mean": None if g.regret is None else g.regret.mean(),
                        "steps": min(r["steps"] for r in g.runs),
                        "wall_hours": np.mean([r.get("wall_seconds") or 0 for r in g.runs]) / 3600,
                    }
                )
        for algo in algos:
            scored = [groups[algo, d] for d in datasets if (algo, d) in groups and groups[algo, d].unit == "normalized"]
            if scored:
                rows.append(
                    {
                        "kind": "domain average",
                        "algo": algo,
                        "dataset": f"{domain} average",
                        "minari_id": "",
                        "domain": domain,
                        "unit": "normalized",
                        "n_datasets": f"{len(scored)} of {len(datasets)}",
                        "final_mean": np.mean([g.final.mean() for g in scored]),
                        "best_mean": np.mean([g.best.mean() for g in scored]),
                    }
                )
    return rows


def markdown_table(rows: list, algos: list, metric: str) -> str:
    """Datasets x algorithms; cells 'mean ± std (seeds)', † for raw returns, domain averages in bold."""
    lines = [f"| dataset | {' | '.join(algos)} |", "|---" * (len(algos) + 1) + "|"]
    cells = defaultdict(dict)
    for row in rows:
        if row["kind"] == "dataset":
            dagger = " †" if row["unit"] == "return" else ""
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells[row["dataset"]][row["algo"]] = f"{mean:.1f} ± {std:.1f} ({row['n']}){dagger}"
        else:
            have, of = row["n_datasets"].split(" of ")
            partial = "" if have == of else f" ({row['n_datasets']} datasets)"
            cells[f"**{row['dataset']}**"][row["algo"]] = f"**{row[metric + '_mean']:.1f}**{partial}"
    for dataset, by_algo in cells.items():
        lines.append(f"| {dataset} | {' | '.join(by_algo.get(a, '–') for a in algos)} |")
    return "\n".join(lines)


def finetuning_table(rows: list, algos: list) -> str | None:
    """Fine-tuning runs as CORL tables them: 'offline -> final' (mean ± std over seeds) per dataset and algorithm,
    and the cumulative regret where the env reports success; None without fine-tuning runs."""
    cells = defaultdict(dict)
    for row in rows:
        if row["kind"] == "dataset" and row["offline_mean"] is not None:
            offline = f"{row['offline_mean']:.1f} ± {row['offline_std']:.1f}"
            cell = f"{offline} → {row['final_mean']:.1f} ± {row['final_std']:.1f}"
            regret = "" if row["regret_mean"] is None else f", regret {row['regret_mean']:.2f}"
            cells[row["dataset"]][row["algo"]] = f"{cell} ({row['n']}{regret})"
    if not cells:
        return None
    lines = [f"| dataset | {' | '.join(algos)} |", "|---" * (len(algos) + 1) + "|"]
    for dataset, by_algo in cells.items():
        lines.append(f"| {dataset} | {' | '.join(by_algo.get(a, '–') for a in algos)} |")
    return "\n".join(lines)


# -------- Plots and aggregates ----------------------------------------------------------------------------------------
def plot_curves(groups: dict, names: dict, domains: dict, out: Path, plt) -> list:
    """curves_<dataset>.png: per algorithm the mean over seeds at each evaluation step, drawn as a line with a
    marker at every evaluation (a run with one evaluation is one point, which a line alone would not show), and a
    ±std band."""
    files = []
    for dataset in sorted({d for _, d in groups}, key=lambda d: (domains[d], names[d])):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (algo, d), g in sorted(groups.items()):
            if d != dataset:
                continue
            key = "normalized_score" if g.unit == "normalized" else "return"
            at = defaultdict(list)
            for run in g.runs:
                for h in run["eval_history"]:
                    at[h["step"]].append(h[key])
            steps = np.array(sorted(at))
            mean, std = np.array([np.mean(at[s]) for s in steps]), np.array([np.std(at[s]) for s in steps])
            ax.plot(steps, mean, marker="o", markersize=4, label=f"{algo} ({len(g.runs)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
            ylabel = "normalized score" if g.unit == "normalized" else "return (no reference scores)"
        ax.set(title=names[dataset], xlabel="gradient steps", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        files.append(out / f"curves_{dataset.replace('/', '-')}.png")
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return files


def aggregates(groups: dict, algos: list, reps: int, warn):
    """rliable over datasets with reference scores that every algorithm has: final scores / 100 as
    (runs x tasks) matrices; seeds beyond the smallest count are dropped (rliable needs equal counts)."""
    tasks = sorted({d for (_, d), g in groups.items() if g.unit == "normalized"})
    tasks = [d for d in tasks if all((a, d) in groups for a in algos)]
    if not tasks:
        return None
    k = min(len(groups[a, d].runs) for a in algos for d in tasks)
    if any(len(groups[a, d].runs) > k for a in algos for d in tasks):
        warn(f"rliable needs as many runs per dataset as per algorithm: the aggregates use the first {k} seeds")
    scores = {a: np.stack([groups[a, d].final[:k] for d in tasks], axis=1) / 100 for a in algos}
    from rliable import library as rly
    from rliable import metrics

    warnings.filterwarnings("ignore", category=FutureWarning, module="arch")  # arch 7 on rliable's random_state

    def iqm_and_gap(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_optimality_gap(x, 1.0)])

    point, ci = rly.get_interval_estimates(scores, iqm_and_gap, reps=reps, random_state=np.random.RandomState(0))
    everything = np.concatenate([s.ravel() for s in scores.values()])
    taus = np.linspace(min(0.0, everything.min()), max(1.0, everything.max()) * 1.05, 81)
    profiles, profile_cis = rly.create_performance_profile(scores, taus, reps=min(reps, 2000))
    return {
        "tasks": tasks,
        "k": k,
        "point": point,
        "ci": ci,
        "taus": taus,
        "profiles": profiles,
        "profile_cis": profile_cis,
    }


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def plot_aggregates(agg: dict, algos: list, out: Path, plt) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for i, title in enumerate(["IQM (normalized score)", "optimality gap (below 100)"]):
        for y, algo in enumerate(algos):
            low, high = 100 * agg["ci"][algo][:, i]
            axes[i].barh(y, high - low, left=low, height=0.5, alpha=0.6)
            axes[i].plot(100 * agg["point"][algo][i], y, "k|", markersize=15)
        axes[i].set(yticks=range(len(algos)), yticklabels=algos, title=title)
        axes[i].grid(axis="x", alpha=0.3)
    for algo in algos:
        axes[2].plot(100 * agg["taus"], agg["profiles"][algo], label=algo)
        axes[2].fill_between(100 * agg["taus"], *agg["profile_cis"][algo], alpha=0.25)
    axes[2].set(title="performance profile", xlabel="normalized score τ", ylabel="fraction of runs with score > τ")
    axes[2].legend()
    fig.suptitle(
        f"{plural(len(agg['tasks']), 'dataset')} x {agg['k']} seeds, 95% stratified-bootstrap confidence intervals",
        y=1.04,
    )
    fig.savefig(out / "aggregate.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out / "aggregate.png"


# -------- main --------------------------------------------------------------------------------------------------------
def main(argv: list) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__)
    warned = []

    def warn(message):
        warned.append(message)
        print(f"warning: {message}", file=sys.stderr)

    runs = select(load_runs(args.runs, warn), args.include_incomplete, warn)
    if not runs:
        raise UserError("no run is left to report (see the warnings); --include-incomplete counts unfinished ones")
    groups = make_groups(runs, warn)
    algos = sorted({a for a, _ in groups})
    names, domains = names_and_domains(runs)
    rows = table_rows(groups, algos, names, domains)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["n_datasets"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        raise UserError(f"cannot write the report into {out}: {e}. Choose another folder with --out.") from None

    md = [
        f"# Results\n\n{len(runs)} runs of {', '.join(algos)} on {plural(len(names), 'dataset')}, from "
        f"{', '.join(args.runs)} ({time.strftime('%Y-%m-%d')}). {PROTOCOL}"
    ]
    for metric in ("final", "best"):
        md.append(f"## {metric.capitalize()} normalized score\n\n{markdown_table(rows, algos, metric)}")
    finetuning = finetuning_table(rows, algos)
    if finetuning is not None:
        md.append(
            "## Offline → online (fine-tuning runs)\n\nThe score at the end of the offline phase → the final score, "
            "mean ± std over seeds (seeds; the cumulative regret, 1 − the online success rate, where the env reports "
            f"success).\n\n{finetuning}"
        )

    md.append("## Aggregates over datasets (rliable)")
    try:
        agg = aggregates(groups, algos, args.reps, warn)
    except Exception as e:  # not installed, or installed with an incompatible arch/pandas
        kind = "is not installed" if isinstance(e, ImportError) else f"failed ({type(e).__name__}: {e})"
        agg, note = None, f"rliable {kind}: no aggregates. To get them: {RLIABLE_HINT}."
        md.append(note)
        print(f"note: {note}", file=sys.stderr)
    else:
        if agg is None:
            md.append("No dataset with reference scores that every algorithm ran: no aggregates.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        md.append("No plots: matplotlib is not installed (pip install matplotlib, or the [report] extra).")
    if agg is not None:
        lines = ["| algorithm | IQM | 95% CI | optimality gap | 95% CI |", "|---|---|---|---|---|"]
        for a in algos:
            (iqm, gap), ((iqm_lo, gap_lo), (iqm_hi, gap_hi)) = 100 * agg["point"][a], 100 * agg["ci"][a]
            lines.append(
                f"| {a} | {iqm:.1f} | [{iqm_lo:.1f}, {iqm_hi:.1f}] | {gap:.1f} | [{gap_lo:.1f}, {gap_hi:.1f}] |"
            )
        md.append(
            f"Final normalized scores of {plural(len(agg['tasks']), 'dataset')} x {agg['k']} seeds; "
            "interquartile mean (IQM) and optimality gap (mean shortfall below 100) with 95% stratified-"
            f"bootstrap confidence intervals ({args.reps} resamples; Agarwal et al., NeurIPS 2021).\n\n"
            + "\n".join(lines)
        )
        if plt is not None:
            md.append(f"![aggregates]({plot_aggregates(agg, algos, out, plt).name})")
    if plt is not None:
        curves = plot_curves(groups, names, domains, out, plt)
        md.append(
            "## Learning curves\n\nMean over seeds at each evaluation, ±std band.\n\n"
            + "\n".join(f"![{p.stem}]({p.name})" for p in curves)
        )

    versions = Counter(", ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or {}).items())) for r in runs)
    commits = Counter(str(r.get("git_commit"))[:12] for r in runs)
    md.append(
        "## Provenance\n\n"
        + "\n".join(
            [f"- {v or 'versions unknown'}: {n} runs" for v, n in versions.items()]
            + [f"- git commit {c}: {n} runs" for c, n in commits.items()]
        )
    )
    if warned:
        md.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in warned))
    (out / "report.md").write_text("\n\n".join(md) + "\n")
    print(f"wrote {out / 'report.md'}, {out / 'results.csv'}" + (" and the plots" if plt else ""))


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
