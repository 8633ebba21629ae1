"""report.py on synthetic summary.json files: the table, the CSV and the curves hold exactly the numbers of the
summaries (numpy's mean and std over seeds), aggregates with rliable or a note without it, warnings for incomplete
runs, duplicate seeds and differing hyperparameters, and clear errors (exit 2) for folders without runs."""

import csv
import json
import re

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

import report

ALGOS = ["cql", "iql"]
DATASETS = {  # minari id: (--env as given, domain, has reference scores)
    "D4RL/door/human-v2": ("door-human-v2", "adroit", True),
    "D4RL/pen/human-v2": ("pen-human-v2", "adroit", True),
    "local/pendulum/random-v0": ("local/pendulum/random-v0", "other", True),
    "local/pointmaze/umaze-random-v0": ("local/pointmaze/umaze-random-v0", "other", False),
}
STEPS = [100, 200, 300]


def write_run(folder, algo, dataset, seed, scores, steps=STEPS, total=300, **args):
    """A summary.json as iql.py / cql.py write it; scores: the normalized score (or return) at each evaluation."""
    env, domain, normalized = DATASETS[dataset]
    history = [
        {
            "step": s,
            "return": v * 10 - 500,
            "return_std": 1.0,
            "length": 200.0,
            "seconds": 0.1,
            "normalized_score": v if normalized else None,
        }
        for s, v in zip(steps, scores, strict=True)
    ]
    key = "normalized_score" if normalized else "return"
    summary = {
        "algo": algo,
        "env": env,
        "minari_id": dataset,
        "domain": domain,
        "seed": seed,
        "steps": steps[-1],
        "total_steps": total,
        "completed": steps[-1] == total,
        "eval_episodes": 10,
        "wall_seconds": 60.0,
        "sps": 5.0,
        "final_normalized_score": history[-1]["normalized_score"],
        "best_normalized_score": max(scores) if normalized else None,
        "final_return": history[-1]["return"],
        "best_return": max(h["return"] for h in history),
        "ref_min_score": -500.0 if normalized else None,
        "ref_max_score": 500.0 if normalized else None,
        "versions": {"torch": "2.x", "minari": "0.5.4"},
        "git_commit": "abc123",
        "args": {"env": env, "seed": seed, "total_steps": total, "beta": 0.5, "run_name": f"{seed}", **args},
        "eval_history": history,
    }
    assert [h[key] for h in history] == list(scores if normalized else [v * 10 - 500 for v in scores])
    run_dir = folder / f"{dataset.replace('/', '-')}__{algo}__{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 seeds x 2 algorithms x 4 datasets of random scores, plus an incomplete run, a duplicate seed, a run with
    another hyperparameter and a collect.py summary (not a training run)."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    complete = {}
    for dataset in DATASETS:
        for algo in ALGOS:
            for seed in range(3):
                beta = 3.0 if (algo, dataset, seed) == ("iql", "D4RL/pen/human-v2", 2) else 0.5
                scores = rng.uniform(-5, 110, size=3).round(3).tolist()
                summary = write_run(root, algo, dataset, seed, scores, beta=beta)
                complete.setdefault((algo, dataset), []).append(summary)
    write_run(root, "iql", "D4RL/door/human-v2", 3, [50.0, 60.0], steps=[100, 200])  # incomplete
    write_run(root / "older", "cql", "D4RL/door/human-v2", 0, [1.0, 2.0], steps=[100, 200], total=200)  # duplicate
    (root / "Pendulum-v1__collect-sac__1__17").mkdir()
    (root / "Pendulum-v1__collect-sac__1__17" / "summary.json").write_text('{"teacher_return": -130.0}')
    return root, complete


@pytest.fixture(scope="module")
def made(runs, tmp_path_factory):
    root, complete = runs
    out = tmp_path_factory.mktemp("report")
    result = run_script("report.py", root, "--out", out, "--reps", "500")
    assert result.returncode == 0, result.stdout + result.stderr
    return out, complete, result


