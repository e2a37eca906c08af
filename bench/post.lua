-- wrk script: POST one pre-signed event, read from $BODY_FILE, with the
-- Mux-Signature from $MUX_SIGNATURE (signed just before the run, so its
-- timestamp stays inside the gateway's 5-minute window).
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Mux-Signature"] = os.getenv("MUX_SIGNATURE")
