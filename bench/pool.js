// Prints a pool of N signed events of exactly SIZE bytes each, for
// scenario (d) of bench/run: the event of payload.js with N distinct ids
// and an object id per 4 events (same lengths, so the same size), each signed now with
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
// The object: every 4 events another asset (an asset's events come a few
// at a time: created, ready, updated…), so that the queue's partitions and
// order object see many objects, as in production; same length.
const objectID = "Hb01ZkKzL6sH02b8GXq4dV7J00vzW3g8Q1";
const objAt = template.indexOf(`"id":"${objectID}"`, template.indexOf(`"object":`)) + 6;
if (objAt < 6) throw new Error("payload.js's object id not found");
// replace puts each [position, old length, new text] into the template.
function replace(parts) {
  parts.sort((a, b) => b[0] - a[0]);
  let s = template;
  for (const [pos, len, text] of parts) s = s.slice(0, pos) + text + s.slice(pos + len);
  return s;
}
// 8 random hex digits per pool, so that two pools never share an id, then
// a 12-digit counter: the id keeps its length and UUID shape.
const run = crypto.randomBytes(4).toString("hex");
const t = Math.floor(Date.now() / 1000);
let out = "";
for (let i = 0; i < n; i++) {
  const obj = run + Math.floor(i / 4).toString(16).padStart(objectID.length - 8, "0");
  const body = replace([[at, id.length, run + id.slice(8, 24) + i.toString(16).padStart(12, "0")], [objAt, objectID.length, obj]]);
  const mac = crypto.createHmac("sha256", secret).update(`${t}.`).update(body).digest("hex");
  out += `t=${t},v1=${mac}\n${body}\n`;
  if (out.length >= 1 << 20 || i === n - 1) {
    fs.writeSync(1, out);
    out = "";
  }
}
