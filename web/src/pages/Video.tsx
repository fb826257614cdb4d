import { useEffect, useRef, useState } from "preact/hooks";
import { type Claims, getJson, liveSocket, type SocketState, socketUrl } from "../api";
import { ErrorLine, Needs, SocketBadge } from "../components/Needs";

// `/ws/video/consume?device=` sends the phone's H.264 as binary messages, one packet's Annex-B
// NAL units each (start codes included): SPS, PPS and the current GOP first (a late joiner
// decodes at once), then each packet live. Text messages are status lines and "pong", and with
// `timing=1` a `timing` message before each packet with its capture time. Where WebCodecs is
// missing, `/ws/video/frames?device=` gives the relay's JPEGs instead (the latest one at once).

const NAL_SPS = 7;
const NAL_PPS = 8;
const NAL_IDR = 5;
const NAL_SLICE = 1; // a picture that is not a keyframe
const WINDOW_MS = 2000; // bandwidth and frame rate are measured over the last 2 s

/** The NAL unit types of an Annex-B buffer (the byte after each 00 00 01 start code). */
export function nalTypes(data: Uint8Array): number[] {
  const types: number[] = [];
  for (let i = 0; i + 3 < data.length; i++) {
    if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1) {
      types.push(data[i + 3] & 0x1f);
      i += 3;
    }
  }
  return types;
}

