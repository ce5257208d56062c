"""The README and the guides in docs/ stay honest.

- Every relative link and image in README.md and docs/**/*.md resolves to a file of the repository,
  and every `#anchor` into a markdown file names one of its headings (GitHub's slugs).
- Every `fmnist ...` command line they show (in code blocks, in console output, in inline code) parses
  against the real CLI: the Click command Typer builds, parsed with `make_context` and never invoked,
  so an unknown option, a bad choice or a wrong type fails here. `python -m fmnist_lightning`,
  `torchrun ... -m fmnist_lightning`, `srun ... fmnist`, `sbatch scripts/slurm/train.sbatch ...` (extra
  `fit` options) and `scripts/reproduce.sh CONFIG N ...` (`fit` options, then `test` options after
  `--`) and `python scripts/benchmark.py ...` (`bench` options) lines are checked as the `fmnist`
  command they run.
- The README stays short and names every package `.ci/run` installs, and shows its test command.

Fast: no training, no data; only the CLI's option parsing.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

from fmnist_lightning.cli import app

try:  # Typer 0.29 and later carry their own copy of Click
    from typer._click import exceptions as click_errors
    from typer.exceptions import Exit
except ImportError:  # older Typer runs on Click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]
    from click.exceptions import Exit  # type: ignore[no-redef,assignment]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_LIMIT = 15_000  # characters

# Placeholders the docs use for a value, and a harmless value of the right kind for each. Only a whole
# shell word is replaced; anything else must parse as written.
PLACEHOLDERS = {
    "PATH": "runs/001/checkpoints/best.ckpt",
    "RUN": "runs/001",
    "RUN_DIR": "runs/001",
    "IMAGE_OR_FOLDER": "tests/data",
    "FILE.yaml": "configs/default.yaml",
    "SPACE.yaml": "configs/spaces/dropout-lr.yaml",
    "CONFIG": "configs/default.yaml",
    "STUDY": "runs/tune-study",
    "OUT_DIR": "out",
    "FILE": "out.json",
    "N": "2",
    "M": "2",
    "S": "60",
    "V": "1.0",
}
SHELL_VARIABLE = re.compile(r"\$\{\w+\}|\$\w+")
# `[--timeout S]`: an optional part, written out when checked.
OPTIONAL = re.compile(r"\[(-[^\[\]]*)\]")
# Redirections (`> log`, `2>&1`), removed before splitting into words.
REDIRECTION = re.compile(r"(?:^|(?<=\s))\d*(?:>>|>&|&>|>|<)\s*\S+")
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
WRAPPERS = {"time", "exec", "nice", "env"}

# Command lines the check cannot parse, as (file relative to the repository, the text as found): empty
# so far. An entry that no longer occurs fails the test, so this list cannot go stale.
CANNOT_PARSE: set[tuple[str, str]] = set()

# The least number of `fmnist` invocations the docs show, in all and in code blocks (so a parser that
# finds none cannot pass vacuously): 116 and 17 when this was written.
MIN_COMMAND_LINES = 100
MIN_BLOCK_COMMAND_LINES = 15


@dataclass(frozen=True)
class Shown:
    """A command line shown in a document: where, the text as written, and how strictly to check it."""

    doc: Path
    line: int
    text: str
    complete: bool  # False for inline code and quoted output, which may leave out a required option

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


# ---------------------------------------------------------------------------------------------
# Reading markdown: fenced blocks apart from prose, inline code, links, headings


@dataclass(frozen=True)
class Block:
    lang: str
    start: int  # line number of the block's first line (after the fence)
    lines: list[str]


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[Block]]:
    """The prose lines (number, text) and the fenced code blocks of a markdown file."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    fence: str | None = None
    lang, start, body = "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None:
            match = re.match(r"(```+|~~~+)\s*([\w+-]*)", stripped)
            if match:
                fence, lang, start, body = match.group(1), match.group(2).lower(), number + 1, []
            else:
                prose.append((number, line))
        elif stripped.startswith(fence) and not stripped[len(fence) :].strip():
            blocks.append(Block(lang, start, body))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"unclosed code fence (opened before line {start})"
    return prose, blocks


INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def prose_text(prose: list[tuple[int, str]]) -> tuple[str, list[int]]:
    """The prose joined into one string, with the line number of each character's line."""
    text = "\n".join(line for _, line in prose)
    line_of = []
    for number, line in prose:
        line_of.extend([number] * (len(line) + 1))
    return text, line_of


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=[\"']([^\"']+)[\"']", re.IGNORECASE)


def links(doc: Path) -> list[tuple[int, str]]:
    """Every link target in the prose of `doc` (inline, reference-style and HTML), with its line."""
    prose, _ = split_markdown(doc.read_text())
    text, line_of = prose_text(prose)
    # Code spans are not links: blank them out, keeping positions (and so line numbers).
    text = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    found = []
    for pattern in (LINK, REFERENCE, HTML_LINK):
        found += [(line_of[m.start(1)], m.group(1)) for m in pattern.finditer(text)]
    return sorted(found, key=lambda item: item[0])  # by line; in order of the patterns within a line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower-cased, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
    text = text.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    prose, _ = split_markdown(doc.read_text())
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose:
        match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


# ---------------------------------------------------------------------------------------------
# Finding the command lines


def logical_lines(lines: list[str], start: int) -> list[tuple[int, str]]:
    """Lines of a shell block with `\\` continuations joined, each with its first line's number."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, line in enumerate(lines):
        number = start + offset
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
        else:
            joined.append((number, line))
    if pending is not None:
        joined.append(pending)
    return joined


# An `fmnist ...` command quoted inside other text (console output, a sentence): up to a closing
# bracket or backtick, or the end of the line.
QUOTED_COMMAND = re.compile(r"(?<![\w/.-])fmnist\s+(?:[a-z-]+|--\w[\w-]*)[^)`\]\n]*")
LAUNCHERS = re.compile(r"(?<![\w/.-])(?:fmnist|python3?|torchrun|srun|sbatch|scripts/reproduce\.sh)(?![\w-])")


def shown_commands(doc: Path) -> list[Shown]:
    """Every command line in `doc` that runs `fmnist`, directly or through a launcher."""
    prose, blocks = split_markdown(doc.read_text())
    found: list[Shown] = []
    for block in blocks:
        if block.lang in ("python", "py", "yaml", "yml", "json", "toml", "ini", "csv"):
            continue  # no shell here; a block of these that runs fmnist would be quoted in a shell block
        console = block.lang in ("console", "shell-session")
        for number, line in logical_lines(block.lines, block.start):
            if console and not line.startswith("$ "):
                # Output; it may quote a command to run next (`train with it: fmnist fit ...`).
                found += [Shown(doc, number, m.group(0).strip(), False) for m in QUOTED_COMMAND.finditer(line)]
                continue
            line = line[2:] if console else line
            if LAUNCHERS.search(line):
                found.append(Shown(doc, number, line.strip(), True))
    text, line_of = prose_text(prose)
    for match in INLINE_CODE.finditer(text):
        code = " ".join(match.group(2).split())
        if LAUNCHERS.match(code) or re.match(r"\w+=\S*\s", code) or code.startswith("time "):
            found.append(Shown(doc, line_of[match.start(2)], code, False))
    return found


def shell_words(line: str) -> list[list[str]]:
    """The simple commands of a shell line, each as its words (variables and placeholders filled in)."""
    line = SHELL_VARIABLE.sub("1", line)
    line = OPTIONAL.sub(r"\1", line)
    line = REDIRECTION.sub(" ", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in OPERATORS:
            commands.append([])
        elif word != "...":
            commands[-1].append(PLACEHOLDERS.get(word, word))
    return [c for c in commands if c]


def _basename(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def fmnist_invocations(words: list[str]) -> list[list[str]]:
    """The `fmnist` argument lists one simple command runs (none if it runs something else)."""
    while words and (ASSIGNMENT.match(words[0]) or words[0] in WRAPPERS):
        words = words[1:]
    if not words:
        return []
    head, rest = _basename(words[0]), words[1:]
    if head == "fmnist":
        return [rest]
    if head in ("python", "python3"):
        if rest[:1] and rest[0].endswith("scripts/benchmark.py"):
            return [["bench", *rest[1:]]]  # the script runs `fmnist bench` with its arguments
        return [rest[2:]] if rest[:2] == ["-m", "fmnist_lightning"] else []
    if head == "torchrun":
        if "fmnist_lightning" not in rest:
            return []
        at = rest.index("fmnist_lightning")
        assert rest[at - 1] == "-m", f"torchrun runs fmnist_lightning without -m: {words}"
        return [rest[at + 1 :]]
    if head == "srun":
        for at, word in enumerate(rest):
            if _basename(word) in ("fmnist", "python", "python3"):
                return fmnist_invocations(rest[at:])
        return []
    if head == "sbatch":
        script = next((i for i, w in enumerate(rest) if w.endswith("scripts/slurm/train.sbatch")), None)
        return [] if script is None else [["fit", *rest[script + 1 :]]]  # the script runs `fmnist fit ... "$@"`
    if words[0].endswith("scripts/reproduce.sh"):
        # scripts/reproduce.sh CONFIG N [fit options] [-- test options]
        if len(rest) < 2:
            return []  # the script named in passing, not run
        config, options = rest[0], rest[2:]
        split = options.index("--") if "--" in options else len(options)
        fit, test = options[:split], options[split + 1 :]
        return [["fit", "--config", config, *fit], ["test", *test]]
    return []


# ---------------------------------------------------------------------------------------------
# Parsing against the CLI without running it


@pytest.fixture(scope="module")
def cli() -> TyperGroup:
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    return command


def _protected_args(ctx: typer.Context) -> list[str]:
    # Click >= 8.2 keeps the subcommand's name in `_protected_args` (the public name is deprecated).
    found = getattr(ctx, "_protected_args", None)
    return list(found if found is not None else ctx.protected_args)


def dry_parse(cli: TyperGroup, args: list[str], complete: bool) -> str | None:
    """Parse `fmnist ARGS` as Click would, without invoking anything: None, or Click's error.

    `--help` and `--version` end the parse successfully (their output is discarded). For a command
    quoted in passing (`complete` False), a missing required option or argument is accepted."""
    if not args:
        return None if not complete else "no command given"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            root = cli.make_context("fmnist", list(args), resilient_parsing=False)
            rest = [*_protected_args(root), *root.args]
            if not rest:
                return None if not complete else "no command given"
            name, command, sub_args = cli.resolve_command(root, rest)
            assert command is not None
            # Quoted in passing, a command may leave out what it requires; every value it gives is
            # still checked (a missing parameter would end the parse before the values after it).
            required = [p for p in command.params if p.required and not complete]
            for param in required:
                param.required = False
            try:
                command.make_context(name, sub_args, parent=root, resilient_parsing=False)
            finally:
                for param in required:
                    param.required = True
    except Exit as exc:
        return None if exc.exit_code == 0 else f"exited {exc.exit_code}"
    except click_errors.ClickException as exc:
        return exc.format_message()
    return None


def check_commands(cli: TyperGroup, shown: list[Shown]) -> tuple[list[str], int, set[tuple[str, str]]]:
    """Problems (file:line, the line, Click's error), the number of invocations parsed, and the
    allow-listed lines met."""
    problems, parsed, allowed = [], 0, set()
    for item in shown:
        key = (str(item.doc.relative_to(ROOT)), item.text)
        if key in CANNOT_PARSE:
            allowed.add(key)
            continue
        try:
            invocations = [inv for words in shell_words(item.text) for inv in fmnist_invocations(words)]
        except (ValueError, AssertionError) as exc:  # shlex: no closing quotation; a malformed launcher
            problems.append(f"{item.where()}: {item.text}\n    cannot split it: {exc}")
            continue
        if not invocations and item.complete and re.search(r"(?<![\w/.-])fmnist(?![\w-])", item.text):
            problems.append(f"{item.where()}: {item.text}\n    names fmnist, but runs no command this check knows")
        for args in invocations:
            if not args and not item.complete:
                continue  # `fmnist` named in passing (the tool, or a benchmark path), not a command line
            parsed += 1
            error = dry_parse(cli, args, item.complete)
            if error is not None:
                problems.append(f"{item.where()}: {item.text}\n    fmnist {shlex.join(args)}\n    {error}")
    return problems, parsed, allowed


# ---------------------------------------------------------------------------------------------
# The tests


def _doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def test_the_docs_are_found() -> None:
    names = {_doc_id(d) for d in DOCS}
    assert {"README.md", "docs/RESULTS.md"} <= names and len(names) >= 5, names


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_relative_link_resolves(doc: Path) -> None:
    problems = []
    for line, target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"{_doc_id(doc)}:{line}: {target}: no such file")
            continue
        if ROOT not in (file, *file.parents):
            problems.append(f"{_doc_id(doc)}:{line}: {target}: outside the repository")
        if anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{_doc_id(doc)}:{line}: {target}: no heading with the anchor #{anchor} in {file.name}")
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_command_line_shown_parses(cli: TyperGroup, doc: Path) -> None:
    problems, _, _ = check_commands(cli, shown_commands(doc))
    assert not problems, "command lines that the CLI refuses:\n" + "\n".join(problems)


def test_the_command_check_covers_the_docs(cli: TyperGroup) -> None:
    shown = [item for doc in DOCS for item in shown_commands(doc)]
    problems, parsed, allowed = check_commands(cli, shown)
    assert parsed >= MIN_COMMAND_LINES, f"only {parsed} fmnist command lines found in the docs"
    in_blocks = check_commands(cli, [item for item in shown if item.complete])[1]
    assert in_blocks >= MIN_BLOCK_COMMAND_LINES, f"only {in_blocks} fmnist command lines found in code blocks"
    assert allowed == CANNOT_PARSE, f"CANNOT_PARSE lists lines the docs no longer show: {CANNOT_PARSE - allowed}"
    # Every subcommand of the CLI appears in at least one line that was parsed.
    used = {
        args[0]
        for item in shown
        for words in shell_words(item.text)
        for args in fmnist_invocations(words)
        if args and not args[0].startswith("-")
    }
    assert set(cli.commands) <= used, f"commands shown nowhere in the docs: {sorted(set(cli.commands) - used)}"


def test_the_command_check_catches_mistakes(cli: TyperGroup) -> None:
    """The check fails on an unknown option, a bad choice, a wrong type and an unknown command, and
    reads launchers, continuations, variables and placeholders."""
    bad = [
        "fmnist fit --max-epoch 3",  # unknown option
        "fmnist fit --precision 64-mixed",  # bad choice
        "fmnist fit --max-epochs three",  # wrong type
        "fmnist fitt",  # unknown command
        "torchrun --nproc-per-node 2 -m fmnist_lightning fit --gpu 2",
        "FMNIST_ACCELERATOR=cpu sbatch --nodes 1 scripts/slurm/train.sbatch --max-epoch 1",
        "scripts/reproduce.sh configs/improved.yaml 3 --offline -- --tta-please",
        "fmnist export --format onnx",  # a full command line missing its required --ckpt
    ]
    for line in bad:
        problems, parsed, _ = check_commands(cli, [Shown(README, 1, line, True)])
        assert parsed >= 1 and problems, line
    good = [
        "fmnist --debug tune --config FILE.yaml --space SPACE.yaml --trials N [--timeout S] --out runs/$RUN_NAME",
        "torchrun --nnodes 2 --node-rank $NODE_RANK -m fmnist_lightning fit --num-nodes 2 --strategy ddp # note",
        "srun --label python -m fmnist_lightning test --ckpt PATH > log 2>&1",
        "python3 -m venv .venv && . .venv/bin/activate && fmnist predict --ckpt PATH IMAGE_OR_FOLDER ...",
        "fmnist tune --help",
    ]
    for line in good:
        problems, parsed, _ = check_commands(cli, [Shown(README, 1, line, True)])
        assert parsed >= 1 and not problems, (line, problems)
    # Quoted in passing, a command may leave out what it needs; it may not misspell anything.
    assert not check_commands(cli, [Shown(README, 1, "fmnist export --format onnx", False)])[0]
    assert check_commands(cli, [Shown(README, 1, "fmnist export --format onnx --offlin", False)])[0]
    assert check_commands(cli, [Shown(README, 1, "fmnist predict --eval-batch-size many", False)])[0]


def test_the_link_check_catches_mistakes(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# A title\n\n## Second: `code` part\n\n[ok](#second-code-part) ![img](pic.png) [x](missing.md)\n\n"
        "```bash\n[not a link](nowhere.md)\n```\n\n`[no](nowhere.md)` [web](https://example.com)\n"
    )
    assert links(doc) == [(5, "#second-code-part"), (5, "pic.png"), (5, "missing.md"), (11, "https://example.com")]
    assert anchors(doc) == {"a-title", "second-code-part"}
    assert github_slug("Finding a learning rate: `fmnist lr-find`") == "finding-a-learning-rate-fmnist-lr-find"
    assert github_slug("GPU: fixed in advance, not yet run") == "gpu-fixed-in-advance-not-yet-run"


def _ci_apt_packages() -> list[str]:
    packages = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if "apt-get" in words and "install" in words:
            for word in words[words.index("install") + 1 :]:
                if word.startswith((">", "2>", "&")):
                    break
                if not word.startswith("-"):
                    packages.append(word)
    return packages


def test_the_readme_is_short_and_names_what_ci_installs() -> None:
    text = README.read_text()
    assert len(text) < README_LIMIT, f"README.md has {len(text)} characters; move detail into docs/"
    packages = _ci_apt_packages()
    assert len(packages) >= 3, packages
    missing = [p for p in packages if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text)]
    assert not missing, f"the README does not name what .ci/run installs: {missing}"


def test_the_readme_shows_the_test_command_ci_runs() -> None:
    """.ci/run runs the README's test command verbatim: the README must still show it."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if "test command, verbatim" in line)
    command = lines[marker + 1].strip()
    _, blocks = split_markdown(README.read_text())
    assert any(command in (line.strip() for line in block.lines) for block in blocks), command


# ---------------------------------------------------------------------------------------------
# The CLI's own help says what the docs say


def test_the_top_level_help_names_every_command(cli: TyperGroup) -> None:
    summary = cli.help or ""
    missing = [name for name in cli.commands if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", summary)]
    assert not missing, f"`fmnist --help`'s summary leaves out {missing}: {summary!r}"


def test_the_storage_example_names_the_driver_the_tune_extra_installs(cli: TyperGroup) -> None:
    """The `tune` extra installs psycopg 3, which SQLAlchemy reaches as postgresql+psycopg:// (a bare
    postgresql:// asks for psycopg2, which is not installed)."""
    assert "psycopg" in (ROOT / "pyproject.toml").read_text().split("tune = [", 1)[1].split("]", 1)[0]
    storage = next(p for p in cli.commands["tune"].params if p.name == "storage")
    help_text = getattr(storage, "help", "") or ""
    assert "postgresql+psycopg://" in help_text and "postgresql://" not in help_text, help_text


# ---------------------------------------------------------------------------------------------
# The figures the README quotes are those of their row in RESULTS.md

RESULTS = ROOT / "docs" / "RESULTS.md"
# A test accuracy as the docs quote it (91.34%), and a duration (5 min 4 s, 27.8 min, 150 s).
ACCURACY = re.compile(r"(?<![\d.])(\d{2}\.\d{1,2})%")
DURATION = re.compile(r"(?<![\d.])(?:\d+(?:\.\d+)? min(?: \d+ s)?|\d+ s)\b")
MACHINE_ID = re.compile(r"\bM\d+\b")
CONFIG_FILE = re.compile(r"configs/([\w-]+)\.yaml")
CELL_SEPARATOR = re.compile(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)")  # a `|` outside code spans


@dataclass(frozen=True)
class ResultRow:
    """A row of a RESULTS.md table that has a config (or model) column and a machine column."""

    config: str
    machines: frozenset[str]
    text: str


def tables(doc: Path) -> list[list[dict[str, str]]]:
    """The markdown tables in the prose of `doc`, each as its rows keyed by the header's cells."""
    prose, _ = split_markdown(doc.read_text())
    found: list[list[str]] = []
    previous = None
    for number, line in prose:
        if line.startswith("|"):
            if previous != number - 1:
                found.append([])
            found[-1].append(line)
            previous = number
    result = []
    for lines in found:
        header, *rows = ([c.strip() for c in CELL_SEPARATOR.split(line.strip().strip("|"))] for line in lines)
        body = [row for row in rows if not all(re.fullmatch(r":?-+:?", c) for c in row)]
        result.append([dict(zip([h.lower() for h in header], row)) for row in body])
    return result


def config_named(cell: str) -> str:
    """The config a row is about: the `configs/NAME.yaml` it names, or its first word."""
    found = CONFIG_FILE.search(cell)
    return found.group(1) if found else re.search(r"[\w-]+", cell.replace("*", "").replace("`", "")).group(0)  # type: ignore[union-attr]


def machine_ids() -> set[str]:
    machines = next(t for t in tables(RESULTS) if t and "id" in t[0] and "native bf16" in t[0])
    return {row["id"] for row in machines}


def result_rows() -> list[ResultRow]:
    rows = []
    for table in tables(RESULTS):
        for row in table:
            first = next(iter(row))
            if first in ("config", "model") and "machine" in row:
                ids = frozenset(MACHINE_ID.findall(row["machine"]))
                rows.append(ResultRow(config_named(row[first]), ids, " | ".join(row.values())))
    return rows


def passages(doc: Path) -> list[tuple[int, str]]:
    """The prose of `doc` as passages that quote figures together: each table row, each list item,
    each paragraph (a code block or a heading ends one), with the line it starts on."""
    prose, _ = split_markdown(doc.read_text())
    result: list[tuple[int, str]] = []
    start, lines, previous = 0, [], 0
    for number, line in prose:
        text = line.strip()
        if lines and (not text or number != previous + 1 or text.startswith(("|", "- ", "* ", "#"))):
            result.append((start, " ".join(lines)))
            lines = []
        previous = number
        if text.startswith("|"):
            result.append((number, text))
        elif text:
            start = start if lines else number
            lines.append(text)
    if lines:
        result.append((start, " ".join(lines)))
    return result


def _gives(row: ResultRow, accuracies: list[str], durations: list[str]) -> bool:
    numbers, words = set(re.findall(r"\d+\.\d+", row.text)), " ".join(row.text.split())
    return all(a in numbers for a in accuracies) and all(d in words for d in durations)


def misquoted_figures(quoted: list[tuple[int, str]], rows: list[ResultRow], machines: set[str]) -> list[str]:
    """Passages that quote a test accuracy whose figures (accuracies and durations) are not all in one
    RESULTS row of the config and machine the passage names."""
    problems = []
    for line, text in quoted:
        accuracies = ACCURACY.findall(text)
        if not accuracies:
            continue
        durations = DURATION.findall(text)
        configs, named = set(CONFIG_FILE.findall(text)), set(MACHINE_ID.findall(text))
        if len(configs) != 1 or len(named) != 1 or not named <= machines:
            problems.append(
                f"README.md:{line}: quotes {accuracies} but names the configs {sorted(configs)} and the machines "
                f"{sorted(named)} (known: {sorted(machines)}): name one configs/NAME.yaml and one machine"
            )
            continue
        (config,), (machine,) = configs, named
        candidates = [row for row in rows if row.config == config and machine in row.machines]
        if not any(_gives(row, accuracies, durations) for row in candidates):
            rows_text = "\n      ".join(row.text for row in candidates) or "(none)"
            problems.append(
                f"README.md:{line}: {config} on {machine}: {accuracies} and {durations} are not all in one of its "
                f"RESULTS.md rows:\n      {rows_text}"
            )
    return problems


def test_the_readmes_figures_are_their_rows_in_results() -> None:
    quoted = passages(README)
    problems = misquoted_figures(quoted, result_rows(), machine_ids())
    assert not problems, "the README quotes figures that RESULTS.md does not give:\n" + "\n".join(problems)
    checked = [text for _, text in quoted if ACCURACY.search(text)]
    assert len(checked) >= 6, f"only {len(checked)} passages of the README quote a result: {checked}"


def test_every_result_row_names_its_machine() -> None:
    """Each row of the results tables points into the machines table (a GPU row has none yet)."""
    machines = machine_ids()
    assert {"M1", "M2", "M3"} <= machines, machines
    problems = []
    for table in tables(RESULTS):
        if not table:
            continue
        columns = list(table[0])
        if columns[0] in ("config", "model") and "machine" not in columns:
            problems.append(f"a results table without a machine column: {columns}")
        for row in table if "machine" in columns else []:
            named = set(MACHINE_ID.findall(row["machine"]))
            if not (named and named <= machines) and "unverified" not in " ".join(row.values()):
                problems.append(f"row names no known machine: {' | '.join(row.values())}")
    assert not problems, "\n".join(problems)


def test_the_figure_check_catches_mistakes() -> None:
    rows = [
        ResultRow("improved", frozenset({"M1"}), "improved | M1 | 94.18 +- 0.15 | 25 | 27.8 min mean"),
        ResultRow("default", frozenset({"M3"}), "default | M3 | 91.27% | 150 s for the fit; 3 min 46 s wall"),
    ]
    machines = {"M1", "M3"}
    good = [
        (1, "`configs/improved.yaml` | 94.18% (3 seeds) | 27.8 min | M1"),
        (2, "on [M3](x), `configs/default.yaml` reached 91.27%: the fit took 150 s, 3 min 46 s in all"),
        (3, "no accuracy here, 5 min on M1 and M3"),
    ]
    assert misquoted_figures(good, rows, machines) == []
    bad = [
        "`configs/improved.yaml` | 94.28% | 27.8 min | M1",  # another accuracy
        "`configs/improved.yaml` | 94.18% | 25.8 min | M1",  # another duration
        "`configs/improved.yaml` | 94.18% | 27.8 min | M3",  # another machine
        "`configs/improved.yaml` | 94.18% | 27.8 min",  # no machine
        "`configs/improved.yaml` | 94.18% | 27.8 min | M7",  # an unknown machine
        "94.18% on M1",  # no config
        "`configs/default.yaml` on M3: 91.27%, the fit 3 min 47 s",
    ]
    for text in bad:
        assert misquoted_figures([(1, text)], rows, machines), text
    assert passages(README) and all(isinstance(line, int) for line, _ in passages(README))
