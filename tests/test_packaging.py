"""Each workspace member stands alone: it declares every distribution its code imports.

A member that imports a package only because a sibling happens to install it works in this
workspace and breaks when it is installed alone (a service's container image). This reads the
imports of each member's `src` (ast, so nothing is imported) and maps each top-level module to
the distribution that provides it in this environment (`importlib.metadata`). Imports under
`if TYPE_CHECKING:` are left out; a module imported only inside a function or a `try` still
counts, and may be declared as an optional extra instead (torch, for the tracker's embedders).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]
# The workspace's own namespace package: `edgeway.<name>` comes from `edgeway-<name>`.
NAMESPACE = "edgeway"
# Imported by code that runs under the system Python, not the member's environment:
# testing/rtsp_server.py is GStreamer's RTSP server through python3-gi, which no wheel provides.
SYSTEM_PYTHON = {"gi"}


def _normalise(requirement: str) -> str:
    """`faststream[rabbit]>=1; python_version...` -> `faststream` (PEP 503 normalised)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _declared(project: dict[str, object]) -> tuple[set[str], set[str]]:
    """The member's required distributions and those of its optional extras."""
    required = {_normalise(r) for r in project.get("dependencies", [])}  # type: ignore[attr-defined]
    extras = project.get("optional-dependencies", {})
    optional = {_normalise(r) for group in extras.values() for r in group}  # type: ignore[attr-defined]
    return required, optional


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for inner in ast.walk(child):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        lines.add(inner.lineno)
    return lines


def _imports(source: Path) -> set[str]:
    """Top-level names a file imports at run time (`edgeway.x` kept as `edgeway.x`)."""
    tree = ast.parse(source.read_text(), filename=str(source))
    skip = _type_checking_only(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from opentelemetry import trace`: the name may be a namespace's subpackage.
            modules = (
                [f"{node.module}.{alias.name}" for alias in node.names]
                if "." not in node.module
                else [node.module]
            )
        else:
            continue
        names.update(".".join(module.split(".")[:2]) for module in modules)
    return names


@cache
def _files_of(name: str) -> frozenset[str]:
    return frozenset(str(file) for file in distribution(name).files or ())


def _distribution_of(module: str, providers: dict[str, list[str]]) -> str | None:
    """The distribution that provides `module` (`top` or `top.sub`). A namespace package
    shared by several distributions (`opentelemetry`, `google`) is told apart by its
    subpackage's files."""
    top, _, sub = module.partition(".")
    if top == NAMESPACE:
        return f"edgeway-{sub.replace('_', '-')}"
    found = providers.get(top, [])
    if len(set(found)) > 1 and sub:
        prefix = f"{top}/{sub}"
        found = [
            name
            for name in found
            if any(f == f"{prefix}.py" or f.startswith(f"{prefix}/") for f in _files_of(name))
        ] or found
    return _normalise(found[0]) if found else None


@pytest.mark.parametrize("member", MEMBERS)
def test_a_member_declares_every_distribution_it_imports(member: str) -> None:
    path = ROOT / member
    project = tomllib.loads((path / "pyproject.toml").read_text())["project"]
    required, optional = _declared(project)
    itself = _normalise(project["name"])
    providers = packages_distributions()
    stdlib = sys.stdlib_module_names
    missing: dict[str, set[str]] = {}  # what is not declared -> the files that import it
    for source in sorted((path / "src").rglob("*.py")):
        for module in _imports(source):
            top = module.partition(".")[0]
            if top in stdlib or top == "__future__" or top in SYSTEM_PYTHON:
                continue
            distribution = _distribution_of(module, providers)
            if distribution in {itself} | required | optional:
                continue
            what = distribution or f"{top} (no installed distribution provides it)"
            missing.setdefault(what, set()).add(str(source.relative_to(path)))
    assert not missing, f"{member}/pyproject.toml does not declare: " + "; ".join(
        f"{what}, in {', '.join(sorted(files))}" for what, files in sorted(missing.items())
    )


def test_the_build_backend_is_pinned() -> None:
    """Every member builds with the backend the constraints pin (`make setup` passes them to
    the build as well), so a new hatchling release cannot change what gets installed."""
    pins = {
        _normalise(line): line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    for member in MEMBERS:
        build = tomllib.loads((ROOT / member / "pyproject.toml").read_text())["build-system"]
        for requirement in build["requires"]:
            assert _normalise(requirement) in pins, f"{member}: {requirement} is not pinned"
