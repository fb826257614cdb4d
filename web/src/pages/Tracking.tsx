import { useEffect, useRef, useState } from "preact/hooks";
import { type Claims, getJson, liveSocket, postJson, type SocketState, socketUrl } from "../api";
import { ErrorLine, Needs, SocketBadge } from "../components/Needs";

interface Camera {
  camera_id: string;
  homography?: { map_points?: [number, number][] } | null;
}

interface Environment {
  environment_id: string;
  name: string;
  ready: boolean;
  cameras: Camera[];
}

interface Track {
  track_id: number;
  global_id: string | number | null; // a UUID here (SpotOn's were integers)
  bbox_xyxy: number[];
  confidence: number;
  map_coords: [number, number] | null;
}

interface TaskStatus {
  task_id: string;
  status: string;
  progress: number;
  current_step: string;
}

// Positions kept per global id for its trail.
const TRAIL = 60;
const PALETTE = ["#2a7de1", "#e8590c", "#2b8a3e", "#ae3ec9", "#f08c00", "#0c8599", "#c92a2a", "#5c940d"];
/** A colour per global id, the same on the map and in the tables. */
function colour(id: string | number): string {
  let hash = 0;
  for (const char of String(id)) hash = (hash * 31 + char.charCodeAt(0)) | 0;
  return PALETTE[Math.abs(hash) % PALETTE.length];
}

/** A global id as people read it: a UUID's first 8 characters are enough to tell them apart. */
const short = (id: string | number) => String(id).slice(0, 8);

