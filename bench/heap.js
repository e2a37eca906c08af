// Drives bench/heap: the two memory scenarios of issue #10, against a
// gateway on 127.0.0.1. Bounded in count and time; it stops by itself.
//
//   node bench/heap.js claims  URL N SIZE   N connections claim SIZE bytes
//                                           with a forged header, send
//                                           nothing; held until stdin closes
//   node bench/heap.js remember URL N SIZE  N signed events of SIZE bytes,
//                                           distinct ids ($MUX_WEBHOOK_SECRET)
const net = require("net");
const crypto = require("crypto");
const http = require("http");

const [mode, url, nArg, sizeArg] = process.argv.slice(2);
const n = Math.min(Number(nArg), 10000);
const size = Math.min(Number(sizeArg), 16 << 20);
const { hostname, port, pathname } = new URL(url);
setTimeout(() => { console.error("bench/heap.js: timed out"); process.exit(1); }, 120000).unref();

if (mode === "claims") {
  const forged = `t=${Math.floor(Date.now() / 1000)},v1=${"ab".repeat(32)}`;
  const socks = [];
  let open = 0;
  for (let i = 0; i < n; i++) {
    const s = net.connect(Number(port), hostname, () => {
      s.write(`POST ${pathname} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nContent-Length: ${size}\r\nMux-Signature: ${forged}\r\n\r\n`);
      if (++open === n) console.log("open");
    });
    s.on("error", () => {});
    socks.push(s);
  }
  process.stdin.on("end", () => { socks.forEach((s) => s.destroy()); process.exit(0); });
  process.stdin.resume();
} else if (mode === "remember") {
  const secret = process.env.MUX_WEBHOOK_SECRET;
  const pad = "p".repeat(size);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  let done = 0, ok = 0;
  const send = (i) => new Promise((resolve) => {
    const body = JSON.stringify({ type: "video.asset.ready", id: `heap-${i}-${crypto.randomUUID()}`,
      object: { type: "asset", id: `a${i}` }, data: { passthrough: pad.slice(0, size - 200) } });
    const t = Math.floor(Date.now() / 1000);
    const v1 = crypto.createHmac("sha256", secret).update(`${t}.${body}`).digest("hex");
    const req = http.request({ hostname, port, path: pathname, method: "POST", agent,
      headers: { "Content-Type": "application/json", "Mux-Signature": `t=${t},v1=${v1}` } }, (res) => {
      res.resume();
      res.on("end", () => { if (res.statusCode === 200) ok++; resolve(); });
    });
    req.on("error", () => resolve());
    req.end(body);
  });
  (async () => {
    for (let i = 0; i < n; i += 4) await Promise.all([0, 1, 2, 3].filter((j) => i + j < n).map((j) => send(i + j)));
    console.log(`sent ${n}, ${ok} answered 200`);
    agent.destroy();
  })();
} else {
  console.error("usage: heap.js claims|remember URL N SIZE");
  process.exit(2);
}
