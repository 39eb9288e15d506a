"""README.md stays true to the code it documents."""

import subprocess
import sys
from pathlib import Path

from ds01_spawner import DS01Spawner

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_readme_documents_every_setting():
    own = [n for n in DS01Spawner.class_traits(config=True) if n in DS01Spawner.__dict__]
    assert own, "DS01Spawner has settings"
    missing = [n for n in own if f"`c.DS01Spawner.{n}`" not in README]
    assert missing == [], f"run scripts/config-reference and update README.md: {missing}"


def test_readme_settings_table_is_current():
    table = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config-reference")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.strip() in README, "README's settings table differs from the traitlets' help"


def test_readme_names_the_two_commands_and_they_exist():
    for command in ("scripts/start-hub", "scripts/test"):
        assert command in README
        assert (REPO / command).stat().st_mode & 0o111
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_spawner_entry_point_is_registered():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="jupyterhub.spawners") if e.name == "ds01"]
    assert ep.load() is DS01Spawner
