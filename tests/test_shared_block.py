"""tools/shared_block.py keeps the shared block of every algorithm script (its three marked parts: the run's fields in
Args, the training loop, the rest) identical to iql.py's: it passes on the repository, fails with a diff when a copy
was edited by hand, and --fix repairs the copy."""

import shutil
import subprocess
import sys

from conftest import ROOT

ALGORITHMS = sorted(p.name for p in ROOT.glob("*.py") if "SHARED BLOCK begins" in p.read_text())


def checker(folder, *flags):
    tool = folder / "tools" / "shared_block.py"
    return subprocess.run([sys.executable, str(tool), *flags], capture_output=True, text=True, timeout=60)


def test_every_algorithm_script_holds_the_shared_block_of_iql():
    assert {"iql.py", "cql.py"} <= set(ALGORITHMS)
    result = checker(ROOT)
    assert result.returncode == 0, result.stdout
    assert f"{len(ALGORITHMS) - 1} script(s) agree with iql.py" in result.stdout


def test_a_copy_edited_by_hand_fails_with_a_diff_and_fix_repairs_it(tmp_path):
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "shared_block.py", tmp_path / "tools")
    for name in ALGORITHMS:
        shutil.copy(ROOT / name, tmp_path / name)
    edited = tmp_path / "cql.py"
    original = edited.read_text()
    edited.write_text(original.replace("    return envs\n", "    return envs  # a fix made in one copy only\n", 1))
    edited.write_text(edited.read_text().replace("seed: int = 1", "seed: int = 2", 1))
    edited.write_text(edited.read_text().replace("        run.finish()\n", "        run.finish()  # edited\n", 1))

    result = checker(tmp_path)
    assert result.returncode == 1
    assert "+    return envs  # a fix made in one copy only" in result.stdout  # the diff shows the edit
    assert "+    seed: int = 2" in result.stdout and "cql.py (main), cql.py (loop), cql.py (args)" in result.stdout

    assert checker(tmp_path, "--fix").returncode == 0
    assert edited.read_text() == original
    assert checker(tmp_path).returncode == 0


def test_a_script_without_the_markers_of_a_block_is_reported(tmp_path):
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "shared_block.py", tmp_path / "tools")
    shutil.copy(ROOT / "iql.py", tmp_path / "iql.py")
    text = (ROOT / "cql.py").read_text()
    lines = [line for line in text.splitlines(keepends=True) if "SHARED BLOCK (args)" not in line]
    (tmp_path / "cql.py").write_text("".join(lines))
    result = checker(tmp_path, "--fix")
    assert result.returncode == 1 and "cql.py: no marked SHARED BLOCK (args)" in result.stdout
