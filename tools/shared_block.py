"""Keeps the shared block of the algorithm scripts word for word the same.

Every algorithm script (iql.py, cql.py, ...) stands alone, so the code that is not the algorithm (the training loop,
data, evaluation, configuration, checkpoints) is repeated in each of them, between marker comments:

    # ----- SHARED BLOCK (args) begins -----   ...   # ----- SHARED BLOCK (args) ends -----   (run fields, in Args)
    # ===== SHARED BLOCK (loop) begins =====   ...   # ===== SHARED BLOCK (loop) ends =====   (after the update)
    # ===== SHARED BLOCK begins =====          ...   # ===== SHARED BLOCK ends =====          (the rest, last)

iql.py is the source. `python tools/shared_block.py` compares every other script that has the markers with it,
prints a diff of each block that differs and exits with 1; `--fix` rewrites those blocks from iql.py. The idea is
transformers' "# Copied from" comments checked by utils/check_copies.py. Standard library only.
"""

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "iql.py"
MARKER = re.compile(r"^\s*# [-=]+ SHARED BLOCK(?: \((\w+)\))? (begins|ends)\b")


def blocks(text: str, file: str) -> dict:
    """{block name: (first line, last line + 1)} of the marked blocks, the marker lines included."""
    found, open_at = {}, {}
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        match = MARKER.match(line)
        if match is None:
            continue
        name = match[1] or "main"
        if match[2] == "begins":
            open_at[name] = number
        elif name in open_at:
            found[name] = (open_at.pop(name), number + 1)
        else:
            raise SystemExit(f"{file}:{number + 1}: SHARED BLOCK ({name}) ends before it begins")
    if open_at:
        raise SystemExit(f"{file}: SHARED BLOCK ({', '.join(open_at)}) begins but never ends")
    return found


def scripts() -> list:
    """The algorithm scripts other than the source: every top-level .py file that has a marked block."""
    return sorted(p for p in ROOT.glob("*.py") if p.name != SOURCE and "SHARED BLOCK" in p.read_text())


def check(fix: bool) -> int:
    source_text = (ROOT / SOURCE).read_text()
    source_lines = source_text.splitlines(keepends=True)
    source_blocks = blocks(source_text, SOURCE)
    differ, unmarked = [], []
    for path in scripts():
        lines = path.read_text().splitlines(keepends=True)
        found = blocks("".join(lines), path.name)
        missing = set(source_blocks) - set(found)
        if missing:
            print(f"{path.name}: no marked SHARED BLOCK ({', '.join(sorted(missing))}); add its markers by hand")
            unmarked.append(path.name)
            continue
        # replace from the last block up, so that the line numbers of the earlier blocks stay valid
        for name, (begin, end) in sorted(found.items(), key=lambda item: -item[1][0]):
            source_begin, source_end = source_blocks[name]
            wanted = source_lines[source_begin:source_end]
            if lines[begin:end] == wanted:
                continue
            differ.append(f"{path.name} ({name})")
            if fix:
                lines[begin:end] = wanted
            else:
                diff = difflib.unified_diff(wanted, lines[begin:end], f"{SOURCE} ({name})", f"{path.name} ({name})")
                sys.stdout.writelines(diff)
        if fix:
            path.write_text("".join(lines))
    if unmarked:
        return 1
    if not differ:
        print(f"shared blocks: {len(scripts())} script(s) agree with {SOURCE}")
        return 0
    if fix:
        print(f"rewrote from {SOURCE}: {', '.join(differ)}")
        return 0
    print(f"\nshared blocks differ from {SOURCE}: {', '.join(differ)}.")
    print(f"Edit {SOURCE}, then copy its blocks with: python tools/shared_block.py --fix")
    return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help=f"rewrite the blocks of the other scripts from {SOURCE}")
    sys.exit(check(parser.parse_args().fix))
