// Differential test, SDK side: generates signature cases (valid ones and
// mutations of header and body, all with timestamps inside the window),
// asks the official Mux Node SDK (@mux/mux-node, pinned in
// package-lock.json) for its verdict on each, and prints them as JSON for
// TestDifferentialAgainstSDK, which compares them with ours.
//
//   node difftest/sdk-verdicts.js [SEED]
//
// Deterministic for a seed, except for the current time in t.
const crypto = require("node:crypto");
const Mux = require("@mux/mux-node");

const mux = new Mux({ tokenId: "unused", tokenSecret: "unused" });
let seed = Number(process.argv[2] || 20261128) >>> 0;
const rand = () => {
  // mulberry32
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const pick = (a) => a[Math.floor(rand() * a.length)];
const hmac = (secret, msg) => crypto.createHmac("sha256", secret).update(msg).digest("hex");

const types = ["video.asset.ready", "video.asset.created", "video.live_stream.active", "video.upload.asset_created", "robots.job.summarize.completed"];
function makeBody(i) {
  const data = { id: "obj" + i, status: pick(["ready", "errored", "active"]), passthrough: pick(["", "caf\u00e9", "emoji \u{1F3AC}", "quote \" and \\ backslash", "x".repeat(Math.floor(rand() * 3000))]) };
  return JSON.stringify({ type: pick(types), id: crypto.randomUUID(), created_at: new Date().toISOString(), object: { type: "asset", id: "obj" + i }, data, attempts: [] });
}

// Each mutation returns {kind, header, body, secret}; kind names what was
// done, so that the Go side can tell intentional differences apart.
const secret = "whsec-" + crypto.randomBytes(8).toString("hex");
const mutations = [
  (b, t) => ({ kind: "valid", header: `t=${t},v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "valid_reordered", header: `v1=${hmac(secret, `${t}.${b}`)},t=${t}`, body: b }),
  (b, t) => ({ kind: "valid_several_v1", header: `t=${t},v1=${hmac("other", `${t}.${b}`)},v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "valid_unknown_scheme", header: `t=${t},v0=${hmac(secret, `${t}.${b}`)},v2=abc,v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "valid_empty_items", header: `,t=${t},,v1=${hmac(secret, `${t}.${b}`)},`, body: b }),
  (b, t) => ({ kind: "wrong_secret", header: `t=${t},v1=${hmac(secret + "x", `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "flipped_hex", header: `t=${t},v1=${flipHex(hmac(secret, `${t}.${b}`))}`, body: b }),
  (b, t) => ({ kind: "truncated_signature", header: `t=${t},v1=${hmac(secret, `${t}.${b}`).slice(0, 10 + Math.floor(rand() * 50))}`, body: b }),
  (b, t) => ({ kind: "extra_long_signature", header: `t=${t},v1=${hmac(secret, `${t}.${b}`)}00`, body: b }),
  (b, t) => ({ kind: "uppercase_hex", header: `t=${t},v1=${hmac(secret, `${t}.${b}`).toUpperCase()}`, body: b }),
  (b, t) => ({ kind: "no_v1", header: `t=${t},v0=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "missing_t", header: `v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "missing_header", header: "", body: b }),
  (b, t) => ({ kind: "non_numeric_t", header: `t=abc,v1=${hmac(secret, `NaN.${b}`)}`, body: b }),
  (b, t) => ({ kind: "trailing_garbage_t", header: `t=${t}abc,v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "leading_zero_t", header: `t=0${t},v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "duplicate_t", header: `t=${t - 1},t=${t},v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "whitespace", header: `t=${t}, v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "tab_whitespace", header: `t=${t},\tv1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "item_without_equals", header: `t=${t},v1=${hmac(secret, `${t}.${b}`)},garbage`, body: b }),
  (b, t) => ({ kind: "duplicated_items", header: `t=${t},v1=${hmac(secret, `${t}.${b}`)},v1=${hmac(secret, `${t}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "body_byte_flip", header: `t=${t},v1=${hmac(secret, `${t}.${b}`)}`, body: flipAscii(b) }),
  (b, t) => ({ kind: "body_appended", header: `t=${t},v1=${hmac(secret, `${t}.${b}`)}`, body: b + "\n" }),
  (b, t) => ({ kind: "signed_other_t", header: `t=${t},v1=${hmac(secret, `${t - 1}.${b}`)}`, body: b }),
  (b, t) => ({ kind: "recent_past_t", header: `t=${t - 120},v1=${hmac(secret, `${t - 120}.${b}`)}`, body: b }),
];

function flipHex(h) {
  const i = Math.floor(rand() * h.length);
  const c = h[i] === "0" ? "1" : "0";
  return h.slice(0, i) + c + h.slice(i + 1);
}
function flipAscii(s) {
  // Flip a character that is plain ASCII, keeping the body valid UTF-8.
  for (;;) {
    const i = Math.floor(rand() * s.length);
    const c = s.charCodeAt(i);
    if (c >= 0x20 && c < 0x7f) return s.slice(0, i) + (c === 0x41 ? "B" : "A") + s.slice(i + 1);
  }
}

async function main() {
  const t = Math.floor(Date.now() / 1000);
  const cases = [];
  for (let i = 0; i < 24; i++) {
    const body = makeBody(i);
    for (const m of mutations) {
      const c = m(body, t);
      let ok = true;
      let error = "";
      try {
        await mux.webhooks.verifySignature(c.body, c.header === "" ? {} : { "mux-signature": c.header }, secret);
      } catch (e) {
        ok = false;
        error = String(e.message || e);
      }
      cases.push({ kind: c.kind, header: c.header, body: c.body, secret, sdk_ok: ok, sdk_error: error });
    }
  }
  process.stdout.write(JSON.stringify(cases));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