def stats(summaries, normalized, metric):
    key = f"{metric}_normalized_score" if normalized else f"{metric}_return"
    values = np.array([s[key] for s in summaries])
    return values.mean(), values.std()


def test_csv_holds_numpys_mean_and_std_over_the_seeds_of_each_summary(made):
    out, complete, _ = made
    rows = [r for r in csv.DictReader(open(out / "results.csv")) if r["kind"] == "dataset"]
    assert {(r["algo"], r["minari_id"]) for r in rows} == set(complete)
    for row in rows:
        normalized = DATASETS[row["minari_id"]][2]
        assert row["unit"] == ("normalized" if normalized else "return")
        assert row["n"] == "3" and row["seeds"] == "0 1 2" and row["domain"] == DATASETS[row["minari_id"]][1]
        for metric in ("final", "best"):
            mean, std = stats(complete[row["algo"], row["minari_id"]], normalized, metric)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, abs=1e-9)
            assert float(row[f"{metric}_std"]) == pytest.approx(std, abs=1e-9)


def test_markdown_table_cells_are_the_rounded_numbers_and_domain_averages_the_mean_of_means(made):
    out, complete, _ = made
    text = (out / "report.md").read_text()
    final_table = text.split("## Final normalized score")[1].split("##")[0]
    best_table = text.split("## Best normalized score")[1].split("##")[0]
    for table, metric in ((final_table, "final"), (best_table, "best")):
        lines = {
            line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.strip().splitlines()[2:]
        }
        for (algo, dataset), summaries in complete.items():
            env, _, normalized = DATASETS[dataset]
            mean, std = stats(summaries, normalized, metric)
            assert lines[env][ALGOS.index(algo)] == f"{mean:.1f} ± {std:.1f} (3)" + ("" if normalized else " †")
        for algo in ALGOS:  # adroit: door and pen; other: pendulum only (the point maze has no reference scores)
            adroit = np.mean([stats(complete[algo, d], True, metric)[0] for d in DATASETS if "D4RL" in d])
            other = stats(complete[algo, "local/pendulum/random-v0"], True, metric)[0]
            assert lines["**adroit average**"][ALGOS.index(algo)] == f"**{adroit:.1f}**"
            assert lines["**other average**"][ALGOS.index(algo)] == f"**{other:.1f}** (1 of 2 datasets)"


def test_warns_about_incomplete_runs_duplicate_seeds_and_differing_hyperparameters(made):
    out, _, result = made
    text = (out / "report.md").read_text()
    for phrase in (
        "1 incomplete runs, left out",
        "duplicate seed: cql on D4RL/door/human-v2 seed 0",
        "iql on D4RL/pen/human-v2: the runs differ in hyperparameters (beta: 0.5 in 2, 3.0 in 1)",
    ):
        assert phrase in result.stderr and phrase in text
    assert "Traceback" not in result.stderr and "collect" not in result.stderr


def test_curves_and_aggregates_are_written(made):
    out, _, _ = made
    for dataset in DATASETS:
        with Image.open(out / f"curves_{dataset.replace('/', '-')}.png") as image:
            assert image.width > 300 and image.height > 200
    assert Image.open(out / "aggregate.png").width > 600
    text = (out / "report.md").read_text()
    iqm = re.search(r"\| iql \| (-?[\d.]+) \| \[(-?[\d.]+), (-?[\d.]+)\] \|", text)
    assert iqm and float(iqm[2]) <= float(iqm[1]) <= float(iqm[3])
    assert "3 datasets x 3 seeds" in text  # the point maze has no reference scores: not in the aggregates


