"""The README and what `make run` prints say the same thing."""

from __future__ import annotations

import ast
import importlib.util
import socket
from pathlib import Path
from typing import Any

import pytest

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


def _devstack() -> Any:
    """deploy/local/devstack.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("devstack", ROOT / "deploy/local/devstack.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_given_to_make_run_win_over_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWAY_TELEMETRY_VEHICLES", '["5YJYGDEE5MF000003"]')
    monkeypatch.setenv("EDGEWAY_HOG_SCALE", "1.05")
    monkeypatch.setenv("OTHER_VARIABLE", "not a setting")
    env = _devstack().settings(
        EDGEWAY_TELEMETRY_VEHICLES="[]", EDGEWAY_HOG_SCALE="1.1", EDGEWAY_ENVIRONMENT="development"
    )
    assert env["EDGEWAY_TELEMETRY_VEHICLES"] == '["5YJYGDEE5MF000003"]'
    assert env["EDGEWAY_HOG_SCALE"] == "1.05"
    assert env["EDGEWAY_ENVIRONMENT"] == "development"  # a default nobody set stays
    assert "OTHER_VARIABLE" not in env


def test_the_demo_camera_sends_for_every_mapped_camera() -> None:
    devstack = _devstack()
    omega = devstack.demo_cameras({})
    assert len(omega) == 7
    extra = devstack.demo_cameras({"EDGEWAY_OCCUPANCY_EXTRA_CAMERAS": '{"Lib_1": "Library"}'})
    assert extra == [*omega, "Lib_1"]
    replaced = devstack.demo_cameras({"EDGEWAY_OCCUPANCY_CAMERAS": '{"Lib_1": "Library"}'})
    assert replaced == ["Lib_1"]


def test_a_port_something_listens_on_is_taken_and_a_free_one_is_not() -> None:
    devstack = _devstack()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            free = spare.getsockname()[1]
        assert devstack.taken_ports({"gateway": port, "tracker": free}) == {"gateway": port}
