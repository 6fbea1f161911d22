"""The commands and paths that README.md and docs/*.md give work in a clone: every `python SCRIPT --flag ...` line names
a script of the repository and only flags that script's --help lists, and every relative link or repository path
points at a file that exists. Nothing trains: each script runs once, with --help."""

import functools
import glob
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# the flags after `--` go on to the script this tool runs
PASS_THROUGH = {"benchmarks/profile_iteration.py": "deepspi_atari.py"}
LAUNCHERS = {"torchrun", "torch.distributed.run"}
TEST_COMMAND = "python -m pytest -q -rs -n auto --dist loadfile tests"


def shell_lines(text):
    """(line number, command line) of a markdown text: the lines of fenced code blocks, `\\`-continuations joined and
    $VARIABLES of the block's own `NAME="..."` lines expanded, and the inline `python ...`/`torchrun ...` code spans of
    the prose, which may wrap over lines."""
    found, prose, in_block, pending, start, variables = [], [], False, "", 0, {}
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            in_block, pending, variables = not in_block, "", {}
            prose.append("")
            continue
        prose.append("" if in_block else line)
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        assignment = re.fullmatch(r"\s*([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*')\s*", line)
        if assignment:
            variables[assignment[1]] = assignment[2][1:-1]
            continue
        for name, value in variables.items():
            line = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", lambda _, value=value: value, line)
        found.append((start, line))
    prose = "\n".join(prose)
    for span in re.finditer(r"`((?:python|torchrun|OMP_NUM_THREADS=\S+ python) (?:(?!\n\s*\n)[^`])+)`", prose):
        found.append((prose.count("\n", 0, span.start()) + 1, " ".join(span[1].split())))
    return sorted(found, key=lambda item: item[0])


def commands(line):
    """Each (script, flags, pass-through flags) a command line runs with python or torchrun; `-m pytest` is left out."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: a command that cannot have been pasted as it is
        raise AssertionError(f"unbalanced quotes in: {line}") from None
    for piece in re.split(r"\x00(?:&&|\|\||;|\|)\x00", "\x00".join(tokens)):
        words = [w for w in piece.split("\x00") if w]
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value before the command
            words = words[1:]
        if not words or os.path.basename(words[0]) not in {"python", "python3", "torchrun"}:
            continue
        launcher, rest = os.path.basename(words[0]), words[1:]
        if rest[:2] == ["-m", "torch.distributed.run"]:
            launcher, rest = "torch.distributed.run", rest[2:]
        elif rest[:1] == ["-m"]:
            continue
        if launcher in LAUNCHERS:  # the launcher's own flags (and their values) come before the script
            while rest and not rest[0].endswith(".py"):
                rest = rest[1:]
        if not rest:  # the launcher named in prose, without a script
            continue
        script, args = rest[0], rest[1:]
        inner = args[args.index("--") + 1 :] if "--" in args else []
        args = args[: args.index("--")] if "--" in args else args
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        yield script, flags, [a.split("=", 1)[0] for a in inner if a.startswith("--")]


def documented_commands(paths=DOCS):
    """(where, script, flags) for every python command in the given markdown files, pass-through flags resolved."""
    found = []
    for path in paths:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for number, line in shell_lines(text):
            for script, flags, inner in commands(line):
                found.append((f"{path}:{number}", script, flags))
                if inner:
                    found.append((f"{path}:{number}", PASS_THROUGH.get(script, script), inner))
    return found


def external(script):
    """A script outside the repository (the docs say where to get it), e.g. CleanRL's in /tmp."""
    return os.path.isabs(script) or script.startswith("~")


