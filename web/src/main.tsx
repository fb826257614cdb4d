import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { type Claims, readClaims, storedToken, storeToken, takeTokenFromAddress } from "./api";
import { IngestionPage } from "./pages/Ingestion";
import { OccupancyPage } from "./pages/Occupancy";
import { SystemPage } from "./pages/System";
import { TelemetryPage } from "./pages/Telemetry";
import { TrackingPage } from "./pages/Tracking";
import { VideoPage } from "./pages/Video";
import "./style.css";

const PAGES = {
  occupancy: { title: "Occupancy", page: OccupancyPage },
  telemetry: { title: "Telemetry", page: TelemetryPage },
  video: { title: "Video", page: VideoPage },
  tracking: { title: "Tracking", page: TrackingPage },
  ingestion: { title: "Ingestion", page: IngestionPage },
  system: { title: "System", page: SystemPage },
} as const;
type PageName = keyof typeof PAGES;

function pageFromAddress(): PageName {
  const name = location.hash.replace(/^#\/?/, "");
  return name in PAGES ? (name as PageName) : "occupancy";
}

function SignIn(props: { onToken: (token: string) => void; error: string | null }) {
  const [text, setText] = useState("");
  return (
    <form
      class="signin"
      onSubmit={(event) => {
        event.preventDefault();
        props.onToken(text.trim());
      }}
    >
      <h1>Edgeway console</h1>
      <p>
        Paste a token. <code>make run</code> prints a console address that signs in with a development token; mint
        another with <code>edgeway-token --subject me --scope occupancy:subscribe</code>. It is kept in this tab's
        session storage only.
      </p>
      <textarea
        name="token"
        rows={4}
        placeholder="eyJ..."
        value={text}
        onInput={(event) => setText((event.target as HTMLTextAreaElement).value)}
      />
      {props.error && <p class="error" role="alert">{props.error}</p>}
      <button type="submit" disabled={!text.trim()}>
        Sign in
      </button>
    </form>
  );
}

function App() {
  const [token, setToken] = useState<string | null>(() => {
    takeTokenFromAddress();
    return storedToken();
  });
  const [page, setPage] = useState<PageName>(pageFromAddress);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const follow = () => setPage(pageFromAddress());
    window.addEventListener("hashchange", follow);
    return () => window.removeEventListener("hashchange", follow);
  }, []);

  let claims: Claims | null = null;
  if (token) {
    try {
      claims = readClaims(token);
    } catch (problem) {
      storeToken(null);
      return <SignIn onToken={setToken} error={`That token cannot be read: ${(problem as Error).message}`} />;
    }
  }
  if (!token || !claims) {
    return (
      <SignIn
        error={error}
        onToken={(pasted) => {
          try {
            readClaims(pasted);
          } catch (problem) {
            setError(`That token cannot be read: ${(problem as Error).message}`);
            return;
          }
          storeToken(pasted);
          setError(null);
          setToken(pasted);
        }}
      />
    );
  }
  const expired = claims.expires !== null && claims.expires * 1000 < Date.now();
  const Page = PAGES[page].page;
  return (
    <div class="console">
      <header>
        <span class="brand">Edgeway</span>
        <nav>
          {(Object.keys(PAGES) as PageName[]).map((name) => (
            <a href={`#${name}`} class={name === page ? "active" : ""} data-page={name}>
              {PAGES[name].title}
            </a>
          ))}
        </nav>
        <span class="who" title={claims.scopes.join(" ")}>
          {claims.subject} · {claims.scopes.length} scopes{expired ? " · expired" : ""}
          <button
            type="button"
            onClick={() => {
              storeToken(null);
              setToken(null);
            }}
          >
            Sign out
          </button>
        </span>
      </header>
      {expired && <p class="error">This token has expired: the gateway will refuse it. Sign out and paste a new one.</p>}
      <main data-testid={`page-${page}`}>
        <Page claims={claims} key={page} />
      </main>
    </div>
  );
}

render(<App />, document.getElementById("app")!);
