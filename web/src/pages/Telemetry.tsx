import { useEffect, useRef, useState } from "preact/hooks";
import { type Claims, getJson, liveSocket, postJson, type SocketState, socketUrl } from "../api";
import { Chart } from "../components/Chart";
import { ErrorLine, Needs, SocketBadge } from "../components/Needs";

// The dashboard protocol of `/ws`: `log`, `history`, then each `telemetry` record.
interface RecordData {
  timestamp: number; // ms, the vehicle's clock
  speed: number;
  battery: number;
  power: number;
  heading: number;
  received_at: string;
}

interface Stats {
  total_readings: number;
  transmitted_readings: number;
  skipped_readings: number;
  compression_ratio: number;
}

interface LiveRecord {
  type: "telemetry";
  data: RecordData;
  vin: string;
  vehicle_vin: string;
  compression_stats: Stats;
  reconstructed: string[];
}

interface LoggerState {
  vin: string;
  acknowledged: boolean;
  running: boolean;
  offline: boolean;
  buffered: number;
}

const FIELDS = ["speed", "battery", "power", "heading"] as const;
type Field = (typeof FIELDS)[number];
const UNITS: Record<Field, string> = { speed: "km/h", battery: "%", power: "kW", heading: "°" };
// Points kept per chart: 2 minutes of a logger's 300 ms records.
const KEEP = 400;
// A vehicle's offline sessions are asked for this often, so a replay shows up within it.
const SESSIONS_POLL_MS = 5000;
const SESSIONS_SHOWN = 10;

// `GET /api/v1/telemetry/sessions`: a run of records the logger buffered in a dead zone and
// replayed when it was back, as the telemetry service stored it.
interface OfflineSession {
  id: number;
  started_at: string; // the records' own times
  ended_at: string | null; // null while the replay goes on
  arrived_at: string | null; // when the replay reached the gateway
  records_buffered: number;
  records_uploaded: number;
  status: "syncing" | "synced";
}

interface Vehicle {
  vin: string;
  times: number[];
  sent: Record<Field, (number | null)[]>;
  rebuilt: Record<Field, (number | null)[]>;
  stats: Stats | null;
  records: number;
}

function emptyVehicle(vin: string): Vehicle {
  const series = () => ({ speed: [], battery: [], power: [], heading: [] }) as Record<Field, (number | null)[]>;
  return { vin, times: [], sent: series(), rebuilt: series(), stats: null, records: 0 };
}

/** `vehicle` with `record` added: each field goes to the sent series or, when the server
 * predicted it (the logger skipped it), to the reconstructed one. */
function addRecord(vehicle: Vehicle, record: LiveRecord): void {
  const at = record.data.timestamp / 1000;
  vehicle.times.push(at);
  for (const field of FIELDS) {
    const rebuilt = record.reconstructed.includes(field);
    vehicle.sent[field].push(rebuilt ? null : record.data[field]);
    vehicle.rebuilt[field].push(rebuilt ? record.data[field] : null);
  }
  if (vehicle.times.length > KEEP) {
    vehicle.times.shift();
    for (const field of FIELDS) {
      vehicle.sent[field].shift();
      vehicle.rebuilt[field].shift();
    }
  }
  vehicle.stats = record.compression_stats;
  vehicle.records += 1;
}

function time(iso: string | null): string {
  return iso === null ? "–" : new Date(iso).toLocaleTimeString();
}

/** The vehicle's last offline sessions, from the telemetry service, asked again every
 * SESSIONS_POLL_MS: a replay that starts, grows or ends shows up within that. */
