import { useEffect, useState } from "preact/hooks";
import { ApiError, type Claims, getJson, getText } from "../api";
import { ErrorLine } from "../components/Needs";

// Each service is asked, through the gateway, the cheapest question its scope allows: an
// answer means the service is reachable over the broker; 504 means it did not answer in time.
// A 404 for a request id nobody made is an answer too (the ingestion service looked).
const PROBES = [
  { service: "occupancy", scope: "occupancy:subscribe", path: "/api/v1/occupancy/history?seconds=60&bucket_s=60" },
  { service: "telemetry", scope: "telemetry:subscribe", path: "/status" },
  { service: "video relay", scope: "video:subscribe", path: "/video/status" },
  { service: "ingestion", scope: "ingest:read", path: "/api/v1/ingest/status/console-readiness-probe", answers: [404] },
  { service: "tracker", scope: "tracking:read", path: "/api/v1/environments" },
];

// Metrics read from the gateway's /metrics (Prometheus text; on the public port in development).
const METRICS: { name: string; label: string }[] = [
  { name: "edgeway_gateway_connections", label: "open WebSockets" },
  { name: "edgeway_gateway_published_total", label: "messages published (broker-confirmed)" },
  { name: "edgeway_gateway_delivered_total", label: "messages queued to clients" },
  { name: "edgeway_gateway_dropped_total", label: "messages dropped for slow clients" },
  { name: "edgeway_gateway_rejected_total", label: "producer messages rejected at the edge" },
  { name: "edgeway_gateway_auth_refused_total", label: "connections refused by auth" },
];

interface Probe {
  service: string;
  state: "ready" | "not answering" | "not checked" | "checking";
  detail: string;
}

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

async function probe(claims: Claims, item: (typeof PROBES)[number]): Promise<Probe> {
  if (!claims.scopes.includes(item.scope)) {
    return { service: item.service, state: "not checked", detail: `needs the scope ${item.scope}` };
  }
  const started = performance.now();
  try {
    await getJson(item.path);
  } catch (problem) {
    const error = problem as ApiError;
    if (!(error instanceof ApiError) || !(item.answers ?? []).includes(error.status)) {
      return { service: item.service, state: "not answering", detail: `${error.status ?? ""} ${error.message}` };
    }
  }
  return { service: item.service, state: "ready", detail: `answered in ${Math.round(performance.now() - started)} ms` };
}

export function SystemPage(props: { claims: Claims }) {
  const [gateway, setGateway] = useState<string>("checking");
  const [probes, setProbes] = useState<Probe[]>([]);
  const [metrics, setMetrics] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const check = () => {
      getJson<{ status: string }>("/readyz")
        .then((answer) => setGateway(answer.status))
        .catch((problem: Error) => setGateway(`not ready: ${problem.message}`));
      Promise.all(PROBES.map((item) => probe(props.claims, item))).then(setProbes);
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
  }, [props.claims]);

  return (
    <section>
      <h2>System</h2>
      <table data-testid="readiness">
        <thead>
          <tr>
            <th>part</th>
            <th>state</th>
            <th>detail</th>
          </tr>
        </thead>
        <tbody>
          <tr data-service="gateway">
            <td>gateway (and its broker link)</td>
            <td class={gateway === "ready" ? "ok" : "bad"}>{gateway}</td>
            <td>/readyz</td>
          </tr>
          {probes.map((item) => (
            <tr data-service={item.service} data-state={item.state}>
              <td>{item.service}</td>
              <td class={item.state === "ready" ? "ok" : item.state === "not checked" ? "muted" : "bad"}>{item.state}</td>
              <td>{item.detail}</td>
            </tr>
          ))}
        </tbody>
      </table>
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