/** The WebCodecs codec string of an SPS NAL unit (`avc1.PPCCLL`: profile, constraints, level). */
export function codecOf(sps: Uint8Array): string {
  const start = sps.findIndex((_, i) => sps[i] === 0 && sps[i + 1] === 0 && sps[i + 2] === 1 && (sps[i + 3] & 0x1f) === NAL_SPS) + 3;
  const hex = (byte: number) => byte.toString(16).padStart(2, "0");
  return `avc1.${hex(sps[start + 1])}${hex(sps[start + 2])}${hex(sps[start + 3])}`;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((size, part) => size + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

interface Stats {
  frames: number;
  fps: number;
  kbps: number;
  decodeMs: number; // from a packet's (or JPEG's) arrival to its picture
  captureMs: number | null; // from the phone's capture to the picture on screen (null: no times)
  size: string;
}

type Mode = "h264" | "jpeg";

/** What a player's socket loop reports to the page: pictures go to `canvas`. */
interface Sink {
  canvas: { current: HTMLCanvasElement | null };
  stats: (stats: Stats) => void;
  notice: (notice: string | null) => void;
  socket: (state: SocketState, reason?: string) => void;
  fallback: (why: string) => void; // no H.264 decoding here: show the JPEG frames instead
}

/** Figures over the last WINDOW_MS: bytes received, and each picture's delays when drawn. */
class Meter {
  received: { at: number; bytes: number }[] = [];
  drawn: { at: number; decode: number; capture: number | null }[] = [];
  frames = 0;
  size = "";

  arrived(bytes: number) {
    this.received.push({ at: performance.now(), bytes });
  }

  /** A picture went on screen: `arrived` (performance.now()) and `captured` (Unix ms or null). */
  shown(arrived: number, captured: number | null, width: number, height: number) {
    const now = performance.now();
    this.frames += 1;
    this.size = `${width}x${height}`;
    this.drawn.push({ at: now, decode: now - arrived, capture: captured === null ? null : Date.now() - captured });
  }

  stats(): Stats {
    const since = performance.now() - WINDOW_MS;
    while (this.received.length && this.received[0].at < since) this.received.shift();
    while (this.drawn.length && this.drawn[0].at < since) this.drawn.shift();
    const bytes = this.received.reduce((total, item) => total + item.bytes, 0);
    const mean = (values: number[]) => (values.length ? values.reduce((a, b) => a + b, 0) / values.length : null);
    const captures = this.drawn.flatMap((item) => (item.capture === null ? [] : [item.capture]));
    return {
      frames: this.frames,
      fps: this.drawn.length / (WINDOW_MS / 1000),
      kbps: (bytes * 8) / WINDOW_MS,
      decodeMs: mean(this.drawn.map((item) => item.decode)) ?? 0,
      captureMs: mean(captures),
      size: this.size,
    };
  }
}

function fitCanvas(canvas: HTMLCanvasElement, width: number, height: number) {
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
}

/**
 * A socket's text messages: `{"type":"timing",..}` (asked with `timing=1`) gives the capture time
 * of the binary message that follows it; a status line or an error becomes the notice.
 */
function textMessage(data: string, sink: Sink, timing: (captured: number | null) => void) {
  if (data === "pong") return;
  try {
    const message = JSON.parse(data);
    if (message.type === "timing") {
      timing(typeof message.captured_ms === "number" ? message.captured_ms : null);
      return;
    }
    sink.notice(message.reason ?? data);
  } catch {
    sink.notice(data);
  }
}

/** `/ws/video/consume`: H.264 decoded with WebCodecs. Returns what stops it. */
function playH264(device: string, sink: Sink): () => void {
  let sps: Uint8Array | null = null;
  let pps: Uint8Array | null = null;
  let decoder: VideoDecoder | null = null;
  let waitingForKey = true;
  let timestamp = 0;
  const arrivals = new Map<number, { arrived: number; captured: number | null }>(); // by chunk timestamp
  const meter = new Meter();
  let captured: number | null = null; // the capture time of the next binary message

  const draw = (frame: VideoFrame) => {
    const times = arrivals.get(frame.timestamp);
    arrivals.delete(frame.timestamp);
    const target = sink.canvas.current;
    if (target) {
      fitCanvas(target, frame.displayWidth, frame.displayHeight);
      target.getContext("2d")?.drawImage(frame, 0, 0);
    }
    meter.shown(times?.arrived ?? performance.now(), times?.captured ?? null, frame.displayWidth, frame.displayHeight);
    frame.close();
  };

  // Pictures wait here while the decoder is being configured (a late joiner's GOP arrives
  // all at once, before `isConfigSupported` answers): none of them is lost.
  let pending: { key: boolean; data: Uint8Array; arrived: number; captured: number | null }[] = [];
  let configuring = false;

  const pump = () => {
    if (!decoder || decoder.state !== "configured") return;
    for (const chunk of pending) {
      if (waitingForKey && !chunk.key) continue;
      waitingForKey = false;
      timestamp += 1;
      arrivals.set(timestamp, { arrived: chunk.arrived, captured: chunk.captured });
      // Annex-B without a description: a keyframe carries its parameter sets in band.
      const inBand = nalTypes(chunk.data).includes(NAL_SPS);
      const sets = sps && pps ? (sps === pps ? [sps] : [sps, pps]) : [];
      const data = chunk.key && !inBand ? concat(...sets, chunk.data) : chunk.data;
      decoder.decode(new EncodedVideoChunk({ type: chunk.key ? "key" : "delta", timestamp, data }));
    }
    pending = [];
  };

  const configure = async () => {
    if (!sps || decoder || configuring) return;
    configuring = true;
    const config: VideoDecoderConfig = { codec: codecOf(sps), optimizeForLatency: true };
    try {
      const support = await VideoDecoder.isConfigSupported(config);
      if (!support.supported) {
        sink.fallback(`This browser cannot decode ${config.codec} with WebCodecs`);
        return;
      }
      decoder = new VideoDecoder({
        output: draw,
        error: (error) => {
          sink.notice(`decoder: ${error.message}; waiting for the next keyframe`);
          decoder = null;
          waitingForKey = true;
        },
      });
      decoder.configure(config);
      pump();
    } finally {
      configuring = false;
    }
  };

  const take = (data: Uint8Array, capturedAt: number | null) => {
    meter.arrived(data.length);
    const types = nalTypes(data);
    const key = types.includes(NAL_IDR);
    const picture = key || types.includes(NAL_SLICE);
    if (types.includes(NAL_SPS)) sps = data;
    if (types.includes(NAL_PPS)) pps = data;
    if (picture) {
      // A keyframe starts over: what waited before it can be skipped.
      if (key) pending = [];
      pending.push({ key, data, arrived: performance.now(), captured: capturedAt });
    }
    if (decoder) pump();
    else void configure();
  };

  const live = liveSocket(() => socketUrl("/ws/video/consume", { device, timing: "1" }), {
    binary: true,
    message: (data) => {
      if (typeof data === "string") {
        textMessage(data, sink, (at) => (captured = at));
        return;
      }
      sink.notice(null);
      take(new Uint8Array(data), captured);
      captured = null;
    },
    state: (state, reason) => {
      sink.socket(state, reason);
      if (state === "open") {
        decoder?.close();
        decoder = null;
        waitingForKey = true;
      }
    },
  });
  const report = window.setInterval(() => sink.stats(meter.stats()), 500);
  return () => {
    live.close();
    window.clearInterval(report);
    if (decoder && decoder.state !== "closed") decoder.close();
  };
}

/** `/ws/video/frames`: the relay's JPEGs (a few a second), for a browser without WebCodecs. */
function playJpeg(device: string, sink: Sink): () => void {
  const meter = new Meter();
  let captured: number | null = null;
  let received = 0; // JPEGs received, in order
  let shown = 0; // the newest one drawn: one decoded late is not drawn over a newer one

  const take = async (data: ArrayBuffer, capturedAt: number | null) => {
    const number = ++received;
    const arrived = performance.now();
    meter.arrived(data.byteLength);
    const bitmap = await createImageBitmap(new Blob([data], { type: "image/jpeg" }));
    const target = sink.canvas.current;
    if (number > shown && target) {
      shown = number;
      fitCanvas(target, bitmap.width, bitmap.height);
      target.getContext("2d")?.drawImage(bitmap, 0, 0);
      meter.shown(arrived, capturedAt, bitmap.width, bitmap.height);
    }
    bitmap.close();
  };

  const live = liveSocket(() => socketUrl("/ws/video/frames", { device, timing: "1" }), {
    binary: true,
    message: (data) => {
      if (typeof data === "string") {
        textMessage(data, sink, (at) => (captured = at));
        return;
      }
      sink.notice(null);
      take(data, captured).catch((problem: Error) => sink.notice(`JPEG: ${problem.message}`));
      captured = null;
    },
    state: sink.socket,
  });
  const report = window.setInterval(() => sink.stats(meter.stats()), 500);
  return () => {
    live.close();
    window.clearInterval(report);
  };
}

function Player(props: { device: string }) {
  const canvas = useRef<HTMLCanvasElement>(null);
  const [socket, setSocket] = useState<{ state: SocketState; reason?: string }>({ state: "connecting" });
  const [stats, setStats] = useState<Stats | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const [mode, setMode] = useState<{ mode: Mode; why?: string }>(() =>
    typeof VideoDecoder === "undefined"
      ? { mode: "jpeg", why: "This browser has no WebCodecs (VideoDecoder)" }
      : { mode: "h264" },
  );

  useEffect(() => {
    const sink: Sink = {
      canvas,
      stats: setStats,
      notice: setNotice,
      socket: (state, reason) => setSocket({ state, reason }),
      fallback: (why) => setMode({ mode: "jpeg", why }),
    };
    setStats(null);
    return (mode.mode === "h264" ? playH264 : playJpeg)(props.device, sink);
  }, [props.device, mode.mode]);

  const frames = mode.mode === "h264" ? "frames decoded" : "JPEG frames shown";
  return (
    <div class="panel">
      <h3>
        {props.device} <SocketBadge {...socket} />
      </h3>
      {mode.why && (
        <p class="hint" data-testid="video-fallback">
          {mode.why}: showing the relay's JPEG frames (a few a second) instead of the H.264 stream.
        </p>
      )}
      <ErrorLine error={notice} />
      <canvas
        ref={canvas}
        width={640}
        height={360}
        class="video"
        data-testid="video-canvas"
        data-mode={mode.mode}
        data-frames={stats?.frames ?? 0}
      />
      {stats && (
        <p data-testid="video-stats">
          {stats.size || "no picture yet"} · {stats.frames} {frames} · {stats.fps.toFixed(1)} frames/s ·{" "}
          <strong>{stats.kbps.toFixed(0)} kbit/s</strong> · decode delay {stats.decodeMs.toFixed(1)} ms (arrival to
          picture) ·{" "}
          <span data-testid="capture-delay" data-ms={stats.captureMs === null ? "" : stats.captureMs.toFixed(0)}>
            capture → screen {stats.captureMs === null ? "–" : `${stats.captureMs.toFixed(0)} ms`}
          </span>{" "}
          (assumes the phone's clock and this computer's agree)
        </p>
      )}
    </div>
  );
}

function Video() {
  const [devices, setDevices] = useState<string[] | null>(null);
  const [device, setDevice] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    getJson<{ devices: string[] }>("/health/video")
      .then((health) => {
        setDevices(health.devices);
        setDevice((current) => current ?? health.devices[0] ?? null);
      })
      .catch((problem: Error) => setError(problem.message));
  }, []);
  return (
    <section>
      <h2>Video</h2>
      <p class="hint">
        The phone's H.264, decoded in this browser with WebCodecs. A late joiner starts from the relay's current GOP,
        so a picture comes at once. Without WebCodecs, the relay's JPEG frames are shown instead.
      </p>
      <ErrorLine error={error} />
      {devices && devices.length === 0 && <p class="muted">No phone is streaming.</p>}
      {devices && devices.length > 1 && (
        <label>
          Device{" "}
          <select value={device ?? ""} onChange={(event) => setDevice((event.target as HTMLSelectElement).value)}>
            {devices.map((name) => (
              <option value={name}>{name}</option>
            ))}
          </select>
        </label>
      )}
      {device && <Player device={device} key={device} />}
    </section>
  );
}

export function VideoPage(props: { claims: Claims }) {
  return (
    <Needs claims={props.claims} scopes={["video:subscribe"]} what="the video page">
      <Video />
    </Needs>
  );
}
