import { useEffect, useState } from "preact/hooks";
import { type Claims, getJson, getText } from "../api";
import { ErrorLine, Needs } from "../components/Needs";

// Each service instance's readiness comes from the gateway, which keeps the latest report each
// instance publishes (what its own /readyz says, every few seconds): the console cannot reach
// the instances, and the gateway does not know their addresses.
const SERVICES_PATH = "/api/v1/system/services";
const SCOPE = "system:read";

interface Instance {
  instance: string;
  status: "ready" | "not ready" | "not reporting";
  failures: Record<string, string>;
  age_s: number;
  checked_at: number;
  interval_s: number;
  version: string | null;
}

interface SystemReadiness {
  gateway: { gateway_id: string; instance: string; status: string; failures: Record<string, string> };
  services: { service: string; instances: Instance[] }[];
}

// Metrics read from the gateway's /metrics (Prometheus text; on the public port in development).
const METRICS: { name: string; label: string }[] = [
  { name: "edgeway_gateway_connections", label: "open WebSockets" },
  { name: "edgeway_gateway_published_total", label: "messages published (broker-confirmed)" },
  { name: "edgeway_gateway_delivered_total", label: "messages queued to clients" },
  { name: "edgeway_gateway_dropped_total", label: "messages dropped for slow clients" },
  { name: "edgeway_gateway_rejected_total", label: "producer messages rejected at the edge" },
  { name: "edgeway_gateway_auth_refused_total", label: "connections refused by auth" },
];

/** The sum of every sample of `name` in Prometheus text (all its label sets together). */
export function metricTotal(text: string, name: string): number | null {
  let total: number | null = null;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (!(rest.startsWith("{") || rest.startsWith(" "))) continue;
    const value = Number(line.slice(line.lastIndexOf(" ") + 1));
    if (!Number.isNaN(value)) total = (total ?? 0) + value;
  }
  return total;
}

/** "database: OSError: ...; migrations: ..." */
function failureText(failures: Record<string, string>): string {
  return Object.entries(failures)
    .map(([check, reason]) => `${check}: ${reason}`)
    .join("; ");
}

function ago(seconds: number): string {
  return seconds < 60 ? `${seconds.toFixed(1)} s ago` : `${Math.round(seconds / 60)} min ago`;
}

function InstanceRow(props: { service: string; item: Instance }) {
  const { item } = props;
  const failing = failureText(item.failures);
  const detail =
    item.status === "not reporting"
      ? `last report ${ago(item.age_s)} (every ${item.interval_s} s)${failing ? `; it said ${failing}` : ""}`
      : `${failing ? `${failing}; ` : ""}reported ${ago(item.age_s)}${item.version ? `, version ${item.version}` : ""}`;
  return (
    <tr data-service={props.service} data-instance={item.instance} data-state={item.status}>
      <td>{props.service}</td>
      <td class="small">{item.instance}</td>
      <td class={item.status === "ready" ? "ok" : "bad"}>{item.status}</td>
      <td class="small">{detail}</td>
    </tr>
  );
}

function Readiness(props: { readiness: SystemReadiness }) {
  const { gateway, services } = props.readiness;
  return (
    <table data-testid="readiness">
      <thead>
        <tr>
          <th>service</th>
          <th>instance</th>
          <th>state</th>
          <th>detail</th>
        </tr>
      </thead>
      <tbody>
        <tr data-service="gateway" data-instance={gateway.instance} data-state={gateway.status}>
          <td>gateway (this replica)</td>
          <td class="small">{gateway.instance}</td>
          <td class={gateway.status === "ready" ? "ok" : "bad"}>{gateway.status}</td>
          <td class="small">{failureText(gateway.failures) || `/readyz, id ${gateway.gateway_id}`}</td>
        </tr>
        {services.map(({ service, instances }) =>
          instances.length === 0 ? (
            <tr data-service={service} data-state="no instance">
              <td>{service}</td>
              <td class="small muted">–</td>
              <td class="bad">no instance</td>
              <td class="small">no instance has reported in the last few minutes</td>
            </tr>
          ) : (
            instances.map((item) => <InstanceRow service={service} item={item} />)
          ),
        )}
      </tbody>
    </table>
  );
}

export function SystemPage(props: { claims: Claims }) {
  const allowed = props.claims.scopes.includes(SCOPE);
  const [readiness, setReadiness] = useState<SystemReadiness | null>(null);
  const [readinessError, setReadinessError] = useState<string | null>(null);
  const [metrics, setMetrics] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const check = () => {
      if (allowed) {
        getJson<SystemReadiness>(SERVICES_PATH)
          .then((answer) => {
            setReadiness(answer);
            setReadinessError(null);
          })
          .catch((problem: Error) => setReadinessError(`${SERVICES_PATH}: ${problem.message}`));
      }
      getText("/metrics")
        .then((text) => {
          setMetrics(text);
          setError(null);
        })
        .catch((problem: Error) =>
          setError(`/metrics is not on the gateway's public port here (outside development it has its own): ${problem.message}`),
        );
    };
    check();
    const timer = window.setInterval(check, 5000);
    return () => window.clearInterval(timer);
  }, [allowed]);

  return (
    <section>
      <h2>System</h2>
      <Needs claims={props.claims} scopes={[SCOPE]} what="each service's readiness">
        <ErrorLine error={readinessError} />
        {readiness ? <Readiness readiness={readiness} /> : !readinessError && <p class="muted">checking…</p>}
      </Needs>
      <h3>Gateway metrics</h3>
      <ErrorLine error={error} />
      {metrics && (
        <table data-testid="metrics">
          <tbody>
            {METRICS.map((metric) => (
              <tr>
                <td>{metric.label}</td>
                <td class="number">{metricTotal(metrics, metric.name) ?? "–"}</td>
                <td class="muted small">{metric.name}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
