package muxwebhook

// Every Caddyfile of the documentation (each ```caddyfile block of
// README.md and of the pages in docs/, and examples/Caddyfile) is run here
// as written, in an in-process Caddy with recording upstreams: a genuine
// signed event must be routed as the text next to the block says, and
// forged requests, to the webhook path and to every other path of the
// site, must never reach an upstream or a file. TestDocLinks checks that
// every relative link of those pages leads to a file, and to a heading of
// it.

import (
	"bytes"
	"cmp"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

const (
	// readmeSecret replaces {env.MUX_WEBHOOK_SECRET} in the documented
	// Caddyfiles.
	readmeSecret = "whsec-readme-0123456789abcdef"
	// readmeOldSecret is a second, "rotated" secret.
	readmeOldSecret = "whsec-readme-old-secret"
	// readmeBcrypt is a bcrypt hash (cost 4) of readmePassword, for the
	// basic_auth of the documented Live Logs site.
	readmeBcrypt   = "$2a$04$q.PiehR/N45VzQKszHv4featKfJulTXAceihThDbSREJky7f2fAVS"
	readmePassword = "readme-password"
	// readmeAppSecret replaces {env.APP_WEBHOOK_SECRET}: the secret a
	// queue destination signs its deliveries with.
	readmeAppSecret = "whsec-readme-app-destination"
)

// docBlock is one Caddyfile of the documentation.
type docBlock struct {
	key  string // file, heading and index under the heading: the table's key
	line int    // where the block starts, for messages
	text string
}

var (
	fenceRe   = regexp.MustCompile("^ {0,3}(```+|~~~+)[ \t]*([^ \t`]*)")
	headingRe = regexp.MustCompile(`^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$`)
)

// markdownCaddyfiles returns the Caddyfile code blocks of a markdown file,
// keyed by the heading they sit under and their index under it (from 1).
func markdownCaddyfiles(t *testing.T, path string) []docBlock {
	t.Helper()
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(src), "\n")
	heading := "(before any heading)"
	perHeading := map[string]int{}
	var blocks []docBlock
	for i := 0; i < len(lines); i++ {
		m := fenceRe.FindStringSubmatch(lines[i])
		if m == nil {
			if h := headingRe.FindStringSubmatch(lines[i]); h != nil {
				heading = h[1]
			}
			continue
		}
		start, fence, lang := i, m[1], strings.ToLower(m[2])
		var body []string
		for i++; ; i++ {
			if i == len(lines) {
				t.Fatalf("%s:%d: code block never closed", path, start+1)
			}
			l := strings.TrimSpace(lines[i])
			if strings.HasPrefix(l, fence) && strings.Trim(l, fence[:1]) == "" {
				break
			}
			body = append(body, lines[i])
		}
		switch lang {
		case "caddyfile", "caddy", "caddy-d":
			perHeading[heading]++
			blocks = append(blocks, docBlock{
				key:  fmt.Sprintf("%s: %s #%d", path, heading, perHeading[heading]),
				line: start + 1,
				text: strings.Join(body, "\n") + "\n",
			})
		}
	}
	return blocks
}

