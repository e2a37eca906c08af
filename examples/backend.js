// A backend behind caddy-mux-webhook: no Mux SDK, no signature code.
// Caddy has already verified the event and routed it here; the type
// arrives in a header set with header_up, the body is the original JSON.
//
//   PORT=9001 node examples/backend.js
const http = require("node:http");

const server = http.createServer((req, res) => {
  let body = "";
  req.setEncoding("utf8");
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    const type = req.headers["x-mux-event-type"];
    const event = JSON.parse(body);
    console.log(`received ${type} ${event.id} for ${event.object.type} ${event.object.id}`);
    // ...do the work, idempotently on event.id: Mux may deliver twice...
    res.writeHead(200, { "Content-Type": "text/plain" });
    res.end(`handled ${type} ${event.data.id}`);
  });
});

server.listen(Number(process.env.PORT || 9001), "127.0.0.1", () => {
  console.log(`backend listening on 127.0.0.1:${server.address().port}`);
});
