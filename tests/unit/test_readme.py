"""The README keeps its promises: two commands, and one configuration table naming every setting."""

import re
from pathlib import Path

from domain.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _settings_classes():
    from domain.circuit import CircuitSettings
    from domain.retrieval.settings import RetrievalSettings
    from worker.signals import HealthSettings

    return [Settings, RetrievalSettings, CircuitSettings, HealthSettings]


def test_every_setting_is_documented():
    documented = set(re.findall(r"`(FOUNDRY_[A-Z0-9_]+)`", README))
    expected = {f"{cls.model_config.get('env_prefix', '')}{n.upper()}" for cls in _settings_classes()
                for n in cls.model_fields}
    missing = expected - documented
    assert not missing, f"README configuration table lacks {sorted(missing)}"


def test_the_two_commands_exist():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
