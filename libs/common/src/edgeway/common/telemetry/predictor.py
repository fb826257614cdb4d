"""Predictive compression of vehicle telemetry: the rules the logger and the server share.

The logger (`Encoder`) leaves a field out of a packet when the server's prediction of it is
within the field's band of the actual value; the server (`Decoder`) puts the prediction in its
place. This only works if both sides hold the same prediction at every step, so:

- Values are quantized as the wire carries them (float32 for speed, battery, power and odometer;
  whole degrees in [0, 360) for heading) before anything uses them, and predictions are kept as
  float32 too, so both sides compute on the same numbers and stay bit-identical.
- Both sides update a prediction with the value the decoder sees: the transmitted value, or the
  prediction itself when the field was skipped (`pred = pred + alpha * (v - pred)`; heading along
  the shortest arc). The seed updated the edge with values the server never saw, so they drifted.
- A resync (the first packet, then every `resync_interval_ms` of record time) carries every field
  and sets both predictions to it, so a decoder that missed packets is exact again from there on.

Packets are numbered 1, 2, 3... by the encoder. A decoder that sees a number jump reports the
missing count (`Decoded.gap`) and flags every record `uncertain` until the next resync: its
predictions may differ from the encoder's, so a skipped field may be off by more than its band.

Legacy loggers, which send no sequence number, are decoded best-effort: packets are taken in the
order they arrive and there is no gap detection, so a lost packet silently shifts the
predictions (and every skipped field reconstructed from them) until the next resync, and those
records are not flagged `uncertain`.

Pure: no I/O and no clock; the only time is the records' own timestamps.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, cast

# Bumped whenever a rule below changes: a packet names the rules its encoder followed.
PREDICTOR_VERSION: Final = 1
FIELDS: Final = ("speed", "battery", "power", "heading")  # predicted fields, in this order
HEADING: Final = 3  # its index in FIELDS
# The reconstructed fields a bitmask names (bit i: FIELDS[i]), for each of the 16 masks.
RECONSTRUCTED: Final = tuple(
    frozenset(name for index, name in enumerate(FIELDS) if mask & (1 << index))
    for mask in range(1 << len(FIELDS))
)

_FLOAT32 = struct.Struct("<f")


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """Smoothing and bands. The defaults are the seed's (python_cloud/predictor.py and
    cpp_edge/logger.cpp). Encoder and decoder of one vehicle must use the same config."""

    alpha: float = 0.3
    speed_band: float = 2.0  # mph
    power_band: float = 5.0  # kW
    battery_band: float = 0.5  # %
    heading_band: float = 5.0  # degrees
    resync_interval_ms: int = 30_000

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        for name in ("speed_band", "power_band", "battery_band", "heading_band"):
            band = getattr(self, name)
            if not (math.isfinite(band) and band > 0.0):
                raise ValueError(f"{name} must be a positive number, got {band}")
        if self.resync_interval_ms <= 0:
            raise ValueError(f"resync_interval_ms must be positive, got {self.resync_interval_ms}")

    def band(self, name: str) -> float:
        return {
            "speed": self.speed_band,
            "battery": self.battery_band,
            "power": self.power_band,
            "heading": self.heading_band,
        }[name]


@dataclass(frozen=True, slots=True)
class Sample:
    """A full reading: timestamp in ms since the epoch, mph, %, kW, miles, degrees."""

    timestamp_ms: int
    speed: float
    battery: float
    power: float
    odometer: float
    heading: float


@dataclass(frozen=True, slots=True)
class Packet:
    """What travels (a `CompressedVehicleData`): a predicted field is None when it was skipped."""

    timestamp_ms: int
    odometer: float
    speed: float | None
    battery: float | None
    power: float | None
    heading: int | None
    is_resync: bool
    sequence: int | None
    predictor_version: int | None


# A packet as a plain tuple of Packet's fields, in their order: how the server reads a batch
# (`edgeway.common.telemetry.wire.parse_rows`), a tuple costing a thirtieth of a Packet.
PacketRow = tuple[
    int, float, float | None, float | None, float | None, int | None, bool, int | None, int | None
]
# What `Decoder.decode_row` gives: speed, battery, power, odometer, heading, the bitmask of the
# reconstructed fields (bit i: FIELDS[i]), uncertain, gap; `Decoded` holds the same.
DecodedRow = tuple[float, float, float, float, float, int, bool, int]


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded packet.

    `reconstructed`: the fields that were predicted, not sent. `uncertain`: packets were lost
    since the last resync, so a reconstructed field may be off by more than its band. `gap`: how
    many packets are missing just before this one (0 for legacy packets)."""

    sample: Sample
    reconstructed: frozenset[str]
    uncertain: bool
    gap: int


