"""policy.py's reader of exported policies, load_exported_policy (collect.py reads .pt2 files with it): a genuine export
of every algorithm script acts as the script's own policy, and a genuine export edited to carry a payload in each place
where torch.export.load (torch 2.13) runs code from a file is refused with one paragraph, without running it;
torch.export.load itself does run each of these payloads (the crafted files are live)."""

import contextlib
import io
import json
import pickle
import re
import zipfile

import pytest
import torch
from conftest import ALGOS, script_checkpoint

import collect
import policy as policy_tool

OBS_DIM = 3


class Payload:
    """Unpickled, it creates the file `marker`: the proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def export(algo: str, file, **args):
    """policy.py's save_policy (the .pt2 only) of a random policy of the script (its Args with **args)."""
    policy = script_checkpoint(algo, file.with_suffix(".pt"), OBS_DIM, low=[-3.0, 0.0], high=[1.0, 0.5], **args)
    assert policy_tool.save_policy(policy, str(file)) == [str(file)]
    return policy


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    file = tmp_path_factory.mktemp("genuine") / "iql.pt2"
    export("iql", file)
    return file


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def edit_json(files: dict, name: str, edit) -> None:
    content = json.loads(files[name])
    edit(content)
    files[name] = json.dumps(content).encode()


# Each edit: (files of the archive by name, the archive's folder, the marker) -> the edited files
def pickled_weight(files, root, marker):
    def edit(config):
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        files[f"{root}/data/weights/{entry['path_name']}"] = saved(Payload(marker))

    edit_json(files, f"{root}/data/weights/model_weights_config.json", edit)
    return files


def constant(path_name: str, payload):
    """A constant entry of torch.export.save's layout: by its name's prefix a pickled tensor, a torchbind object or
    an opaque object (torch.load(weights_only=False), torch._C._pickle_load_obj, pickle.loads)."""

    def add(files, root, marker):
        entry = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}
        edit_json(files, f"{root}/data/constants/model_constants_config.json", lambda c: c["config"].update(c0=entry))
        files[f"{root}/data/constants/{path_name}"] = payload(Payload(marker))
        return files

    add.__name__ = f"constant_{path_name}"
    return add


def sample_inputs(files, root, marker):
    files[f"{root}/data/sample_inputs/model.pt"] = saved(Payload(marker))
    return files


def legacy_weights(files, root, marker):
    files[f"{root}/data/weights/model.pt"] = saved(Payload(marker))
    return files


def legacy_constants(files, root, marker):
    files[f"{root}/data/constants/model.pt"] = saved(Payload(marker))
    return files


def pre_2_7_layout(files, root, marker):
    """torch.export.load falls back to this layout when the archive has no archive_version."""
    program = files[f"{root}/models/model.json"]
    return {
        "version": b"8.20",
        "serialized_exported_program.json": program,
        "serialized_state_dict.pt": saved(Payload(marker)),
        "serialized_constants.pt": saved({}),
        "serialized_example_inputs.pt": saved(((torch.zeros(2, OBS_DIM),), {})),
    }


def shape_expression(files, root, marker):
    """sympy.sympify evaluates each symbolic shape as Python."""
    name = f"{root}/models/model.json"
    symbol = json.loads(files[name])["graph_module"]["graph"]["tensor_values"]["obs"]["sizes"][0]["as_expr"]
    payload = symbol["expr_str"].replace("integer=True", f"integer=open({str(marker)!r}, 'w') is not None")
    files[name] = files[name].replace(json.dumps(symbol["expr_str"]).encode(), json.dumps(payload).encode())
    return files


def guards_code(files, root, marker):
    """.module() execs the program's guards_code."""
    edit_json(files, f"{root}/models/model.json", lambda p: p.update(guards_code=[f"open({str(marker)!r}, 'w')"]))
    return files


LIVE = [pickled_weight, constant("tensor_c0", saved), constant("opaque_obj_c0", pickle.dumps), sample_inputs]
LIVE += [legacy_weights, legacy_constants, pre_2_7_layout, shape_expression, guards_code]


