"""Use a trained policy of any algorithm script: evaluate it on many seeded episodes, record a video, or export it as
one file that runs where only torch is installed.

    python policy.py evaluate runs/RUN                    # 100 episodes: mean, std, 95 % CI, success rate
    python policy.py evaluate runs/RUN --episodes 10 --video
    python policy.py export runs/RUN policy.pt2 [--onnx]

RUN is a run folder (its checkpoints/last.pt) or a checkpoint file. The checkpoint names its script (iql.py, cql.py,
...): that script is imported from beside this file (or from --script, e.g. a copy of it elsewhere), and its own
make_networks and Policy build the policy, so no layout is guessed. Checkpoints are read weights-only: one from someone
else cannot run code. Docs: docs/policies.md.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro


class UserError(Exception):
    """A mistake in the input: printed as one paragraph, exit code 2, no traceback."""


@dataclasses.dataclass
class Evaluate:
    """Evaluate a checkpoint's deterministic policy in its dataset's evaluation env."""

    run: Annotated[str, tyro.conf.Positional]  # a run folder (its checkpoints/last.pt) or a checkpoint file
    episodes: int = 100  # evaluation episodes, run in lockstep
    seed: int | None = None  # default: the run's, so that the episodes repeat the run's own evaluation at that step
    device: str = "auto"  # where the policy runs: auto, cpu, cuda, mps
    video: bool = False  # also a GIF of the first episode, beside the results (MuJoCo: MUJOCO_GL=egl)
    script: str | None = None  # the algorithm script to build the policy with; default: <algo>.py beside policy.py


@dataclasses.dataclass
class Export:
    """Write a checkpoint's deterministic policy as one torch.export file (raw flat observation in, env action out)."""

    run: Annotated[str, tyro.conf.Positional]  # a run folder (its checkpoints/last.pt) or a checkpoint file
    file: Annotated[str, tyro.conf.Positional]  # the .pt2 file to write
    onnx: bool = False  # also FILE.onnx, one self-contained file (pip install onnx onnxscript)
    script: str | None = None  # the algorithm script to build the policy with; default: <algo>.py beside policy.py


def read_checkpoint(path: str) -> tuple:
    """(checkpoint, file) of a run folder or a checkpoint file, read weights-only."""
    file = Path(path) / "checkpoints" / "last.pt" if Path(path).is_dir() else Path(path)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        missing = {"algo", "args", "actor", "normalization", "minari_id", "step"} - set(ckpt)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:300]}"
        raise UserError(f"{path}: not a readable checkpoint of an algorithm script ({why})") from None
    return ckpt, file


def import_script(algo: str, script: str | None):
    """The algorithm script as a module: --script, or <algo>.py beside this file (with its common.py)."""
    path = Path(script) if script else Path(__file__).resolve().parent / f"{algo}.py"
    if not path.is_file():
        raise UserError(f"the checkpoint is {algo}.py's, and there is no {path}: name the script with --script PATH")
    sys.path.insert(0, str(path.resolve().parent))
    spec = importlib.util.spec_from_file_location(f"{algo}_policy_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if module.ALGO != algo:
        raise UserError(f"{path} is {module.ALGO}.py, the checkpoint {algo}.py's: name the right one with --script")
    return module


def load_policy(path: str, script: str | None = None) -> tuple:
    """(policy, checkpoint, checkpoint file, script module): the script's own Policy around the checkpoint's actor."""
    ckpt, file = read_checkpoint(path)
    module = import_script(ckpt["algo"], script)
    try:
        args = module.Args(**ckpt["args"])
        obs_dim, act_dim = len(ckpt["normalization"]["obs_mean"]), len(ckpt["normalization"]["action_low"])
        actor = module.make_networks(args, obs_dim, act_dim)["actor"]
        actor.load_state_dict(ckpt["actor"])
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:300]}"
        raise UserError(f"{file} does not fit {module.__file__} ({why}): was it written by another version?") from e
    policy = module.Policy(actor.eval(), ckpt["normalization"]).eval().requires_grad_(False)
    return policy, ckpt, file, module