function OfflineSessions(props: { vin: string }) {
  const [sessions, setSessions] = useState<OfflineSession[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let stopped = false;
    const read = () =>
      getJson<{ sessions: OfflineSession[] }>(
        `/api/v1/telemetry/sessions?vin=${encodeURIComponent(props.vin)}&limit=${SESSIONS_SHOWN}`,
      )
        .then((answer) => {
          if (stopped) return;
          setSessions(answer.sessions);
          setError(null);
        })
        .catch((problem: Error) => !stopped && setError(`offline sessions: ${problem.message}`));
    read();
    const polling = window.setInterval(read, SESSIONS_POLL_MS);
    return () => {
      stopped = true;
      window.clearInterval(polling);
    };
  }, [props.vin]);
  return (
    <div data-testid="offline-sessions" data-vin={props.vin}>
      <h4>Offline sessions</h4>
      <ErrorLine error={error} />
      {sessions === null ? null : sessions.length === 0 ? (
        <p class="muted small">none: every record of this vehicle arrived as it was recorded</p>
      ) : (
        <table class="small">
          <thead>
            <tr>
              <th>recorded from</th>
              <th>to</th>
              <th>replay arrived</th>
              <th>records stored / buffered</th>
              <th>status</th>
            </tr>
          </thead>
          <tbody>
            {sessions.map((session) => (
              <tr data-testid="offline-session" data-status={session.status}>
                <td>{time(session.started_at)}</td>
                <td>{time(session.ended_at)}</td>
                <td>{time(session.arrived_at)}</td>
                <td>
                  {session.records_uploaded} / {session.records_buffered}
                </td>
                <td>{session.status}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}

function Controls(props: { vins: string[] }) {
  const [answer, setAnswer] = useState<{ effect: string; loggers: LoggerState[] } | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [target, setTarget] = useState("");
  const send = (path: string) => {
    setError(null);
    const query = target ? `?vin=${encodeURIComponent(target)}` : "";
    postJson<{ effect: string; loggers: LoggerState[] }>(`${path}${query}`)
      .then(setAnswer)
      .catch((problem: Error) => setError(problem.message));
  };
  return (
    <div class="panel" data-testid="logger-controls">
      <h3>Logger controls</h3>
      <label>
        Vehicle{" "}
        <select value={target} onChange={(event) => setTarget((event.target as HTMLSelectElement).value)}>
          <option value="">every vehicle</option>
          {props.vins.map((vin) => (
            <option value={vin}>{vin}</option>
          ))}
        </select>
      </label>{" "}
      <button type="button" onClick={() => send("/logger/start")}>
        Start
      </button>{" "}
      <button type="button" onClick={() => send("/logger/stop")}>
        Stop
      </button>{" "}
      <button type="button" onClick={() => send("/toggle_offline")}>
        Dead zone on/off
      </button>
      <ErrorLine error={error} />
      {answer && (
        <div data-testid="control-answer">
          <p class="muted">{answer.effect}</p>
          <table>
            <thead>
              <tr>
                <th>VIN</th>
                <th>acknowledged</th>
                <th>running</th>
                <th>in a dead zone</th>
                <th>buffered</th>
              </tr>
            </thead>
            <tbody>
              {answer.loggers.map((logger) => (
                <tr>
                  <td>{logger.vin}</td>
                  <td>{logger.acknowledged ? "yes" : "no"}</td>
                  <td>{logger.running ? "yes" : "no"}</td>
                  <td>{logger.offline ? "yes" : "no"}</td>
                  <td>{logger.buffered}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}

function Telemetry(props: { operator: boolean }) {
  const vehicles = useRef<Record<string, Vehicle>>({});
  const [, setTick] = useState(0);
  const [socket, setSocket] = useState<{ state: SocketState; reason?: string }>({ state: "connecting" });
  const [fleet, setFleet] = useState<{ total_records: number; compression_stats: Stats } | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let dirty = false;
    const live = liveSocket(() => socketUrl("/ws"), {
      message: (data) => {
        const message = JSON.parse(data as string);
        if (message.type !== "telemetry" || typeof message.vin !== "string") return;
        const record = message as LiveRecord;
        const vehicle = (vehicles.current[record.vin] ??= emptyVehicle(record.vin));
        addRecord(vehicle, record);
        dirty = true;
      },
      state: (state, reason) => setSocket({ state, reason }),
    });
    // Redrawn at most 4 times a second, however many records arrive.
    const redraw = window.setInterval(() => {
      if (dirty) {
        dirty = false;
        setTick((tick) => tick + 1);
      }
    }, 250);
    const readStatus = () =>
      getJson<{ total_records: number; compression_stats: Stats }>("/status")
        .then((status) => {
          setFleet(status);
          setError(null);
        })
        .catch((problem: Error) => setError(`/status: ${problem.message}`));
    readStatus();
    const polling = window.setInterval(readStatus, 5000);
    return () => {
      live.close();
      window.clearInterval(redraw);
      window.clearInterval(polling);
    };
  }, []);

  const list = Object.values(vehicles.current).sort((a, b) => a.vin.localeCompare(b.vin));
  return (
    <section>
      <h2>
        Telemetry <SocketBadge {...socket} />
      </h2>
      <ErrorLine error={error} />
      {fleet && (
        <div class="panel" data-testid="fleet-stats">
          <h3>Compression today (fleet)</h3>
          <p>
            {fleet.total_records} records stored · {fleet.compression_stats.transmitted_readings} fields sent,{" "}
            {fleet.compression_stats.skipped_readings} predicted by the server ·{" "}
            <strong>{fleet.compression_stats.compression_ratio}% saved</strong>
          </p>
        </div>
      )}
      {props.operator ? (
        <Controls vins={list.map((vehicle) => vehicle.vin)} />
      ) : (
        <p class="muted" data-testid="controls-refused">
          Logger controls need the scope telemetry:control (operators).
        </p>
      )}
      <p class="hint">
        Lines are values the vehicle sent; <span class="rebuilt">dots</span> are values it skipped and the server
        reconstructed from its prediction. Offline sessions are records a logger buffered in a dead zone and sent
        when it was back: <em>syncing</em> while they still arrive late, <em>synced</em> once a live record followed.
      </p>
      {list.length === 0 && <p class="muted">Waiting for the first record…</p>}
      {list.map((vehicle) => (
        <div class="vehicle" data-testid="vehicle" data-vin={vehicle.vin}>
          <h3>
            {vehicle.vin} <small class="muted">{vehicle.records} records</small>
          </h3>
          {vehicle.stats && (
            <p class="muted small">
              {vehicle.stats.transmitted_readings} fields sent, {vehicle.stats.skipped_readings} reconstructed (
              {vehicle.stats.compression_ratio}% saved)
            </p>
          )}
          <div class="charts">
            {FIELDS.map((field) => (
              <Chart
                title={`${field} (${UNITS[field]})`}
                data={[vehicle.times, vehicle.sent[field], vehicle.rebuilt[field]]}
                series={[
                  { label: "sent", stroke: "#2a7de1" },
                  { label: "reconstructed", stroke: "#e8590c", points: true },
                ]}
                width={300}
                height={150}
                testid={`chart-${field}`}
              />
            ))}
          </div>
          <OfflineSessions vin={vehicle.vin} />
        </div>
      ))}
    </section>
  );
}

export function TelemetryPage(props: { claims: Claims }) {
  return (
    <Needs claims={props.claims} scopes={["telemetry:subscribe"]} what="the telemetry page">
      <Telemetry operator={props.claims.scopes.includes("telemetry:control")} />
    </Needs>
  );
}
