"""Documentation that must not drift from the code: config/README.md, report captions, the changelog."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import metastem
from metastem.smk.schema_docs import render

REPO = Path(__file__).resolve().parents[1]


def test_config_readme_is_generated_from_the_schemas():
    expected = render(REPO / "workflow/schemas")
    actual = (REPO / "config/README.md").read_text()
    assert actual == expected, "config/README.md is out of date: run `make docs`"


def test_config_readme_names_every_key_and_column():
    import yaml

    text = (REPO / "config/README.md").read_text()
    sheet = yaml.safe_load((REPO / "workflow/schemas/datasets.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    missing = [f"`{c}`" for c in sheet["properties"] if f"| `{c}` |" not in text]
    for section, spec in config["properties"].items():
        for key in spec.get("properties", {}):
            if f"| `{section}.{key}` |" not in text:
                missing.append(f"{section}.{key}")
    assert not missing, missing


@pytest.mark.parametrize("path", sorted((REPO / "workflow/report").glob("*.rst")), ids=lambda p: p.name)
def test_report_caption_renders_without_docutils_errors(path):
    """Snakemake renders captions with docutils; `|NES|` and the like become red error boxes."""
    from docutils.core import publish_doctree

    doctree = publish_doctree(path.read_text(), settings_overrides={"report_level": 5, "halt_level": 5})
    errors = [str(m.astext()) for m in doctree.traverse() if m.tagname == "system_message"]
    assert not errors, f"{path.name}: {errors}"


def test_changelog_has_the_current_version():
    text = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(metastem.__version__)}\]?", text, re.M), \
        f"CHANGELOG.md has no section for {metastem.__version__}"


def test_license_matches_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = { text = "MIT" }' in pyproject
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
