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
import math
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
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
    device: str = "auto"  # where the policy runs: auto (cuda, then mps, then cpu) or any torch device (cuda:1)
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
    if cmd.episodes < 1:
        raise UserError("--episodes must be at least 1")
    policy, ckpt, file, module = load_policy(cmd.run, cmd.script)
    dataset = module.load_dataset(ckpt["minari_id"])
    module.check_dataset(dataset, ckpt, "policy.py evaluate")
    device = module.pick_device(cmd.device)
    acts = module.numpy_policies(policy.to(device), ckpt["normalization"], device)
    act = next(iter(acts.values()))  # the run's score's condition (dt.py: the first target return)
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
    """The checkpoint's policy as a .pt2 file (and an .onnx file with --onnx), read back with load_exported_policy
    and checked against the checkpoint's policy on observations of the data's scale. Returns the files written."""
    if Path(cmd.file).suffix != ".pt2":
        raise UserError(f"export writes a .pt2 file (torch.export), not {cmd.file}")
    if cmd.onnx and not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript")):
        raise UserError("--onnx needs onnx and onnxscript: pip install onnx onnxscript (the project's [export] extra)")
    policy, ckpt, _, _ = load_policy(cmd.run, cmd.script)
    info = {"algo": ckpt["algo"], "minari_id": ckpt["minari_id"], "step": ckpt["step"]}
    if hasattr(policy.actor, "targets"):  # a sequence model's window policy (dt.py): what keeps its window
        info.update(seq_len=policy.actor.seq_len, target_returns=list(policy.actor.targets(ckpt["normalization"])))
    try:
        written = save_policy(policy, cmd.file, cmd.onnx, info)
    except OSError as e:
        raise UserError(f"cannot write {cmd.file}: {e}") from None
    inputs = policy_inputs(policy, 100, torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (load_exported_policy(cmd.file)(*inputs) - policy(*inputs)).abs().max().item()
    for name in written:
        print(f"wrote {name}")
    print(f"{ckpt['algo']}.py step {ckpt['step']}: exported actions match the checkpoint's (max difference {gap:.1e})")
    if "seq_len" in info:
        targets = ", ".join(f"{r:g}" for r in info["target_returns"])
        print(f"a window of up to {info['seq_len']} steps in; target returns {targets} in its policy.json")
    return written


def policy_inputs(policy: torch.nn.Module, n: int, generator: torch.Generator | None = None) -> tuple:
    """n random inputs of the data's scale: observations; for a sequence model's policy (an actor with a seq_len:
    dt.py), windows of seq_len steps: states, the actions taken (env units), returns-to-go and timesteps."""
    seq_len = getattr(policy.actor, "seq_len", None)
    shape = (n,) if seq_len is None else (n, seq_len)
    obs = policy.obs_mean + policy.obs_std * torch.randn(*shape, len(policy.obs_mean), generator=generator)
    if seq_len is None:
        return (obs,)
    unit = torch.rand(*shape, len(policy.action_low), generator=generator)
    actions = policy.action_low + unit * (policy.action_high - policy.action_low)
    returns_to_go = torch.randn(shape, generator=generator) / policy.actor.reward_scale
    timesteps = torch.randint(1000, (n, 1), generator=generator) + torch.arange(seq_len)
    return obs, actions, returns_to_go, timesteps


def save_policy(policy: torch.nn.Module, file: str, onnx: bool = False, info: dict | None = None) -> list:
    """torch.export's program of the policy, any batch size (and a sequence model's window: up to seq_len steps), with
    info as its extra file policy.json (policy_info reads it); with onnx, an .onnx file beside it, weights inside."""
    inputs = policy_inputs(policy, 2)
    batch = torch.export.Dim("batch")
    names, dims = ["obs"], ({0: batch},)
    if len(inputs) > 1:  # a window of any length up to seq_len; the example has 2 steps so that none is special
        inputs = tuple(x[:, :2].contiguous() for x in inputs)
        steps = {0: batch, 1: torch.export.Dim("steps", max=max(policy.actor.seq_len, 2))}
        names, dims = ["states", "actions", "returns_to_go", "timesteps"], (steps, (steps, steps, steps))
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        program = torch.export.export(policy, inputs, dynamic_shapes=dims)
        torch.export.save(program, file, extra_files={"policy.json": json.dumps(info or {})})
        if not onnx:
            return [file]
        onnx_file = str(Path(file).with_suffix(".onnx"))
        torch.onnx.export(policy, inputs, onnx_file, dynamic_shapes=dims, input_names=names, external_data=False)
    return [file, onnx_file]


# ---- Exported policies: a .pt2 file read as data, never as code -------------------------------------------------
# torch.export.load runs code from the file it reads (torch 2.13; its own docstring says never to load an untrusted
# one): it unpickles weights and constants marked as pickled (torch.load with weights_only=False, pickle.loads),
# retries the sample inputs and the legacy weight files with weights_only=False when the safe load fails, reads the
# pre-2.7 layout the same way, evaluates each symbolic shape with sympy.sympify (Python's eval), execs the file's
# guards_code in .module(), and loads the compiled libraries of AOTInductor packages. So this loader does not call
# it: it reads the program (models/<name>.json) and the raw bytes of the weights itself, and runs the graph node by
# node with aten operators from a fixed list of tensor math. Nothing else in the archive is read.
class PolicyFileError(ValueError):
    """A .pt2 file that load_exported_policy refuses: the message is one paragraph naming the file."""


# The aten operators a policy's graph may call: tensor math and shapes (none touches files, processes or objects)
PT2_OPS = {
    "linear", "addmm", "mm", "matmul", "bmm", "t", "transpose", "permute", "view", "reshape", "_unsafe_view",
    "expand", "unsqueeze", "squeeze", "flatten", "cat", "stack", "split", "split_with_sizes", "chunk", "slice",
    "select", "narrow", "clone", "contiguous", "alias", "detach", "dropout", "relu", "tanh", "sigmoid", "elu",
    "gelu", "silu", "mish", "leaky_relu", "softplus", "hardtanh", "exp", "log", "sqrt", "rsqrt", "neg", "abs",
    "pow", "add", "sub", "rsub", "mul", "div", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "where",
    "layer_norm", "native_layer_norm", "mean", "sum", "embedding", "unflatten", "unbind",
    "scaled_dot_product_attention",
}  # fmt: skip
PT2_DTYPES = {6: torch.float16, 7: torch.float32, 8: torch.float64, 13: torch.bfloat16}  # torch.export's ScalarType
PT2_SYMPY = {"Symbol", "Integer", "True", "False", "positive", "integer", "nonnegative", "Max", "Min", "Mod", "Eq"}
PT2_SYMPY |= {"Mul", "Add"}  # a sequence model's token count, 3 x its window's steps (dt.py)
PT2_SYMPY |= {"Ne", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "ModularIndexing", "FloorToInt", "CeilToInt"}
# The one guard a policy file may hold: that inputs agree in sizes (a sequence model's window: dt.py), a comparison only
PT2_SIZE = r"L\['\w+'\](?:\[\d+\])?\.size\(\)\[\d+\]"
PT2_GUARD = re.compile(rf"{PT2_SIZE} == {PT2_SIZE}(?: and {PT2_SIZE} == {PT2_SIZE})*")
PT2_SCALARS = {"as_int": int, "as_float": float, "as_bool": bool, "as_ints": int, "as_floats": float, "as_bools": bool}


@dataclasses.dataclass(frozen=True)
class Pt2Ref:
    """A value of the graph by name: a weight, the observation or a node's output."""

    name: str


def pt2_tensor(archive, folder: str, entry: dict, what: str) -> torch.Tensor:
    """A weight or constant from its raw bytes (the layout torch.export.save writes for plain tensors)."""
    meta = entry["tensor_meta"]  # pt2_refuse_code has refused pickles
    if meta["dtype"] not in PT2_DTYPES:
        raise PolicyFileError(f"{what} has dtype {meta['dtype']} of torch.export's ScalarType; floats only")
    dtype = PT2_DTYPES[meta["dtype"]]
    raw = bytearray(archive.read(folder + entry["path_name"]))
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
    sizes, strides = [int(d["as_int"]) for d in meta["sizes"]], [int(d["as_int"]) for d in meta["strides"]]
    return flat.as_strided(sizes, strides, int(meta["storage_offset"]["as_int"])).clone()  # bounds are checked


def pt2_argument(arg: dict):
    """A node's argument: a reference to a graph value, a list of them, None, or numbers and booleans."""
    ((kind, value),) = arg.items()
    if kind == "as_tensor":
        return Pt2Ref(value["name"])
    if kind == "as_tensors":
        return [Pt2Ref(t["name"]) for t in value]
    if kind == "as_none":
        return None
    plain = isinstance(value, list) == kind.endswith("s") and kind in PT2_SCALARS
    if plain and all(isinstance(v, PT2_SCALARS[kind] | int) for v in (value if isinstance(value, list) else [value])):
        return value
    raise PolicyFileError(f"a node argument of kind {kind} is not supported (tensors, numbers and booleans are)")


def pt2_operator(target: str):
    """torch.ops.aten.<name>.<overload> for a name in PT2_OPS; anything else is refused."""
    name, _, overload = target.removeprefix("torch.ops.aten.").partition(".")
    if not target.startswith("torch.ops.aten.") or name not in PT2_OPS:
        raise PolicyFileError(f"its graph calls {target[:100]}, which is not on collect.py's list of tensor operators")
    packet = getattr(torch.ops.aten, name)
    if overload not in packet.overloads():
        raise PolicyFileError(f"its graph calls {target[:100]}, an overload that torch does not have")
    return getattr(packet, overload)


def pt2_resolve(value, values: dict):
    if isinstance(value, list):
        return [pt2_resolve(v, values) for v in value]
    return values[value.name] if isinstance(value, Pt2Ref) else value


def pt2_expressions(tree) -> list:
    """Every symbolic shape expression ("expr_str") in the program's JSON."""
    if isinstance(tree, dict):
        return [e for k, v in tree.items() for e in ([v] if k == "expr_str" else pt2_expressions(v))]
    return [e for v in tree for e in pt2_expressions(v)] if isinstance(tree, list) else []


def pt2_plain_expression(expr) -> bool:
    """Shapes as torch.export writes them (Symbol('s35', positive=True, integer=True), FloorDiv(s0, 2), 4): symbol
    names, numbers, arithmetic and sympy's functions; no attribute, subscript, string or other name for eval."""
    rest = re.sub(r"'[a-z]+[0-9]+'|[0-9]+\.[0-9]+", "0", str(expr))  # quoted symbol names, decimals
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest))
    plain = isinstance(expr, str) and re.fullmatch(r"[A-Za-z0-9_ (),+\-*/%<>=!]*", rest) is not None  # ASCII only
    return plain and all(n in PT2_SYMPY or re.fullmatch(r"[a-z]+[0-9]+", n) for n in names)