@functools.cache
def help_flags(script):
    """The flags a script defines, read from the option lines of its --help (tyro's box or argparse's list)."""
    env = dict(os.environ, COLUMNS="400", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"{script} --help exited with {out.returncode}: {out.stderr[-2000:]}"
    flags = set()
    for line in out.stdout.splitlines():
        option = re.match(r"^(?:│ | {2})(-[^\s,]+(?:, -[^\s,]+)*)", line)
        if option:
            flags.update(flag for flag in option[1].split(", ") if flag.startswith("--"))
    assert "--help" in flags, f"no option lines found in the --help of {script}"
    return frozenset(flags)


def unknown_flags(found):
    """'where: script --flag' for each documented flag that the script's --help does not list, and 'where: script'
    for each repository script that does not exist."""
    problems = []
    scripts = sorted({s for _, s, _ in found if not external(s) and os.path.isfile(os.path.join(ROOT, s))})
    with ThreadPoolExecutor(4) as pool:  # one --help per script, run side by side
        list(pool.map(help_flags, scripts))
    for where, script, flags in found:
        if external(script):
            continue
        if not os.path.isfile(os.path.join(ROOT, script)):
            problems.append(f"{where}: {script}: no such script in the repository")
            continue
        problems += [f"{where}: {script} {flag}" for flag in flags if flag not in help_flags(script)]
    return problems


def test_every_documented_flag_is_in_its_scripts_help():
    found = documented_commands()
    readme = [f for f in found if f[0].startswith("README.md:")]
    assert len({s for _, s, _ in found}) >= 8 and readme, f"too few commands found: {found}"
    assert unknown_flags(found) == []


def test_a_made_up_flag_or_script_is_reported(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `python deepspi_maze.py --n 5 --made-up-flag 3` or:\n\n```bash\n"
        'B="--seed 2 --no-such-thing"\n'
        "OMP_NUM_THREADS=1 python deepspi_maze.py $B \\\n    --epsilon=0.1  # a comment --not-a-flag\n"
        "torchrun --standalone --nproc_per_node 2 deepspi_atari_multigpu.py --num-envs 8 --bogus\n"
        "python benchmarks/profile_iteration.py --top 5 -- --bf16 --wrong-inner\n"
        "python no_such_script.py --x && python -m pytest -q --whatever tests\n"
        "python /tmp/ppo_atari.py --anything\n```\n"
        "Or `python deepspi_maze.py --epsilon 0.1\n--wrapped-typo` in prose.\n"
    )  # fmt: skip
    found = documented_commands([str(doc)])
    assert [(s, f) for _, s, f in found] == [
        ("deepspi_maze.py", ["--n", "--made-up-flag"]),
        ("deepspi_maze.py", ["--seed", "--no-such-thing", "--epsilon"]),
        ("deepspi_atari_multigpu.py", ["--num-envs", "--bogus"]),
        ("benchmarks/profile_iteration.py", ["--top"]),
        ("deepspi_atari.py", ["--bf16", "--wrong-inner"]),
        ("no_such_script.py", ["--x"]),
        ("/tmp/ppo_atari.py", ["--anything"]),
        ("deepspi_maze.py", ["--epsilon", "--wrapped-typo"]),
    ]
    assert [p.split(": ", 1)[1] for p in unknown_flags(found)] == [
        "deepspi_maze.py --made-up-flag",
        "deepspi_maze.py --no-such-thing",
        "deepspi_atari_multigpu.py --bogus",
        "deepspi_atari.py --wrong-inner",
        "no_such_script.py: no such script in the repository",
        "deepspi_maze.py --wrapped-typo",
    ]
    assert unknown_flags(found)[1].startswith(f"{doc}:5: ")  # the line where the continued command starts


def repo_paths(text):
    """The relative targets of markdown links and images, and the repository paths written in code spans."""
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    spans = re.findall(r"`((?:docs|tests|experiments|benchmarks)/[^`\s]*)`", text)
    return [t.split("#")[0] for t in targets], [s.split("::")[0] for s in spans]


@pytest.mark.parametrize("path", DOCS)
def test_links_and_paths_resolve(path):
    with open(os.path.join(ROOT, path)) as f:
        links, spans = repo_paths(f.read())
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, os.path.dirname(path), link))]
    for span in spans:  # docs/learning/x.{csv,md} and globs: each expansion must match a file
        brace = re.search(r"\{([^}]*)\}", span)
        for expanded in (
            [span[: brace.start()] + alt + span[brace.end() :] for alt in brace[1].split(",")] if brace else [span]
        ):
            if not glob.glob(os.path.join(ROOT, expanded)):
                missing.append(expanded)
    assert missing == []


def test_readme_test_command_is_the_one_ci_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().split("\n")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().split("\n")
    assert TEST_COMMAND in readme and TEST_COMMAND in ci
