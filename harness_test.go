package muxwebhook

// Test harness: a real Caddy, loaded in-process from a Caddyfile, bound to
// 127.0.0.1, with real HTTP upstreams that record what reaches them.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// testGlobals is the one builder of a test Caddy's global options: bound
// to 127.0.0.1, no automatic HTTPS, nothing persisted, JSON logs. Every
// test's Caddy, in-process or a process, starts from it; the README's
// Caddyfiles get the same options merged into their own (readme_test.go).
type testGlobals struct {
	admin    string // the admin API's address; "" turns it off
	storage  string // a file_system storage directory; "" = Caddy's default
	logFile  string // JSON logs to this file; "" = to stderr (a process's output file)
	logLevel string // "" = INFO
	extra    string // more global options, tab-indented lines, as they are
}

// options are the global options, by name, without the braces.
func (o testGlobals) options() []testOption {
	admin := o.admin
	if admin == "" {
		admin = "off"
	}
	opts := []testOption{
		{"admin", "admin " + admin},
		{"persist_config", "persist_config off"},
		{"auto_https", "auto_https off"},
		{"default_bind", "default_bind 127.0.0.1"},
	}
	if o.storage != "" {
		opts = append(opts, testOption{"storage", "storage file_system " + o.storage})
	}
	log := "log {\n"
	if o.logFile != "" {
		log += "\t\toutput file " + o.logFile + "\n"
	}
	log += "\t\tformat json\n"
	if o.logLevel != "" {
		log += "\t\tlevel " + o.logLevel + "\n"
	}
	return append(opts, testOption{"log", log + "\t}"})
}

// testOption is one global option: its name and its text.
type testOption struct{ name, line string }

// String is the global options block.
func (o testGlobals) String() string {
	var b strings.Builder
	b.WriteString("{\n")
	for _, opt := range o.options() {
		b.WriteString("\t" + opt.line + "\n")
	}
	if o.extra != "" {
		b.WriteString(strings.TrimRight(o.extra, "\n") + "\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// gateway is a running in-process Caddy.
type gateway struct {
	t       *testing.T
	url     string // http://127.0.0.1:port
	admin   string // http://localhost:port of the admin API, if enabled
	logFile string
}

// givenPorts are the ports freePort returned: the kernel may hand a port
// just closed out again, and a test that asks for several before it
// binds any (a cluster's nine) must get nine distinct ones.
var givenPorts = struct {
	sync.Mutex
	m map[int]bool
}{m: map[int]bool{}}

// freePort returns a port on 127.0.0.1 that was free a moment ago, and
// that it never returned before in this process.
func freePort(t *testing.T) int {
	t.Helper()
	givenPorts.Lock()
	defer givenPorts.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !givenPorts.m[port] {
			givenPorts.m[port] = true
			return port
		}
	}
	t.Fatal("no port on 127.0.0.1 that was not handed out before")
	return 0
}

// startGateway loads site (the body of one site block) into Caddy,
// listening on 127.0.0.1 only, with JSON debug logs written to a file.
// Extra sites may be appended with extraSites. Caddy is stopped when the
// test ends.
func startGateway(t *testing.T, site string, extraSites ...string) *gateway {
	t.Helper()
	cfg, g := gatewayConfig(t, site, extraSites...)
	return g.load(cfg)
}

// startGatewayWithAdmin is startGateway with the admin API on a free
// localhost port and extra global options.
func startGatewayWithAdmin(t *testing.T, global, site string) *gateway {
	t.Helper()
	port := freePort(t)
	cfg, g := gatewayConfigWith(t, fmt.Sprintf("localhost:%d", port), global, site)
	g.admin = fmt.Sprintf("http://localhost:%d", port)
	return g.load(cfg)
}

func (g *gateway) load(cfg string) *gateway {
	t := g.t
	t.Helper()
	if err := loadCaddyfile(cfg); err != nil {
		t.Fatalf("loading Caddy config: %v\n%s", err, cfg)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})
	return g
}

func gatewayConfig(t *testing.T, site string, extraSites ...string) (string, *gateway) {
	t.Helper()
	return gatewayConfigWith(t, "off", "", site, extraSites...)
}

func gatewayConfigWith(t *testing.T, admin, global, site string, extraSites ...string) (string, *gateway) {
	t.Helper()
	dir := t.TempDir()
	port := freePort(t)
	g := &gateway{t: t, url: fmt.Sprintf("http://127.0.0.1:%d", port), logFile: filepath.Join(dir, "caddy.log")}
	if admin == "off" {
		admin = ""
	}
	globals := testGlobals{admin: admin, storage: filepath.Join(dir, "storage"), logFile: g.logFile, logLevel: "DEBUG", extra: global}
	cfg := fmt.Sprintf(`%s
http://127.0.0.1:%d {
%s
}
%s
`, globals, port, site, strings.Join(extraSites, "\n"))
	return cfg, g
}

func loadCaddyfile(cfg string) error {
	js, err := adaptCaddyfile(cfg)
	if err != nil {
		return err
	}
	return caddy.Load([]byte(js), true)
}

// logLines returns the JSON log entries written so far.
func (g *gateway) logLines() []map[string]any {
	g.t.Helper()
	f, err := os.Open(g.logFile)
	if err != nil {
		g.t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 4<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// rawLog returns the whole log file.
func (g *gateway) rawLog() string {
	b, err := os.ReadFile(g.logFile)
	if err != nil {
		g.t.Fatal(err)
	}
	return string(b)
}

// received is one request as an upstream saw it.
type received struct {
	Method           string
	URI              string
	Header           http.Header
	Body             []byte
	ContentLength    int64
	TransferEncoding []string
}

// upstream is a real HTTP server on 127.0.0.1 that records requests.
type upstream struct {
	*httptest.Server
	name string
	mu   sync.Mutex
	reqs []received
}

func newUpstream(t *testing.T, name string) *upstream {
	t.Helper()
	u := &upstream{name: name}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.reqs = append(u.reqs, received{r.Method, r.RequestURI, r.Header.Clone(), body, r.ContentLength, r.TransferEncoding})
		u.mu.Unlock()
		w.Header().Set("X-Upstream", name)
		fmt.Fprintf(w, "%s got %s", name, r.Header.Get("X-Mux-Event-Type"))
	}))
	t.Cleanup(u.Close)
	return u
}

