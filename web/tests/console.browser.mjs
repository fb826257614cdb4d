// The web console in real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core), against a running stack. tests/test_console.py starts the stack as `make run`
// does, runs this script and checks what it reports; run by hand against your own `make run`:
//
//   CONSOLE_URL='http://127.0.0.1:8000/#token=...' LIMITED_TOKEN="$(edgeway-token ... --scope telemetry:subscribe)" \
//   SAMPLE_IMAGE=deploy/local/sample.jpg SCREENSHOTS=var/screenshots RTSP_URL=rtsp://127.0.0.1:8554/moving \
//   node web/tests/console.browser.mjs
//
// It prints one JSON object (what each page showed); screenshots of each page go to SCREENSHOTS.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
// Flags that keep Chromium off the network it would otherwise call home on (this machine's is
// closed: without them it retries refused connections many at a time).
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const LIVE_WAIT_MS = Number(process.env.LIVE_WAIT_MS ?? 20000);
// How long a vehicle stays in the dead zone the telemetry page puts it in: past the telemetry
// service's offline_after_s (5 s), so what it buffered first arrives late, an offline session.
const DEAD_ZONE_MS = Number(process.env.DEAD_ZONE_MS ?? 7000);
const DEAD_ZONE_VIN = "5YJ3E1EA1KF000001";
// A tracking task's first frames wait for its videos to be read and its detector to start.
const TRACKING_WAIT_MS = Number(process.env.TRACKING_WAIT_MS ?? 90000);

const { CONSOLE_URL, LIMITED_TOKEN, SAMPLE_IMAGE, SCREENSHOTS, RTSP_URL } = process.env;
if (!CONSOLE_URL || !LIMITED_TOKEN || !SAMPLE_IMAGE || !SCREENSHOTS || !RTSP_URL) {
  console.error("set CONSOLE_URL, LIMITED_TOKEN, SAMPLE_IMAGE, SCREENSHOTS and RTSP_URL (see the top of this file)");
  process.exit(2);
}
mkdirSync(SCREENSHOTS, { recursive: true });

const report = { pages: {}, offsite_requests: [], page_errors: [] };
const origin = new URL(CONSOLE_URL).origin;

async function watch(context) {
  context.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(origin) && !url.startsWith("data:") && !url.startsWith("blob:")) {
      // Presigned frame URLs of the local object store are on this machine too (another port).
      if (!/^https?:\/\/(127\.0\.0\.1|localhost)[:/]/.test(url)) report.offsite_requests.push(url);
    }
  });
}