// docPages are the documentation's markdown pages: README.md, then each
// page of docs/, sorted.
func docPages(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob("docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(pages)
	return append([]string{"README.md"}, pages...)
}

// docCaddyfiles is every Caddyfile the documentation shows.
func docCaddyfiles(t *testing.T) []docBlock {
	t.Helper()
	var blocks []docBlock
	for _, page := range docPages(t) {
		blocks = append(blocks, markdownCaddyfiles(t, page)...)
	}
	demo, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	return append(blocks, docBlock{key: "examples/Caddyfile", line: 1, text: string(demo)})
}

// blockTest says how to run one documented Caddyfile and what it must do.
//
// The block's text gets replace applied (each old string must be in the
// block, so that an edit of the block that the entry does not follow fails
// the test), is put into wrap where it says BLOCK, and then every
// stand-in is made real: hooks.example.com becomes a free port on
// 127.0.0.1, each address of upstreams a recording server on 127.0.0.1
// (or, in a run that lists it as down, a port where nothing listens), each
// path of dirs a fresh temporary directory, {env.MUX_WEBHOOK_SECRET} the
// test's secret, {env.APP_WEBHOOK_SECRET} readmeAppSecret, and Caddy's
// data directory (the delivery queue's default store) a temporary one. The
// tokens <free-port>, <secret-file> (a file holding the secret and a
// newline) and <bcrypt> (readmeBcrypt) may be used in replace and wrap.
type blockTest struct {
	replace   []string // pairs: old, new
	wrap      string   // a Caddyfile with BLOCK where the block goes; "" = the block is whole
	split     bool     // the block shows alternatives separated by a blank line: each runs alone
	upstreams []string // the upstream addresses the block (or wrap) names
	dirs      []string // file system paths the block names
	secret    string   // the signing secret; default readmeSecret
	hook      string   // the webhook path; default /mux
	everyPath bool     // mux_webhook has no matcher: a forgery to any path gets 401
	noRun     string   // why the block cannot run; it is then only adapted
	// queueDirs of dirs hold the delivery queue's own store, whose files
	// are no events. A Caddyfile with mux_deliver delivers through the
	// queue: the run waits for every delivery to reach its upstreams.
	queueDirs []string
	runs      []blockRun
}

// blockRun is one load of the Caddyfile: forgeries to every path first,
// then the deliveries, then check.
type blockRun struct {
	name       string
	down       []string          // upstreams with nothing listening in this run
	files      map[string]string // files written before the load, by documented path
	deliveries []docDelivery
	check      func(t *testing.T, s *blockSite)
}

// docDelivery is one genuine signed event and what must become of it.
type docDelivery struct {
	typ, data string
	id        string            // a label: the same label is the same event id within a run
	path      string            // default: the webhook path
	secret    string            // default: the block's secret
	status    int               // the answer
	body      string            // the answer's body, when set
	to        string            // the upstream that must receive it, byte for byte; "" = none
	also      []string          // more upstreams that must receive it (fan-out through the queue)
	header    map[string]string // headers that upstream must see ({id} = the event id)
	stored    string            // documented path of the file that must hold it ({id} = the event id)

	// signedWith is the secret the Mux-Signature that the upstreams see
	// must verify with, now: the block's secret when the queue passes on
	// Mux's header, a destination's sign secret when it re-signs.
	signedWith string
}

// Wrappers for fragments. None lets a request to a path other than /mux
// reach a backend.
const (
	// wrapInMuxRoute puts a handler fragment in the route of /mux.
	wrapInMuxRoute = `hooks.example.com {
	mux_webhook /mux {env.MUX_WEBHOOK_SECRET}
	handle /mux {
BLOCK
	}
	handle {
		respond 404
	}
}
`
	// wrapInSite puts site-level lines after mux_webhook, before a
	// catch-all 204.
	wrapInSite = `hooks.example.com {
	mux_webhook /mux {env.MUX_WEBHOOK_SECRET}
BLOCK
	handle {
		respond 204
	}
}
`
	// wrapMuxWebhook completes a mux_webhook /mux directive with a route
	// proxying /mux to app.
	wrapMuxWebhook = `hooks.example.com {
BLOCK
	handle /mux {
		reverse_proxy app:8080
	}
	handle {
		respond 404
	}
}
`
	// wrapGlobalDeliver puts global options before a site queueing the
	// events of /mux for the destination app.
	wrapGlobalDeliver = `BLOCK
hooks.example.com {
	mux_webhook /mux {env.MUX_WEBHOOK_SECRET}
	handle /mux {
		mux_deliver app
	}
	handle {
		respond 404
	}
}
`
	// wrapGlobal puts global options before a site proxying /mux to app.
	wrapGlobal = `BLOCK
hooks.example.com {
	mux_webhook /mux {env.MUX_WEBHOOK_SECRET}
	handle /mux {
		reverse_proxy app:8080
	}
	handle {
		respond 404
	}
}
`
)

// toApp is a genuine event that app:8080 must receive.
var toApp = []docDelivery{{typ: "video.asset.ready", status: 200, to: "app:8080"}}

// readmeBlockTests has an entry for every documented Caddyfile.
var readmeBlockTests = map[string]blockTest{
	"README.md: caddy-mux-webhook #1": {
		upstreams: []string{"assets:8080", "live:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 200, to: "assets:8080"},
			{typ: "video.asset.static_renditions.ready", status: 200, to: "assets:8080"},
			{typ: "video.live_stream.active", status: 200, to: "live:8080"},
			{typ: "video.upload.created", status: 204},
		}}},
	},
	"README.md: `mux_webhook` #1": {
		replace: []string{
			"[<matcher>] [<secret>...]", "/mux {env.MUX_WEBHOOK_SECRET}",
			"<secret> [<secret>...]", readmeOldSecret,
			"<duration>", "5m",
			"<size>", "1MiB",
			"[<window>]", "1h",
		},
		wrap:      wrapMuxWebhook,
		upstreams: []string{"app:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			// Every secret listed is accepted (rotation).
			{typ: "video.asset.ready", status: 200, to: "app:8080"},
			{typ: "video.asset.ready", secret: readmeOldSecret, status: 200, to: "app:8080"},
			// dedupe: a delivered id is answered 200 without the backend.
			{typ: "video.asset.ready", id: "twice", status: 200, to: "app:8080"},
			{typ: "video.asset.ready", id: "twice", status: 200},
		}}},
	},
	"README.md: Secrets: use `{env.*}` or `{file.*}` #1": {
		replace:   []string{"/run/secrets/mux_webhook", "<secret-file>"},
		wrap:      "hooks.example.com {\nBLOCK\n\treverse_proxy app:8080\n}\n",
		upstreams: []string{"app:8080"},
		everyPath: true,
		runs:      []blockRun{{deliveries: toApp}},
	},
	"README.md: `mux_event` #1": {
		wrap: `hooks.example.com {
	mux_webhook /mux {env.MUX_WEBHOOK_SECRET}
BLOCK
	handle @ready {
		reverse_proxy ready:8080
	}
	handle @assets {
		reverse_proxy assets:8080
	}
	handle {
		respond 204
	}
}
`,
		upstreams: []string{"ready:8080", "assets:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 200, to: "ready:8080"},
			{typ: "video.asset.static_renditions.ready", status: 200, to: "assets:8080"},
			{typ: "video.upload.created", status: 200, to: "assets:8080"},
			{typ: "video.live_stream.active", status: 204},
		}}},
	},
	"README.md: Duplicates: `dedupe` #1": {
		split:     true,
		wrap:      wrapMuxWebhook,
		upstreams: []string{"app:8080"},
		runs: []blockRun{
			{name: "delivered once", deliveries: []docDelivery{
				{typ: "video.asset.ready", id: "a", status: 200, to: "app:8080"},
				{typ: "video.asset.ready", id: "a", status: 200, body: ""},
				{typ: "video.asset.created", id: "b", status: 200, to: "app:8080"},
			}},
			{name: "a failure is not remembered", down: []string{"app:8080"}, deliveries: []docDelivery{
				{typ: "video.asset.ready", id: "c", status: 502},
				{typ: "video.asset.ready", id: "c", status: 502},
			}},
		},
	},
	"README.md: `mux_store`: never lose an event #1": {
		replace: []string{
			"[<matcher>] <path-template>", "/var/spool/mux/{http.mux.event.id}.json",
			"<code>", "201",
		},
		wrap: wrapInMuxRoute,
		dirs: []string{"/var/spool/mux"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 201, stored: "/var/spool/mux/{id}.json"},
		}}},
	},
	"README.md: `mux_store`: never lose an event #2": {
		wrap: wrapInMuxRoute,
		dirs: []string{"/var/spool/mux"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 202, stored: "/var/spool/mux/video.asset.ready/{id}.json"},
			{typ: "video.live_stream.idle", status: 202, stored: "/var/spool/mux/video.live_stream.idle/{id}.json"},
		}}},
	},
	"docs/observability.md: Live Logs #1": {
		wrap:      wrapGlobal,
		upstreams: []string{"app:8080"},
		runs:      []blockRun{{deliveries: toApp}},
	},
	"docs/observability.md: Live Logs #2": {
		replace:   []string{"$2a$14$…", "<bcrypt>"},
		upstreams: []string{"app:8080"},
		runs: []blockRun{{
			deliveries: []docDelivery{{typ: "video.asset.ready", id: "seen", status: 200, to: "app:8080"}},
			check: func(t *testing.T, s *blockSite) {
				req, _ := http.NewRequest(http.MethodGet, s.url+"/mux-webhook/events", nil)
				if status, _, _ := do(t, req); status != http.StatusUnauthorized {
					t.Errorf("live log without credentials: %d, want 401", status)
				}
				req, _ = http.NewRequest(http.MethodGet, s.url+"/mux-webhook/events", nil)
				req.SetBasicAuth("admin", readmePassword)
				if status, _, list := do(t, req); status != 200 || !strings.Contains(list, `"id":"`+s.id("seen")+`"`) {
					t.Errorf("live log with credentials: %d %.300s", status, list)
				}
			},
		}},
	},
	"README.md: Route by family, acknowledge the rest #1": {
		upstreams: []string{"media-service:8080", "live-service:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 200, to: "media-service:8080"},
			{typ: "video.upload.asset_created", status: 200, to: "media-service:8080"},
			{typ: "video.live_stream.active", status: 200, to: "live-service:8080"},
			{typ: "video.delivery.high_traffic", status: 200, to: "live-service:8080"},
			{typ: "robots.job.summarize.completed", status: 204},
		}}},
	},
	"README.md: Dynamic upstream with `map` #1": {
		wrap:      "hooks.example.com {\nBLOCK\n}\n",
		upstreams: []string{"assets:8080", "live:8080", "fallback:8080"},
		everyPath: true,
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 200, to: "assets:8080"},
			{typ: "video.live_stream.idle", status: 200, to: "live:8080"},
			{typ: "video.upload.created", status: 200, to: "fallback:8080"},
		}}},
	},
	"README.md: Pass the event to the backend in headers #1": {
		wrap:      wrapInMuxRoute,
		upstreams: []string{"app:8080"},
		runs: []blockRun{{deliveries: []docDelivery{{
			typ: "video.asset.ready", data: `{"id":"a1","passthrough":"order-42"}`, status: 200, to: "app:8080",
			header: map[string]string{
				"X-Mux-Event-Type":  "video.asset.ready",
				"X-Mux-Event-Id":    "{id}",
				"X-Mux-Asset-Id":    "obj-{id}",
				"X-Mux-Passthrough": "order-42",
			},
		}}}},
	},
	"README.md: Custom error responses with `handle_errors` #1": {
		wrap:      "hooks.example.com {\n\tmux_webhook /mux {env.MUX_WEBHOOK_SECRET}\n\thandle /mux {\n\t\treverse_proxy app:8080\n\t}\n\thandle {\n\t\trespond 404\n\t}\nBLOCK\n}\n",
		upstreams: []string{"app:8080"},
		runs: []blockRun{
			{name: "backend up", deliveries: toApp},
			{
				name: "backend down", down: []string{"app:8080"},
				deliveries: []docDelivery{{typ: "video.asset.ready", status: 503, body: "retry later"}},
				check: func(t *testing.T, s *blockSite) {
					req := signedRequest(t, s.url+"/mux", "wrong", event("video.asset.ready", s.id("forged"), ""), time.Now())
					if status, _, body := do(t, req); status != 401 || body != "bad signature" {
						t.Errorf("forged: %d %q, want 401 %q", status, body, "bad signature")
					}
				},
			},
		},
	},
	"README.md: Answer from a file per event type #1": {
		wrap: wrapInSite,
		dirs: []string{"/srv/mux-responses"},
		runs: []blockRun{{
			files: map[string]string{"/srv/mux-responses/video.asset.ready.json": `{"answer":"asset ready"}`},
			deliveries: []docDelivery{
				{typ: "video.asset.ready", status: 200, body: `{"answer":"asset ready"}`},
				{typ: "video.asset.errored", status: 404},
				{typ: "video.live_stream.active", status: 204},
			},
		}},
	},
	"README.md: Park events while the backend is down, replay them later #1": {
		upstreams: []string{"app:8080"},
		dirs:      []string{"/var/spool/mux"},
		runs: []blockRun{
			{name: "backend up", deliveries: toApp},
			{
				name: "backend down", down: []string{"app:8080"},
				deliveries: []docDelivery{{typ: "video.asset.ready", id: "parked", status: 202, stored: "/var/spool/mux/video.asset.ready/{id}.json"}},
				check:      checkReplay,
			},
		},
	},
	"README.md: Queue: `mux_deliver` #1": {
		upstreams: []string{"app:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", id: "q1", status: 202, body: "", to: "app:8080", signedWith: readmeAppSecret,
				header: map[string]string{
					"Content-Type": "application/json", "Idempotency-Key": "{id}",
					"Mux-Webhook-Attempt": "1", "Mux-Webhook-Destination": "app",
				}},
			// Mux's retry of a queued event is absorbed by the dedupe window.
			{typ: "video.asset.ready", id: "q1", status: 202, body: ""},
			{typ: "video.live_stream.active", id: "q2", status: 202, to: "app:8080", signedWith: readmeAppSecret},
		}}},
	},
	"README.md: Every setting #1": {
		replace: []string{
			// The embedded server here; TestReadmeQueueNATSSettings adapts
			// the nats block.
			"\t\t\tnats <url>... {\n\t\t\t\tcreds    <file>\n\t\t\t\tuser     <user>\n\t\t\t\tpassword <password>\n\t\t\t\ttoken    <token>\n\t\t\t\treplicas <n>\n\t\t\t}\n", "",
			"{\n\tmux_webhook {", "{\n\tadmin localhost:<free-port>\n\tmux_webhook {",
			"<path>", "/var/lib/caddy/mux-queue",
			"header       <field> <value>", "header       X-Readme readme-value",
			"destination <name> <url>", "destination app http://app:8080/mux",
			"<name>", "MUX_README",
			"<size>", "64MiB",
			"<duration>|off", "7d",
			"<duration>...", "50ms 100ms",
			"<duration>", "10s",
			"<n>/<s|m|h>", "100/s",
			"<failures> <probe>", "10 30s",
			"<n>", "3",
			"<secret>", "{env.APP_WEBHOOK_SECRET}",
		},
		wrap:      wrapGlobalDeliver,
		upstreams: []string{"app:8080"},
		dirs:      []string{"/var/lib/caddy/mux-queue"},
		queueDirs: []string{"/var/lib/caddy/mux-queue"},
		runs: []blockRun{
			{name: "destination up", deliveries: []docDelivery{
				{typ: "video.asset.ready", status: 202, to: "app:8080", signedWith: readmeAppSecret,
					header: map[string]string{"X-Readme": "readme-value", "Idempotency-Key": "{id}", "Mux-Webhook-Attempt": "1"}},
			}},
			{
				name: "destination down", down: []string{"app:8080"},
				deliveries: []docDelivery{{typ: "video.asset.ready", id: "dead", status: 202}},
				check: func(t *testing.T, s *blockSite) {
					// retry 50ms 100ms, max_attempts 3: a dead letter
					// after the third attempt.
					s.waitDeadLetters("app", 3, "dead")
				},
			},
		},
	},
	"README.md: A backend slower than Mux's 5 seconds #1": {
		upstreams: []string{"transcoder:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 202, to: "transcoder:8080", signedWith: readmeSecret,
				header: map[string]string{"Idempotency-Key": "{id}", "Mux-Webhook-Destination": "transcoder"}},
			{typ: "video.asset.created", status: 204},
			{typ: "video.live_stream.active", status: 204},
		}}},
	},
	"README.md: Fan-out: one event, two services #1": {
		upstreams: []string{"assets:8080", "analytics:8080"},
		runs: []blockRun{{
			deliveries: []docDelivery{
				{typ: "video.asset.ready", id: "f1", status: 202, to: "assets:8080", also: []string{"analytics:8080"}, signedWith: readmeSecret},
				{typ: "video.asset.ready", id: "f1", status: 202}, // Mux's retry: absorbed
				{typ: "video.live_stream.active", id: "f2", status: 202, to: "analytics:8080", signedWith: readmeSecret},
			},
			check: func(t *testing.T, s *blockSite) {
				for _, name := range []string{"assets", "analytics"} {
					for _, r := range s.ups[name+":8080"].requests() {
						if got := r.Header.Get("Mux-Webhook-Destination"); got != name {
							t.Errorf("%s received Mux-Webhook-Destination: %q", name, got)
						}
					}
				}
			},
		}},
	},
	"README.md: Keep an asset's state right #1": {
		upstreams: []string{"app:8080"},
		runs: []blockRun{{
			deliveries: []docDelivery{
				{typ: "video.asset.created", id: "k1", status: 202, to: "app:8080", signedWith: readmeSecret},
				{typ: "video.asset.ready", id: "k2", status: 202, to: "app:8080", signedWith: readmeSecret},
				{typ: "video.asset.ready", id: "k2", status: 202}, // Mux's retry: absorbed
			},
		}},
	},
	"README.md: A weekend outage #1": {
		replace: []string{
			"{\n\tmux_webhook {", "{\n\tadmin localhost:<free-port>\n\tmux_webhook {",
			"retry   1m 5m 30m 1h", "retry   50ms",
			"max_age 7d", "max_age 7d\n\t\t\tbreaker 10 300ms", // the probe compressed like the retries
		},
		upstreams: []string{"app:8080"},
		dirs:      []string{"/var/lib/caddy/mux-queue"},
		queueDirs: []string{"/var/lib/caddy/mux-queue"},
		runs: []blockRun{
			{name: "backend up", deliveries: []docDelivery{{typ: "video.asset.ready", status: 202, to: "app:8080"}}},
			{
				name: "backend down: the breaker trips, then a probe delivers", down: []string{"app:8080"},
				deliveries: []docDelivery{
					{typ: "video.asset.ready", id: "fri", status: 202},
					{typ: "video.asset.deleted", id: "sat", status: 202},
				},
				check: checkWeekendBreaker,
			},
		},
	},
	"docs/queue.md: When a destination is down #1": {
		replace: []string{
			"{\n\tmux_webhook {", "{\n\tadmin localhost:<free-port>\n\tmux_webhook {",
			"retry   1m 5m 30m 1h", "retry   50ms",
			"max_age 2d", "max_age 1s",
		},
		wrap:      wrapGlobalDeliver,
		upstreams: []string{"app:8080"},
		dirs:      []string{"/var/lib/caddy/mux-queue"},
		queueDirs: []string{"/var/lib/caddy/mux-queue"},
		runs: []blockRun{
			{name: "backend up", deliveries: []docDelivery{{typ: "video.asset.ready", status: 202, to: "app:8080"}}},
			{
				name: "backend down past max_age", down: []string{"app:8080"},
				deliveries: []docDelivery{
					{typ: "video.asset.ready", id: "fri", status: 202},
					{typ: "video.asset.deleted", id: "sat", status: 202},
				},
				check: checkMondayRedeliver,
			},
		},
	},
	"README.md: Route on event content #1": {
		wrap:      wrapInSite,
		upstreams: []string{"vip-pipeline:8080"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", data: `{"id":"a1","passthrough":"vip-7"}`, status: 200, to: "vip-pipeline:8080"},
			{typ: "video.asset.ready", data: `{"id":"a2","passthrough":"regular"}`, status: 204},
			{typ: "video.asset.created", data: `{"id":"a3","passthrough":"vip-8"}`, status: 204},
		}}},
	},
	"docs/development.md: Backends without a vendor SDK #1": {
		wrap:      wrapInMuxRoute,
		upstreams: []string{"app:9001"},
		runs: []blockRun{{deliveries: []docDelivery{{
			typ: "video.asset.ready", status: 200, to: "app:9001",
			header: map[string]string{"X-Mux-Event-Type": "video.asset.ready"},
		}}}},
	},
	"docs/cluster.md: Running on several machines #1": {
		upstreams: []string{"app:8080"},
		dirs:      []string{"/mnt/shared/caddy"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", id: "once", status: 200, to: "app:8080"},
			{typ: "video.asset.ready", id: "once", status: 200},
		}}},
	},
	"docs/development.md: Local development with Mux's CLI #1": {
		replace: []string{
			"http://localhost:8080", "hooks.example.com",
			"{env.MUX_CLI_WEBHOOK_SECRET}", "the-mux-cli-secret",
		},
		upstreams: []string{"localhost:3000"},
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 200, to: "localhost:3000"},
			{typ: "video.asset.created", secret: "the-mux-cli-secret", status: 200, to: "localhost:3000"},
			{typ: "video.asset.created", secret: "neither-secret", status: 401},
		}}},
	},
	"docs/cluster.md: Several gateways on one NATS cluster (`mux_deliver`) #1": {
		upstreams: []string{"app:8080"},
		noRun:     "it needs a NATS cluster at 10.0.0.1-3: TestClusterSharedWork and TestClusterExample run gateways on one",
	},
	"docs/security.md: Floods and slow clients #1": {
		wrap:      wrapGlobal,
		upstreams: []string{"app:8080"},
		runs:      []blockRun{{deliveries: toApp}},
	},
	"examples/Caddyfile": {
		replace: []string{
			"admin localhost:2019", "admin off",
			"http://localhost:8080", "hooks.example.com",
			"http://localhost:9001", "http://localhost:<free-port>",
			"http://localhost:9002", "http://localhost:<free-port>",
			"http://localhost:9003 {", "http://localhost:<free-port> {",
		},
		upstreams: []string{"127.0.0.1:9001", "127.0.0.1:9002", "localhost:9003"},
		secret:    demoSecret,
		runs: []blockRun{{deliveries: []docDelivery{
			{typ: "video.asset.ready", status: 200, to: "127.0.0.1:9001",
				header: map[string]string{"X-Mux-Event-Type": "video.asset.ready", "X-Mux-Event-Id": "{id}"}},
			{typ: "video.upload.asset_created", status: 200, to: "127.0.0.1:9001"},
			{typ: "video.live_stream.active", status: 200, to: "127.0.0.1:9002",
				header: map[string]string{"X-Mux-Event-Type": "video.live_stream.active", "X-Mux-Event-Id": "{id}"}},
			// Every other event: queued for analytics, delivered by Caddy.
			{typ: "robots.job.summarize.completed", status: 202, body: "", to: "localhost:9003", signedWith: demoSecret,
				header: map[string]string{"Idempotency-Key": "{id}", "Mux-Webhook-Destination": "analytics", "Mux-Webhook-Attempt": "1"}},
			{typ: "video.delivery.high_traffic", status: 202, to: "localhost:9003"},
		}}},
	},
}

