"""The whole AMQP topology, declared in one place.

Two kinds of flow (docs/architecture.md, "Messaging"):

- durable work: persistent messages into quorum queues with an explicit delivery limit and a
  dead-letter exchange; consumers ack only after the effect is committed;
- live results: the `edgeway.broadcast` topic exchange, whose routing key is the client channel
  name; each gateway replica reads it through its own exclusive, bounded queue.
"""

from __future__ import annotations

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue
from faststream.rabbit.schemas.queue import QuorumQueueArgs

from edgeway.common.settings import ExchangeNames

# A message that fails this many deliveries is dead-lettered instead of looping forever.
DEFAULT_DELIVERY_LIMIT = 5
# A gateway that falls this far behind on live results drops the oldest (classic queue drop-head).
GATEWAY_QUEUE_MAX_LENGTH = 100_000
# Live video and IMU waiting for the relay: about 5 minutes of a 30 fps stream's packets.
VIDEO_QUEUE_MAX_LENGTH = 10_000
# Edge detection frames waiting for one tracker replica: ~40 s of 8 cameras at 30 fps. Live and
# lossy: a tracker that far behind is better served by the newest frames.
DETECTIONS_QUEUE_MAX_LENGTH = 10_000
# Relayed phone frames waiting for one live tracking task: the task keeps only the newest of
# each camera, so a short queue (half a second of a 30 fps phone) only absorbs bursts.
RELAY_FRAMES_QUEUE_MAX_LENGTH = 16
# Readiness reports waiting for one gateway replica: a few minutes of a hundred instances'.
SYSTEM_QUEUE_MAX_LENGTH = 10_000


class Channels:
    """Client channel names: the routing keys of the broadcast exchange."""

    OCCUPANCY_LOCATIONS = "occupancy.location.*"

    @staticmethod
    def occupancy_location(location_id: int) -> str:
        return f"occupancy.location.{location_id}"

    TELEMETRY_VEHICLES = "telemetry.vehicle.*"
    TELEMETRY_CONTROL = "telemetry.control.*"
    TELEMETRY_LOGS = "telemetry.log.*"

    @staticmethod
    def telemetry_vehicle(vin: str) -> str:
        """Every reconstructed record of one vehicle, and its compression statistics."""
        return f"telemetry.vehicle.{vin}"

    @staticmethod
    def telemetry_control(vin: str | None = None) -> str:
        """Commands for edge loggers: one vehicle's, or every logger's (`all`)."""
        return f"telemetry.control.{vin or 'all'}"

    @staticmethod
    def telemetry_log(vin: str) -> str:
        """Log lines of one vehicle's edge logger, for the dashboards."""
        return f"telemetry.log.{vin}"

    VIDEO_VIEWER = "video.viewer"  # trajectory updates and restarts for every viewer

    @staticmethod
    def video_stream(device: str) -> str:
        """Parsed H.264 packets of one phone's stream."""
        return f"video.stream.{device}"

    @staticmethod
    def video_frames(device: str) -> str:
        """The relay's decoded JPEGs of one phone's stream, for viewers without H.264."""
        return f"video.frames.{device}"

    @staticmethod
    def video_imu(device: str) -> str:
        """One phone's IMU samples, in order, for viewers."""
        return f"video.imu.{device}"

    @staticmethod
    def video_control(device: str | None = None) -> str:
        """Viewer commands for one phone, or for every phone (`all`)."""
        return f"video.control.{device or 'all'}"

    INGEST_REQUESTS = "ingest.request.*"

    @staticmethod
    def ingest_request(request_id: str) -> str:
        """Progress and completion of one ingestion request (upload or RTSP capture)."""
        return f"ingest.request.{request_id}"

    TRACKING_TASKS = "tracking.task.*"

    @staticmethod
    def tracking_task(task_id: str) -> str:
        """One tracking task's tracking_update, status_update and batch_processing_complete."""
        return f"tracking.task.{task_id}"

    SYSTEM_READINESS = "system.readiness.*"

    @staticmethod
    def system_readiness(service: str) -> str:
        """Each instance of one service says whether it is ready (`edgeway.common.readiness`)."""
        return f"system.readiness.{service}"

    @staticmethod
    def producer(gateway_id: str, connection_id: str) -> str:
        """Where services answer one producer connection (rejections of what it sent)."""
        return f"gateway.{gateway_id}.{connection_id}"

    @staticmethod
    def producers_of(gateway_id: str) -> str:
        return f"gateway.{gateway_id}.*"


