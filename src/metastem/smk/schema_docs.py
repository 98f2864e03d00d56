"""config/README.md from the workflow's schemas: every config key and sheet column, its default and meaning.

The schemas are the one place these facts live; the README is generated from them (``make docs``) and
a test fails when it is out of date, so the two cannot drift apart.

    python -m metastem.smk.schema_docs workflow/schemas > config/README.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HEADER = """\
# Configuring metastem

Generated from `workflow/schemas/config.schema.yaml` and `workflow/schemas/datasets.schema.yaml` by
`make docs` (`python -m metastem.smk.schema_docs workflow/schemas`); edit the schemas, not this file.

`config/config.yaml` needs only what differs from the defaults below. Every key below `simulate`, `qc`,
`cluster`, `malignant`, `stemness`, `pseudotime`, `pathways` and `niche` can also be set per dataset in the
sheet's `params` column (`cluster.resolution=0.5;qc.max_pct_mito=25`). The config and the sheet are checked
before any job starts; every problem of every dataset is reported at once, one line each.
"""


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(value) if not isinstance(value, str) else (f'"{value}"' if value == "" else value)
    return f"`{text}`"


def _allowed(spec: dict) -> str:
    if "enum" in spec:
        return "one of " + ", ".join(_fmt(v) for v in spec["enum"])
    bounds = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in spec:
            bounds.append(f"{sign} {spec[key]}")
    kind = spec.get("type", "")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    return ", ".join([kind, *bounds]) if bounds else kind


def _clean(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _rows(props: dict, prefix: str = "") -> list[str]:
    rows = []
    for key, spec in props.items():
        name = f"{prefix}{key}"
        if spec.get("type") == "object" and "properties" in spec:
            rows.append(f"| **`{name}`** | | | {_clean(spec.get('description'))} |")
            rows += _rows(spec["properties"], prefix=f"{name}.")
        else:
            rows.append(f"| `{name}` | {_fmt(spec.get('default'))} | {_allowed(spec)} | {_clean(spec.get('description'))} |")
    return rows


def render(schemas_dir: str | Path) -> str:
    """The markdown page for the two schemas in ``schemas_dir``."""
    d = Path(schemas_dir)
    config = yaml.safe_load((d / "config.schema.yaml").read_text())
    sheet = yaml.safe_load((d / "datasets.schema.yaml").read_text())
    required = set(sheet.get("required", []))
    out = [HEADER, "## The dataset sheet (`datasets`, tab-separated, one row per input)", "",
           _clean(sheet.get("description")), "",
           "| column | default | allowed | meaning |", "|---|---|---|---|"]
    for key, spec in sheet["properties"].items():
        default = "(required)" if key in required else _fmt(spec.get("default"))
        out.append(f"| `{key}` | {default} | {_allowed(spec)} | {_clean(spec.get('description'))} |")
    out += ["", "## Configuration keys (`config/config.yaml`)", "", _clean(config.get("description")), "",
            "| key | default | allowed | meaning |", "|---|---|---|---|", *_rows(config["properties"]), ""]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - exercised by the test through render()
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else "workflow/schemas"))
