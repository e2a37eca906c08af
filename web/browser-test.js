// Browser test of the Live Logs page, run by TestLiveLogPageInBrowser:
// headless Chromium (Debian's package) driven by playwright-core opens
// the page, three signed events are sent while it is open, and they must
// appear live with their types and outcomes; a click opens a row's detail.
//
//   node web/browser-test.js PAGE_URL WEBHOOK_URL SECRET [SCREENSHOT.png]
//
// PAGE_URL is where the page is served (e.g. http://127.0.0.1:8080/mux-webhook/,
// a route with the mux_webhook_ui handler), WEBHOOK_URL the mux_webhook route.
const crypto = require("node:crypto");
const { chromium } = require("playwright-core");

const [pageURL, gateway, secret, screenshot] = process.argv.slice(2);
if (!pageURL || !gateway || !secret) {
  console.error("usage: node web/browser-test.js PAGE_URL WEBHOOK_URL SECRET [SCREENSHOT.png]");
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

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(pageURL);
    await page.getByTestId("state").filter({ hasText: /^live$/ }).waitFor({ timeout: 15000 });

    const stamp = Date.now().toString(36);
    const sent = [
      { type: "video.asset.ready", id: "br-a-" + stamp, key: secret, outcome: "verified" },
      { type: "video.live_stream.active", id: "br-l-" + stamp, key: secret, outcome: "verified" },
      { type: "video.upload.created", id: "br-f-" + stamp, key: "not-the-secret", outcome: "mismatch" },
    ];
    for (const s of sent) {
      const status = await send(s.type, s.id, s.key);
      console.log(`sent ${s.type} ${s.id}: ${status}`);
    }

    // Each appears live (no reload), with its outcome; verified ones with their type and id.
    for (const s of sent) {
      const sel = s.outcome === "verified"
        ? `tr[data-testid="row"][data-outcome="verified"][data-type="${s.type}"]`
        : `tr[data-testid="row"][data-outcome="${s.outcome}"]`;
      const row = page.locator(sel).filter({ hasText: s.outcome === "verified" ? s.id : "" }).first();
      await row.waitFor({ timeout: 10000 });
      const text = await row.innerText();
      if (!text.includes(s.outcome)) throw new Error(`row for ${s.id} does not show ${s.outcome}: ${text}`);
      if (s.outcome === "verified" && !text.includes(s.type)) throw new Error(`row for ${s.id} does not show ${s.type}: ${text}`);
    }

    // Filters narrow the table.
    await page.getByTestId("filter-outcome").selectOption("verified");
    const shown = await page.locator('tr[data-testid="row"]').evaluateAll((rows) => rows.map((r) => r.dataset.outcome));
    if (shown.length === 0 || shown.some((o) => o !== "verified")) throw new Error("outcome filter shows " + shown);
    await page.getByTestId("filter-outcome").selectOption("");
    await page.getByTestId("filter-type").fill("video.live_stream.*");
    const types = await page.locator('tr[data-testid="row"]').evaluateAll((rows) => rows.map((r) => r.dataset.type));
    if (types.length === 0 || types.some((t) => !t.startsWith("video.live_stream."))) throw new Error("type filter shows " + types);
    await page.getByTestId("filter-type").fill("");

    // A click opens the detail: headers with the signature redacted, the body pretty-printed.
    await page.locator('tr[data-testid="row"]').filter({ hasText: sent[0].id }).first().click();
    const headers = await page.getByTestId("headers").innerText();
    if (!/Mux-Signature: \[redacted\]/i.test(headers)) throw new Error("signature not redacted in the detail: " + headers);
    if (/v1=/.test(headers)) throw new Error("a v1 value is visible in the detail");
    const body = await page.getByTestId("body").innerText();
    if (!body.includes(`"id": "${sent[0].id}"`)) throw new Error("detail body is not the pretty-printed event: " + body.slice(0, 200));

    if (screenshot) await page.screenshot({ path: screenshot, fullPage: false });
    if (errors.length) throw new Error("page errors: " + errors.join("; "));
    console.log("browser test passed");
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(String(e && e.stack || e));
  process.exit(1);
});
