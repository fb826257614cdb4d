"""The README and what `make run` prints say the same thing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _constant(path: Path, name: str) -> str:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise AssertionError(f"{name} is not in {path}")


def test_the_banner_and_the_readme_mint_a_token_alike() -> None:
    command = _constant(ROOT / "deploy/local/devstack.py", "MINT_COMMAND")
    assert command in (ROOT / "README.md").read_text()


def test_every_file_the_readme_uploads_ships_with_the_repository() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    uploaded = re.findall(r"files=@(\S+)", readme)
    assert uploaded
    for path in uploaded:
        assert (ROOT / path).is_file(), path