// waitDeadLetters waits until the dead letters of destination, read from
// the admin endpoint of the block, are the events of labels; each after
// attempts attempts, unless attempts is 0.
func (s *blockSite) waitDeadLetters(destination string, attempts int, labels ...string) {
	t := s.t
	t.Helper()
	var dead []struct {
		ID        string `json:"id"`
		Attempts  int    `json:"attempts"`
		LastError string `json:"last_error"`
	}
	url := "http://" + s.adminAddress() + "/mux-webhook/queue/dead?destination=" + destination
	testwait.For(t, func() bool {
		dead = nil
		getJSON(t, url, &dead)
		return len(dead) >= len(labels)
	}, func() string { return fmt.Sprintf("dead letters of %s: %+v", destination, dead) })
	var got, want []string
	for _, d := range dead {
		got = append(got, d.ID)
		if (attempts > 0 && d.Attempts != attempts) || d.LastError == "" {
			t.Errorf("dead letter %s: %d attempts, last error %q; want %d attempts and the error", d.ID, d.Attempts, d.LastError, attempts)
		}
	}
	for _, l := range labels {
		want = append(want, s.id(l))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("dead letters of %s: %v, want %v", destination, got, want)
	}
}

// checkMondayRedeliver: the weekend's events became dead letters; the
// backend comes back, and the recipe's commands redeliver them.
// checkWeekendBreaker: the backend down, the destination trips (the
// status says so, with its next probe); once the backend is back, a probe
// resets it and both weekend events are delivered, none a dead letter.
func checkWeekendBreaker(t *testing.T, s *blockSite) {
	admin := "http://" + s.adminAddress()
	var st QueueStatus
	testwait.For(t, func() bool {
		st = queueStatus(t, admin)["app"]
		return st.State == "tripped"
	}, func() string { return fmt.Sprintf("app never tripped: %+v", st) })
	if st.NextProbe == "" || st.StateSince == "" {
		t.Errorf("a tripped destination's status without next_probe or state_since: %+v", st)
	}
	app := newUpstreamAt(t, "app:8080", s.down["app:8080"])
	testwait.For(t, func() bool { return len(app.requests()) >= 2 }, func() string {
		return fmt.Sprintf("the backend got %d requests once back, want both weekend events", len(app.requests()))
	})
	testwait.For(t, func() bool {
		st = queueStatus(t, admin)["app"]
		return st.State == "active" && st.Pending+st.InFlight == 0
	}, func() string { return fmt.Sprintf("app after the probe: %+v", st) })
	if st.Dead != 0 {
		t.Errorf("%d dead letters after the outage, want none", st.Dead)
	}
}

