"""The README keeps its promises: two commands, and one configuration table naming every setting."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    from domain.config import env_names

    documented = set(re.findall(r"`(FOUNDRY_[A-Z0-9_]+)`", README))
    missing = set(env_names()) - documented
    assert not missing, f"README configuration table lacks {sorted(missing)}"


def test_the_two_commands_exist():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def _commands():
    """(command, [its subcommands]) for every top-level `foundry` command."""
    import argparse

    from worker.cli import build_parser

    def sub_actions(parser):
        return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]

    (top,) = sub_actions(build_parser())
    for name, parser in top.choices.items():
        yield name, [sub for a in sub_actions(parser) for sub in a.choices]


def test_every_cli_command_appears_in_the_readme():
    spans = re.findall(r"`(foundry [^`]+)`", README) + re.findall(r"^(foundry .+)$", README, re.M)
    for name, subs in _commands():
        mine = [s for s in spans if re.match(rf"foundry {re.escape(name)}\b", s)]
        assert mine, f"`foundry {name}` is not in the README"
        for sub in subs:
            assert any(re.search(rf"(?<![\w-]){re.escape(sub)}(?![\w-])", s) for s in mine), \
                f"`foundry {name} {sub}` is not in the README"
