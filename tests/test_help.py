"""Help that fits an 80-column terminal, and shell completion, through the real entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

from fmnist_lightning.cli import app
from tests.helpers import subprocess_env


def _root() -> TyperGroup:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    return root


COMMANDS = sorted(_root().commands)  # every registered command


def _shown(name: str, text: str) -> bool:
    """`name` appears whole: not cut, and not only as the start of a longer option name."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_whole_at_80_columns(cli, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli(*filter(None, [command]), "--help")
    assert code == 0, out
    assert "…" not in out
    assert [line for line in out.splitlines() if len(line) > 80] == []
    root = _root()
    click_command = root.commands[command] if command else root
    names = [n for p in click_command.params if p.param_type_name == "option" for n in (*p.opts, *p.secondary_opts)]
    assert names and [n for n in names if not _shown(n, out)] == []


def test_the_command_list_gives_each_summary_whole(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = " ".join(cli("--help")[1].split())  # wrapped lines joined
    for name, command in _root().commands.items():
        assert f"{name} {command.get_short_help_str(limit=sys.maxsize)}" in out


def test_a_bare_fmnist_prints_the_help_not_an_error(cli) -> None:
    code, out, err = cli()
    assert (code, err) == (2, "")
    assert out.startswith("Usage: fmnist") and "Commands:" in out


@pytest.mark.parametrize(
    ("words", "expected"),
    [("fmnist fi", "fit"), ("fmnist fit --checkpoint-every", "--checkpoint-every-n-steps")],
)
def test_bash_completes_commands_and_options(words: str, expected: str) -> None:
    """What the script of `fmnist --install-completion` asks the installed `fmnist` in bash."""
    fmnist = Path(sys.executable).parent / "fmnist"
    env = subprocess_env(_FMNIST_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - 1))
    done = subprocess.run([fmnist], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.split()) == (0, [expected]), done.stderr
