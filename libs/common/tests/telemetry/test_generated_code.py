"""The committed protobuf code is what its .proto generates; the seed's loggers still fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeway.common.telemetry import telemetry_pb2

SOURCE_DIR = Path(telemetry_pb2.__file__).parent


@pytest.mark.parametrize("proto", ["telemetry", "uploads"])
@pytest.mark.parametrize("suffix", ["_pb2.py", "_pb2.pyi"])
def test_generated_code_is_current(tmp_path: Path, proto: str, suffix: str) -> None:
    name = proto + suffix
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{SOURCE_DIR}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"{proto}.proto",
        ],
        check=True,
    )
    assert (tmp_path / name).read_bytes() == (SOURCE_DIR / name).read_bytes(), (
        f"{name} is stale: regenerate it in {SOURCE_DIR} with "
        f"python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. {proto}.proto"
    )


def _numbers(message: type[object]) -> dict[str, int]:
    return {field.name: field.number for field in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_the_seed_field_numbers_are_kept() -> None:
    """Loggers built on the seed's telemetry.proto (package tesla) must decode unchanged."""
    assert telemetry_pb2.DESCRIPTOR.package == "tesla"
    assert _numbers(telemetry_pb2.VehicleData) == {
        "timestamp": 1,
        "vehicle_speed": 2,
        "battery_level": 3,
        "power_kw": 5,
        "odometer": 6,
        "heading": 7,
        "sequence": 8,
    }
    assert _numbers(telemetry_pb2.CompressedVehicleData) == {
        "timestamp": 1,
        "vehicle_speed": 2,
        "battery_level": 3,
        "power_kw": 4,
        "odometer": 5,
        "heading": 6,
        "is_resync": 7,
        "sequence": 8,
        "predictor_version": 9,
    }
    assert _numbers(telemetry_pb2.TelemetryBatch) == {"records": 1, "device_id": 2}
    assert _numbers(telemetry_pb2.CompressedBatch) == {"records": 1, "device_id": 2}
