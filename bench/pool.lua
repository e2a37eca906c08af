-- wrk script for scenario (d): POST the events of $POOL_FILE (made by
-- bench/pool.js: a Mux-Signature line, then a body line, per event) in
-- turn, so that every request carries another event id. The requests are
-- built once, in init: sending one costs wrk what post.lua's static
-- request does.
local reqs, n, i = {}, 0, 0

function init(args)
	local f = assert(io.open(os.getenv("POOL_FILE"), "rb"))
	while true do
		local sig = f:read("*l")
		if not sig then break end
		local body = assert(f:read("*l"), "pool: a signature without a body")
		n = n + 1
		reqs[n] = wrk.format("POST", nil, { ["Content-Type"] = "application/json", ["Mux-Signature"] = sig }, body)
	end
	f:close()
	assert(n > 0, "pool: no events")
	-- Loading a large pool takes a while: $READY_FILE, if set, tells
	-- bench/run when the requests start, so that it measures the servers'
	-- CPU time over the run alone.
	local ready = os.getenv("READY_FILE")
	if ready then assert(io.open(ready, "w")):close() end
end

function request()
	i = i % n + 1
	return reqs[i]
end
