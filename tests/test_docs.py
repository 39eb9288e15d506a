"""README.md and docs/ stay true to the code they document."""

import re
import subprocess
import sys
from pathlib import Path

from ds01_spawner import DS01Spawner
from ds01_spawner.settings import DS01Settings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"
CONFIGURATION = (DOCS / "configuration.md").read_text()
ARCHITECTURE = (DOCS / "architecture.md").read_text()


def test_configuration_page_documents_every_setting():
    own = [
        n
        for n in DS01Spawner.class_traits(config=True)
        if n in DS01Spawner.__dict__ or n in DS01Settings.__dict__
    ]
    assert own, "DS01Spawner has settings"
    missing = [n for n in own if f"`c.DS01Spawner.{n}`" not in CONFIGURATION]
    assert missing == [], f"run scripts/config-reference, update docs/configuration.md: {missing}"


def test_configuration_page_settings_table_is_current():
    table = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config-reference")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.strip() in CONFIGURATION, (
        "docs/configuration.md's settings table differs from the traitlets' help: "
        "paste the output of scripts/config-reference"
    )


def test_readme_names_the_two_commands_and_they_exist():
    for command in ("scripts/start-hub", "scripts/test"):
        assert command in README
        assert (REPO / command).stat().st_mode & 0o111
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_spawner_entry_point_is_registered():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="jupyterhub.spawners") if e.name == "ds01"]
    assert ep.load() is DS01Spawner


def test_module_map_names_every_module_and_only_real_ones():
    modules = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "ds01_spawner").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    named = set(re.findall(r"^\| `(ds01_spawner/[\w/]+\.py)` \|", ARCHITECTURE, re.M))
    assert sorted(modules - named) == [], "give each new module a line in docs/architecture.md"
    assert sorted(named - modules) == [], "docs/architecture.md names modules that do not exist"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def _without_code(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading():
    broken = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in _anchors(_without_code(file.read_text())):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_readme_links_every_docs_page_and_each_says_its_purpose():
    for page in sorted(DOCS.glob("*.md")):
        assert f"](docs/{page.name})" in README, f"link docs/{page.name} from README.md"
        title, blank, purpose = page.read_text().split("\n")[:3]
        assert title.startswith("# ") and blank == "" and purpose.strip(), page.name


def test_readme_shows_every_screenshot():
    for picture in sorted((DOCS / "screenshots").glob("*.png")):
        assert f"](docs/screenshots/{picture.name})" in README, picture.name
