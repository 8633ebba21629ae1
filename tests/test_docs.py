"""The documentation says what the code does: every flag named in README.md and docs/*.md is a flag of the script it is
documented for (read from that script's --help, and its subcommands'), every field of every algorithm script's Args is
a flag on its page (docs/<script>.md; the shared block's fields on docs/usage.md), every relative link and anchor
points at something that exists, the README's offline quickstart is the command list tests/test_collect.py runs,
quoted files are quoted verbatim, and the README fits on a page.

Which script a flag belongs to: a command line or inline code naming a script (`python cql.py --cql-alpha 5`,
`sweep.py --threads`) gives it; otherwise the nearest heading that names a script (a section "Reports: `report.py`"),
otherwise the page (docs/iql.md: iql.py, docs/collect.md: collect.py, ...). Flags with none of these (README.md,
docs/usage.md, ...) are the shared ones: every algorithm script that exists must have them. Flags after a bare `--`
(sweep.py passes them on) and in a grid file's `flags: all:` line are shared too; `iql: ...` lines are iql.py's."""

import ast
import re
import sys
from pathlib import Path

import pytest
from conftest import ALGOS, ROOT, run_script

sys.path.insert(0, str(ROOT / "tools"))
from shared_block import blocks  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALGORITHMS = tuple(ALGOS)  # every script with the shared block: iql.py, cql.py, td3_bc.py, rebrac.py, ...
TOOLS = ("policy.py", "collect.py", "sweep.py", "report.py", "benchmarks/throughput.py", "benchmarks/scale.py")
TOOLS += ("benchmarks/ablation.py", "benchmarks/compare.py", "benchmarks/ensemble.py", "tools/shared_block.py")
SUBCOMMANDS = {"policy.py": ("evaluate", "export")}  # a flag of either counts as the script's
PAGE_SCRIPT = {f"{Path(s).stem}.md": s for s in ALGORITHMS}
PAGE_SCRIPT |= {"policies.md": "policy.py", "collect.md": "collect.py", "sweeps.md": "sweep.py"}
SHARED = "every algorithm script"
SCRIPT = re.compile(
    r"(?<![\w/.-])((?:benchmarks/|tools/)?(?:"
    + "|".join(re.escape(Path(s).stem) for s in ALGORITHMS + TOOLS)
    + r")\.py)\b"
)
FLAG = re.compile(r"(?<![\w-])--(\[no-\])?([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def flags_in(text: str) -> list:
    """--name and --[no-]name (both forms) in a piece of text; only the name of --name=value."""
    found = []
    for match in FLAG.finditer(text):
        found.append(f"--{match[2]}")
        if match[1]:
            found.append(f"--no-{match[2]}")
    return found


def command_flags(line: str, default: str) -> list:
    """(script, flag) of a shell line: `python x.py ...` names its script (also for its comment), `... -- ...` hands
    the rest on to the algorithm scripts (those of a sweep's `--algos` when it names one); a comment line is prose of
    the default script; other programs (pip, ray, minari, srun, ...) are not ours."""
    code, _, comment = line.partition(" #")
    if code.lstrip().startswith("#"):
        code, comment = "", code.lstrip()[1:]
    words = code.split()
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]) or words[0] in ("$", "python", "python3")):
        words.pop(0)  # VAR=value python ...
    script = SCRIPT.fullmatch(words[0]) if words else None
    if script is None:
        skip = comment.startswith(("SBATCH", "!")) or bool(words)
        return [] if skip else [(default, flag) for flag in flags_in(comment)]
    pairs, owner = [(script[1], flag) for flag in flags_in(comment)], script[1]
    algos = words[words.index("--algos") + 1] if "--algos" in words[:-1] else None  # sweep.py --algos cql -- ...
    for word in words[1:]:
        if word == "--":
            owner = f"{algos}.py" if algos in [Path(a).stem for a in ALGORITHMS] else SHARED
        elif word.startswith("--"):
            pairs += [(owner, flag) for flag in flags_in(word.split("=", 1)[0])]
    return pairs


def span_flags(span: str, default: str) -> list:
    """(script, flag) of inline code: flags after a script's name are its own, flags before it the default's; inline
    code that starts with another program (`pip install -e`, `ray start --head`) is not ours."""
    first = span.split()[0] if span.split() else ""
    if re.fullmatch(r"[a-z][\w.-]*", first) and not SCRIPT.fullmatch(first) and first not in ("python", "python3"):
        return []
    pairs, owner = [], default
    for word in span.split():
        if SCRIPT.fullmatch(word.strip("(),;:")):
            owner = SCRIPT.fullmatch(word.strip("(),;:"))[1]
        elif word == "--":
            owner = SHARED
        else:
            pairs += [(owner, flag) for flag in flags_in(word.split("=", 1)[0])]
    return pairs


