# A Rack backend behind caddy-mux-webhook: Caddy has verified and routed the
# event; the type arrives in a header set with header_up.
#
#   rackup examples/backend.ru -p 9001
require "json"

run lambda { |env|
  type  = env["HTTP_X_MUX_EVENT_TYPE"]
  event = JSON.parse(env["rack.input"].read)
  warn "received #{type} #{event["id"]} for #{event["object"]["type"]} #{event["object"]["id"]}"
  # ...do the work, idempotently on event["id"]: Mux may deliver twice...
  [200, { "content-type" => "text/plain" }, ["handled #{type} #{event["data"]["id"]}"]]
}