def aotinductor_library(files, root, marker):
    """AOTInductor packages: torch.export.load loads their compiled library (not crafted here: a compiler)."""
    files[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF"
    return files


def operator_outside_aten(files, root, marker):
    """torch resolves any torch.* name as an operator (its verifier then refuses this one)."""
    edit_json(
        files,
        f"{root}/models/model.json",
        lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system"),
    )
    return files


def craft(genuine, edit, marker, file):
    """A copy of the genuine export with `edit` applied, written as torch.export.save writes (stored, not zipped)."""
    with zipfile.ZipFile(genuine) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    files = edit(files, next(iter(files)).split("/")[0], marker)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return file


@pytest.mark.parametrize("algo", [a[:-3] for a in ALGOS])
def test_every_scripts_export_acts_as_its_policy(algo, tmp_path):
    """On observations (dt.py: windows of seq_len steps, and of 1) of 3 x the data's spread, batches of 100 and 1."""
    policy = export(algo, tmp_path / "policy.pt2")
    loaded = policy_tool.load_exported_policy(tmp_path / "policy.pt2")
    inputs = list(policy_tool.policy_inputs(policy, 100, torch.Generator().manual_seed(0)))
    inputs[0] = policy.obs_mean + (inputs[0] - policy.obs_mean) * 3
    for batch in (inputs, [x[:1] for x in inputs], [x[:, -1:] for x in inputs] if len(inputs) > 1 else inputs):
        with torch.no_grad():
            expected = policy(*batch)
        torch.testing.assert_close(loaded(*batch), expected, rtol=1e-5, atol=1e-6)
    exported = torch.export.load(tmp_path / "policy.pt2").module()
    assert torch.equal(loaded(*inputs), exported(*inputs))  # the same operators


@pytest.mark.parametrize("algo,args", [("iql", {"actor_dropout": 0.1}), ("rebrac", {"actor_layer_norm": True})])
def test_exports_with_dropout_and_layer_norm_act_as_their_policy(algo, args, tmp_path):
    policy = export(algo, tmp_path / "policy.pt2", **args)
    obs = torch.randn(20, OBS_DIM)
    with torch.no_grad():
        torch.testing.assert_close(policy_tool.load_exported_policy(tmp_path / "policy.pt2")(obs), policy(obs))


def test_an_export_made_outside_the_scripts_acts_as_its_module(tmp_path):
    """GELU, LayerNorm and SiLU between Linear layers, a dynamic batch: any graph of the listed operators is read."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.SiLU()]
    module = torch.nn.Sequential(*layers, torch.nn.Linear(8, 2), torch.nn.Tanh()).eval()
    batch = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(module, (torch.zeros(2, 4),), dynamic_shapes=batch), tmp_path / "m.pt2")
    obs = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(policy_tool.load_exported_policy(tmp_path / "m.pt2")(obs), module(obs))


@pytest.mark.parametrize("edit", LIVE, ids=lambda edit: edit.__name__)
def test_torch_export_load_runs_the_payload_of_each_crafted_file(edit, genuine, tmp_path):
    """The control: each crafted file does run code when torch.export.load reads it (and .module() runs it)."""
    marker = tmp_path / "marker"
    file = craft(genuine, edit, marker, tmp_path / "crafted.pt2")
    with contextlib.suppress(Exception):
        torch.export.load(file).module()(torch.zeros(2, OBS_DIM))
    assert marker.exists()


@pytest.mark.parametrize("edit", LIVE + [aotinductor_library, operator_outside_aten], ids=lambda e: e.__name__)
def test_a_crafted_policy_file_is_refused_without_running_its_payload(edit, genuine, tmp_path):
    marker = tmp_path / "marker"
    file = craft(genuine, edit, marker, tmp_path / "crafted.pt2")
    with pytest.raises(policy_tool.PolicyFileError) as refusal:
        policy_tool.load_exported_policy(file)(torch.zeros(2, OBS_DIM))
    assert not marker.exists()
    message = str(refusal.value)
    assert message.startswith(str(file)) and "\n" not in message and len(message) < 500


def test_collect_refuses_a_crafted_policy_file_with_exit_2_and_runs_nothing(genuine, tmp_path, capsys):
    """The probe of issue 30: a genuine export whose first weight is a pickle with a __reduce__ payload."""
    marker = tmp_path / "marker"
    file = craft(genuine, pickled_weight, marker, tmp_path / "crafted.pt2")
    argv = ["--env", "Pendulum-v1", "--policy", "checkpoint", "--checkpoint", str(file), "--ref-episodes", "1"]
    assert collect.cli(argv + ["--episodes", "1", "--dataset-id", "local/pendulum/crafted-v0"]) == 2
    assert not marker.exists()
    assert "is a pickled object, which runs code" in capsys.readouterr().err


def test_damaged_and_foreign_files_get_one_paragraph(genuine, tmp_path):
    (tmp_path / "text.pt2").write_text("not a zip")
    torch.save({"actor": torch.zeros(2)}, tmp_path / "checkpoint.pt2")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(genuine.read_bytes()[:5000])
    for file in ("text.pt2", "checkpoint.pt2", "truncated.pt2", "missing.pt2"):
        with pytest.raises(policy_tool.PolicyFileError, match="not a policy file of torch.export.save|refused"):
            policy_tool.load_exported_policy(tmp_path / file)


# ---- policy.json: what a window policy's file says of itself --------------------------------------------
def window_file(tmp_path, info: dict | None):
    """A dt.py export (its window policy) whose policy.json is info (None: removed, as in files written before it)."""
    file = tmp_path / "dt.pt2"
    policy = script_checkpoint("dt", tmp_path / "dt.pt", OBS_DIM, low=[-2.0], high=[2.0], target_returns=(5.0,))
    assert policy_tool.save_policy(policy, str(file), info={"algo": "dt", "seq_len": 5, "target_returns": [5.0]})
    assert policy_tool.policy_info(file) == {"algo": "dt", "seq_len": 5, "target_returns": [5.0]}

    def edit(files, root, marker):
        files.pop(f"{root}/extra/policy.json")
        return files if info is None else {**files, f"{root}/extra/policy.json": json.dumps(info).encode()}

    return craft(file, edit, None, tmp_path / "edited.pt2")


@pytest.mark.parametrize(
    "info",
    [
        {"algo": "../dt", "seq_len": 5, "target_returns": [5.0]},
        {"algo": "dt", "seq_len": 0, "target_returns": [5.0]},
        {"algo": "dt", "seq_len": 5, "target_returns": []},
        {"algo": "dt", "seq_len": 5, "target_returns": ["5", float("nan")]},
        {"algo": "dt", "target_returns": [5.0]},
        ["dt", 5],
    ],
)
def test_a_policy_json_that_does_not_say_what_keeps_the_window_is_refused(info, tmp_path):
    file = window_file(tmp_path, info)
    with pytest.raises(policy_tool.PolicyFileError) as refusal:
        policy_tool.policy_info(file)
    assert str(refusal.value).startswith(str(file)) and "\n" not in str(refusal.value)


@pytest.mark.parametrize(
    "info,message",
    [
        (None, "is not a policy exported for env Pendulum-v1 .*export it again with policy.py export"),
        ({"algo": "report", "seq_len": 5, "target_returns": [5.0]}, "no such script with a context_policy"),
        ({"algo": "nowhere", "seq_len": 5, "target_returns": [5.0]}, "no such script with a context_policy"),
    ],
)
def test_collect_refuses_a_window_policy_it_cannot_keep_the_window_of(info, message, tmp_path, capsys):
    """Without policy.json (a file written before it) or naming a script that keeps no window: exit 2, one line,
    before any episode runs."""
    file = window_file(tmp_path, info)
    argv = ["--env", "Pendulum-v1", "--policy", "checkpoint", "--checkpoint", str(file), "--ref-episodes", "1"]
    assert collect.cli(argv + ["--episodes", "1", "--dataset-id", "local/pendulum/window-v0"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "random reference" not in err, err