def pt2_refuse_code(archive, sample_inputs: str, program: dict, stored: dict) -> None:
    """This loader never reads what follows, but torch.export.load would run it: a file holding it is refused, so
    that nobody loads it later with torch and takes it for safe because collect.py recorded with it."""
    for kind, entries in stored.items():
        for fqn, entry in entries.items():
            if entry.get("use_pickle") or not isinstance(entry.get("tensor_meta"), dict):
                raise PolicyFileError(f"its {kind} entry {str(fqn)[:100]} is a pickled object, which runs code")
    legacy = re.compile(r".*/data/aotinductor/.*|.*/data/(weights|constants)/[^/]*\.pt")  # libraries, pickles
    if compiled := [name for name in archive.namelist() if legacy.fullmatch(name)]:
        raise PolicyFileError(f"it holds {compiled[0][:100]}, compiled code or a legacy pickle that torch would run")
    if [guard for guard in program.get("guards_code") or [] if not PT2_GUARD.fullmatch(guard)]:
        raise PolicyFileError("it holds Python code (guards_code) that torch.export.load's .module() runs")
    if bad := [e for e in pt2_expressions(program) if not pt2_plain_expression(e)]:
        raise PolicyFileError(f"its shape expression {str(bad[0])[:100]!r} would be run by sympy's eval")
    try:  # the sample inputs (never used here): torch reads them again with weights_only=False if this fails
        torch.load(io.BytesIO(archive.read(sample_inputs)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PolicyFileError(f"its sample inputs hold more than tensors ({type(e).__name__})") from None


def pt2_program(archive) -> tuple:
    """(weights by graph name, input names, steps, output name) of the archive's one program."""
    models = [name for name in archive.namelist() if name.count("/") == 2 and "/models/" in name]
    if len(models) != 1 or not models[0].endswith(".json"):
        raise PolicyFileError(f"it holds {len(models)} exported programs (models/*.json), not one")
    root, _, model = models[0].removesuffix(".json").partition("/models/")
    program = json.loads(archive.read(models[0]))
    configs = {kind: f"{root}/data/{kind}/{model}_{kind}_config.json" for kind in ("weights", "constants")}
    stored = {kind: json.loads(archive.read(file))["config"] for kind, file in configs.items()}
    pt2_refuse_code(archive, f"{root}/data/sample_inputs/{model}.pt", program, stored)
    values, observation = {}, []
    for spec in program["graph_module"]["signature"]["input_specs"]:
        ((kind, body),) = spec.items()
        key = {"parameter": "parameter_name", "buffer": "buffer_name", "tensor_constant": "tensor_constant_name"}
        if kind == "user_input" and set(body["arg"]) == {"as_tensor"}:
            observation.append(body["arg"]["as_tensor"]["name"])
        elif kind in key:
            fqn = body[key[kind]]
            where = "weights" if fqn in stored["weights"] else "constants"
            values[body["arg"]["name"]] = pt2_tensor(archive, f"{root}/data/{where}/", stored[where][fqn], fqn)
        else:
            raise PolicyFileError(f"it takes an input of kind {kind}; a policy takes tensors")
    outputs = program["graph_module"]["signature"]["output_specs"]
    if not observation or len(outputs) != 1 or set(outputs[0]) != {"user_output"}:
        raise PolicyFileError(
            "a policy takes tensors (an observation) and returns one action tensor; this one does not"
        )
    steps, defined = [], set(values) | set(observation)
    for node in program["graph_module"]["graph"]["nodes"]:
        op = pt2_operator(node["target"])
        args = [pt2_argument(a["arg"]) for a in node["inputs"] if a["kind"] != 2]  # 1: positional, 2: keyword
        kwargs = {a["name"]: pt2_argument(a["arg"]) for a in node["inputs"] if a["kind"] == 2}
        ((kind, out),) = node["outputs"][0].items() if len(node["outputs"]) == 1 else ((None, None),)
        if kind not in ("as_tensor", "as_tensors"):
            raise PolicyFileError(f"its node {node['target'][:100]} does not return tensors")
        result = Pt2Ref(out["name"]) if kind == "as_tensor" else [Pt2Ref(t["name"]) for t in out]
        used = [r.name for r in pt2_refs([args, list(kwargs.values())])]
        if missing := sorted(set(used) - defined):
            raise PolicyFileError(f"its graph uses {missing[:3]} before they are computed")
        defined |= {r.name for r in pt2_refs([result])}
        steps.append((op, args, kwargs, result))
    output = pt2_argument(outputs[0]["user_output"]["arg"])
    if not isinstance(output, Pt2Ref) or output.name not in defined:
        raise PolicyFileError("its output is not a tensor that the graph computes")
    return values, observation, steps, output.name


def pt2_refs(value) -> list:
    """Every Pt2Ref in nested lists."""
    if isinstance(value, list):
        return [ref for v in value for ref in pt2_refs(v)]
    return [value] if isinstance(value, Pt2Ref) else []


def load_exported_policy(file) -> Callable[..., torch.Tensor]:
    """A policy file of torch.export.save (`policy.py export`) as a function observation batch -> action
    batch (a sequence model's: its window of states, actions, returns-to-go and timesteps -> action batch), read
    without running code from the file (see above). Raises PolicyFileError, one paragraph, on a file that is not such a
    policy, holds pickles, or calls an operator outside PT2_OPS."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(Path(file).read_bytes()))  # read once: what is checked is what runs
        values, inputs, steps, output = pt2_program(archive)
    except PolicyFileError as e:
        message = f"{file} is refused: {e}. A policy file is read only if it holds tensor operators and raw weights"
        raise PolicyFileError(message + "; export the policy again with `python policy.py export`.") from None
    except Exception as e:
        error = f"{type(e).__name__}: {str(e)[:200]}"
        raise PolicyFileError(f"{file} is not a policy file of torch.export.save, or it is damaged ({error})") from None

    @torch.no_grad()
    def policy(*obs: torch.Tensor) -> torch.Tensor:
        if len(obs) != len(inputs):
            raise PolicyFileError(f"{file} takes {len(inputs)} input tensors, not {len(obs)}")
        computed = values | dict(zip(inputs, obs, strict=True))
        for op, args, kwargs, result in steps:
            out = op(*pt2_resolve(args, computed), **{k: pt2_resolve(v, computed) for k, v in kwargs.items()})
            for ref, tensor in zip(pt2_refs([result]), out if isinstance(result, list) else [out], strict=True):
                computed[ref.name] = tensor
        return computed[output]

    return policy


def policy_info(file) -> dict:
    """The extra file policy.json of a policy file, checked: policy.py export writes the checkpoint's algo, minari_id
    and step, and for a sequence model's window policy its seq_len and target_returns. {} where there is none."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(Path(file).read_bytes()))
        names = [name for name in archive.namelist() if name.count("/") == 2 and name.endswith("/extra/policy.json")]
        info = json.loads(archive.read(names[0])) if names else {}
    except Exception as e:
        raise PolicyFileError(f"{file}: its policy.json cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(info, dict):
        raise PolicyFileError(f"{file}: its policy.json is not a mapping")
    if ("seq_len" in info or "target_returns" in info) and not window_info(info):
        raise PolicyFileError(f"{file}: its policy.json does not hold an algo, seq_len >= 1 and finite target_returns")
    return info


def window_info(info: dict) -> bool:
    """A window policy's info names a script (letters, digits, _), a seq_len >= 1 and finite target returns."""
    algo, seq_len, targets = info.get("algo"), info.get("seq_len"), info.get("target_returns")
    named = isinstance(algo, str) and re.fullmatch(r"[a-z0-9_]+", algo) is not None
    numbers = isinstance(targets, list) and all(type(r) in (int, float) and math.isfinite(r) for r in targets)
    return named and type(seq_len) is int and seq_len >= 1 and numbers and len(targets) > 0


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