async function shot(page, name) {
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

async function open(page, name) {
  await page.click(`nav a[data-page="${name}"]`);
  await page.waitForSelector(`main[data-testid="page-${name}"]`);
}

async function occupancy(page) {
  await open(page, "occupancy");
  await page.waitForSelector('[data-testid="occupancy-card"] [data-testid="percent"]', { timeout: LIVE_WAIT_MS });
  const read = () =>
    page.$$eval('[data-testid="occupancy-card"]', (cards) =>
      cards.map((card) => ({
        location: card.dataset.location,
        percent: card.querySelector('[data-testid="percent"]')?.textContent ?? null,
        people: card.querySelector('[data-testid="people"]')?.textContent ?? null,
        updated: card.querySelector(".small")?.textContent ?? null,
        sparkline_points: Number(card.querySelector('[data-testid="sparkline"]')?.dataset.points ?? 0),
      })),
    );
  const first = await read();
  let later = first;
  const deadline = Date.now() + LIVE_WAIT_MS;
  while (Date.now() < deadline) {
    await page.waitForTimeout(1000);
    later = await read();
    if (JSON.stringify(later) !== JSON.stringify(first)) break;
  }
  await shot(page, "occupancy");
  return { first, later, changed: JSON.stringify(later) !== JSON.stringify(first) };
}

async function telemetry(page) {
  await open(page, "telemetry");
  await page.waitForFunction(
    () => Number(document.querySelector('[data-testid="chart-speed"]')?.dataset.points ?? 0) >= 5,
    null,
    { timeout: LIVE_WAIT_MS },
  );
  // Logger control, as an operator: the answer lists each logger's state.
  await page.click('[data-testid="logger-controls"] button:has-text("Start")');
  await page.waitForSelector('[data-testid="control-answer"] tbody tr', { timeout: 10000 });
  const vehicles = await page.$$eval('[data-testid="vehicle"]', (cards) =>
    cards.map((card) => ({
      vin: card.dataset.vin,
      points: Object.fromEntries(
        ["speed", "battery", "power", "heading"].map((field) => [
          field,
          Number(card.querySelector(`[data-testid="chart-${field}"]`)?.dataset.points ?? 0),
        ]),
      ),
      canvases: card.querySelectorAll("canvas").length,
    })),
  );
  const fleet = await page.textContent('[data-testid="fleet-stats"]').catch(() => null);
  const control = await page.textContent('[data-testid="control-answer"]');
  // One vehicle into a dead zone and out again, from the page: its replay becomes an offline
  // session, which the vehicle's table shows at its next poll.
  const controls = '[data-testid="logger-controls"]';
  await page.selectOption(`${controls} select`, DEAD_ZONE_VIN);
  await page.click(`${controls} button:has-text("Dead zone on/off")`);
  await page.waitForSelector(`${controls} [data-testid="control-answer"] tbody tr`, { timeout: 10000 });
  const deadZone = await page.textContent(`${controls} [data-testid="control-answer"] tbody tr`);
  await page.waitForTimeout(DEAD_ZONE_MS);
  await page.click(`${controls} button:has-text("Dead zone on/off")`);
  const table = `[data-testid="offline-sessions"][data-vin="${DEAD_ZONE_VIN}"]`;
  await page.waitForSelector(`${table} [data-testid="offline-session"]`, { timeout: LIVE_WAIT_MS });
  const sessions = await page.$$eval(`${table} [data-testid="offline-session"]`, (rows) =>
    rows.map((row) => ({
      status: row.dataset.status,
      cells: [...row.children].map((cell) => cell.textContent),
    })),
  );
  await shot(page, "telemetry");
  return { vehicles, fleet, control, dead_zone: deadZone, sessions };
}

async function ingestion(page) {
  await open(page, "ingestion");
  await page.setInputFiles('[data-testid="upload-form"] input[type="file"]', SAMPLE_IMAGE);
  await page.click('[data-testid="upload-form"] button[type="submit"]');
  await page.waitForSelector('[data-testid="ingest-request"][data-status="completed"]', { timeout: LIVE_WAIT_MS });
  await page.waitForFunction(
    () => [...document.querySelectorAll('[data-testid="thumbnail"]')].some((img) => img.complete && img.naturalWidth > 0),
    null,
    { timeout: LIVE_WAIT_MS },
  );
  const progress = await page.$eval('[data-testid="upload-progress"]', (bar) => bar.value);
  const thumbnails = await page.$$eval('[data-testid="thumbnail"]', (images) =>
    images.map((img) => ({ width: img.naturalWidth, height: img.naturalHeight })),
  );
  const status = await page.textContent('[data-testid="ingest-status"]');
  // An RTSP capture from the demo camera, cancelled while it runs.
  await page.fill('[data-testid="rtsp-form"] input[size]', RTSP_URL);
  await page.fill('[data-testid="rtsp-form"] input[type="number"]', "60");
  await page.click('[data-testid="rtsp-form"] button[type="submit"]');
  const capture = '[data-testid="ingest-request"][data-source="rtsp"]';
  await page.waitForSelector(`${capture} button:has-text("Cancel capture")`, { timeout: LIVE_WAIT_MS });
  await page.click(`${capture} button:has-text("Cancel capture")`);
  await page.waitForSelector(`${capture}[data-status="cancelled"]`, { timeout: LIVE_WAIT_MS });
  const cancelled = await page.textContent(`${capture} h4`);
  await shot(page, "ingestion");
  return { progress, status, thumbnails, cancelled };
}

async function system(page) {
  await open(page, "system");
  // Until every row says ready (the page asks again every 5 s); if some never does, the
  // report shows what the rows said when the wait ended.
  await page
    .waitForFunction(
      () => {
        const rows = [...document.querySelectorAll('[data-testid="readiness"] tbody tr[data-state]')];
        return rows.length > 1 && rows.every((row) => row.dataset.state === "ready");
      },
      null,
      { timeout: LIVE_WAIT_MS },
    )
    .catch(() => null);
  await page.waitForSelector('[data-testid="metrics"]', { timeout: LIVE_WAIT_MS });
  const readiness = await page.$$eval('[data-testid="readiness"] tbody tr[data-state]', (rows) =>
    rows.map((row) => ({
      service: row.dataset.service,
      instance: row.dataset.instance ?? null,
      state: row.dataset.state,
      detail: row.children[3].textContent,
    })),
  );
  const metrics = await page.$$eval('[data-testid="metrics"] tr', (rows) =>
    Object.fromEntries(rows.map((row) => [row.children[2].textContent, row.children[1].textContent])),
  );
  await shot(page, "system");
  return { readiness, metrics };
}

// The video canvas's size and the spread of its pixels' luma: a blank (one-colour) canvas has
// none; the phone's pattern moves and has colours.
function canvasPicture(page) {
  return page.$eval('[data-testid="video-canvas"]', (canvas) => {
    const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    let sum = 0;
    let squares = 0;
    const count = data.length / 4;
    for (let i = 0; i < data.length; i += 4) {
      const luma = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
      sum += luma;
      squares += luma * luma;
    }
    const mean = sum / count;
    return { width: canvas.width, height: canvas.height, mean, stddev: Math.sqrt(squares / count - mean * mean) };
  });
}

// The video page until a picture is on its canvas and a window of figures (bandwidth, delays)
// has passed: what it shows, and a screenshot named `name`.
async function videoPage(page, name) {
  const opened = Date.now();
  await open(page, "video");
  await page.waitForFunction(
    () => Number(document.querySelector('[data-testid="video-canvas"]')?.dataset.frames ?? 0) >= 1,
    null,
    { timeout: LIVE_WAIT_MS },
  );
  const firstPictureMs = Date.now() - opened;
  await page.waitForTimeout(2500); // a window of bandwidth and delay figures
  const picture = await canvasPicture(page);
  const stats = await page.textContent('[data-testid="video-stats"]');
  const canvas = await page.$eval('[data-testid="video-canvas"]', (element) => ({ ...element.dataset }));
  const captureMs = await page.$eval('[data-testid="capture-delay"]', (span) => span.dataset.ms);
  const fallback = await page.$eval('[data-testid="video-fallback"]', (line) => line.textContent).catch(() => null);
  await shot(page, name);
  return {
    first_picture_ms: firstPictureMs,
    picture,
    stats,
    frames: Number(canvas.frames),
    mode: canvas.mode,
    capture_ms: captureMs === "" ? null : Number(captureMs),
    fallback,
  };
}

function video(page) {
  return videoPage(page, "video");
}

// The video page in a browser without WebCodecs (removed before the console's scripts run):
// it falls back to the relay's JPEG frames.
async function videoWithoutWebCodecs(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await watch(context);
  await context.addInitScript(() => {
    delete window.VideoDecoder;
    delete window.VideoFrame;
    delete window.EncodedVideoChunk;
  });
  const page = await context.newPage();
  page.on("pageerror", (error) => report.page_errors.push(String(error)));
  try {
    await page.goto(CONSOLE_URL);
    return await videoPage(page, "video-jpeg");
  } catch (error) {
    await shot(page, "video-jpeg-failed").catch(() => undefined);
    return { error: String(error) };
  } finally {
    await context.close();
  }
}

async function tracking(page) {
  await open(page, "tracking");
  const row = '[data-testid="environments"] tr[data-environment="demo-lab"]';
  await page.waitForSelector(`${row} button:not([disabled])`, { timeout: LIVE_WAIT_MS });
  await page.click(`${row} button`);
  await page.waitForFunction(
    () => Number(document.querySelector('[data-testid="tracking-map"]')?.dataset.ids ?? 0) >= 1,
    null,
    { timeout: TRACKING_WAIT_MS },
  );
  await page.waitForTimeout(2000); // a few more frames: trails
  const task = await page.$eval('[data-testid="tracking-task"]', (panel) => ({
    status: panel.querySelector('[data-testid="task-status"]').textContent,
    frame: Number(panel.dataset.frame),
    ids: Number(panel.querySelector('[data-testid="tracking-map"]').dataset.ids),
    trails: panel.querySelectorAll('[data-testid="tracking-map"] polyline').length,
    cameras: [...panel.querySelectorAll('[data-testid="camera-tracks"]')].map((camera) => camera.dataset.camera),
  }));
  await shot(page, "tracking");
  // Stop it: the rest of the suite need not share the machine with it.
  await page.click('[data-testid="tracking-task"] button:has-text("Stop")').catch(() => undefined);
  return task;
}

async function refused(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await watch(context);
  const page = await context.newPage();
  // Signed in by pasting the token, as a user does.
  await page.goto(`${origin}/`);
  await page.fill("form.signin textarea", LIMITED_TOKEN);
  await page.click('form.signin button[type="submit"]');
  await page.waitForSelector('main[data-testid="page-occupancy"]');
  const refusal = await page.textContent('[data-testid="refusal"]').catch(() => null);
  await page.waitForTimeout(3000); // time for data to arrive, if it were going to
  const cards = await page.$$('[data-testid="occupancy-card"]');
  await shot(page, "refused-occupancy");
  // The scope it has opens its page, without the operators' controls.
  await open(page, "telemetry");
  const controls = await page.textContent('[data-testid="controls-refused"]', { timeout: 5000 }).catch(() => null);
  const controlButtons = await page.$$('[data-testid="logger-controls"] button');
  await context.close();
  return { refusal, cards: cards.length, controls, control_buttons: controlButtons.length };
}

const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true });
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await watch(context);
  const page = await context.newPage();
  page.on("pageerror", (error) => report.page_errors.push(String(error)));
  await page.goto(CONSOLE_URL);
  report.token_left_address = !page.url().includes("token=");
  for (const [name, check] of Object.entries({ occupancy, telemetry, video, ingestion, system, tracking })) {
    try {
      report.pages[name] = await check(page);
    } catch (error) {
      report.pages[name] = { error: String(error) };
      await shot(page, `${name}-failed`).catch(() => undefined);
    }
  }
  await context.close();
  report.pages.refused = await refused(browser);
  report.pages.video_jpeg = await videoWithoutWebCodecs(browser);
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