class OutOfOrderError(ValueError):
    """decode() of a packet whose sequence is at or before the last one decoded (a duplicate or a
    late delivery); the state is left unchanged."""


def quantize_float(value: float) -> float:
    """`value` as a protobuf `float` carries it (IEEE float32, round to nearest)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    try:
        packed = _FLOAT32.pack(value)
    except OverflowError:
        raise ValueError(f"out of float32 range: {value}") from None
    result: float = _FLOAT32.unpack(packed)[0]
    return result


def quantize_heading(value: float) -> int:
    """Whole degrees in [0, 360), as the wire's int32 heading carries them (360 reads as 0)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite heading: {value}")
    return math.floor(value + 0.5) % 360


def angular_difference(source: float, target: float) -> float:
    """The shortest signed arc from `source` to `target`, in (-180, 180] degrees."""
    arc = (target - source) % 360.0
    return arc - 360.0 if arc > 180.0 else arc


def _normalize_heading(value: float) -> float:
    """A heading prediction in [0, 360), held as float32 like the other predictions."""
    heading = quantize_float(value % 360.0)
    # Rounding (in % or to float32) can land on 360.0 exactly, which is 0.
    return 0.0 if heading >= 360.0 else heading


def _distance(name: str, actual: float, prediction: float) -> float:
    if name == "heading":
        return abs(angular_difference(prediction, actual))
    return abs(actual - prediction)


def _follow(prediction: float | None, seen: float, alpha: float) -> float:
    """A speed, battery or power prediction after the decoder saw `seen`."""
    if prediction is None:
        return seen
    return quantize_float(prediction + alpha * (seen - prediction))


def _update(name: str, prediction: float | None, seen: float, alpha: float) -> float:
    """The prediction after the decoder saw `seen` (a field with no prediction yet takes it)."""
    if prediction is None:
        return seen
    if name == "heading":
        return _normalize_heading(prediction + alpha * angular_difference(prediction, seen))
    return _follow(prediction, seen, alpha)


