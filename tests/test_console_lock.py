"""The web console's npm lock file records what to install, never where from: whoever installs
uses their own registry (a mirror, a proxy), and no registry address is committed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

WEB = Path(__file__).resolve().parents[1] / "web"


def _walk(value: Any, path: str = "") -> list[str]:
    """Every `resolved` key in the lock file, by where it is."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "resolved":
                found.append(f"{path}/{key}")
            found += _walk(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _walk(item, f"{path}/{index}")
    return found


def test_npmrc_keeps_registry_addresses_out_of_the_lock_file() -> None:
    settings = {
        key.strip(): value.strip()
        for key, _, value in (
            line.partition("=")
            for line in (WEB / ".npmrc").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", ";"))
        )
    }
    assert settings.get("omit-lockfile-registry-resolved") == "true"


def test_lock_file_records_no_registry_address() -> None:
    text = (WEB / "package-lock.json").read_text()
    lock = json.loads(text)
    assert lock["lockfileVersion"] >= 3
    assert _walk(lock) == []
    # Nor any tarball address elsewhere (the `funding` pages packages name are not downloads).
    addresses = re.findall(r"https?://[^\"\s]*", text)
    assert [a for a in addresses if "registry" in a or a.endswith((".tgz", ".tar.gz"))] == []
    # Every package is still pinned: a version and an integrity hash each.
    packages = {name: entry for name, entry in lock["packages"].items() if name}
    assert packages
    unpinned = [
        name
        for name, entry in packages.items()
        if not entry.get("link") and not (entry.get("version") and entry.get("integrity"))
    ]
    assert unpinned == []


def test_lock_file_matches_package_json() -> None:
    manifest = json.loads((WEB / "package.json").read_text())
    root = json.loads((WEB / "package-lock.json").read_text())["packages"][""]
    assert root.get("dependencies", {}) == manifest.get("dependencies", {})
    assert root.get("devDependencies", {}) == manifest.get("devDependencies", {})
