// Browser test of the console, run by TestConsoleInBrowser: headless
// Chromium (Debian's package) driven by playwright-core, against a Caddy
// with the console on a site route (mux_webhook_ui) and a delivery queue
// with two destinations: "app", whose backend answers 500 until it is
// fixed (max_attempts 2), and "analytics", which takes everything.
//
//   node web/browser-test.js PAGE_URL WEBHOOK_URL SECRET APP_BACKEND_URL [SCREENSHOT_DIR]
//
// APP_BACKEND_URL is the test's backend of "app": POST /fix makes it answer
// 200, GET /received lists the event ids it accepted. With SCREENSHOT_DIR,
// each view is saved there as console-*.png (the pictures of docs/observability.md).
//
// What must work: events arrive live on the Events view and the search
// narrows them; an event's detail shows its headers (signature redacted),
// body and every delivery attempt; the failing destination's event shows
// up as a dead letter (Queue and Dead letters views); requests from
// another site cannot redeliver it; the console's Redeliver button does,
// and the fixed backend receives it. At a laptop's width (1400 x 900, the
// screenshots' size): the console opens without its URL's slash, the
// Events table shows every column without a horizontal scrollbar, with
// or without the detail pane, times have their date, the detail pane
// never shows a row the search hides, and "Redeliver all" and "Purge…"
// are disabled while there is nothing to act on.
const crypto = require("node:crypto");
const path = require("node:path");
const { chromium } = require("playwright-core");

const [pageURL, gateway, secret, backend, shots] = process.argv.slice(2);
if (require.main === module && (!pageURL || !gateway || !secret || !backend)) {
  console.error("usage: node web/browser-test.js PAGE_URL WEBHOOK_URL SECRET APP_BACKEND_URL [SCREENSHOT_DIR]");
  process.exit(2);
}

async function send(type, id, key) {
  const body = JSON.stringify({
    type, id, created_at: new Date().toISOString(),
    object: { type: type.startsWith("video.live_stream") ? "live" : "asset", id: "obj-" + id },
    environment: { id: "env-browser", name: "Browser test" },
    data: { id: "obj-" + id, status: "ready", passthrough: "browser test" },
    attempts: [],
  });
  const t = Math.floor(Date.now() / 1000);
  const v1 = crypto.createHmac("sha256", key).update(`${t}.${body}`).digest("hex");
  const res = await fetch(gateway, {
    method: "POST",
    headers: { "Content-Type": "application/json", "Mux-Signature": `t=${t},v1=${v1}` },
    body,
  });
  await res.arrayBuffer();
  return res.status;
}

async function received() {
  const res = await fetch(backend + "/received");
  return res.json();
}

function check(ok, message) {
  if (!ok) throw new Error(message);
}

// until polls fn (at most 15 s) until it returns something truthy.
async function until(what, fn) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error("timed out waiting for " + what);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function shot(page, name) {
  if (!shots) return;
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  await page.screenshot({ path: path.join(shots, name), fullPage: false });
  console.log("screenshot " + name);
}

// fits checks that the Events table needs no horizontal scrollbar and
// that its status and duration columns end inside the window.
async function fits(page, when) {
  const m = await page.evaluate(() => {
    const list = document.getElementById("list");
    const heads = [...list.querySelectorAll("thead th")];
    return {
      scroll: list.scrollWidth, client: list.clientWidth, window: window.innerWidth,
      listRight: list.getBoundingClientRect().right,
      cols: heads.slice(-2).map((th) => [th.textContent, th.getBoundingClientRect().right]),
    };
  });
  check(m.scroll <= m.client, `${when}: the Events table scrolls sideways (${m.scroll} px in ${m.client})`);
  for (const [name, right] of m.cols) {
    check(right <= m.listRight + 0.5 && right <= m.window, `${when}: the ${name} column ends at ${right} px, outside the table (${m.listRight}) or the window (${m.window})`);
  }
}