func checkMondayRedeliver(t *testing.T, s *blockSite) {
	s.waitDeadLetters("app", 0, "fri", "sat")
	app := newUpstreamAt(t, "app:8080", s.down["app:8080"])
	admin := s.adminAddress()
	if out, err := runCommand(t, "", "queue", "dead", "app", "--address", admin); err != nil || !strings.Contains(out, s.id("fri")) {
		t.Errorf("queue dead app: %v\n%s", err, out)
	}
	out, err := runCommand(t, "", "queue", "redeliver", "app", "--all", "--address", admin)
	if err != nil || !strings.Contains(out, "redelivered 2 dead letters of app") {
		t.Fatalf("queue redeliver app --all: %v\n%s", err, out)
	}
	testwait.For(t, func() bool { return len(app.requests()) == 2 }, func() string {
		return fmt.Sprintf("the backend got %d requests after the redelivery, want 2", len(app.requests()))
	})
	for _, r := range app.requests() {
		if !bytes.Equal(r.Body, s.bodies[s.id("fri")]) && !bytes.Equal(r.Body, s.bodies[s.id("sat")]) {
			t.Errorf("the backend got %.100q, not a weekend event", r.Body)
		}
		if got := r.Header.Get("Mux-Webhook-Attempt"); got != "1" {
			t.Errorf("a redelivered event came as attempt %q, want 1", got)
		}
	}
	// The backend answered; the queue counts each delivery once its
	// acknowledgement is stored.
	done := regexp.MustCompile(`(?m)^app\s+0\s+0\s+0\s+2\s+0\s`)
	testwait.For(t, func() bool {
		out, err = runCommand(t, "", "queue", "--address", admin)
		return err == nil && done.MatchString(out)
	}, func() string {
		return fmt.Sprintf("queue: %v, want app with 0 pending, 0 in flight, 2 delivered, 0 dead:\n%s", err, out)
	})
}

