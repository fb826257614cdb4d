import { useEffect, useRef, useState } from "preact/hooks";
import { type Claims, getJson, liveSocket, type SocketState, socketUrl } from "../api";
import { ErrorLine, Needs, SocketBadge } from "../components/Needs";

// `/ws/video/consume?device=` sends the phone's H.264 as binary messages, one packet's Annex-B
// NAL units each (start codes included): SPS, PPS and the current GOP first (a late joiner
// decodes at once), then each packet live. Text messages are status lines and "pong".

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
  decodeMs: number; // from a packet's arrival to its decoded picture
  size: string;
}

function Player(props: { device: string }) {
  const canvas = useRef<HTMLCanvasElement>(null);
  const [socket, setSocket] = useState<{ state: SocketState; reason?: string }>({ state: "connecting" });
  const [stats, setStats] = useState<Stats | null>(null);
  const [notice, setNotice] = useState<string | null>(null);

  useEffect(() => {
    if (typeof VideoDecoder === "undefined") {
      setNotice(
        "This browser has no WebCodecs (VideoDecoder): the H.264 stream cannot be decoded here. Use a current Chromium, Edge or Safari.",
      );
      return;
    }
    let sps: Uint8Array | null = null;
    let pps: Uint8Array | null = null;
    let decoder: VideoDecoder | null = null;
    let waitingForKey = true;
    let timestamp = 0;
    const arrivals = new Map<number, number>(); // chunk timestamp -> arrival (ms)
    const received: { at: number; bytes: number }[] = [];
    const decoded: { at: number; delay: number }[] = [];
    let frames = 0;
    let size = "";

    const draw = (frame: VideoFrame) => {
      const now = performance.now();
      const arrived = arrivals.get(frame.timestamp);
      arrivals.delete(frame.timestamp);
      if (arrived !== undefined) decoded.push({ at: now, delay: now - arrived });
      frames += 1;
      const target = canvas.current;
      if (target) {
        if (target.width !== frame.displayWidth) target.width = frame.displayWidth;
        if (target.height !== frame.displayHeight) target.height = frame.displayHeight;
        target.getContext("2d")?.drawImage(frame, 0, 0);
        size = `${frame.displayWidth}x${frame.displayHeight}`;
      }
      frame.close();
    };

    // Pictures wait here while the decoder is being configured (a late joiner's GOP arrives
    // all at once, before `isConfigSupported` answers): none of them is lost.
    let pending: { key: boolean; data: Uint8Array; arrived: number }[] = [];
    let configuring = false;

    const pump = () => {
      if (!decoder || decoder.state !== "configured") return;
      for (const chunk of pending) {
        if (waitingForKey && !chunk.key) continue;
        waitingForKey = false;
        timestamp += 1;
        arrivals.set(timestamp, chunk.arrived);
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
          setNotice(`This browser cannot decode ${config.codec} with WebCodecs.`);
          return;
        }
        decoder = new VideoDecoder({
          output: draw,
          error: (error) => {
            setNotice(`decoder: ${error.message}; waiting for the next keyframe`);
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

    const take = (data: Uint8Array) => {
      const now = performance.now();
      received.push({ at: now, bytes: data.length });
      const types = nalTypes(data);
      const key = types.includes(NAL_IDR);
      const picture = key || types.includes(NAL_SLICE);
      if (types.includes(NAL_SPS)) sps = data;
      if (types.includes(NAL_PPS)) pps = data;
      if (picture) {
        // A keyframe starts over: what waited before it can be skipped.
        if (key) pending = [];
        pending.push({ key, data, arrived: now });
      }
      if (decoder) pump();
      else void configure();
    };

    const live = liveSocket(() => socketUrl("/ws/video/consume", { device: props.device }), {
      binary: true,
      message: (data) => {
        if (typeof data === "string") {
          if (data !== "pong") {
            try {
              setNotice(JSON.parse(data).reason ?? data);
            } catch {
              setNotice(data);
            }
          }
          return;
        }
        setNotice(null);
        take(new Uint8Array(data));
      },
      state: (state, reason) => {
        setSocket({ state, reason });
        if (state === "open") {
          decoder?.close();
          decoder = null;
          waitingForKey = true;
        }
      },
    });
    const report = window.setInterval(() => {
      const since = performance.now() - WINDOW_MS;
      while (received.length && received[0].at < since) received.shift();
      while (decoded.length && decoded[0].at < since) decoded.shift();
      const bytes = received.reduce((total, item) => total + item.bytes, 0);
      const delay = decoded.length ? decoded.reduce((total, item) => total + item.delay, 0) / decoded.length : 0;
      setStats({ frames, fps: decoded.length / (WINDOW_MS / 1000), kbps: (bytes * 8) / WINDOW_MS, decodeMs: delay, size });
    }, 500);
    return () => {
      live.close();
      window.clearInterval(report);
      if (decoder && decoder.state !== "closed") decoder.close();
    };
  }, [props.device]);

  return (
    <div class="panel">
      <h3>
        {props.device} <SocketBadge {...socket} />
      </h3>
      <ErrorLine error={notice} />
      <canvas ref={canvas} width={640} height={360} class="video" data-testid="video-canvas" data-frames={stats?.frames ?? 0} />
      {stats && (
        <p data-testid="video-stats">
          {stats.size || "no picture yet"} · {stats.frames} frames decoded · {stats.fps.toFixed(1)} frames/s ·{" "}
          <strong>{stats.kbps.toFixed(0)} kbit/s</strong> · decode delay {stats.decodeMs.toFixed(1)} ms (arrival to
          picture)
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
        so a picture comes at once.
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
