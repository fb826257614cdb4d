// The gateway's public endpoints, called with the signed-in token. The console talks to nothing
// else: every address here is relative to the page's own origin.

const TOKEN_KEY = "edgeway.token";

export interface Claims {
  subject: string;
  scopes: string[];
  expires: number | null; // seconds since the epoch
}

export function storedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function storeToken(token: string | null): void {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** A token given in the page's address (`#token=...`, as `make run` prints it): kept in session
 * storage and taken out of the address bar. */
export function takeTokenFromAddress(): void {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = fragment.get("token");
  if (token) {
    storeToken(token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

/** What the token says it allows, read from its payload. Only to show the pages it opens: the
 * gateway verifies the signature and decides. Throws on text that is not a JWT. */
export function readClaims(token: string): Claims {
  const parts = token.split(".");
  if (parts.length !== 3) throw new Error("not a JWT: it should be three base64url parts joined by dots");
  let payload: Record<string, unknown>;
  try {
    const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    payload = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0))));
  } catch {
    throw new Error("not a JWT: its payload is not base64url JSON");
  }
  const scope = typeof payload.scope === "string" ? payload.scope : "";
  return {
    subject: typeof payload.sub === "string" ? payload.sub : "?",
    scopes: scope.split(" ").filter(Boolean),
    expires: typeof payload.exp === "number" ? payload.exp : null,
  };
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    reason: string,
  ) {
    super(reason);
  }
}

/** The gateway's error object (`{code, reason, fix}`) as an ApiError. */
async function failure(response: Response): Promise<ApiError> {
  let code = `http_${response.status}`;
  let reason = response.statusText;
  try {
    const body = await response.json();
    code = body.code ?? code;
    reason = [body.reason ?? body.message, body.fix].filter(Boolean).join(" ") || reason;
  } catch {
    // not JSON: the status says it
  }
  return new ApiError(response.status, code, reason);
}

function authorization(): Record<string, string> {
  const token = storedToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

export async function getJson<T>(path: string): Promise<T> {
  const response = await fetch(path, { headers: authorization() });
  if (!response.ok) throw await failure(response);
  return (await response.json()) as T;
}

export async function postJson<T>(path: string, body?: unknown): Promise<T> {
  const response = await fetch(path, {
    method: "POST",
    headers: { ...authorization(), ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return (await response.json()) as T;
}

export async function getText(path: string): Promise<string> {
  const response = await fetch(path, { headers: authorization() });
  if (!response.ok) throw await failure(response);
  return response.text();
}

/** A multipart POST with upload progress (fetch reports none): XMLHttpRequest's. */
export function postForm<T>(path: string, form: FormData, onProgress: (fraction: number) => void): Promise<T> {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    const token = storedToken();
    if (token) request.setRequestHeader("Authorization", `Bearer ${token}`);
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    request.onload = () => {
      let body: Record<string, unknown> = {};
      try {
        body = JSON.parse(request.responseText);
      } catch {
        // not JSON
      }
      if (request.status >= 200 && request.status < 300) resolve(body as T);
      else {
        const reason = [body.reason ?? body.message, body.fix].filter(Boolean).join(" ");
        reject(new ApiError(request.status, String(body.code ?? request.status), reason || request.statusText));
      }
    };
    request.onerror = () => reject(new ApiError(0, "network", "the gateway could not be reached"));
    request.send(form);
  });
}

/** A WebSocket address on the page's own host, with the token as `?token=` (browsers cannot set
 * headers on a WebSocket). */
export function socketUrl(path: string, params: Record<string, string> = {}): string {
  const query = new URLSearchParams(params);
  const token = storedToken();
  if (token) query.set("token", token);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const suffix = query.toString();
  return `${scheme}//${location.host}${path}${suffix ? `?${suffix}` : ""}`;
}

export type SocketState = "connecting" | "open" | "closed";

/** A socket that reconnects (after 1 s, then up to 10 s) until `close()` is called. */
export function liveSocket(
  url: () => string,
  handlers: {
    message: (data: string | ArrayBuffer) => void;
    state?: (state: SocketState, reason?: string) => void;
    binary?: boolean;
  },
): { close: () => void } {
  let socket: WebSocket | null = null;
  let stopped = false;
  let delay = 1000;
  let timer: number | undefined;

  const open = () => {
    handlers.state?.("connecting");
    socket = new WebSocket(url());
    if (handlers.binary) socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      delay = 1000;
      handlers.state?.("open");
    };
    socket.onmessage = (event) => handlers.message(event.data);
    socket.onclose = (event) => {
      if (stopped) return;
      handlers.state?.("closed", event.reason || `closed (${event.code}); trying again`);
      timer = window.setTimeout(open, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  open();
  return {
    close() {
      stopped = true;
      window.clearTimeout(timer);
      socket?.close();
    },
  };
}