// deadButtons checks that "Redeliver all" and "Purge…" are enabled
// exactly when there are dead letters to act on.
async function deadButtons(page, enabled, when) {
  for (const id of ["dead-redeliver-all", "dead-purge"]) {
    const b = page.getByTestId(id);
    await until(`${id} ${enabled ? "enabled" : "disabled"} (${when})`, async () => (await b.isEnabled()) === enabled);
  }
}

// historyView: the History view lists the events sent (verified ones:
// asset and live), its search narrows them, an event's detail shows its
// body and delivery attempts, a replay to analytics asks to confirm the
// count and then runs to done; the Charts view draws the last 24 h.
// Every failure here says "History:" first, with what the page said.
async function historyView(page, { asset, live }) {
  const notice = async () => (await page.getByTestId("history-notice").innerText().catch(() => "")).trim();
  const step = async (what, fn) => {
    try {
      return await fn();
    } catch (e) {
      const said = await notice();
      throw new Error(`History: ${what}: ${e.message}` + (said && !e.message.includes(said) ? ` (the page says: ${said})` : ""));
    }
  };
  await page.getByTestId("tab-history").click();
  check(page.url().endsWith("#history"), "History view URL: " + page.url());
  const rows = () => page.locator('tr[data-testid="history-row"]').evaluateAll((rs) => rs.map((r) => ({ id: r.dataset.id, type: r.dataset.type, outcome: r.dataset.outcome })));
  let polls = 0;
  await step("the sent events listed", () => until("the history to list " + asset + " and " + live, async () => {
    if (++polls % 10 === 0) await page.getByTestId("history-search").click(); // written asynchronously: search again
    const said = await notice();
    if (/off|no such|404/i.test(said)) throw new Error("the server has no history endpoints (or history is off): " + said);
    const got = await rows();
    return got.some((r) => r.id === asset) && got.some((r) => r.id === live);
  }));
  let got = await rows();
  check(got.every((r) => r.outcome === "verified" || r.outcome === "duplicate"), "History: a row that is not a verified event: " + JSON.stringify(got));
  check(!got.some((r) => r.id.startsWith("br-f-")), "History: the forged request is listed: " + JSON.stringify(got));
  const time = await page.locator('tr[data-testid="history-row"] td').first().innerText();
  check(/^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$/.test(time), "History: a time without its date: " + JSON.stringify(time));

  // The search: a type glob lists its subset only.
  await page.getByTestId("history-type").fill("video.live_stream.*");
  await page.getByTestId("history-search").click();
  await step("the type search", () => until("the type search", async () => {
    got = await rows();
    return got.length > 0 && got.every((r) => r.type.startsWith("video.live_stream.")) && got.some((r) => r.id === live);
  }).catch(() => { throw new Error("type video.live_stream.* lists " + JSON.stringify(got)); }));

  // An event's detail: its body and its delivery attempts.
  await page.locator(`tr[data-testid="history-row"][data-id="${live}"]`).click();
  const body = page.getByTestId("history-body");
  await step("the event's detail", async () => {
    await body.waitFor({ timeout: 10000 });
    const text = await body.innerText();
    check(text.includes(`"id": "${live}"`), "the body is not the event: " + text.slice(0, 200));
    const attempts = page.locator('tr[data-testid="history-attempt"]');
    let tries = 0;
    await until("the delivery attempt to analytics in the detail", async () => {
      if (++tries % 10 === 0) await page.locator(`tr[data-testid="history-row"][data-id="${live}"]`).click(); // load it again
      return (await attempts.count()) >= 1;
    });
    const lines = await attempts.allInnerTexts();
    check(lines.some((l) => /analytics\s+1\s+delivered\s+200/.test(l)), "no delivered attempt to analytics: " + lines.join(" | "));
  });

  // Replay to analytics: the dry run's count first, then the job to done.
  await page.getByTestId("history-destination").selectOption("analytics");
  const replay = page.getByTestId("history-replay");
  check((await replay.innerText()).trim() === "Replay to analytics…", "the replay button says " + JSON.stringify(await replay.innerText()));
  await replay.click();
  const question = page.getByTestId("replay-question");
  await step("the replay's dry run", async () => {
    await question.waitFor({ timeout: 10000 });
  }).catch(async (e) => {
    const panel = await page.getByTestId("replay-panel").innerText().catch(() => "");
    throw new Error(e.message + " (the replay panel says: " + panel.trim() + ")");
  });
  const asked = (await question.innerText()).trim();
  check(asked === "1 event will be queued to analytics. Replay?", "History: the replay asks " + JSON.stringify(asked) + ", want the count of the live stream event");
  await page.getByTestId("replay-confirm").click();
  const progress = page.getByTestId("replay-progress");
  await step("the replay job", async () => {
    await page.locator('[data-testid="replay-progress"][data-state="done"]').waitFor({ timeout: 30000 }).catch(async () => {
      const panel = await page.getByTestId("replay-panel").innerText().catch(() => "");
      throw new Error("the replay never finished: " + panel.trim());
    });
    const queued = await progress.getAttribute("data-queued");
    check(queued === "1", "the replay queued " + queued + " of 1: " + (await progress.innerText()));
  });
  console.log("replay: " + (await progress.innerText()).trim());
  await shot(page, "console-history.png");

  // Stop: a running job's progress offers "Stop replay", which asks (the
  // dialog is accepted), cancels the job on the server (DELETE) and shows
  // the server's answer. The real job is drawn as running again, then
  // stopped: it had ended, so the server answers with its end, "done".
  await step("the Stop button", async () => {
    const job = await progress.getAttribute("data-job");
    await page.evaluate(async (id) => {
      const j = await getJSON("history/replay/" + encodeURIComponent(id));
      replayProgress({ ...j, done: false, state: "running" });
    }, job);
    const stop = page.getByTestId("replay-stop");
    await stop.waitFor({ timeout: 10000 });
    await stop.click();
    await page.locator(`[data-testid="replay-progress"][data-job="${job}"][data-state="done"]`).waitFor({ timeout: 10000 });
    check((await stop.count()) === 0, "History: Stop replay still offered for an ended job");
    console.log("replay stopped: " + (await progress.innerText()).trim());
  });

  // Charts: events per minute by outcome, per destination attempts and delivery time.
  await page.getByTestId("tab-charts").click();
  await step("the charts", async () => {
    const bars = page.locator('[data-testid="chart-events"] rect[data-key="verified"]');
    await until("a bar of verified events in the events chart", async () => {
      const said = (await page.getByTestId("charts-notice").innerText().catch(() => "")).trim();
      if (said) throw new Error(said);
      return (await bars.count()) > 0;
    });
    const total = (await bars.evaluateAll((rs) => rs.map((r) => Number(r.dataset.n)))).reduce((a, b) => a + b, 0);
    check(total >= 2, "the events chart counts " + total + " verified events, want the 2 sent at least");
    const legend = await page.locator('[data-testid="chart-events"] [data-testid="legend"]').innerText();
    check(/verified/.test(legend) && /duplicate/.test(legend), "the events chart's legend: " + legend);
    for (const name of ["app", "analytics"]) {
      const deliveries = page.locator(`[data-testid="chart-deliveries-${name}"]`);
      await deliveries.waitFor({ timeout: 5000 });
      check(await deliveries.locator('rect[data-key="delivered"]').count() > 0, `no delivered bar for ${name}`);
      check(await page.locator(`[data-testid="chart-latency-${name}"] circle[data-key="p99"]`).count() > 0, `no p99 point for ${name}`);
    }
    check(await page.locator('[data-testid="chart-deliveries-app"] rect[data-key="dead"]').count() > 0, "no dead bar for app");
    const ticks = await page.locator('[data-testid="chart-events"] text.tick').evaluateAll((ns) => ns.map((n) => n.textContent)); // SVG: no innerText
    check(ticks.filter((t) => /^\d{2}:\d{2}$/.test(t)).length >= 4, "the events chart's time labels: " + ticks.join(" "));
  });
  // The last hour, where a minute's bar is wide enough to see.
  await page.getByTestId("charts-window").selectOption("1");
  await page.locator('[data-testid="chart-events"] rect[data-key="verified"]').first().waitFor({ timeout: 10000 });
  await shot(page, "console-charts.png");
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, locale: "en-GB", timezoneId: "UTC" });
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("dialog", (d) => d.accept());
    // The URL without its slash leads to the console.
    const noSlash = pageURL.replace(/\/$/, "");
    await page.goto(noSlash);
    check(page.url() === pageURL, `${noSlash} led to ${page.url()}, want ${pageURL}`);
    await page.getByTestId("state").filter({ hasText: /^live$/ }).waitFor({ timeout: 15000 });

    // 1. Events arrive live.
    const stamp = Date.now().toString(36);
    const asset = "br-a-" + stamp, live = "br-l-" + stamp;
    const sent = [
      { type: "video.asset.ready", id: asset, key: secret, outcome: "verified" },
      { type: "video.live_stream.active", id: live, key: secret, outcome: "verified" },
      { type: "video.upload.created", id: "br-f-" + stamp, key: "not-the-secret", outcome: "mismatch" },
    ];
    for (const s of sent) {
      const status = await send(s.type, s.id, s.key);
      console.log(`sent ${s.type} ${s.id}: ${status}`);
      check(status === (s.outcome === "verified" ? 202 : 401), `${s.id}: status ${status}`);
    }
    for (const s of sent) {
      const sel = s.outcome === "verified"
        ? `tr[data-testid="row"][data-outcome="verified"][data-id="${s.id}"]`
        : `tr[data-testid="row"][data-outcome="${s.outcome}"]`;
      const row = page.locator(sel).first();
      await row.waitFor({ timeout: 10000 });
      const text = await row.innerText();
      check(text.includes(s.outcome), `row for ${s.id} does not show ${s.outcome}: ${text}`);
      if (s.outcome === "verified") check(text.includes(s.type), `row for ${s.id} does not show ${s.type}: ${text}`);
    }
    // The failing destination's attempts arrive live too: a retry, then dead.
    await page.locator(`tr[data-testid="row"][data-outcome="dead"][data-id="${asset}"]`).waitFor({ timeout: 15000 });
    await page.locator(`tr[data-testid="row"][data-outcome="delivered"][data-id="${live}"]`).waitFor({ timeout: 15000 });

    // 1b. At 1400 px, nothing selected: no detail pane, the table has the
    // width and shows its last columns without scrolling; times have a date.
    await fits(page, "with nothing selected");
    const listWidth = await page.locator("#list").evaluate((n) => n.getBoundingClientRect().width);
    check(listWidth >= 1300, `with nothing selected the table is ${listWidth} px wide of 1400: the empty detail pane takes the rest`);
    const time = await page.locator('tr[data-testid="row"] td').first().innerText();
    check(/^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$/.test(time), "a time without its date: " + JSON.stringify(time));

    // 2. The search: outcome, type glob, event id, object id.
    const shown = (attr) => page.locator('tr[data-testid="row"]').evaluateAll((rows, a) => rows.map((r) => r.dataset[a]), attr);
    await page.getByTestId("filter-outcome").selectOption("verified");
    let got = await shown("outcome");
    check(got.length > 0 && got.every((o) => o === "verified"), "outcome search shows " + got);
    await page.getByTestId("filter-clear").click();
    await page.getByTestId("filter-type").fill("video.live_stream.*");
    got = await shown("type");
    check(got.length > 0 && got.every((t) => t.startsWith("video.live_stream.")), "type search shows " + got);
    await page.getByTestId("filter-clear").click();
    await page.getByTestId("filter-id").fill(asset);
    await until("the event id search", async () => {
      got = await shown("id");
      // The request and its three delivery attempts (analytics delivered; app retry, dead).
      return got.length === 4 && got.every((id) => id === asset);
    }).catch(() => { throw new Error("event id search shows " + got); });
    await page.getByTestId("filter-clear").click();
    await page.getByTestId("filter-object").fill("obj-" + live);
    got = await shown("id");
    check(got.length === 1 && got[0] === live, "object id search shows " + got);
    await page.getByTestId("filter-clear").click();
    await until("the cleared search", async () => (await shown("id")).length >= 7);

    // 3. The events view and an event's detail: headers with the
    // signature redacted, the body pretty-printed, every delivery attempt.
    await page.locator(`tr[data-testid="row"][data-outcome="verified"][data-id="${live}"]`).click();
    await fits(page, "with the detail pane open");
    await shot(page, "console-events.png");
    // A search that hides the selected row empties the detail pane.
    await page.getByTestId("filter-type").fill("video.asset.*");
    await until("the detail pane emptied by the search", async () => !(await page.getByTestId("detail").isVisible()));
    check(await page.locator('tr[data-testid="row"].selected').count() === 0, "a hidden row stays selected");
    await page.getByTestId("filter-clear").click();
    await until("the cleared search", async () => (await shown("id")).length >= 7);
    await page.locator(`tr[data-testid="row"][data-outcome="verified"][data-id="${asset}"]`).click();
    const headers = await page.getByTestId("headers").innerText();
    check(/Mux-Signature: \[redacted\]/i.test(headers), "signature not redacted in the detail: " + headers);
    check(!/v1=/.test(headers), "a v1 value is visible in the detail");
    const body = await page.getByTestId("body").innerText();
    check(body.includes(`"id": "${asset}"`), "detail body is not the pretty-printed event: " + body.slice(0, 200));
    const attempts = page.locator('[data-testid="attempt"]');
    await until("three delivery attempts in the detail", async () => (await attempts.count()) === 3);
    const lines = await attempts.allInnerTexts();
    check(lines.some((l) => /analytics\s+1\s+delivered\s+200\s+[\d.]+ ms/.test(l)), "no delivered attempt to analytics: " + lines.join(" | "));
    check(lines.some((l) => /app\s+1\s+retry\s+500\s+[\d.]+ ms\s+app answered 500/.test(l)), "no failed first attempt to app: " + lines.join(" | "));
    check(lines.some((l) => /app\s+2\s+dead\s+500\s+[\d.]+ ms\s+app answered 500/.test(l)), "no dead second attempt to app: " + lines.join(" | "));
    await shot(page, "console-event-detail.png");

    // 4. The queue: the dead letter counted, its error, what was delivered.
    await page.getByTestId("tab-queue").click();
    const appRow = page.locator('tr[data-testid="queue-row"][data-destination="app"]');
    await until("app's dead letter in the queue view", async () => {
      const t = await appRow.innerText().catch(() => "");
      return /\t1\t\S+\tapp answered 500/.test(t) ? t : false; // dead 1, oldest, last error
    });
    const analyticsRow = await page.locator('tr[data-testid="queue-row"][data-destination="analytics"]').innerText();
    check(/^analytics\t\S+\t0\t0\t0\t[2-9]\d*\t0\t/.test(analyticsRow), "analytics in the queue view: " + JSON.stringify(analyticsRow)); // pending, in flight, held, delivered, dead
    await shot(page, "console-queue.png");

    // 4b. Pause and resume analytics (the dialog is accepted above).
    const analytics = page.locator('tr[data-testid="queue-row"][data-destination="analytics"]');
    await analytics.getByTestId("queue-pause").click();
    await until("analytics paused in the queue view", async () => {
      const t = await analytics.innerText().catch(() => "");
      return /\tpaused since /.test(t) ? t : false;
    });
    await analytics.getByTestId("queue-resume").click();
    await until("analytics active again", async () => {
      const t = await analytics.innerText().catch(() => "");
      return /\tactive\t/.test(t) ? t : false;
    });

    // 5. The dead letters of app.
    await appRow.getByTestId("queue-show-dead").click();
    const deadRow = page.locator(`tr[data-testid="dead-row"][data-id="${asset}"]`);
    await deadRow.waitFor({ timeout: 10000 });
    const deadText = await deadRow.innerText();
    check(deadText.includes("video.asset.ready") && /\t2\t/.test(deadText) && deadText.includes("app answered 500"),
      "dead letter row: " + JSON.stringify(deadText));
    check(page.url().endsWith("#dead/app"), "dead letters view URL: " + page.url());
    await deadButtons(page, true, "app, with its dead letter");
    const deadTime = await deadRow.locator("td").nth(4).innerText();
    check(/^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$/.test(deadTime), "dead at without its date: " + JSON.stringify(deadTime));
    await shot(page, "console-dead-letters.png");
    // analytics has none: nothing to redeliver or purge.
    await page.getByTestId("dead-destination").selectOption("analytics");
    await page.getByText("No dead letters for analytics.").waitFor({ timeout: 10000 });
    await deadButtons(page, false, "analytics, without dead letters");
    await page.getByTestId("dead-destination").selectOption("app");
    await deadRow.waitFor({ timeout: 10000 });
    await deadButtons(page, true, "app again");

    // 6. Cross-site requests cannot change anything. A page on another
    // site posts a form to the console (the browser adds Origin and
    // Sec-Fetch-Site; a form cannot add the console's header)...
    const redeliver = new URL("queue/redeliver", pageURL).href;
    const evil = await context.newPage();
    await evil.route("http://evil.test/**", (route) => route.fulfill({
      contentType: "text/html",
      body: `<!doctype html><form method="post" action="${redeliver}" enctype="text/plain">` +
        `<input name='{"destination":"app","all":true,"x":"' value='"}'></form>` +
        `<script>document.forms[0].submit()</script>`,
    }));
    const [formResponse] = await Promise.all([
      evil.waitForResponse((r) => r.url() === redeliver, { timeout: 10000 }),
      evil.goto("http://evil.test/"),
    ]);
    check(formResponse.status() === 403, `a cross-site form post got ${formResponse.status()}`);
    const formBody = await formResponse.text();
    check(/refused/.test(formBody), "the refusal does not say why: " + formBody);
    console.log(`cross-site form post: ${formResponse.status()} ${formBody.trim()}`);
    await evil.close();
    // ... and a script elsewhere, or a forged request, fares no better.
    for (const [what, headers] of [
      ["a foreign Origin with the console's header", { Origin: "http://evil.test", "X-Mux-Webhook-Console": "1" }],
      ["Sec-Fetch-Site: cross-site with the header", { "Sec-Fetch-Site": "cross-site", "X-Mux-Webhook-Console": "1" }],
      ["no console header", {}],
    ]) {
      const res = await fetch(redeliver, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...headers },
        body: JSON.stringify({ destination: "app", all: true }),
      });
      const text = await res.text();
      check(res.status === 403 && /refused/.test(text), `${what}: ${res.status} ${text}`);
      console.log(`${what}: 403 ${text.trim()}`);
    }
    await page.getByTestId("dead-refresh").click();
    await deadRow.waitFor({ timeout: 5000 });
    check((await received()).length === 0, "the app backend received something before the console redelivered");

    // 7. Fix the backend, click Redeliver: the backend receives the event.
    await fetch(backend + "/fix", { method: "POST" });
    await deadRow.getByTestId("dead-redeliver").click();
    await page.getByTestId("dead-notice").filter({ hasText: "Redelivered 1 to app." }).waitFor({ timeout: 10000 });
    await until("the backend to receive the redelivered event", async () => (await received()).includes(asset));
    await deadRow.waitFor({ state: "detached", timeout: 10000 });
    await deadButtons(page, false, "app, once its dead letter is redelivered");
    // The Events view shows the new attempt, live.
    await page.getByTestId("tab-events").click();
    await page.locator(`tr[data-testid="row"][data-outcome="delivered"][data-destination="app"][data-id="${asset}"]`).waitFor({ timeout: 10000 });

    check(errors.length === 0, "page errors: " + errors.join("; "));
    console.log("live log, queue and dead letters passed");

    // 8. History and charts (shared/SPEC.md, "History").
    await historyView(page, { asset, live });
    check(errors.length === 0, "page errors: " + errors.join("; "));
    console.log("browser test passed");
  } finally {
    await browser.close();
  }
}

if (require.main === module) {
  main().catch((e) => {
    console.error(String(e && e.stack || e));
    process.exit(1);
  });
}
module.exports = { historyView };
