#!/usr/bin/env sh
# Sends one signed Mux-style event, the way Mux would, using only curl and
# openssl.
#
#   examples/send-event.sh [TYPE] [URL]
#
# TYPE defaults to video.asset.ready, URL to http://localhost:8080/mux.
# The secret comes from MUX_WEBHOOK_SECRET, defaulting to the demo's
# development secret in examples/Caddyfile.
set -eu

type="${1:-video.asset.ready}"
url="${2:-http://localhost:8080/mux}"
secret="${MUX_WEBHOOK_SECRET:-dev-only-secret-DO-NOT-USE-IN-PRODUCTION}"

t=$(date +%s)
id="evt-$t-$$"
body=$(printf '{"type":"%s","id":"%s","created_at":"%s","object":{"type":"asset","id":"obj-%s"},"environment":{"id":"env-demo","name":"Demo"},"data":{"id":"obj-%s","passthrough":"demo"},"attempts":[]}' \
	"$type" "$id" "$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)" "$id" "$id")

# v1 = hex(HMAC-SHA256(secret, "<t>.<body>"))
v1=$(printf '%s.%s' "$t" "$body" | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)

curl -sS -i "$url" \
	-H "Mux-Signature: t=$t,v1=$v1" \
	-H 'Content-Type: application/json' \
	--data-binary "$body"
echo
