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