def documented_flags(page: Path, text: str | None = None) -> list:
    """(script, flag, page:line) of every flag the page names."""
    page_default = PAGE_SCRIPT.get(page.name, SHARED)
    default, fence, block_lang, continued, sections = page_default, None, "", None, []
    found, paragraph = [], []

    def prose(lines: list) -> None:
        """A paragraph (inline code may span its lines, as Markdown allows), or a table row."""
        if not lines:
            return
        where, joined = lines[0][0], " ".join(line for _, line in lines)
        for span in re.findall(r"`([^`]+)`", joined):
            found.extend((owner, flag, where) for owner, flag in span_flags(span, default))
        rest = re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]+`", " ", joined))  # link targets may hold --
        found.extend((default, flag, where) for flag in flags_in(rest))
        lines.clear()

    for number, line in enumerate((page.read_text() if text is None else text).splitlines(), 1):
        where = f"{page.relative_to(ROOT)}:{number}"
        opening = FENCE.match(line)
        if fence is None and opening:
            prose(paragraph)
            fence, block_lang, continued = opening[1], opening[2], None
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            elif block_lang in ("yaml", "yml"):
                key = re.match(r"\s*(\w+):\s*(.*)", line.split(" #")[0])
                if key and key[1] in ("all", *(Path(a).stem for a in ALGORITHMS)):
                    owner = SHARED if key[1] == "all" else f"{key[1]}.py"
                    found.extend((owner, flag, where) for flag in flags_in(key[2]))
            elif block_lang in ("", "bash", "sh", "shell", "console"):
                text_line = (continued or "") + line.rstrip("\\")
                if line.rstrip().endswith("\\"):
                    continued = text_line + " "
                    continue
                continued = None
                found.extend((owner, flag, where) for owner, flag in command_flags(text_line, default))
            continue  # python, text, ...: not command lines
        heading = HEADING.match(line)
        if heading:  # a heading naming a script is its section's default, subsections included
            prose(paragraph)
            level, named = len(heading[1]), SCRIPT.search(heading[2])
            sections = [(lv, script) for lv, script in sections if lv < level]
            sections += [(level, named[1])] if named else []
            default = sections[-1][1] if sections else page_default
            continue
        if not line.strip() or line.lstrip().startswith("|"):
            prose(paragraph)
            prose([(where, line)])
            continue
        if re.match(r"\s*([-*+]|\d+\.)\s", line):  # a list item starts a paragraph of its own
            prose(paragraph)
        paragraph.append((where, line))
    prose(paragraph)
    return found


def defined_flags(help_text: str) -> set:
    """The flags an --help output defines: the option column (rows that start with a dash near the left edge;
    descriptions and their wrapped lines are indented further, so a flag named in a description does not count)."""
    flags = set()
    for line in help_text.splitlines():
        row = re.match(r"^[\s│|]{0,4}(-.*)", line.replace("\u2502", "│"))
        if row:
            options = re.split(r"\s{2,}", row[1])[0]
            flags.update(re.findall(r"--[\w-]+", options))
    return flags


@pytest.fixture(scope="module")
def help_flags() -> dict:
    """script -> the flags of its --help (wide, plain output), and of its subcommands' --help."""
    env = {"COLUMNS": "200", "TERM": "dumb"}
    flags = {}
    for script in [s for s in ALGORITHMS + TOOLS if (ROOT / s).is_file()]:
        flags[script] = set()
        for command in [[], *([sub] for sub in SUBCOMMANDS.get(script, ()))]:
            result = run_script(script, *command, "--help", env=env, timeout=120)
            out = result.stdout + result.stderr
            assert result.returncode == 0, f"python {script} {' '.join(command)} --help failed:\n{out}"
            flags[script] |= defined_flags(out)
        assert "--help" in flags[script] and len(flags[script]) > 1, f"no options read from {script} --help:\n{out}"
    return flags


def test_every_documented_flag_is_a_flag_of_its_script(help_flags):
    algorithms = [s for s in ALGORITHMS if s in help_flags]
    wrong = []
    for page in PAGES:
        for owner, flag, where in documented_flags(page):
            scripts = algorithms if owner == SHARED else [owner]
            for script in scripts:
                if script not in help_flags:  # a page for a script still being written
                    continue
                if flag not in help_flags[script]:
                    wrong.append(f"{where}: {flag} is not a flag of {script}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def args_fields(script: str) -> tuple:
    """(the algorithm's own fields, the run's fields) of a script's Args, in order: the run's are those between the
    SHARED BLOCK (args) markers."""
    text = (ROOT / script).read_text()
    begin, end = blocks(text, script)["args"]  # 0-based lines, markers included
    (args,) = [node for node in ast.parse(text).body if isinstance(node, ast.ClassDef) and node.name == "Args"]
    own, shared = [], []
    for node in args.body:
        if isinstance(node, ast.AnnAssign):
            (shared if begin < node.lineno - 1 < end else own).append(node.target.id)
    return own, shared


def test_every_field_of_args_is_a_documented_flag():
    """Every Args field of every algorithm script is named as a flag (--name, or --no-name for a boolean) on its page:
    the algorithm's own fields on docs/<script>.md, the run's fields (the shared block's) on docs/usage.md."""
    usage = ROOT / "docs" / "usage.md"

    def flags_on(page: Path, owner: str) -> set:
        return {flag for who, flag, _ in documented_flags(page) if who == owner} if page.is_file() else set()

    missing = []
    for script in ALGORITHMS:
        page = ROOT / "docs" / f"{Path(script).stem}.md"
        own, shared = args_fields(script)
        for fields, where, named in ((own, page, flags_on(page, script)), (shared, usage, flags_on(usage, SHARED))):
            absent = [f"--{field.replace('_', '-')}" for field in fields]
            absent = [flag for flag in absent if not {flag, flag.replace("--", "--no-", 1)} & named]
            if absent:
                owner = f"{script}'s" if where == page else "the shared block's"  # the same in every script
                nowhere = "" if where.is_file() else " (no such page)"
                missing.append(f"{where.relative_to(ROOT)}{nowhere} lacks {owner} {', '.join(absent)}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_the_parser_attributes_flags_to_their_scripts():
    """The rules above, on a made-up page."""
    page = ROOT / "docs" / "cql.md"
    text = "\n".join(
        [
            "Run `--cql-alpha 5` here, `python sweep.py --threads 2 -- --eval-every 10` there,",
            "`pip install -e .[test]`.",
            "```bash",
            "python report.py runs --out r  # or --reps 10",
            "OMP_NUM_THREADS=1 python iql.py \\",
            "    --beta 3",
            "ray start --head --port 6379",
            "```",
            "```yaml",
            "flags:",
            "  all: --eval-every 5",
            "  iql: --hidden-dim 32",
            "```",
            "## Reports: `report.py`",
            "`--include-incomplete` and `--[no-]x-y`",
        ]
    )
    found = [(owner, flag) for owner, flag, _ in documented_flags(page, text)]
    assert found == [
        ("cql.py", "--cql-alpha"),
        ("sweep.py", "--threads"),
        (SHARED, "--eval-every"),
        ("report.py", "--reps"),
        ("report.py", "--out"),
        ("iql.py", "--beta"),
        (SHARED, "--eval-every"),
        ("iql.py", "--hidden-dim"),
        ("report.py", "--include-incomplete"),
        ("report.py", "--x-y"),
        ("report.py", "--no-x-y"),
    ]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text.replace("`", "")).replace(" ", "-")


def anchors(page: Path) -> set:
    found, fence = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fence = not fence
        elif not fence and HEADING.match(line):
            found.add(slug(HEADING.match(line)[2]))
    return found


def test_relative_links_and_anchors_point_at_what_exists():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_links_back_to_the_readme():
    for page in PAGES[1:]:
        assert "](../README.md" in page.read_text(), f"{page.name} has no link back to the README"


def test_the_readme_fits_on_a_page_and_holds_the_tested_offline_quickstart():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    tree = ast.parse((ROOT / "tests" / "test_collect.py").read_text())
    (quickstart,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "QUICKSTART" for t in node.targets)
    ]
    for command in ast.literal_eval(quickstart):
        assert f"\n{command}\n" in readme, f"the README's offline quickstart lacks, verbatim: {command}"


def test_quoted_files_are_quoted_verbatim():
    """A fenced block right after `<!-- file: PATH -->` must be PATH's text."""
    quoted = 0
    for page in PAGES:
        for path, body in re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", page.read_text(), flags=re.S):
            assert body == (ROOT / path).read_text(), f"{page.name} quotes {path}, but not as it is"
            quoted += 1
    assert quoted >= 1