// checkReplay brings the parked event's backend up and replays the spool
// with the README's command line.
func checkReplay(t *testing.T, s *blockSite) {
	app := newUpstreamAt(t, "app:8080", s.down["app:8080"])
	spool := s.dirs["/var/spool/mux"]
	out, err := runCommand(t, "", "replay", "--from", spool, "--to", s.url+"/mux")
	if err != nil {
		t.Fatalf("replay: %v\n%s", err, out)
	}
	got := app.requests()
	if len(got) != 1 || !bytes.Equal(got[0].Body, s.bodies[s.id("parked")]) {
		t.Fatalf("the backend got %d requests after the replay, want the parked event", len(got))
	}
	if _, err := os.Stat(filepath.Join(spool, "delivered", "video.asset.ready", s.id("parked")+".json")); err != nil {
		t.Errorf("the replayed file was not moved to delivered/: %v", err)
	}
}

func TestReadmeCaddyfiles(t *testing.T) {
	t.Setenv(SecretEnv, readmeSecret)
	t.Setenv("APP_WEBHOOK_SECRET", readmeAppSecret)
	blocks := docCaddyfiles(t)
	seen := map[string]bool{}
	for _, b := range blocks {
		seen[b.key] = true
	}
	for key := range readmeBlockTests {
		if !seen[key] {
			t.Errorf("readmeBlockTests has an entry for %q, but no such Caddyfile block exists: update the key", key)
		}
	}
	for _, b := range blocks {
		bt, ok := readmeBlockTests[b.key]
		if !ok {
			t.Errorf("%s (line %d) is not tested: add an entry for %q to readmeBlockTests", b.key, b.line, b.key)
			continue
		}
		// Braces would make placeholders of the test's temporary paths.
		name := strings.NewReplacer("{", "(", "}", ")").Replace(b.key)
		t.Run(name, func(t *testing.T) { bt.test(t, b) })
	}
}

func (bt blockTest) test(t *testing.T, b docBlock) {
	text := b.text
	if len(bt.replace)%2 != 0 {
		t.Fatal("replace needs pairs")
	}
	for i := 0; i < len(bt.replace); i += 2 {
		if !strings.Contains(text, bt.replace[i]) {
			t.Fatalf("the block (line %d) no longer contains %q: update its entry", b.line, bt.replace[i])
		}
		text = strings.ReplaceAll(text, bt.replace[i], bt.replace[i+1])
	}
	variants := []string{text}
	if bt.split {
		variants = strings.Split(strings.TrimSpace(text), "\n\n")
		if len(variants) < 2 {
			t.Fatal("split, but the block shows only one alternative")
		}
	}
	if bt.noRun == "" && len(bt.runs) == 0 {
		t.Fatal("the entry has no runs and no noRun reason")
	}
	allUp := slices.ContainsFunc(bt.runs, func(r blockRun) bool { return len(r.down) == 0 })
	if bt.noRun == "" && !allUp {
		t.Fatal("the entry needs a run with every upstream up, where forgeries could reach them")
	}
	for i, v := range variants {
		cfg := v
		if bt.wrap != "" {
			cfg = strings.Replace(bt.wrap, "BLOCK", v, 1)
		}
		name := "variant " + fmt.Sprint(i+1)
		if len(variants) == 1 {
			name = "as written"
		}
		t.Run(name, func(t *testing.T) {
			if bt.noRun != "" {
				s := bt.prepare(t, cfg, blockRun{})
				if _, err := adaptCaddyfile(s.cfg); err != nil {
					t.Fatalf("adapting (not run: %s): %v\n%s", bt.noRun, err, s.cfg)
				}
				return
			}
			for _, r := range bt.runs {
				t.Run(cmp.Or(r.name, "run"), func(t *testing.T) { bt.run(t, cfg, r) })
			}
		})
	}
}

// blockSite is a documented Caddyfile made real.
type blockSite struct {
	t       *testing.T
	cfg     string
	url     string
	secret  string
	hook    string
	ups     map[string]*upstream // documented address -> recording upstream
	down    map[string]string    // documented address -> 127.0.0.1:port, nothing listening
	dirs    map[string]string    // documented path -> temporary directory
	logFile string
	prefix  string            // of this run's event ids
	bodies  map[string][]byte // event id -> body delivered
	preset  map[string]bool   // files written before the load
	queue   map[string]bool   // documented dirs of the queue's store
	async   bool              // deliveries reach upstreams later, through the queue
	queued  []queuedDelivery  // with async: the deliveries sent, checked once all are
}

// queuedDelivery is a delivery sent through the queue, and its event.
type queuedDelivery struct {
	docDelivery
	id   string
	body []byte
}

// targets are the upstreams that must receive d.
func (d docDelivery) targets() []string {
	if d.to == "" {
		return d.also
	}
	return append([]string{d.to}, d.also...)
}

var readmeRuns atomic.Int64

// id is the event id for a delivery label in this run. dedupe remembers
// ids across config loads, so every run has its own.
func (s *blockSite) id(label string) string { return s.prefix + label }

func (s *blockSite) file(documented string) string {
	for doc, dir := range s.dirs {
		if rest, ok := strings.CutPrefix(documented, doc); ok {
			return dir + rest
		}
	}
	s.t.Fatalf("%s is under none of the entry's dirs", documented)
	return ""
}

var docTokens = regexp.MustCompile(`<free-port>|<secret-file>|<bcrypt>`)