// hostPort is the upstream's address in reverse_proxy's host:port form.
func (u *upstream) hostPort() string { return strings.TrimPrefix(u.URL, "http://") }

func (u *upstream) requests() []received {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]received(nil), u.reqs...)
}

// signedRequest builds a POST with a Mux-Signature computed in the test.
func signedRequest(t *testing.T, url, secret string, body []byte, at time.Time) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	ts := strconv.FormatInt(at.Unix(), 10)
	req.Header.Set("Mux-Signature", "t="+ts+",v1="+macHex(secret, ts, string(body)))
	req.Header.Set("Content-Type", "application/json")
	return req
}

// do sends req and returns the status, headers and body of the response.
func do(t *testing.T, req *http.Request) (int, http.Header, string) {
	t.Helper()
	// A connection of its own: a pooled one may lead to a server an
	// earlier test stopped on the same port.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

// doAfterReload is do for the first request after a config reload: a
// connection the outgoing server accepted as it shut down is closed
// before the request is read (EOF), so a failed connection is tried
// again, at most 3 times.
func doAfterReload(t *testing.T, newReq func() *http.Request) (int, http.Header, string) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := 0; ; i++ {
		resp, err := client.Do(newReq())
		if err != nil {
			// The outgoing server closed the connection unread: EOF,
			// or a reset when the request was already on the wire.
			if i < 2 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			t.Fatalf("after a reload: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(b)
	}
}

// event returns a realistic Mux event body.
func event(typ, id string, data string) []byte {
	objType := "asset"
	switch {
	case strings.HasPrefix(typ, "video.live_stream."):
		objType = "live"
	case strings.HasPrefix(typ, "video.upload."):
		objType = "upload"
	}
	if data == "" {
		data = `{"id":"obj-` + id + `","status":"ready"}`
	}
	return []byte(fmt.Sprintf(`{"type":%q,"request_id":null,"object":{"type":%q,"id":"obj-%s"},"id":%q,"environment":{"name":"Production","id":"env-1"},"data":%s,"created_at":"2024-05-01T10:00:00.000000Z","attempts":[],"accessor_source":null,"accessor":null}`,
		typ, objType, id, id, data))
}

func stopCaddy() error { return caddy.Stop() }

const demoSecret = "dev-only-secret-DO-NOT-USE-IN-PRODUCTION"

// sendQueued sends one event to g and waits until app has had `deliveries`
// deliveries in all.
func sendQueued(t *testing.T, g *gateway, app *upstream, id string, deliveries int) {
	t.Helper()
	status, _, _ := doAfterReload(t, func() *http.Request {
		return signedRequest(t, g.url, testSecret, event("video.asset.ready", id, ""), time.Now())
	})
	if status != http.StatusAccepted {
		t.Fatalf("%s: %d, want 202", id, status)
	}
	testwait.For(t, func() bool { return len(app.requests()) == deliveries },
		func() string { return fmt.Sprintf("%d deliveries, want %d", len(app.requests()), deliveries) })
}

// observedHandler is a provisioned handler whose log lines the test reads.
func observedHandler(t *testing.T, h *Handler) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	h = provisionedHandler(t, h)
	core, logs := observer.New(zapcore.DebugLevel)
	h.logger = zap.New(core)
	if h.dedupe != nil {
		h.dedupe.logger = h.logger
	}
	return h, logs
}

// serveSigned runs body, signed with secret, through h with next.
func serveSigned(h *Handler, secret string, body []byte, next caddyhttp.Handler) (int, error) {
	w := newRecorder()
	err := h.ServeHTTP(w, benchRequest(body, Sign([]byte(secret), body, time.Now())), next)
	if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok {
		return he.StatusCode, err
	}
	return w.Code, err
}

func lastLine(logs *observer.ObservedLogs) map[string]any {
	all := logs.FilterMessage("mux webhook").All()
	if len(all) == 0 {
		return nil
	}
	return all[len(all)-1].ContextMap()
}

const testSecret = "whsec-test-0123456789abcdef"