def test_curves_plot_the_mean_and_std_of_the_evaluations_at_each_step(runs, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, complete = runs
    selected = report.select(report.load_runs([str(root)], print), False, print)
    groups = report.make_groups(selected, print)
    names, domains = report.names_and_domains(selected)
    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figures to read their lines
    files = report.plot_curves(groups, names, domains, tmp_path, plt)
    for path, number in zip(files, plt.get_fignums(), strict=True):
        ax = plt.figure(number).axes[0]
        dataset = next(d for d in DATASETS if path.name == f"curves_{d.replace('/', '-')}.png")
        key = "normalized_score" if DATASETS[dataset][2] else "return"
        for line, algo in zip(ax.lines, ALGOS, strict=True):
            values = np.array([[h[key] for h in s["eval_history"]] for s in complete[algo, dataset]])
            assert line.get_label() == f"{algo} (3 seeds)"
            assert list(line.get_xdata()) == STEPS
            np.testing.assert_allclose(line.get_ydata(), values.mean(axis=0))
        band = ax.collections[0].get_paths()[0].vertices[:, 1]  # fill_between: mean - std and mean + std
        values = np.array([[h[key] for h in s["eval_history"]] for s in complete["cql", dataset]])
        assert np.isclose(band.min(), (values.mean(0) - values.std(0)).min())
    plt.close("all")


def test_a_curve_with_a_single_evaluation_is_drawn_as_a_visible_marker(tmp_path, monkeypatch):
    """A line through one point draws nothing (and its ±std band is empty): each evaluation carries a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for seed in range(2):
        write_run(tmp_path / "runs", "iql", "D4RL/door/human-v2", seed, [40.0 + seed], steps=[300])
    selected = report.select(report.load_runs([str(tmp_path / "runs")], print), False, print)
    groups = report.make_groups(selected, print)
    names, domains = report.names_and_domains(selected)
    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figure to read and render it
    (path,) = report.plot_curves(groups, names, domains, tmp_path, plt)
    fig = plt.figure(plt.get_fignums()[-1])
    ax = fig.axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == [300] and list(line.get_ydata()) == [40.5]
    assert line.get_marker() not in (None, "", " ", "None", "none") and line.get_markersize() > 0
    ax.get_legend().remove()  # the legend's sample would show the colour even without a marker
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    colour = (np.array(matplotlib.colors.to_rgb(line.get_color())) * 255).round().astype(int)
    assert (np.abs(pixels - colour).max(axis=-1) <= 8).sum() >= 10  # the marker's pixels, in the line's colour
    plt.close("all")
    assert path.is_file()


def test_without_rliable_the_report_says_how_to_get_the_aggregates(runs, tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "rliable").mkdir(parents=True)
    (hidden / "rliable" / "__init__.py").write_text("raise ImportError('hidden by the test')")
    result = run_script("report.py", runs[0], "--out", tmp_path / "r", env={"PYTHONPATH": str(hidden)})
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    assert "rliable is not installed" in text and 'pip install -e ".[report]" in the repository' in text
    assert not (tmp_path / "r" / "aggregate.png").exists() and (tmp_path / "r" / "results.csv").exists()


@pytest.mark.parametrize("case", ["empty", "missing", "only incomplete"])
def test_folders_without_reportable_runs_are_a_clear_error(case, tmp_path):
    if case == "only incomplete":
        write_run(tmp_path, "iql", "D4RL/door/human-v2", 0, [1.0], steps=[100])
    folder = tmp_path / "nothing-here" if case == "missing" else tmp_path
    result = run_script("report.py", folder, "--out", tmp_path / "r")
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out, out
    assert {"empty": "no summary.json", "missing": "is not a folder", "only incomplete": "no run is left"}[case] in out


def test_fine_tuning_runs_get_an_offline_to_online_table_with_the_regret(tmp_path):
    """Two seeds fine-tuned online: the offline score (at the end of the offline phase) -> the final one, as CORL's
    fine-tuning tables; the regret is the mean over seeds of 1 - the online success rate."""
    for seed, (offline, final, regret) in enumerate([(40.0, 70.0, 0.2), (60.0, 90.0, 0.4)]):
        summary = write_run(tmp_path / "runs", "iql", "D4RL/door/human-v2", seed, [offline, 80.0, final])
        summary.update(online_steps=200, offline_normalized_score=offline, online={"regret": regret})
        run = tmp_path / "runs" / f"D4RL-door-human-v2__iql__{seed}" / "summary.json"
        run.write_text(json.dumps(summary))
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--reps", "500"])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Offline → online (fine-tuning runs)" in text
    assert "| door-human-v2 | 50.0 ± 10.0 → 80.0 ± 10.0 (2, regret 0.30) |" in text
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert float(rows[0]["offline_mean"]) == 50.0 and float(rows[0]["regret_mean"]) == pytest.approx(0.3)


DAMAGE = {  # summary.json edits -> what the warning says
    "seed-string": ({"seed": "0"}, 'seed is "0", not int'),
    "history-dict": ({"eval_history": {"step": 100}}, "eval_history is {"),
    "no-minari-id": ({"minari_id": None}, "no minari_id"),  # None: the key is left out
    "score-string": ({"final_return": "12.5"}, 'final_return is "12.5", not a number'),
    "score-list": ({"best_normalized_score": [1, 2]}, "best_normalized_score is [1, 2], not a number"),
    "step-string": ({"eval_history": [{"step": "100", "return": 1.0}]}, 'eval_history[0] is {"step": "100"'),
    "regret-string": ({"online": {"regret": "low"}}, 'online.regret is "low", not a number'),
    "steps-bool": ({"steps": True}, "steps is true, not int"),
}


def test_a_summary_of_the_wrong_types_is_skipped_with_a_warning_that_names_it_and_says_what_is_wrong(tmp_path):
    """Damaged summary.json files (a string for a number, a dict for a list, a key missing, a JSON list) beside a
    good one: each is skipped with one warning naming its file; the good run is reported, no traceback."""
    write_run(tmp_path, "iql", "D4RL/door/human-v2", 0, [10.0, 20.0, 30.0])
    for i, (edit, _) in enumerate(DAMAGE.values()):
        summary = write_run(tmp_path / "damaged", "iql", "D4RL/door/human-v2", i + 1, [1.0, 2.0, 3.0])
        run_dir = tmp_path / "damaged" / f"D4RL-door-human-v2__iql__{i + 1}"
        (run_dir / "summary.json").write_text(json.dumps({k: v for k, v in (summary | edit).items() if v is not None}))
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "summary.json").write_text("[1, 2]")
    warnings = []
    runs = report.load_runs([str(tmp_path)], warnings.append)
    assert [r["seed"] for r in runs] == [0]
    for i, (name, (_, phrase)) in enumerate(DAMAGE.items()):
        path = tmp_path / "damaged" / f"D4RL-door-human-v2__iql__{i + 1}" / "summary.json"
        assert any(w.startswith(f"{path} is damaged (") and phrase in w for w in warnings), (name, warnings)
    assert f"{tmp_path / 'listed' / 'summary.json'} holds a JSON list, not a run's summary: skipped" in warnings
    assert len(warnings) == len(DAMAGE) + 1
    result = run_script("report.py", tmp_path, "--out", tmp_path / "out", "--reps", "200")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "| door-human-v2 | 30.0 ± 0.0 (1) |" in (tmp_path / "out" / "report.md").read_text()


def test_nan_scores_are_left_out_with_a_warning_that_names_the_runs(tmp_path, capsys):
    """A diverged seed (NaN final score, json's NaN) is not averaged in: the warning names it, the table has 2 seeds."""
    for seed, final in enumerate([40.0, float("nan"), 60.0]):
        write_run(tmp_path / "runs", "iql", "D4RL/door/human-v2", seed, [10.0, 20.0, final])
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--reps", "200"])
    warning = capsys.readouterr().err
    nan_run = tmp_path / "runs" / "D4RL-door-human-v2__iql__1"
    assert "1 runs with a NaN or infinite score (diverged?), left out of every number" in warning
    assert f"{nan_run} (final_return nan, final_normalized_score nan, return at step 300 nan)" in warning
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| door-human-v2 | 50.0 ± 10.0 (2) |" in text and "nan ±" not in text
