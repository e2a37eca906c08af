// Prints a pool of N signed events of exactly SIZE bytes each, for
// scenario (d) of bench/run: the event of payload.js with N distinct ids
// (same length, so the same size), each signed now with
// $MUX_WEBHOOK_SECRET. mux_deliver queues an event id once per destination
// within its dedupe window, so a load of one repeated event would measure
// the duplicate fast path, not the queue.
//
//   MUX_WEBHOOK_SECRET=... node pool.js SIZE N > pool
//
// Output: per event, two lines: its Mux-Signature, then its body (JSON on
// one line), for bench/pool.lua.
const crypto = require("node:crypto");
const fs = require("node:fs");
const { execFileSync } = require("node:child_process");

const size = Number(process.argv[2] || 2048);
const n = Number(process.argv[3] || 1000);
const secret = process.env.MUX_WEBHOOK_SECRET;
if (!secret) throw new Error("set MUX_WEBHOOK_SECRET");
const template = execFileSync(process.execPath, [__dirname + "/payload.js", String(size)]).toString();
const id = "3a56ac3d-33da-4366-855b-f592d898409d";
const at = template.indexOf(`"id":"${id}"`) + 6;
if (at < 6) throw new Error("payload.js's event id not found");
// 8 random hex digits per pool, so that two pools never share an id, then
// a 12-digit counter: the id keeps its length and UUID shape.
const run = crypto.randomBytes(4).toString("hex");
const t = Math.floor(Date.now() / 1000);
let out = "";
for (let i = 0; i < n; i++) {
  const body = template.slice(0, at) + run + id.slice(8, 24) + i.toString(16).padStart(12, "0") + template.slice(at + id.length);
  const mac = crypto.createHmac("sha256", secret).update(`${t}.`).update(body).digest("hex");
  out += `t=${t},v1=${mac}\n${body}\n`;
  if (out.length >= 1 << 20 || i === n - 1) {
    fs.writeSync(1, out);
    out = "";
  }
}
