from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VehicleData(_message.Message):
    __slots__ = ("timestamp", "vehicle_speed", "battery_level", "power_kw", "odometer", "heading", "sequence")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_SPEED_FIELD_NUMBER: _ClassVar[int]
    BATTERY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    POWER_KW_FIELD_NUMBER: _ClassVar[int]
    ODOMETER_FIELD_NUMBER: _ClassVar[int]
    HEADING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    timestamp: int
    vehicle_speed: float
    battery_level: float
    power_kw: float
    odometer: float
    heading: int
    sequence: int
    def __init__(self, timestamp: _Optional[int] = ..., vehicle_speed: _Optional[float] = ..., battery_level: _Optional[float] = ..., power_kw: _Optional[float] = ..., odometer: _Optional[float] = ..., heading: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class CompressedVehicleData(_message.Message):
    __slots__ = ("timestamp", "vehicle_speed", "battery_level", "power_kw", "odometer", "heading", "is_resync", "sequence", "predictor_version")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_SPEED_FIELD_NUMBER: _ClassVar[int]
    BATTERY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    POWER_KW_FIELD_NUMBER: _ClassVar[int]
    ODOMETER_FIELD_NUMBER: _ClassVar[int]
    HEADING_FIELD_NUMBER: _ClassVar[int]
    IS_RESYNC_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    timestamp: int
    vehicle_speed: float
    battery_level: float
    power_kw: float
    odometer: float
    heading: int
    is_resync: bool
    sequence: int
    predictor_version: int
    def __init__(self, timestamp: _Optional[int] = ..., vehicle_speed: _Optional[float] = ..., battery_level: _Optional[float] = ..., power_kw: _Optional[float] = ..., odometer: _Optional[float] = ..., heading: _Optional[int] = ..., is_resync: _Optional[bool] = ..., sequence: _Optional[int] = ..., predictor_version: _Optional[int] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("records", "device_id")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[VehicleData]
    device_id: str
    def __init__(self, records: _Optional[_Iterable[_Union[VehicleData, _Mapping]]] = ..., device_id: _Optional[str] = ...) -> None: ...

class CompressedBatch(_message.Message):
    __slots__ = ("records", "device_id")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[CompressedVehicleData]
    device_id: str
    def __init__(self, records: _Optional[_Iterable[_Union[CompressedVehicleData, _Mapping]]] = ..., device_id: _Optional[str] = ...) -> None: ...
