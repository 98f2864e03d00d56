"""Per-rule conda environments (envs/*.yaml) agree with requirements.lock and with the rules using them.

`snakemake --sdm conda` builds these instead of the .venv; a pin drifting from the lock would make the
conda run compute with other versions than the tested one.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import metastem

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]

# conda-forge/bioconda name -> pip name, where they differ
CONDA_TO_PIP = {"python-igraph": "igraph", "matplotlib-base": "matplotlib"}
# packages a rule's env must provide beyond the analysis stack (checked when the rule exists)
NEEDS = {"pathways": {"gseapy"}, "report": {"jinja2"}, "index": {"jinja2"}}
# every env imports the metastem package: these come with `import metastem` and its config handling
BASE = {"python", "numba", "numpy", "pandas", "pyyaml", "jsonschema"}


def _norm(name: str) -> str:
    name = name.strip().lower().replace("_", "-")
    return CONDA_TO_PIP.get(name, name)


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def _deps(env: dict) -> list[str]:
    out = []
    for d in env.get("dependencies") or []:
        if isinstance(d, dict):
            out.extend(d.get("pip", []))
        else:
            out.append(str(d))
    return out


def _split(spec: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(?:==?\s*([^\s=<>!,*]+))?\s*", spec)
    assert m, f"unparsable dependency '{spec}' (write name=version)"
    return m.group(1), m.group(2)


def _rules() -> dict[str, tuple[Path, dict[str, str]]]:
    """rule name -> (file, {directive: first argument line}) from the Snakefile and workflow/rules."""
    rules = {}
    for f in RULE_FILES:
        lines = f.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"(?:rule|checkpoint)\s+(\w+)\s*:", lines[i])
            if not m:
                i += 1
                continue
            name, body = m.group(1), []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i][0] in " \t#"):
                body.append(lines[i])
                i += 1
            directives: dict[str, str] = {}
            for j, ln in enumerate(body):
                d = re.match(r"\s{4}(\w+):\s*(.*)$", ln)
                if d and ln.startswith("    ") and not ln.startswith("     "):
                    value = d.group(2).strip()
                    if not value:  # value on the next non-empty line
                        value = next((b.strip() for b in body[j + 1:] if b.strip()), "")
                    directives[d.group(1)] = value
            rules[name] = (f, directives)
    return rules


def _env_packages(path: Path) -> set[str]:
    return {_norm(_split(s)[0]) for s in _deps(yaml.safe_load(path.read_text()))}


def test_there_are_envs():
    assert ENVS, "no envs/*.yaml"
    assert {"analysis.yaml", "pathways.yaml", "report.yaml"} <= {p.name for p in ENVS}


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_parses_and_uses_conda_forge_only(path):
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict) and isinstance(env.get("dependencies"), list), f"{path.name}: no dependencies list"
    channels = env.get("channels") or []
    assert channels[:1] == ["conda-forge"], f"{path.name}: conda-forge must come first: {channels}"
    assert "nodefaults" in channels and "defaults" not in channels, f"{path.name}: add nodefaults, drop defaults"
    names = [_norm(_split(s)[0]) for s in _deps(env)]
    assert len(names) == len(set(names)), f"{path.name}: duplicated packages {names}"
    missing = BASE - set(names)
    assert not missing, f"{path.name}: every rule imports metastem, which needs {sorted(missing)}"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_installs_the_workflows_metastem(path):
    """--sdm conda without a checkout: every env installs the metastem package of the workflow's version."""
    specs = dict(_split(s) for s in _deps(yaml.safe_load(path.read_text())))
    assert specs.get("metastem") == metastem.__version__, f"{path.name}: pip: metastem=={metastem.__version__}"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_agree_with_lock(path):
    lock = _lock()
    pyproject = (REPO / "pyproject.toml").read_text()
    py = re.search(r'requires-python\s*=\s*">=(\d+\.\d+)', pyproject).group(1)
    problems = []
    for spec in _deps(yaml.safe_load(path.read_text())):
        name, version = _split(spec)
        key = _norm(name)
        if version is None:
            problems.append(f"{spec}: not pinned (write {name}=<version from requirements.lock>)")
        elif key == "python":
            if version != py:
                problems.append(f"{spec}: pyproject.toml requires Python {py}")
        elif key == "metastem":
            if version != metastem.__version__:
                problems.append(f"{spec}: the workflow is metastem {metastem.__version__}")
        elif key == "pip":
            continue  # the installer itself (pip freeze does not list it): pinned, not in the lock
        elif key not in lock:
            problems.append(f"{spec}: '{key}' is not in requirements.lock")
        elif version != lock[key]:
            problems.append(f"{spec}: requirements.lock has {key}=={lock[key]}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_every_rule_conda_env_exists():
    rules = _rules()
    assert {"qc", "cluster", "all"} <= set(rules), f"rule parser found only {sorted(rules)}"
    problems = []
    for name, (f, d) in sorted(rules.items()):
        runs_code = any(k in d for k in ("script", "shell", "run", "notebook", "wrapper"))
        if "conda" not in d:
            if runs_code:
                problems.append(f"rule {name} ({f.name}) runs code but has no conda: directive")
            continue
        m = re.fullmatch(r"['\"]([^'\"]+)['\"],?", d["conda"])
        if not m:
            problems.append(f"rule {name}: conda: {d['conda']} is not a plain path")
            continue
        env = (f.parent / m.group(1)).resolve()  # snakemake resolves it relative to the rule's file
        if not env.is_file():
            problems.append(f"rule {name}: conda env {m.group(1)} -> {env} does not exist")
        elif env.parent != REPO / "envs":
            problems.append(f"rule {name}: conda env {env} is outside envs/")
        else:
            lacking = NEEDS.get(name, set()) - _env_packages(env)
            if lacking:
                problems.append(f"rule {name}: {env.name} lacks {sorted(lacking)} (the rule imports it)")
    assert not problems, "\n".join(problems)


def test_every_env_is_used_by_a_rule():
    used = set()
    for _, (f, d) in _rules().items():
        m = re.fullmatch(r"['\"]([^'\"]+)['\"],?", d.get("conda", ""))
        if m:
            used.add((f.parent / m.group(1)).resolve())
    unused = [p.name for p in ENVS if p.resolve() not in used]
    assert not unused, f"env file(s) no rule uses: {unused}"