@dataclass(frozen=True, slots=True)
class PredictorState:
    """One vehicle's predictor state, identical on both sides after every packet when none is lost.

    Immutable: `Encoder.state` and `Decoder.state` are snapshots that can be stored (`to_json`)
    and handed to a new `Encoder`/`Decoder` (`from_json`) to carry on exactly where it stopped.
    `in_sync`: whether the predictions are known to match the encoder's (a resync was seen and no
    packet was lost since)."""

    speed: float | None = None
    battery: float | None = None
    power: float | None = None
    heading: float | None = None
    last_resync_ms: int | None = None
    last_sequence: int | None = None
    last_timestamp_ms: int | None = None
    in_sync: bool = False

    def predictions(self) -> tuple[float | None, ...]:
        """The predictions, in `FIELDS` order."""
        return (self.speed, self.battery, self.power, self.heading)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (floats round-trip exactly through JSON's shortest repr)."""
        return {
            "predictor_version": PREDICTOR_VERSION,
            "predictions": dict(zip(FIELDS, self.predictions(), strict=True)),
            "last_resync_ms": self.last_resync_ms,
            "last_sequence": self.last_sequence,
            "last_timestamp_ms": self.last_timestamp_ms,
            "in_sync": self.in_sync,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PredictorState:
        """The state `to_json` wrote; ValueError if it is malformed or from another version."""
        if data.get("predictor_version") != PREDICTOR_VERSION:
            raise ValueError(
                f"predictor state of version {data.get('predictor_version')!r}, "
                f"this is version {PREDICTOR_VERSION}"
            )
        try:
            predictions = data["predictions"]
            speed, battery, power, heading = (
                _json_float(predictions[name], name) for name in FIELDS
            )
            return cls(
                speed=speed,
                battery=battery,
                power=power,
                heading=heading,
                last_resync_ms=_json_int(data["last_resync_ms"], "last_resync_ms"),
                last_sequence=_json_int(data["last_sequence"], "last_sequence"),
                last_timestamp_ms=_json_int(data["last_timestamp_ms"], "last_timestamp_ms"),
                in_sync=_json_bool(data["in_sync"], "in_sync"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed predictor state: {exc!r}") from None


def _json_float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"predictor state: {name} is not a number: {value!r}")
    return quantize_float(float(value))


def _json_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"predictor state: {name} is not an integer: {value!r}")
    return value


def _json_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"predictor state: {name} is not a boolean: {value!r}")
    return value


class Encoder:
    """The logger's side: turns readings into packets, one vehicle at a time, in record order."""

    def __init__(
        self, config: PredictorConfig = PredictorConfig(), state: PredictorState | None = None
    ) -> None:
        self.config = config
        self.state = state if state is not None else PredictorState()

    def encode(self, sample: Sample) -> Packet:
        """The packet for `sample`; ValueError if a value is NaN, infinite or beyond float32."""
        config, state = self.config, self.state
        timestamp = sample.timestamp_ms
        odometer = quantize_float(sample.odometer)
        values = (
            quantize_float(sample.speed),
            quantize_float(sample.battery),
            quantize_float(sample.power),
            float(quantize_heading(sample.heading)),
        )
        resync = (
            state.last_resync_ms is None
            or timestamp - state.last_resync_ms >= config.resync_interval_ms
            # A record clock that went back (a logger whose clock was reset) would otherwise
            # postpone the next resync by as long as it went back.
            or timestamp < state.last_resync_ms
        )
        sent: list[float | None] = []
        predictions: list[float | None] = []
        for name, value, prediction in zip(FIELDS, values, state.predictions(), strict=True):
            if resync:
                sent.append(value)
                predictions.append(value)
            elif prediction is not None and _distance(name, value, prediction) <= config.band(name):
                sent.append(None)
                predictions.append(prediction)  # the decoder sees the prediction: no change
            else:
                sent.append(value)
                predictions.append(_update(name, prediction, value, config.alpha))
        sequence = (state.last_sequence or 0) + 1
        self.state = _advance(
            state, predictions, timestamp=timestamp, sequence=sequence, resync=resync
        )
        heading = sent[3]
        return Packet(
            timestamp_ms=timestamp,
            odometer=odometer,
            speed=sent[0],
            battery=sent[1],
            power=sent[2],
            heading=None if heading is None else int(heading),
            is_resync=resync,
            sequence=sequence,
            predictor_version=PREDICTOR_VERSION if resync else None,
        )


class Decoder:
    """The server's side: rebuilds full readings from one vehicle's packets, in sequence order.

    The state lives in plain attributes while packets are decoded (the server decodes every
    record it stores, so `decode` allocates as little as it can); `state` is the immutable
    snapshot of it, built when asked for."""

    __slots__ = (
        "_alpha",
        "_battery",
        "_heading",
        "_in_sync",
        "_last_resync_ms",
        "_last_sequence",
        "_power",
        "_speed",
        "config",
        "last_timestamp_ms",
    )

    def __init__(
        self, config: PredictorConfig = PredictorConfig(), state: PredictorState | None = None
    ) -> None:
        self.config = config
        self._alpha = config.alpha
        self.state = state if state is not None else PredictorState()

    @property
    def state(self) -> PredictorState:
        """The state after the last decoded packet, as `Encoder.state` holds it."""
        return PredictorState(
            speed=self._speed,
            battery=self._battery,
            power=self._power,
            heading=self._heading,
            last_resync_ms=self._last_resync_ms,
            last_sequence=self._last_sequence,
            last_timestamp_ms=self.last_timestamp_ms,
            in_sync=self._in_sync,
        )

    @state.setter
    def state(self, state: PredictorState) -> None:
        self._speed = state.speed
        self._battery = state.battery
        self._power = state.power
        self._heading = state.heading
        self._last_resync_ms = state.last_resync_ms
        self._last_sequence = state.last_sequence
        self.last_timestamp_ms: int | None = state.last_timestamp_ms
        self._in_sync = state.in_sync

    def decode(self, packet: Packet) -> Decoded:
        """The reading `packet` stands for.

        OutOfOrderError for a numbered packet at or before the last one (the state is unchanged);
        ValueError for a packet this module cannot read (another predictor version, a resync
        without every field, a sequence below 1, a value that is not a finite float32)."""
        timestamp = packet.timestamp_ms
        speed, battery, power, odometer, heading, mask, uncertain, gap = self.decode_row(
            (
                timestamp,
                packet.odometer,
                packet.speed,
                packet.battery,
                packet.power,
                packet.heading,
                packet.is_resync,
                packet.sequence,
                packet.predictor_version,
            )
        )
        return Decoded(
            sample=Sample(timestamp, speed, battery, power, odometer, heading),
            reconstructed=RECONSTRUCTED[mask],
            uncertain=uncertain,
            gap=gap,
        )

    def decode_row(self, row: PacketRow) -> DecodedRow:
        """`decode` of a packet given as a plain tuple, answered with one: the server decodes
        every record it stores, and a `Packet`, `Sample` and `Decoded` per record cost it more
        than the decoding does. The rules, errors and state changes are `decode`'s."""
        timestamp, odometer, speed, battery, power, sent_heading, resync, sequence, version = row
        if version is not None and version != PREDICTOR_VERSION:
            raise ValueError(
                f"packet follows predictor version {version}, "
                f"this decoder knows version {PREDICTOR_VERSION}"
            )
        # The fields are taken one by one, not in a loop over tuples: this is most of what a
        # record costs the server.
        speed = None if speed is None else quantize_float(speed)
        battery = None if battery is None else quantize_float(battery)
        power = None if power is None else quantize_float(power)
        heading = None if sent_heading is None else float(quantize_heading(sent_heading))
        if resync and (speed is None or battery is None or power is None or heading is None):
            sent = (speed, battery, power, heading)
            missing = [name for name, value in zip(FIELDS, sent, strict=True) if value is None]
            raise ValueError(f"a resync packet carries every field; missing {missing}")
        odometer = quantize_float(odometer)
        gap, in_sync = self._gap(sequence, timestamp)

        # Everything that can fail has been checked: from here on the state moves.
        unpredictable = False
        mask = 0
        if resync:
            self._speed, self._battery, self._power, self._heading = speed, battery, power, heading
            in_sync = True
            self._last_resync_ms = timestamp
        else:
            # A skipped field takes its prediction, which stays; a sent one moves it. A decoder
            # that never saw a resync has nothing to predict from: 0.0, uncertain.
            alpha = self._alpha
            prediction = self._speed
            if speed is None:
                mask = 1
                unpredictable = unpredictable or prediction is None
                speed = 0.0 if prediction is None else prediction
            else:
                self._speed = _follow(prediction, speed, alpha)
            prediction = self._battery
            if battery is None:
                mask |= 2
                unpredictable = unpredictable or prediction is None
                battery = 0.0 if prediction is None else prediction
            else:
                self._battery = _follow(prediction, battery, alpha)
            prediction = self._power
            if power is None:
                mask |= 4
                unpredictable = unpredictable or prediction is None
                power = 0.0 if prediction is None else prediction
            else:
                self._power = _follow(prediction, power, alpha)
            prediction = self._heading
            if heading is None:
                mask |= 8
                unpredictable = unpredictable or prediction is None
                heading = 0.0 if prediction is None else prediction
            elif prediction is None:
                self._heading = heading
            else:
                self._heading = _normalize_heading(
                    prediction + alpha * angular_difference(prediction, heading)
                )
        if sequence is not None:
            self._last_sequence = sequence
        self.last_timestamp_ms = timestamp
        self._in_sync = in_sync
        # Every value is set: a resync carries all four; a skipped one took its prediction or 0.0.
        return cast(
            "DecodedRow",
            (
                speed,
                battery,
                power,
                odometer,
                heading,
                mask,
                unpredictable or not (sequence is None or in_sync),
                gap,
            ),
        )

    def _gap(self, sequence: int | None, timestamp: int) -> tuple[int, bool]:
        """(missing packets before this one, whether the state is still in sync before it)."""
        if sequence is None:
            return 0, self._in_sync  # legacy: arrival order, no gap detection
        if sequence < 1:
            raise ValueError(f"sequence numbers start at 1, got {sequence}")
        last = self._last_sequence
        if last is None:
            gap = sequence - 1  # encoders number from 1
        elif sequence > last:
            gap = sequence - last - 1
        elif self.last_timestamp_ms is not None and timestamp > self.last_timestamp_ms:
            # A lower number with a later record time: the encoder restarted (the logger's
            # clear_data) and numbers from 1 again. Its predictions are not ours until a resync.
            return sequence - 1, False
        else:
            raise OutOfOrderError(
                f"packet {sequence} (timestamp {timestamp}) is at or before "
                f"the last decoded one, {last} (timestamp {self.last_timestamp_ms})"
            )
        return gap, self._in_sync and gap == 0


def _advance(
    state: PredictorState,
    predictions: list[float | None],
    *,
    timestamp: int,
    sequence: int | None,
    resync: bool,
    in_sync: bool | None = None,
) -> PredictorState:
    speed, battery, power, heading = predictions
    return replace(
        state,
        speed=speed,
        battery=battery,
        power=power,
        heading=heading,
        last_resync_ms=timestamp if resync else state.last_resync_ms,
        last_sequence=sequence,
        last_timestamp_ms=timestamp,
        in_sync=(state.in_sync or resync) if in_sync is None else in_sync,
    )