/** Where the map is: the environment's map points (homographies), grown by what was seen. */
function bounds(environment: Environment, trails: Map<string | number, [number, number][]>) {
  const points: [number, number][] = [];
  for (const camera of environment.cameras) points.push(...(camera.homography?.map_points ?? []));
  for (const trail of trails.values()) points.push(...trail);
  if (points.length === 0) return { x: 0, y: 0, width: 1, height: 1 };
  const xs = points.map((point) => point[0]);
  const ys = points.map((point) => point[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const pad = Math.max(x1 - x0, y1 - y0, 1) * 0.05;
  return { x: x0 - pad, y: y0 - pad, width: x1 - x0 + 2 * pad || 1, height: y1 - y0 + 2 * pad || 1 };
}

function TaskView(props: { taskId: string; environment: Environment; canStop: boolean }) {
  const [status, setStatus] = useState<TaskStatus | null>(null);
  const [socket, setSocket] = useState<{ state: SocketState; reason?: string }>({ state: "connecting" });
  const [cameras, setCameras] = useState<Record<string, Track[]>>({});
  const [frame, setFrame] = useState<number | null>(null);
  const [done, setDone] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const trails = useRef(new Map<string | number, [number, number][]>());

  useEffect(() => {
    const live = liveSocket(() => socketUrl(`/ws/tracking/${encodeURIComponent(props.taskId)}`), {
      message: (data) => {
        const message = JSON.parse(data as string);
        const payload = message.payload ?? message;
        if (message.type === "tracking_update") {
          const seen: Record<string, Track[]> = {};
          for (const [camera, view] of Object.entries(payload.cameras ?? {})) {
            const tracks = (view as { tracks: Track[] }).tracks;
            seen[camera] = tracks;
            for (const track of tracks) {
              if (track.global_id === null || !track.map_coords) continue;
              const trail = trails.current.get(track.global_id) ?? [];
              trail.push(track.map_coords);
              if (trail.length > TRAIL) trail.shift();
              trails.current.set(track.global_id, trail);
            }
          }
          setCameras(seen);
          setFrame(payload.global_frame_index);
        } else if (message.type === "batch_processing_complete") {
          setDone(true);
        } else if (message.type === "error") {
          setError(message.reason);
        } else if (typeof payload.status === "string") {
          setStatus(payload as TaskStatus);
        }
      },
      state: (state, reason) => setSocket({ state, reason }),
    });
    return () => live.close();
  }, [props.taskId]);

  const stop = () =>
    postJson<TaskStatus>(`/api/v1/processing-tasks/${encodeURIComponent(props.taskId)}/stop`)
      .then(setStatus)
      .catch((problem: Error) => setError(problem.message));

  const box = bounds(props.environment, trails.current);
  const radius = Math.max(box.width, box.height) / 80;
  return (
    <div class="panel" data-testid="tracking-task" data-status={status?.status ?? ""} data-frame={frame ?? -1}>
      <h3>
        Task <code>{props.taskId}</code> <SocketBadge {...socket} />
      </h3>
      <p>
        <span data-testid="task-status">{status?.status ?? "…"}</span>
        {status && ` · ${Math.round(status.progress * 100)}% · ${status.current_step}`}
        {frame !== null && ` · frame ${frame}`}
        {done && " · every frame processed"}
      </p>
      {status && <progress value={status.progress} max={1} />}
      {props.canStop && status && !["COMPLETED", "FAILED", "STOPPED"].includes(status.status) && (
        <button type="button" onClick={stop}>
          Stop
        </button>
      )}
      <ErrorLine error={error} />
      <div class="tracking">
        <svg
          class="map"
          data-testid="tracking-map"
          data-ids={trails.current.size}
          viewBox={`${box.x} ${box.y} ${box.width} ${box.height}`}
          width={420}
          height={420}
          preserveAspectRatio="xMidYMid meet"
        >
          <rect x={box.x} y={box.y} width={box.width} height={box.height} fill="#fff" stroke="#ccd" stroke-width={radius / 4} />
          {[...trails.current.entries()].map(([id, trail]) => {
            const [x, y] = trail[trail.length - 1];
            return (
              <g>
                <polyline
                  points={trail.map((point) => point.join(",")).join(" ")}
                  fill="none"
                  stroke={colour(id)}
                  stroke-width={radius / 3}
                  opacity={0.6}
                />
                <circle cx={x} cy={y} r={radius} fill={colour(id)} />
                <text x={x + radius * 1.2} y={y} font-size={radius * 2.2} fill="#1d2430">
                  {short(id)}
                </text>
              </g>
            );
          })}
        </svg>
        <div class="tracks">
          {Object.entries(cameras)
            .sort(([a], [b]) => a.localeCompare(b))
            .map(([camera, tracks]) => (
              <div data-testid="camera-tracks" data-camera={camera}>
                <h4>
                  {camera} <small class="muted">{tracks.length} tracks</small>
                </h4>
                <table>
                  <thead>
                    <tr>
                      <th>track</th>
                      <th>global id</th>
                      <th>map</th>
                      <th>confidence</th>
                    </tr>
                  </thead>
                  <tbody>
                    {tracks.map((track) => (
                      <tr>
                        <td>{track.track_id}</td>
                        <td style={{ color: track.global_id === null ? undefined : colour(track.global_id) }}>
                          {track.global_id === null ? "–" : short(track.global_id)}
                        </td>
                        <td>{track.map_coords ? track.map_coords.map((value) => value.toFixed(1)).join(", ") : "–"}</td>
                        <td>{track.confidence.toFixed(2)}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            ))}
        </div>
      </div>
    </div>
  );
}

function Tracking(props: { canStart: boolean; canWatch: boolean }) {
  const [environments, setEnvironments] = useState<Environment[] | null>(null);
  const [task, setTask] = useState<{ id: string; environment: Environment } | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    getJson<{ environments: Environment[] }>("/api/v1/environments")
      .then((answer) => setEnvironments(answer.environments))
      .catch((problem: Error) => setError(problem.message));
  }, []);

  const start = (environment: Environment) => {
    setError(null);
    postJson<{ task_id: string }>("/api/v1/processing-tasks/start", { environment_id: environment.environment_id })
      .then((answer) => setTask({ id: answer.task_id, environment }))
      .catch((problem: Error) => setError(problem.message));
  };

  return (
    <section>
      <h2>Tracking</h2>
      <ErrorLine error={error} />
      <table data-testid="environments">
        <thead>
          <tr>
            <th>environment</th>
            <th>cameras</th>
            <th>videos</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {(environments ?? []).map((environment) => (
            <tr data-environment={environment.environment_id}>
              <td>
                {environment.name} <code class="muted">{environment.environment_id}</code>
              </td>
              <td>{environment.cameras.map((camera) => camera.camera_id).join(", ")}</td>
              <td>{environment.ready ? "ready" : "not ready"}</td>
              <td>
                {props.canStart ? (
                  <button type="button" disabled={!environment.ready} onClick={() => start(environment)}>
                    Start a task
                  </button>
                ) : (
                  <span class="muted small">starting needs tracking:admin</span>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {environments && environments.length === 0 && <p class="muted">No environments yet.</p>}
      {task &&
        (props.canWatch ? (
          <TaskView taskId={task.id} environment={task.environment} canStop={props.canStart} key={task.id} />
        ) : (
          <p class="muted">Task {task.id} started; watching it needs the scope tracking:subscribe.</p>
        ))}
    </section>
  );
}

export function TrackingPage(props: { claims: Claims }) {
  return (
    <Needs claims={props.claims} scopes={["tracking:read"]} what="the tracking page">
      <Tracking
        canStart={props.claims.scopes.includes("tracking:admin")}
        canWatch={props.claims.scopes.includes("tracking:subscribe")}
      />
    </Needs>
  );
}
