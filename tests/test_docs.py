"""The docs match the code: the README stays a user's README (short, every command and flag of `edge`
in it, the two commands CI and the demo run), and every `docs/design.md §N` citation names a section
that exists. No engine is imported: these run in a second."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
MAX_README_LINES = 300  # issue 16: a README for users; history goes to benchmarks/RESULTS.md

# the two commands .ci/run and the tests take from the README, under these markers
MAIN_COMMAND = "python3 install.py && PATH=$PWD/.venv/bin:$PATH bash benchmarks/demo.sh"
TEST_COMMAND = "python3 install.py --extras test && .venv/bin/python -m pytest"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def commands(parser: argparse.ArgumentParser, prefix: str = "edge"):
    """(command line, parser) for the parser and every subcommand below it, depth first.
    argparse has no public way to list subparsers; `_actions` is how its own help formatter finds them."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{prefix} {name}")


def flags(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """The option strings of each optional argument `--help` lists (help itself excepted)."""
    return [tuple(a.option_strings) for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def mentioned(text: str, word: str) -> bool:
    # a whole flag: `-n` must not match inside `-n-gen` or `--no-token`
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_readme_is_short():
    n = len(readme().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move history to " \
                                  "benchmarks/RESULTS.md and design to docs/design.md"


@pytest.mark.parametrize("marker, command", [("main-command", MAIN_COMMAND), ("test-command", TEST_COMMAND)])
def test_readme_keeps_the_two_commands(marker, command):
    # .ci/run reads the first line of the ```bash block after the marker
    lines = readme().splitlines()
    at = lines.index(f"<!-- {marker} -->")
    assert lines[at + 1] == "```bash" and lines[at + 2] == command


def test_every_command_and_flag_is_in_the_readme():
    from edge.cli import build_parser

    text = readme()
    missing = []
    for line, parser in commands(build_parser()):
        if line != "edge" and line not in text:
            missing.append(f"command `{line}`")
        for options in flags(parser):
            if not any(mentioned(text, o) for o in options):
                missing.append(f"`{line}` option {'/'.join(options)}")
    assert not missing, "README.md does not mention: " + "; ".join(missing)


def design_sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), re.M)}


SKIP_DIRS = {".git", "__pycache__", "build", "demo", "out", "work"}
CITATION = re.compile(r"docs/design\.md((?:[\s,/]*(?:and\s+)?§\s*\d+)+)")


def cited_files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(p in SKIP_DIRS or (p.startswith(".venv")) or p == ".hypothesis" for p in rel.parts):
            continue
        if path.is_file() and path.suffix in {".py", ".md", ".sh", ".toml", ".cpp", ".txt", ""} and path != DESIGN:
            yield path


def test_design_citations_name_existing_sections():
    sections = design_sections()
    assert sections >= set(range(1, 12)), f"docs/design.md lost numbered sections: {sorted(sections)}"
    bad = []
    for path in cited_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in CITATION.finditer(text):
            for n in re.findall(r"§\s*(\d+)", m.group(1)):
                if int(n) not in sections:
                    line = text.count("\n", 0, m.start()) + 1
                    bad.append(f"{path.relative_to(ROOT)}:{line} cites §{n}")
    assert not bad, f"citations of sections docs/design.md does not have ({sorted(sections)}): " + "; ".join(bad)


def test_citation_pattern_finds_lists():
    # the scanner must see every section of "docs/design.md §4, §6" and "docs/design.md §4 and §9"
    found = [re.findall(r"§\s*(\d+)", m.group(1)) for m in
             CITATION.finditer("see docs/design.md §4, §6 and docs/design.md §4 and §9; §7 is not a citation")]
    assert found == [["4", "6"], ["4", "9"]]
