"""docs/ stays true: every CLI option is documented, and every ```python block of every page runs.

Convention: a page's ```python blocks run in order in one namespace, in a fresh temporary directory;
blocks fenced ```python no-run are shown, not run (kept few). Regenerate the option tables of
docs/configuration.md after changing options with `python tests/test_docs.py --write-options`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
RUN, NO_RUN = "python", "python no-run"
MAX_NO_RUN = 6  # blocks that start Ray or need a GPU; everything else must run
TABLE = re.compile(r"(<!-- options:start[^\n]*-->\n)(?P<table>.*?)(<!-- options:end -->)", re.DOTALL)
# Groups of the option tables: the first option of each, in parser order.
GROUPS = {
    "--help": "Command (not settings: they are not config-file keys)",
    "--dataset": "Data",
    "--backdoor": "Backdoor (the removal check)",
    "--model": "Model and training",
    "--forget-client": "The deletion request",
    "--methods": "Methods and IAU",
    "--finetune-rounds": "Baselines",
    "--dropout-prob": "Faults and robustness",
    "--seed": "Execution",
    "--shadow-mia": "Evaluation and output",
    "--tracking": "Experiment tracking",
    "--secure-aggregation": "Secure aggregation",
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on this shared 2-core machine two threads made these in-process runs 8x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def python_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number of the code) of every ```python block of a Markdown text."""
    blocks = []
    for match in FENCE.finditer(text):
        info = " ".join(match.group("info").split())
        if info.split(" ")[0] == "python":
            blocks.append((info, match.group("body"), text.count("\n", 0, match.start("body")) + 1))
    return blocks


def documented(option: str, text: str) -> bool:
    """Whether `option` appears as a whole word (`--seed` is not found inside `--seeds`)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def cli_options() -> list[str]:
    """Every option string of `python -m simulations.run`."""
    from simulations.run import build_parser

    return [option for action in build_parser()._actions for option in action.option_strings]


def options_table() -> str:
    """The option tables of docs/configuration.md, generated from the parser."""
    from simulations.run import build_parser

    lines: list[str] = []
    for action in build_parser()._actions:
        group = next((GROUPS[o] for o in action.option_strings if o in GROUPS), None)
        if group:
            lines += ([""] if lines else []) + [f"### {group}", "", "| option | meaning |", "|---|---|"]
        flags = " / ".join(f"`{o}`" for o in action.option_strings)
        metavar = f" {action.metavar}" if action.nargs != 0 and action.metavar and len(action.option_strings) == 1 else ""
        lines.append(f"| {flags}{metavar} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def all_docs() -> str:
    """Every page of docs/, concatenated."""
    return "\n".join(path.read_text() for path in sorted(DOCS.glob("*.md")))


def test_every_cli_option_is_documented():
    missing = [option for option in cli_options() if not documented(option, all_docs())]
    assert not missing, (
        f"options of `python -m simulations.run` missing from docs/: {missing}; "
        "run `python tests/test_docs.py --write-options` and describe them where they belong"
    )


def test_the_option_tables_list_no_option_that_does_not_exist():
    table = TABLE.search((DOCS / "configuration.md").read_text())
    assert table is not None, "docs/configuration.md lost its <!-- options:start --> / <!-- options:end --> markers"
    listed = set(re.findall(r"`(-{1,2}[\w-]+)`", table.group("table")))
    stale = sorted(listed - set(cli_options()))
    assert not stale, f"docs/configuration.md lists options the CLI no longer has: {stale}; run `python tests/test_docs.py --write-options`"
    assert set(cli_options()) <= listed, "the option tables miss options; run `python tests/test_docs.py --write-options`"


def test_the_checks_can_fail():
    """The helpers find what they should and nothing else (so the tests above can fail)."""
    assert documented("--seed", "use `--seed N`") and not documented("--seed", "use --seeds 0,1")
    assert not documented("-h", "--heldout-fraction") and documented("-h", "`-h` / `--help`")
    text = "a\n```python\nx = 1\n```\n```python no-run\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(RUN, "x = 1\n", 3), (NO_RUN, "y = 2\n", 6)]


def test_snippets_are_marked_with_a_known_convention_and_few_are_skipped():
    blocks = [(path.name, info) for path in sorted(DOCS.glob("*.md")) for info, _, _ in python_blocks(path.read_text())]
    unknown = [(name, info) for name, info in blocks if info not in (RUN, NO_RUN)]
    assert not unknown, f"unknown fence info strings (use ```python or ```python no-run): {unknown}"
    skipped = [name for name, info in blocks if info == NO_RUN]
    assert len(skipped) <= MAX_NO_RUN, f"too many ```python no-run blocks ({skipped}): make them runnable"
    assert sum(info == RUN for _, info in blocks) >= 8


PAGES = sorted(p.name for p in DOCS.glob("*.md") if any(info == RUN for info, _, _ in python_blocks(p.read_text())))


@pytest.mark.parametrize("page", PAGES)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    from strategies.methods import registry_scope

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{page}"}
    with registry_scope():  # a page may register a method
        for info, code, line in python_blocks((DOCS / page).read_text()):
            if info == RUN:
                # Padding keeps tracebacks pointing at the line of the page.
                exec(compile("\n" * (line - 1) + code, str(DOCS / page), "exec"), namespace)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-options"]:
        sys.exit("usage: python tests/test_docs.py --write-options")
    page = DOCS / "configuration.md"
    text = page.read_text()
    if not TABLE.search(text):
        sys.exit(f"{page} has no <!-- options:start --> / <!-- options:end --> markers")
    page.write_text(TABLE.sub(lambda m: m.group(1) + options_table() + m.group(3), text))
    print(f"rewrote the option tables of {page}")
