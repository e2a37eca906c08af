// Baseline (c) of the load test: what applications do today without the
// gateway. A Node server verifies each delivery with the official Mux SDK
// (@mux/mux-node, pinned in package-lock.json), routes by type and forwards
// it to the same upstream that Caddy proxies to in (a) and (b).
//
//   PORT=... UPSTREAM=http://127.0.0.1:... MUX_WEBHOOK_SECRET=... node node-verify.js
const http = require("node:http");
const Mux = require("@mux/mux-node");

const mux = new Mux({
  tokenId: "unused-by-webhooks",
  tokenSecret: "unused-by-webhooks",
  webhookSecret: process.env.MUX_WEBHOOK_SECRET,
});
const upstream = new URL(process.env.UPSTREAM);
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", async () => {
    const raw = Buffer.concat(chunks);
    let event;
    try {
      event = await mux.webhooks.unwrap(raw.toString("utf8"), req.headers);
    } catch {
      res.writeHead(401).end();
      return;
    }
    if (!event.type.startsWith("video.asset.")) {
      res.writeHead(204).end();
      return;
    }
    const up = http.request(
      {
        host: upstream.hostname,
        port: upstream.port,
        path: req.url,
        method: "POST",
        agent,
        headers: { ...req.headers, host: upstream.host, "content-length": raw.length },
      },
      (ur) => {
        res.writeHead(ur.statusCode, ur.headers);
        ur.pipe(res);
      },
    );
    up.on("error", () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    up.end(raw);
  });
});

server.listen(Number(process.env.PORT), "127.0.0.1", () => {
  console.log(`node-verify listening on 127.0.0.1:${server.address().port}`);
});
