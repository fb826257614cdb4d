import { useEffect, useState } from "preact/hooks";
import { type Claims, getJson, liveSocket, type SocketState, socketUrl } from "../api";
import { Chart } from "../components/Chart";
import { ErrorLine, Needs, SocketBadge } from "../components/Needs";

// Omega's client message (`/client/ws/connect`), the latest state first, then each update.
interface Update {
  location_name: string;
  timestamp: number | string;
  people_detected: number;
  occupancy_percent: number;
}

interface History {
  bucket_s: number;
  locations: { location_name: string; points: [number, number, number][] }[];
}

const HOUR_S = 3600;

interface Place {
  latest: Update | null;
  times: number[];
  percents: number[];
}

function seconds(timestamp: number | string): number {
  return typeof timestamp === "number" ? timestamp : Date.parse(timestamp) / 1000;
}

/** The place with `update` added to its sparkline, points older than an hour dropped. */
function withUpdate(place: Place | undefined, update: Update): Place {
  const at = seconds(update.timestamp);
  const times = [...(place?.times ?? [])];
  const percents = [...(place?.percents ?? [])];
  if (!Number.isNaN(at) && (times.length === 0 || at >= times[times.length - 1])) {
    times.push(at);
    percents.push(update.occupancy_percent);
  }
  const cutoff = Date.now() / 1000 - HOUR_S;
  const first = times.findIndex((time) => time >= cutoff);
  const keep = first < 0 ? times.length : first;
  return { latest: update, times: times.slice(keep), percents: percents.slice(keep) };
}

function Occupancy() {
  const [places, setPlaces] = useState<Record<string, Place>>({});
  const [socket, setSocket] = useState<{ state: SocketState; reason?: string }>({ state: "connecting" });
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let live: { close: () => void } | null = null;
    let stopped = false;
    // The last hour first (the sparklines), then the socket: its latest state, then updates.
    getJson<History>(`/api/v1/occupancy/history?seconds=${HOUR_S}&bucket_s=60`)
      .then((history) => {
        if (stopped) return;
        const loaded: Record<string, Place> = {};
        for (const location of history.locations) {
          loaded[location.location_name] = {
            latest: null,
            times: location.points.map((point) => point[0]),
            percents: location.points.map((point) => point[1]),
          };
        }
        setPlaces((current) => ({ ...loaded, ...current }));
      })
      .catch((problem: Error) => setError(`No history: ${problem.message}`))
      .finally(() => {
        if (stopped) return;
        live = liveSocket(() => socketUrl("/client/ws/connect"), {
          message: (data) => {
            const update = JSON.parse(data as string) as Update;
            if (typeof update.location_name !== "string") return; // an error frame
            setPlaces((current) => ({
              ...current,
              [update.location_name]: withUpdate(current[update.location_name], update),
            }));
          },
          state: (state, reason) => setSocket({ state, reason }),
        });
      });
    return () => {
      stopped = true;
      live?.close();
    };
  }, []);

  const names = Object.keys(places).sort();
  return (
    <section>
      <h2>
        Occupancy <SocketBadge {...socket} />
      </h2>
      <p class="hint">Occupied zones (tables) per location, live from the camera models; the line is the last hour.</p>
      <ErrorLine error={error} />
      <div class="cards">
        {names.map((name) => {
          const place = places[name];
          return (
            <div class="card" data-testid="occupancy-card" data-location={name}>
              <h3>{name}</h3>
              {place.latest ? (
                <p class="big">
                  <span data-testid="percent">{place.latest.occupancy_percent.toFixed(1)}%</span>{" "}
                  <small>
                    <span data-testid="people">{place.latest.people_detected}</span> people
                  </small>
                </p>
              ) : (
                <p class="big muted">no live state yet</p>
              )}
              <Chart
                compact
                width={220}
                height={50}
                data={[place.times, place.percents]}
                series={[{ label: "%", stroke: "#2a7de1" }]}
                testid="sparkline"
              />
              {place.latest && (
                <p class="muted small">updated {new Date(seconds(place.latest.timestamp) * 1000).toLocaleTimeString()}</p>
              )}
            </div>
          );
        })}
      </div>
      {names.length === 0 && !error && <p class="muted">Waiting for the first state…</p>}
    </section>
  );
}

export function OccupancyPage(props: { claims: Claims }) {
  return (
    <Needs claims={props.claims} scopes={["occupancy:subscribe"]} what="the occupancy page">
      <Occupancy />
    </Needs>
  );
}