// prepare makes the Caddyfile runnable for run r.
func (bt blockTest) prepare(t *testing.T, cfg string, r blockRun) *blockSite {
	t.Helper()
	s := &blockSite{
		t: t, secret: cmp.Or(bt.secret, readmeSecret), hook: cmp.Or(bt.hook, "/mux"),
		ups: map[string]*upstream{}, down: map[string]string{}, dirs: map[string]string{},
		prefix: fmt.Sprintf("readme-%d-%d-", time.Now().UnixNano(), readmeRuns.Add(1)),
		bodies: map[string][]byte{}, preset: map[string]bool{},
	}
	// Longest first, so that no address is a part of another.
	addrs := slices.Clone(bt.upstreams)
	sort.Slice(addrs, func(i, j int) bool { return len(addrs[i]) > len(addrs[j]) })
	for _, addr := range addrs {
		if !strings.Contains(cfg, addr) {
			t.Fatalf("the Caddyfile names no upstream %s", addr)
		}
		hostPort := ""
		if slices.Contains(r.down, addr) {
			hostPort = fmt.Sprintf("127.0.0.1:%d", freePort(t))
			s.down[addr] = hostPort
		} else {
			s.ups[addr] = newUpstream(t, addr)
			hostPort = s.ups[addr].hostPort()
		}
		cfg = strings.ReplaceAll(cfg, addr, hostPort)
	}
	s.queue = map[string]bool{}
	for _, d := range bt.queueDirs {
		s.queue[d] = true
	}
	s.async = strings.Contains(cfg, "mux_deliver")
	for _, d := range bt.dirs {
		if !strings.Contains(cfg, d) {
			t.Fatalf("the Caddyfile names no %s", d)
		}
		s.dirs[d] = t.TempDir()
		cfg = strings.ReplaceAll(cfg, d, s.dirs[d])
	}
	for doc, content := range r.files {
		path := s.file(doc)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		s.preset[path] = true
	}
	cfg = docTokens.ReplaceAllStringFunc(cfg, func(tok string) string {
		switch tok {
		case "<free-port>":
			return fmt.Sprint(freePort(t))
		case "<secret-file>":
			path := filepath.Join(t.TempDir(), "secret")
			if err := os.WriteFile(path, []byte(s.secret+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			return path
		default:
			return readmeBcrypt
		}
	})
	if !strings.Contains(cfg, "hooks.example.com") {
		t.Fatal("the Caddyfile has no hooks.example.com site")
	}
	s.url = fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cfg = strings.ReplaceAll(cfg, "hooks.example.com", s.url)
	cfg = s.withTestGlobals(cfg)
	checkLocalOnly(t, cfg)
	s.cfg = cfg
	return s
}

// withTestGlobals adds to the Caddyfile's global options (or to a new
// global block) what a test needs and the Caddyfile does not set: no admin
// endpoint, no autosave, no HTTPS, 127.0.0.1 only, storage and a log in
// temporary directories.
func (s *blockSite) withTestGlobals(cfg string) string {
	dir := s.t.TempDir()
	s.logFile = filepath.Join(dir, "caddy.log")
	// The tests' global options, each unless the block sets it itself.
	opts := testGlobals{storage: filepath.Join(dir, "storage"), logFile: s.logFile}.options()
	lines := strings.Split(cfg, "\n")
	start, end := -1, -1
	for i, l := range lines {
		if tl := strings.TrimSpace(l); tl != "" && !strings.HasPrefix(tl, "#") {
			if tl == "{" {
				start = i
			}
			break
		}
	}
	if start >= 0 {
		for i := start + 1; i < len(lines) && end < 0; i++ {
			if lines[i] == "}" {
				end = i
			}
		}
		if end < 0 {
			s.t.Fatal("the global options block never ends")
		}
	}
	global := ""
	if start >= 0 {
		global = strings.Join(lines[start+1:end], "\n")
	}
	var add []string
	for _, o := range opts {
		if !regexp.MustCompile(`(?m)^\s*` + o.name + `(\s|$)`).MatchString(global) {
			add = append(add, "\t"+o.line)
		}
	}
	if start < 0 {
		return "{\n" + strings.Join(add, "\n") + "\n}\n\n" + cfg
	}
	return strings.Join(slices.Concat(lines[:start+1], add, lines[start+1:]), "\n")
}

var (
	hostPortRe  = regexp.MustCompile(`(?:^|[\s/])([A-Za-z][\w.-]*):\d+\b`)
	outsidePath = []string{"/var/", "/srv/", "/mnt/", "/run/", "/etc/", "/home/"}
)

// checkLocalOnly fails when the Caddyfile still names a host or a path
// that the entry did not replace.
func checkLocalOnly(t *testing.T, cfg string) {
	t.Helper()
	for _, m := range hostPortRe.FindAllStringSubmatch(cfg, -1) {
		if m[1] != "localhost" {
			t.Fatalf("the Caddyfile still names %s: list it in the entry's upstreams\n%s", strings.TrimSpace(m[0]), cfg)
		}
	}
	for _, p := range outsidePath {
		if strings.Contains(cfg, p) {
			t.Fatalf("the Caddyfile still names a path under %s: list it in the entry's dirs\n%s", p, cfg)
		}
	}
	if strings.Contains(cfg, "example.com") {
		t.Fatalf("the Caddyfile still names example.com\n%s", cfg)
	}
}

func (bt blockTest) run(t *testing.T, cfg string, r blockRun) {
	// The queue's store goes under Caddy's data directory by default.
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	s := bt.prepare(t, cfg, r)
	if _, err := adaptCaddyfile(s.cfg); err != nil {
		t.Fatalf("adapting: %v\n%s", err, s.cfg)
	}
	if err := loadCaddyfile(s.cfg); err != nil {
		t.Fatalf("loading: %v\n%s", err, s.cfg)
	}
	t.Cleanup(func() {
		if err := stopCaddy(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
		if t.Failed() {
			log, _ := os.ReadFile(s.logFile)
			t.Logf("Caddyfile:\n%s\nCaddy's log (last 4 KiB):\n%s", s.cfg, log[max(0, len(log)-4096):])
		}
	})
	s.forgeries(bt.everyPath)
	for _, d := range r.deliveries {
		s.deliver(d)
	}
	if s.async {
		s.checkQueued()
	}
	if r.check != nil {
		r.check(t, s)
	}
}

// forgedPaths are the paths forgeries are sent to: the webhook path,
// look-alikes, the site's root and another path.
func forgedPaths(hook string) []string {
	return []string{hook, hook + "/", hook + ".json", "/", "/other/path?x=1", "/" + hook, strings.ToUpper(hook)}
}

// docForgery is one forged request.
type docForgery struct {
	what     string
	path     string
	req      *http.Request
	verified bool // the path is one mux_webhook checks: the answer must be 401 (405 for a GET)
}

// forgedRequests builds requests with a wrong secret, without a signature, with
// a genuine signature too old, and GETs, for every path of forgedPaths,
// with bodies that look like events every route wants.
func forgedRequests(t *testing.T, base, hook, secret string, everyPath bool) []docForgery {
	t.Helper()
	types := []string{"video.asset.ready", "video.live_stream.active", "video.upload.created", "robots.job.summarize.completed"}
	var out []docForgery
	for _, p := range forgedPaths(hook) {
		verified := everyPath || p == hook || p == "/"+hook || p == strings.ToUpper(hook)
		for i, typ := range types {
			body := event(typ, fmt.Sprintf("forged-%d", i), `{"id":"a1","passthrough":"vip-1"}`)
			unsigned := signedRequest(t, base+p, secret, body, time.Now())
			unsigned.Header.Del("Mux-Signature")
			out = append(out,
				docForgery{typ + ", wrong secret", p, signedRequest(t, base+p, "not-"+secret, body, time.Now()), verified},
				docForgery{typ + ", no signature", p, unsigned, verified},
				docForgery{typ + ", expired", p, signedRequest(t, base+p, secret, body, time.Now().Add(-time.Hour)), verified},
			)
		}
		get, err := http.NewRequest(http.MethodGet, base+p, nil)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, docForgery{"GET", p, get, verified})
	}
	return out
}

// forgeries sends forgeries and checks that none reached an upstream or
// wrote a file.
func (s *blockSite) forgeries(everyPath bool) {
	t := s.t
	t.Helper()
	for _, f := range forgedRequests(t, s.url, s.hook, s.secret, everyPath) {
		status, _, _ := do(t, f.req)
		want := http.StatusUnauthorized
		if f.req.Method == http.MethodGet {
			want = http.StatusMethodNotAllowed
		}
		if f.verified && status != want {
			t.Errorf("%s to %s: %d, want %d", f.what, f.path, status, want)
		}
	}
	for name, u := range s.ups {
		if got := u.requests(); len(got) > 0 {
			var seen []string
			for _, r := range got {
				if what := r.Method + " " + r.URI; !slices.Contains(seen, what) {
					seen = append(seen, what)
				}
			}
			t.Errorf("%d forged requests reached %s: %s", len(got), name, strings.Join(seen, ", "))
		}
	}
	for doc, dir := range s.dirs {
		if s.queue[doc] {
			continue // the queue's store; what it holds is checked by the run
		}
		_ = filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
			if err == nil && !e.IsDir() && !s.preset[path] {
				t.Errorf("a forged request wrote %s (under %s)", path, doc)
			}
			return nil
		})
	}
}