class Topology:
    """Exchanges and queues, named by the settings."""

    def __init__(self, names: ExchangeNames | None = None) -> None:
        self.names = names or ExchangeNames()

    # --- shared -------------------------------------------------------------------------------

    @property
    def broadcast(self) -> RabbitExchange:
        return RabbitExchange(self.names.broadcast, type=ExchangeType.TOPIC, durable=True)

    @property
    def dead_letter(self) -> RabbitExchange:
        return RabbitExchange(self.names.dead_letter, type=ExchangeType.TOPIC, durable=True)

    def work_queue(
        self,
        name: str,
        *,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        single_active_consumer: bool = False,
    ) -> RabbitQueue:
        """A quorum queue for durable work, dead-lettering to `<name>` on the DLX.

        With `single_active_consumer`, one consumer at a time gets every message, in order, and
        the others stand by: for work whose order matters (a vehicle's predictor state).
        """
        arguments: QuorumQueueArgs = {
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.names.dead_letter,
            "x-dead-letter-routing-key": name,
        }
        if single_active_consumer:
            arguments["x-single-active-consumer"] = True
        return RabbitQueue(name, queue_type=QueueType.QUORUM, durable=True, arguments=arguments)

    @property
    def work_queues(self) -> list[RabbitQueue]:
        """Every durable work queue, each with its dead letters (`edgeway-dead-letters`)."""
        return [
            self.occupancy_observations_queue,
            self.telemetry_raw_queue,
            self.ingest_uploads_queue,
            self.tracking_commands_queue,
            self.tracking_videos_queue,
        ]

    def dead_letter_queue(self, work_queue: str) -> RabbitQueue:
        """Where a work queue's rejected messages wait for an operator."""
        return RabbitQueue(
            f"{work_queue}.dead",
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=work_queue,
        )

    def gateway_queue(self, gateway_id: str) -> RabbitQueue:
        """One gateway replica's private view of the broadcast exchange."""
        return RabbitQueue(
            f"edgeway.gateway.{gateway_id}",
            exclusive=True,
            auto_delete=True,
            durable=False,
            arguments={"x-max-length": GATEWAY_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
        )

    def gateway_system_queue(self, gateway_id: str) -> RabbitQueue:
        """One gateway replica's copy of the services' readiness reports (`system.readiness.*`),
        apart from the clients' fan-out; a backlog is stale, so the oldest go."""
        return RabbitQueue(
            f"edgeway.gateway.{gateway_id}.system",
            exclusive=True,
            auto_delete=True,
            durable=False,
            routing_key=Channels.SYSTEM_READINESS,
            arguments={"x-max-length": SYSTEM_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
        )

    # --- occupancy ----------------------------------------------------------------------------

    @property
    def occupancy_observations(self) -> RabbitExchange:
        return RabbitExchange(
            self.names.occupancy_observations, type=ExchangeType.FANOUT, durable=True
        )

    @property
    def occupancy_observations_queue(self) -> RabbitQueue:
        return self.work_queue("edgeway.occupancy.observations")

    @property
    def occupancy_requests_queue(self) -> RabbitQueue:
        """Request/reply queries to the occupancy service (latest state)."""
        return RabbitQueue(
            "edgeway.occupancy.requests",
            durable=False,
            # A query nobody answers in time is worthless: the asker has given up (504).
            arguments={"x-message-ttl": 10_000},
        )

    # --- telemetry ----------------------------------------------------------------------------

    @property
    def telemetry_raw(self) -> RabbitExchange:
        return RabbitExchange(self.names.telemetry_raw, type=ExchangeType.FANOUT, durable=True)

    @property
    def telemetry_raw_queue(self) -> RabbitQueue:
        # Packets of one vehicle must be decoded in order: its predictor state depends on it.
        return self.work_queue("edgeway.telemetry.raw", single_active_consumer=True)

    @property
    def telemetry_requests_queue(self) -> RabbitQueue:
        """Request/reply queries to the telemetry service (history, status, vehicles)."""
        return RabbitQueue(
            "edgeway.telemetry.requests", durable=False, arguments={"x-message-ttl": 10_000}
        )

    # --- video and the phone link -------------------------------------------------------------

    def worldsystem(self, name: str) -> RabbitExchange:
        """A WorldSystem exchange by its field in ExchangeNames (fanout, durable, key "")."""
        return RabbitExchange(getattr(self.names, name), type=ExchangeType.FANOUT, durable=True)

    @property
    def video_stream_queue(self) -> RabbitQueue:
        """Raw phone H.264 chunks for the video relay, in order (one consumer).

        Live and lossy: when the relay falls this far behind, the oldest chunks go (its parser
        resynchronises on the next packet header)."""
        return RabbitQueue(
            "edgeway.video.stream",
            durable=True,
            arguments={"x-max-length": VIDEO_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
        )

    @property
    def video_imu(self) -> RabbitExchange:
        """Raw phone IMU samples, for the video relay to order (Edgeway's own ingress)."""
        return RabbitExchange(self.names.video_imu, type=ExchangeType.FANOUT, durable=True)

    @property
    def video_imu_queue(self) -> RabbitQueue:
        return RabbitQueue(
            "edgeway.video.imu",
            durable=True,
            arguments={"x-max-length": VIDEO_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
        )

    @property
    def video_requests_queue(self) -> RabbitQueue:
        """Request/reply queries to the video relay (GOP for a late joiner, status)."""
        return RabbitQueue(
            "edgeway.video.requests", durable=False, arguments={"x-message-ttl": 10_000}
        )

    # --- ingestion ----------------------------------------------------------------------------

    @property
    def ingest_uploads(self) -> RabbitExchange:
        """Files accepted at the edge (images, phone CSV files), one message per file."""
        return RabbitExchange(self.names.ingest_uploads, type=ExchangeType.FANOUT, durable=True)

    @property
    def ingest_uploads_queue(self) -> RabbitQueue:
        return self.work_queue("edgeway.ingest.uploads")

    @property
    def ingest_frames(self) -> RabbitExchange:
        """Every stored frame, announced once committed: the tracker binds its own queue."""
        return RabbitExchange(self.names.ingest_frames, type=ExchangeType.FANOUT, durable=True)

    @property
    def ingest_control(self) -> RabbitExchange:
        """Cancellations for every ingestion replica: the one running the capture stops it."""
        return RabbitExchange(self.names.ingest_control, type=ExchangeType.FANOUT, durable=True)

    def ingest_control_queue(self, replica_id: str) -> RabbitQueue:
        return RabbitQueue(
            f"edgeway.ingest.control.{replica_id}", exclusive=True, auto_delete=True, durable=False
        )

    @property
    def ingest_requests_queue(self) -> RabbitQueue:
        """Request/reply to the ingestion service: create uploads, start, cancel, status."""
        return RabbitQueue(
            "edgeway.ingest.requests", durable=False, arguments={"x-message-ttl": 10_000}
        )

    # --- tracking -----------------------------------------------------------------------------

    @property
    def tracking_commands(self) -> RabbitExchange:
        """Tasks to run: one persistent `run` command per task, taken by any tracker replica."""
        return RabbitExchange(self.names.tracking_commands, type=ExchangeType.FANOUT, durable=True)

    @property
    def tracking_commands_queue(self) -> RabbitQueue:
        return self.work_queue("edgeway.tracking.commands")

    @property
    def tracking_videos(self) -> RabbitExchange:
        """Camera videos an operator uploaded through the gateway, one message per file."""
        return RabbitExchange(self.names.tracking_videos, type=ExchangeType.FANOUT, durable=True)

    @property
    def tracking_videos_queue(self) -> RabbitQueue:
        return self.work_queue("edgeway.tracking.videos")

    @property
    def tracking_unrouted(self) -> RabbitExchange:
        """Where edge detections go that no live task takes (the detections' alternate exchange)."""
        return RabbitExchange(self.names.tracking_unrouted, type=ExchangeType.FANOUT, durable=True)

    @property
    def tracking_detections(self) -> RabbitExchange:
        """Edge detection frames, routed by `<environment_id>.<camera_id>` (live, transient).

        A tracker replica that runs a live task on an environment binds `<environment_id>.*`;
        what no replica takes goes to `tracking_unrouted`, whose consumer tells the producer why.
        """
        return RabbitExchange(
            self.names.tracking_detections,
            type=ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": self.names.tracking_unrouted},
        )

    @staticmethod
    def tracking_detections_key(environment_id: str, camera_id: str) -> str:
        return f"{environment_id}.{camera_id}"

    @property
    def tracking_unrouted_queue(self) -> RabbitQueue:
        """Shared by every tracker replica; an answer nobody needs any more is dropped."""
        return RabbitQueue(
            "edgeway.tracking.detections.unrouted",
            durable=False,
            arguments={
                "x-message-ttl": 10_000,
                "x-max-length": DETECTIONS_QUEUE_MAX_LENGTH,
                "x-overflow": "drop-head",
            },
        )

    def tracking_detections_queue(self, replica_id: str) -> RabbitQueue:
        """One tracker replica's edge detections, for the live tasks it runs."""
        return RabbitQueue(
            f"edgeway.tracker.{replica_id}.detections",
            exclusive=True,
            auto_delete=True,
            durable=False,
            arguments={"x-max-length": DETECTIONS_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
        )

    def tracking_frames_queue(self, replica_id: str, task_id: str) -> RabbitQueue:
        """One live tracking task's copy of `video_frames_exchange` (decoded phone frames)."""
        return RabbitQueue(
            f"edgeway.tracker.{replica_id}.frames.{task_id}",
            exclusive=True,
            auto_delete=True,
            durable=False,
            arguments={"x-max-length": RELAY_FRAMES_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"},
        )

    @property
    def tracking_control(self) -> RabbitExchange:
        """Stops for every tracker replica: the one running the task ends it."""
        return RabbitExchange(self.names.tracking_control, type=ExchangeType.FANOUT, durable=True)

    def tracking_control_queue(self, replica_id: str) -> RabbitQueue:
        return RabbitQueue(
            f"edgeway.tracker.{replica_id}.control", exclusive=True, auto_delete=True, durable=False
        )

    @property
    def tracking_requests_queue(self) -> RabbitQueue:
        """Request/reply to the tracker: environments, task start, status, stop, tracks."""
        return RabbitQueue(
            "edgeway.tracking.requests", durable=False, arguments={"x-message-ttl": 10_000}
        )

    # --- WorldSystem --------------------------------------------------------------------------

    def worldsystem_exchanges(self) -> list[RabbitExchange]:
        """The WorldSystem fanout exchanges, durable, with their (overridable) names."""
        n = self.names
        names = (
            n.video_frames,
            n.video_stream,
            n.imu_data,
            n.processed_frames,
            n.analysis_mode,
            n.trajectory_data,
            n.restart,
            n.ply_fanout,
        )
        return [RabbitExchange(name, type=ExchangeType.FANOUT, durable=True) for name in names]