def evaluate(cmd: Evaluate) -> dict:
    """Many seeded episodes of the checkpoint's policy: printed, and written to <run>/evaluations/ as JSON."""
    policy, ckpt, file, module = load_policy(cmd.run, cmd.script)
    dataset = module.load_dataset(ckpt["minari_id"])
    module.check_dataset(dataset, ckpt, "policy.py evaluate")
    device = module.pick_device(cmd.device)
    act = module.numpy_policy(policy.to(device), device)
    obs_dim, act_dim = len(policy.obs_mean), len(policy.action_low)
    envs = module.make_eval_envs(dataset, cmd.episodes, obs_dim, act_dim)
    seed = ckpt["args"]["seed"] if cmd.seed is None else cmd.seed
    seeds = module.evaluation_seeds(seed, ckpt["step"], cmd.episodes)
    returns, lengths, success = module.evaluate(envs, act, seeds)
    scores = module.normalized_scores(dataset, returns)
    result = {"algo": ckpt["algo"], "minari_id": dataset.id, "checkpoint": str(file), "step": ckpt["step"]}
    result.update(seed=seed, episodes=cmd.episodes)
    result["return"] = mean_and_interval(returns, seed)
    result["normalized_score"] = None if scores is None else mean_and_interval(scores, seed)
    result["success_rate"] = None if success is None else float(success.mean())
    result["length"] = float(lengths.mean())
    result["returns"] = returns.tolist()
    print(f"{ckpt['algo']}.py, {dataset.id}, step {ckpt['step']}: {cmd.episodes} episodes, seed {seed}")
    for name in ("return", "normalized_score"):
        if result[name] is not None:
            mean, std, (low, high) = result[name].values()
            print(f"  {name:<17} {mean:9.2f} ± {std:.2f}  (95 % CI {low:.2f} to {high:.2f})")
    if success is not None:
        print(f"  {'success rate':<17} {result['success_rate']:9.2f}")
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    out = run_dir / "evaluations" / f"step_{ckpt['step']}__seed_{seed}__{cmd.episodes}_episodes.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        if cmd.video:
            problem = module.record_video(dataset, act, seeds[0], out.with_suffix(".gif"))
            print(problem or f"wrote {out.with_suffix('.gif')}")
    except OSError as e:
        print(f"warning: could not write the results to {out.parent} ({e}); they are printed above")
    return result


def mean_and_interval(values: np.ndarray, seed: int) -> dict:
    """Mean, std and a 95 % bootstrap interval of the mean (10,000 resamples, percentile method)."""
    means = np.random.default_rng(seed).choice(values, (10_000, len(values))).mean(axis=1)
    interval = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {"mean": float(values.mean()), "std": float(values.std()), "ci95": interval}


def export(cmd: Export) -> list:
    """The policy as a .pt2 file (torch.export, any batch size), checked against the checkpoint's policy on random
    observations; with --onnx an .onnx file too, weights inside. Returns the files written."""
    if Path(cmd.file).suffix != ".pt2":
        raise UserError(f"export writes a .pt2 file (torch.export), not {cmd.file}")
    if cmd.onnx and not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript")):
        raise UserError(
            "--onnx needs onnx and onnxscript: pip install onnx onnxscript (or the project's [export] extra)"
        )
    policy, ckpt, file, _ = load_policy(cmd.run, cmd.script)
    if Path(cmd.file).resolve() == file.resolve():
        raise UserError(f"{cmd.file} is the checkpoint itself: write the policy to another file")
    noise = torch.randn(100, len(policy.obs_mean), generator=torch.Generator().manual_seed(0))
    obs = policy.obs_mean + policy.obs_std * noise  # observations of the data's scale
    batch = ({0: torch.export.Dim("batch")},)
    written = [cmd.file]
    with quiet():
        program = torch.export.export(policy, (obs[:2],), dynamic_shapes=batch)
        Path(cmd.file).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, cmd.file)
        if cmd.onnx:
            onnx_file = str(Path(cmd.file).with_suffix(".onnx"))
            torch.onnx.export(
                policy, (obs[:2],), onnx_file, dynamic_shapes=batch, input_names=["obs"], external_data=False
            )
            written.append(onnx_file)
    with torch.no_grad():
        gap = (program.module()(obs) - policy(obs)).abs().max().item()
    for name in written:
        print(f"wrote {name}")
    print(f"{ckpt['algo']}.py step {ckpt['step']}: exported actions match the checkpoint's (max difference {gap:.1e})")
    return written


@contextlib.contextmanager
def quiet():
    """torch.export and torch.onnx print progress and warnings meant for their developers: keep them off the console."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def main(argv: list) -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")  # --video: MuJoCo renders offscreen
    cmd = tyro.extras.subcommand_cli_from_dict({"evaluate": Evaluate, "export": Export}, args=argv, description=__doc__)
    if isinstance(cmd, Evaluate):
        evaluate(cmd)
    else:
        export(cmd)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as e:
        if type(e).__name__ != "UserError":  # this file's or the algorithm script's
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