// deliver sends one genuine event and checks where it went.
func (s *blockSite) deliver(d docDelivery) {
	t := s.t
	t.Helper()
	id := s.id(cmp.Or(d.id, fmt.Sprint(len(s.bodies))))
	body := event(d.typ, id, d.data)
	if prev, ok := s.bodies[id]; ok && d.data == "" {
		body = prev // the same event again
	}
	s.bodies[id] = body
	path := cmp.Or(d.path, s.hook)
	before := map[string]int{}
	for name, u := range s.ups {
		before[name] = len(u.requests())
	}
	status, _, got := do(t, signedRequest(t, s.url+path, cmp.Or(d.secret, s.secret), body, time.Now()))
	what := fmt.Sprintf("%s %s", d.typ, cmp.Or(d.id, "event"))
	if status != d.status {
		t.Errorf("%s: answered %d %.200q, want %d", what, status, got, d.status)
	}
	if d.body != "" && got != d.body {
		t.Errorf("%s: answered %q, want %q", what, got, d.body)
	}
	for _, to := range d.targets() {
		if s.ups[to] == nil {
			t.Fatalf("%s: no upstream %s in this run", what, to)
		}
	}
	if s.async {
		s.queued = append(s.queued, queuedDelivery{d, id, body})
		return
	}
	if len(d.also) > 0 {
		t.Fatalf("%s: also needs a Caddyfile with mux_deliver", what)
	}
	for name, u := range s.ups {
		reqs := u.requests()
		want := before[name]
		if name == d.to {
			want++
		}
		if len(reqs) != want {
			t.Errorf("%s: %s received %d requests, want %d", what, name, len(reqs)-before[name], want-before[name])
			continue
		}
		if name != d.to {
			continue
		}
		last := reqs[len(reqs)-1]
		if last.Method != http.MethodPost || last.URI != path || !bytes.Equal(last.Body, body) {
			t.Errorf("%s: %s received %s %s %.100q, want the event as sent", what, name, last.Method, last.URI, last.Body)
		}
		s.checkReceived(what, name, last, d, id)
	}
	if d.stored != "" {
		file := s.file(strings.ReplaceAll(d.stored, "{id}", id))
		if b, err := os.ReadFile(file); err != nil || !bytes.Equal(b, body) {
			t.Errorf("%s: stored file %s: %v, content %.100q", what, file, err, b)
		}
	}
}

// checkReceived checks the headers an upstream received with delivery d.
func (s *blockSite) checkReceived(what, name string, got received, d docDelivery, id string) {
	t := s.t
	t.Helper()
	for k, v := range d.header {
		if want := strings.ReplaceAll(v, "{id}", id); got.Header.Get(k) != want {
			t.Errorf("%s: %s received %s: %q, want %q", what, name, k, got.Header.Get(k), want)
		}
	}
	if d.signedWith != "" {
		sig := got.Header.Get("Mux-Signature")
		if _, err := Verify(sig, got.Body, [][]byte{[]byte(d.signedWith)}, time.Now(), DefaultTolerance); err != nil {
			t.Errorf("%s: %s received a Mux-Signature that does not verify with the expected secret: %v", what, name, err)
		}
	}
}

// checkQueued waits until every delivery sent through the queue reached
// each of its upstreams, byte for byte, and checks that nothing else
// reached any upstream: no forgery, and no event twice.
func (s *blockSite) checkQueued() {
	t := s.t
	t.Helper()
	want := map[string]int{}
	for _, d := range s.queued {
		for _, to := range d.targets() {
			want[to]++
		}
	}
	find := func(name string, body []byte) (received, bool) {
		for _, r := range s.ups[name].requests() {
			if r.Method == http.MethodPost && bytes.Equal(r.Body, body) {
				return r, true
			}
		}
		return received{}, false
	}
	counts := func() string {
		var out []string
		for name, u := range s.ups {
			out = append(out, fmt.Sprintf("%s got %d, want %d", name, len(u.requests()), want[name]))
		}
		sort.Strings(out)
		return strings.Join(out, "; ")
	}
	testwait.For(t, func() bool {
		for _, d := range s.queued {
			for _, to := range d.targets() {
				if _, ok := find(to, d.body); !ok {
					return false
				}
			}
		}
		return true
	}, counts)
	for _, d := range s.queued {
		for _, to := range d.targets() {
			if got, ok := find(to, d.body); ok {
				s.checkReceived(fmt.Sprintf("%s %s", d.typ, d.id), to, got, d.docDelivery, d.id)
			}
		}
	}
	time.Sleep(300 * time.Millisecond) // nothing else arrives late
	for name, u := range s.ups {
		if got := len(u.requests()); got != want[name] {
			t.Errorf("%s received %d requests, want %d (%s)", name, got, want[name], counts())
		}
	}
}

// adminAddress is the address of the admin endpoint that a block's entry
// adds with admin localhost:<free-port>.
func (s *blockSite) adminAddress() string {
	m := regexp.MustCompile(`(?m)^\s*admin (localhost:\d+)\s*$`).FindStringSubmatch(s.cfg)
	if m == nil {
		s.t.Fatalf("the Caddyfile has no admin localhost:<port> line\n%s", s.cfg)
	}
	return m[1]
}

// newUpstreamAt is newUpstream listening on addr (a port that was down).
func newUpstreamAt(t *testing.T, name, addr string) *upstream {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	u := newUpstream(t, name)
	u.Server.Close()
	srv := httptest.NewUnstartedServer(u.Server.Config.Handler)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return u
}

