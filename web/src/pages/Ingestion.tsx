import { useEffect, useState } from "preact/hooks";
import { type Claims, getJson, liveSocket, postForm, postJson, socketUrl } from "../api";
import { ErrorLine, Needs } from "../components/Needs";

// TrackShift's IngestionResponse, as `/api/v1/ingest/status/{id}` and `/ws/ingest/{id}` give it.
interface Frame {
  frame_id: string;
  storage_url: string | null;
  width: number;
  height: number;
  size_bytes: number;
}

interface Status {
  request_id: string;
  status: "pending" | "in_progress" | "completed" | "failed" | "cancelled";
  camera_id: string;
  source_type: string;
  frames: Frame[];
  frames_total: number;
  message: string | null;
}

const FINAL = new Set(["completed", "failed", "cancelled"]);

/** A request's status, read once and then followed on its progress socket until it is final. */
function RequestView(props: { requestId: string; canCancel: boolean }) {
  const [status, setStatus] = useState<Status | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const read = () =>
      getJson<Status>(`/api/v1/ingest/status/${encodeURIComponent(props.requestId)}`)
        .then(setStatus)
        .catch((problem: Error) => setError(problem.message));
    read();
    // The socket's events say something changed; the status call gives the whole page of frames.
    const live = liveSocket(() => socketUrl(`/ws/ingest/${encodeURIComponent(props.requestId)}`), {
      message: () => read(),
    });
    return () => live.close();
  }, [props.requestId]);

  const cancel = () =>
    postJson<Status>(`/api/v1/ingest/rtsp/${encodeURIComponent(props.requestId)}/cancel`)
      .then(setStatus)
      .catch((problem: Error) => setError(problem.message));

  return (
    <div class="panel" data-testid="ingest-request" data-status={status?.status ?? ""} data-source={status?.source_type ?? ""}>
      <h4>
        Request <code>{props.requestId}</code>: <span data-testid="ingest-status">{status?.status ?? "…"}</span>
        {status && ` · ${status.frames_total} frames · ${status.source_type} from ${status.camera_id}`}
      </h4>
      {status?.message && <p class="muted">{status.message}</p>}
      {props.canCancel && status && !FINAL.has(status.status) && status.source_type === "rtsp" && (
        <button type="button" onClick={cancel}>
          Cancel capture
        </button>
      )}
      <ErrorLine error={error} />
      <div class="thumbs">
        {status?.frames.map((frame) =>
          frame.storage_url ? (
            <a href={frame.storage_url} target="_blank" rel="noreferrer">
              <img
                src={frame.storage_url}
                alt={frame.frame_id}
                title={`${frame.width}x${frame.height}, ${frame.size_bytes} bytes`}
                data-testid="thumbnail"
              />
            </a>
          ) : null,
        )}
      </div>
    </div>
  );
}

function Upload(props: { onRequest: (id: string) => void }) {
  const [files, setFiles] = useState<FileList | null>(null);
  const [camera, setCamera] = useState("console");
  const [progress, setProgress] = useState<number | null>(null);
  const [error, setError] = useState<string | null>(null);
  const submit = (event: Event) => {
    event.preventDefault();
    if (!files || files.length === 0) return;
    const form = new FormData();
    form.append("camera_id", camera);
    for (const file of Array.from(files)) form.append("files", file);
    form.append("meta", JSON.stringify({ session: "web-console" }));
    setError(null);
    setProgress(0);
    postForm<{ request_id: string }>("/api/v1/ingest/upload", form, setProgress)
      .then((answer) => {
        setProgress(1);
        props.onRequest(answer.request_id);
      })
      .catch((problem: Error) => {
        setProgress(null);
        setError(problem.message);
      });
  };
  return (
    <form class="panel" onSubmit={submit} data-testid="upload-form">
      <h3>Upload images</h3>
      <label>
        Camera id <input value={camera} onInput={(event) => setCamera((event.target as HTMLInputElement).value)} />
      </label>{" "}
      <input
        type="file"
        name="files"
        accept="image/*"
        multiple
        onChange={(event) => setFiles((event.target as HTMLInputElement).files)}
      />{" "}
      <button type="submit" disabled={!files || files.length === 0}>
        Upload
      </button>
      {progress !== null && (
        <progress value={progress} max={1} data-testid="upload-progress">
          {Math.round(progress * 100)}%
        </progress>
      )}
      <ErrorLine error={error} />
    </form>
  );
}

function Capture(props: { onRequest: (id: string) => void }) {
  const [url, setUrl] = useState("rtsp://127.0.0.1:8554/moving");
  const [camera, setCamera] = useState("cam-1");
  const [duration, setDuration] = useState(5);
  const [error, setError] = useState<string | null>(null);
  const submit = (event: Event) => {
    event.preventDefault();
    setError(null);
    postJson<{ request_id: string }>("/api/v1/ingest/rtsp", {
      rtsp_url: url,
      camera_id: camera,
      capture_mode: "continuous",
      fps: 1,
      capture_duration: duration,
    })
      .then((answer) => props.onRequest(answer.request_id))
      .catch((problem: Error) => setError(problem.message));
  };
  return (
    <form class="panel" onSubmit={submit} data-testid="rtsp-form">
      <h3>RTSP capture (1 frame a second)</h3>
      <label>
        URL <input size={40} value={url} onInput={(event) => setUrl((event.target as HTMLInputElement).value)} />
      </label>{" "}
      <label>
        Camera id <input value={camera} onInput={(event) => setCamera((event.target as HTMLInputElement).value)} />
      </label>{" "}
      <label>
        Seconds{" "}
        <input
          type="number"
          min={1}
          value={duration}
          onInput={(event) => setDuration(Number((event.target as HTMLInputElement).value))}
        />
      </label>{" "}
      <button type="submit">Start capture</button>
      <ErrorLine error={error} />
    </form>
  );
}

function Ingestion(props: { canWrite: boolean }) {
  const [requests, setRequests] = useState<string[]>([]);
  const [lookup, setLookup] = useState("");
  const add = (id: string) => setRequests((current) => [id, ...current.filter((known) => known !== id)]);
  return (
    <section>
      <h2>Ingestion</h2>
      {props.canWrite ? (
        <>
          <Upload onRequest={add} />
          <Capture onRequest={add} />
        </>
      ) : (
        <p class="muted" data-testid="write-refused">
          Uploads and captures need the scope ingest:write.
        </p>
      )}
      <form
        class="panel"
        onSubmit={(event) => {
          event.preventDefault();
          if (lookup.trim()) add(lookup.trim());
        }}
      >
        <label>
          A request's status: <input value={lookup} placeholder="request id" onInput={(event) => setLookup((event.target as HTMLInputElement).value)} />
        </label>{" "}
        <button type="submit">Show</button>
      </form>
      {requests.map((id) => (
        <RequestView requestId={id} canCancel={props.canWrite} key={id} />
      ))}
    </section>
  );
}

export function IngestionPage(props: { claims: Claims }) {
  return (
    <Needs claims={props.claims} scopes={["ingest:read"]} what="the ingestion page">
      <Ingestion canWrite={props.claims.scopes.includes("ingest:write")} />
    </Needs>
  );
}