// TestReadmeQueueNATSSettings: the nats block of the README's list of
// queue settings (which TestReadmeCaddyfiles runs on the embedded server)
// is valid syntax, and each of its options lands in the config.
func TestReadmeQueueNATSSettings(t *testing.T) {
	var block string
	for _, b := range markdownCaddyfiles(t, "README.md") {
		if b.key == "README.md: Every setting #1" {
			block = b.text
		}
	}
	if block == "" {
		t.Fatal("README.md has no block \"Every setting #1\" any more: update this test")
	}
	cfg := block
	for _, p := range [][2]string{
		{"\t\t\tdir <path>\n", ""},
		{"<url>...", "nats://127.0.0.1:4222 nats://127.0.0.1:4223"},
		{"<file>", "/etc/caddy/nats.creds"},
		{"<user>", "caddy"},
		{"<password>", "{env.NATS_PASSWORD}"},
		{"<token>", "{file./run/secrets/nats-token}"},
		{"replicas <n>", "replicas 3"},
		{"destination <name> <url>", "destination app http://127.0.0.1:8080/mux"},
		{"<name>", "MUX_README"},
		{"<size>", "64MiB"},
		{"<duration>|off", "7d"},
		{"<duration>...", "1s 2s"},
		{"<duration>", "10s"},
		{"<n>/<s|m|h>", "100/m"},
		{"<failures> <probe>", "10 30s"},
		{"<n>", "2"},
		{"<secret>", "{env.APP_WEBHOOK_SECRET}"},
		{"<field> <value>", "X-Readme readme-value"},
	} {
		if !strings.Contains(cfg, p[0]) {
			t.Fatalf("the block no longer contains %q: update this test", p[0])
		}
		cfg = strings.ReplaceAll(cfg, p[0], p[1])
	}
	out, err := adaptCaddyfile(cfg + "\nhttp://127.0.0.1:8080 {\n\trespond 204\n}\n")
	if err != nil {
		t.Fatalf("adapting: %v\n%s", err, cfg)
	}
	for _, want := range []string{
		`"urls": [`, `"nats://127.0.0.1:4223"`, `"creds": "/etc/caddy/nats.creds"`, `"user": "caddy"`,
		`"password": "{env.NATS_PASSWORD}"`, `"token": "{file./run/secrets/nats-token}"`, `"replicas": 3`,
		`"stream": "MUX_README"`, `"max_attempts": 2`, `"X-Readme": "readme-value"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the adapted config has no %s:\n%s", want, out)
		}
	}
}

// TestMarkdownCaddyfiles: headings inside code blocks are not headings,
// blocks are counted per heading, and only Caddyfile blocks are taken.
func TestMarkdownCaddyfiles(t *testing.T) {
	got := markdownCaddyfiles(t, "testdata/markdown-caddyfiles.md")
	want := []docBlock{
		{"testdata/markdown-caddyfiles.md: Title #1", 3, "respond 204\n"},
		{"testdata/markdown-caddyfiles.md: Section #1", 14, "a\n"},
		{"testdata/markdown-caddyfiles.md: Section #2", 18, "b\n"},
		{"testdata/markdown-caddyfiles.md: Other `section` #1", 28, "c\n```\nstill c\n"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
}

// TestDocLinks: every relative link of README.md and docs/*.md leads to a
// file that exists, and a #anchor to a heading of that file (GitHub's
// anchors), so that text moved between pages takes its links along.
func TestDocLinks(t *testing.T) {
	broken, err := docLinkErrors(docPages(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range broken {
		t.Errorf("%s:%d: link (%s): %s", b.page, b.line, b.target, b.why)
	}
}

// TestDocLinksFindsBrokenOnes: the checker TestDocLinks uses reports each
// kind of broken link, and only those: a missing file, an anchor its file
// has no heading for (headings in code blocks are none; a repeated
// heading's anchors are -1, -2, ...), and never a link in code.
func TestDocLinksFindsBrokenOnes(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	write("pic.png", "")
	write("b.md", "# B\n\n## Other one\n")
	a := write("a.md", "# A\n\n## Same\n\n## Same\n\n## `mux_deliver` and (its) answers: yes\n\n"+
		"```sh\n# Fenced\n[in a block](nowhere.md)\n```\n\n"+
		"[ok](#same) [ok](#same-1) [ok](#mux_deliver-and-its-answers-yes) [ok](b.md#other-one) ![ok](pic.png) [ok](https://example.com/x.md#y)\n"+
		"[bad](#same-2) [bad](missing.md) [bad](b.md#nope) [bad](#fenced) ![bad](gone.png) [bad](pic.png#x)\n"+
		"`[in code](nowhere.md)` and ``a `[in code](nowhere.md)` b``, a span `that\ngoes on [in code](nowhere.md)`\n")
	broken, err := docLinkErrors([]string{a})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, b := range broken {
		if b.line != 15 {
			t.Errorf("%s reported at line %d, want 15", b.target, b.line)
		}
		got = append(got, b.target)
	}
	want := []string{"#same-2", "missing.md", "b.md#nope", "#fenced", "gone.png", "pic.png#x"}
	if !slices.Equal(got, want) {
		t.Errorf("broken links found: %q\nwant %q", got, want)
	}
}

// docLinkError is a link that leads nowhere.
type docLinkError struct {
	page   string
	line   int
	target string
	why    string
}

// docLinkRe finds the target of a markdown link or image,
// [text](target) or ![alt](target), with an optional "title".
var docLinkRe = regexp.MustCompile(`\]\(([^()\s]*)(?:\s+"[^"]*")?\)`)

// docLinkErrors checks every relative link of the pages.
func docLinkErrors(pages []string) ([]docLinkError, error) {
	anchors := map[string]map[string]bool{} // by page read
	anchorsOf := func(path string) (map[string]bool, error) {
		if a, ok := anchors[path]; ok {
			return a, nil
		}
		a, _, err := readDocPage(path)
		anchors[path] = a
		return a, err
	}
	var broken []docLinkError
	for _, page := range pages {
		_, links, err := readDocPage(page)
		if err != nil {
			return nil, err
		}
		for _, l := range links {
			if strings.Contains(l.target, "://") || strings.HasPrefix(l.target, "mailto:") {
				continue
			}
			path, anchor, _ := strings.Cut(l.target, "#")
			file := page
			if path != "" {
				file = filepath.Join(filepath.Dir(page), path)
				if _, err := os.Stat(file); err != nil {
					broken = append(broken, docLinkError{page, l.line, l.target, fmt.Sprintf("%s does not exist", file)})
					continue
				}
			}
			if anchor == "" {
				continue
			}
			if !strings.HasSuffix(file, ".md") {
				broken = append(broken, docLinkError{page, l.line, l.target, fmt.Sprintf("%s is not a markdown page: it has no headings", file)})
				continue
			}
			a, err := anchorsOf(file)
			if err != nil {
				return nil, err
			}
			if !a[anchor] {
				broken = append(broken, docLinkError{page, l.line, l.target, fmt.Sprintf("%s has no heading whose anchor is #%s", file, anchor)})
			}
		}
	}
	return broken, nil
}

// docLink is a link's target and the line it is on.
type docLink struct {
	line   int
	target string
}

// readDocPage returns the anchors of a markdown page's headings, as GitHub
// makes them, and its links; neither counts inside code blocks or code
// spans.
func readDocPage(path string) (anchors map[string]bool, links []docLink, err error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	lines := strings.Split(string(src), "\n")
	anchors = map[string]bool{}
	counts := map[string]int{}
	fence := ""
	for i, l := range lines {
		if fence != "" {
			c := strings.TrimSpace(l)
			if strings.HasPrefix(c, fence) && strings.Trim(c, fence[:1]) == "" {
				fence = ""
			}
			lines[i] = "" // no link in a code block
			continue
		}
		if m := fenceRe.FindStringSubmatch(l); m != nil {
			fence = m[1]
			lines[i] = ""
			continue
		}
		if h := headingRe.FindStringSubmatch(l); h != nil {
			// GitHub's: a repeated anchor gets the next free -1, -2, ...
			slug := githubSlug(h[1])
			anchor := slug
			for anchors[anchor] {
				counts[slug]++
				anchor = fmt.Sprintf("%s-%d", slug, counts[slug])
			}
			anchors[anchor] = true
		}
	}
	text := blankCodeSpans(strings.Join(lines, "\n"))
	for i, l := range strings.Split(text, "\n") {
		for _, m := range docLinkRe.FindAllStringSubmatch(l, -1) {
			links = append(links, docLink{line: i + 1, target: m[1]})
		}
	}
	return anchors, links, nil
}

// headingLinkRe is a link inside a heading: its anchor has the text only.
var headingLinkRe = regexp.MustCompile(`!?\[([^\]]*)\]\([^)]*\)`)

// githubSlug is the anchor GitHub gives a heading: its text in lower case,
// without the characters other than letters, digits, '-', '_' and spaces,
// and with each space a '-'.
func githubSlug(heading string) string {
	heading = headingLinkRe.ReplaceAllString(heading, "$1")
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// blankCodeSpans replaces every code span of text (a run of backticks to
// the next run of as many, within a paragraph) with spaces, keeping the
// line breaks.
func blankCodeSpans(text string) string {
	b := []byte(text)
	run := func(i int) int { // the length of the run of backticks at i
		n := 0
		for i+n < len(b) && b[i+n] == '`' {
			n++
		}
		return n
	}
	for i := 0; i < len(b); {
		if b[i] != '`' {
			i++
			continue
		}
		n := run(i)
		end := -1
		for j := i + n; j < len(b); {
			if b[j] == '\n' {
				next := b[j+1:]
				if k := bytes.IndexByte(next, '\n'); k >= 0 {
					next = next[:k]
				}
				if len(bytes.TrimSpace(next)) == 0 {
					break // a blank line ends the paragraph, and the span with it
				}
			}
			if b[j] != '`' {
				j++
				continue
			}
			m := run(j)
			if m == n {
				end = j + m
				break
			}
			j += m
		}
		if end < 0 {
			i += n
			continue
		}
		for k := i; k < end; k++ {
			if b[k] != '\n' {
				b[k] = ' '
			}
		}
		i = end
	}
	return string(b)
}

// TestLayoutTableNamesEveryFile: the repository layout table of
// docs/architecture.md, how a newcomer finds things, names every source
// file of the two packages (a row may name several with a glob, like
// queue/lock_*.go) and every test file (directly, or as <file>_test.go
// beside a source file, or by one of the table's globs).
func TestLayoutTableNamesEveryFile(t *testing.T) {
	doc, err := os.ReadFile("docs/architecture.md")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range regexp.MustCompile("`([^`]+)`").FindAllStringSubmatch(string(doc), -1) {
		names = append(names, m[1])
	}
	named := func(file string) bool {
		for _, n := range names {
			if ok, _ := filepath.Match(n, file); ok || n == file {
				return true
			}
		}
		return false
	}
	files, _ := filepath.Glob("*.go")
	queueFiles, _ := filepath.Glob("queue/*.go")
	for _, f := range append(files, queueFiles...) {
		src, isTest := strings.CutSuffix(f, "_test.go")
		if isTest && (named(src+".go") || named("<file>_test.go")) && fileExists(src+".go") {
			continue // beside the file it tests
		}
		if !named(f) {
			t.Errorf("docs/architecture.md's layout table does not name %s", f)
		}
	}
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
