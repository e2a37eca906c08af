//go:build e2e

package muxwebhook

// The harness of the tests against real processes (files e2e_*_test.go,
// built with -tags e2e; ./scripts/test runs them): the xcaddy-built binary
// (MUX_CADDY_BIN), processes started and stopped by PID, their output kept
// in files, and waiting for them to listen.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// waitForHTTP waits up to 10 s until base answers.
func waitForHTTP(t *testing.T, base string, out *syncBuffer) {
	t.Helper()
	testwait.For(t, func() bool {
		resp, err := http.Get(base + "/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	}, out.String)
}

// runCaddyBinary runs `bin run` on the Caddyfile cfg, with its own HOME,
// until the test ends, and returns its output (logged if the test fails).
func runCaddyBinary(t *testing.T, bin, cfg string) *syncBuffer {
	t.Helper()
	dir := t.TempDir()
	out, _ := runCaddyIn(t, bin, cfg, dir, dir, nil)
	return out
}

// runCaddyIn runs `bin run` on cfg, written to dir/Caddyfile, with HOME
// (and XDG directories) at home, as the user cred names if not nil (then in
// dir, since that user may not enter the test's working directory), until
// the test ends, and returns its output and the process (to kill it).
func runCaddyIn(t *testing.T, bin, cfg, dir, home string, cred *syscall.Credential) (*syncBuffer, *exec.Cmd) {
	t.Helper()
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "run", "--config", path, "--adapter", "caddyfile")
	if cred != nil {
		cmd.Dir = dir
	}
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+home, "XDG_CONFIG_HOME="+home)
	// Caddy dies with the test process, even if it is killed or times out
	// before its cleanups run.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: cred}
	out := processOutput(t, "caddy")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})
	return out, cmd
}

// syncBuffer holds a process's output for the test to read (log lines it
// waits for), and writes it to a file of its own as well: see processOutput.
type syncBuffer struct {
	mu   sync.Mutex
	buf  strings.Builder
	file *os.File
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.file != nil {
		_, _ = b.file.Write(p)
	}
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testLogs is the directory the processes' logs are written to:
// $MUX_TEST_LOGS (./scripts/test sets .testlogs), else one under the
// system's temporary directory. Servers' logs go there, not into the
// test output; a failed test names its processes' files and shows their
// last lines.
func testLogs(t *testing.T) string {
	dir := os.Getenv("MUX_TEST_LOGS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "caddy-mux-webhook-test-logs")
	}
	dir = filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// processOutput returns the buffer for one process's output (stdout and
// stderr), also written to <testLogs>/<name>-<n>.log. When the test
// ends, the file is closed; if the test failed, its path and last lines
// are logged.
func processOutput(t *testing.T, name string) *syncBuffer {
	t.Helper()
	dir := testLogs(t)
	var f *os.File
	for n := 1; ; n++ {
		var err error
		f, err = os.OpenFile(filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, n)), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err == nil {
			break
		}
		if !os.IsExist(err) || n > 1000 {
			t.Fatal(err)
		}
	}
	out := &syncBuffer{file: f}
	t.Cleanup(func() {
		out.mu.Lock()
		out.file = nil
		out.mu.Unlock()
		f.Close()
		if t.Failed() {
			t.Logf("%s's output is in %s; its last lines:\n%s", name, f.Name(), tail(out.String(), 2048))
		}
	})
	return out
}

// startProcess starts bin with args, its output in out, killed when the
// test ends (or the test process dies).
func startProcess(t *testing.T, bin string, args ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out := processOutput(t, filepath.Base(bin))
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd, out
}

// waitListening waits until something accepts connections on addr.
func waitListening(t *testing.T, addr string, out *syncBuffer) {
	t.Helper()
	testwait.For(t, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, out.String)
}

// binaryGateway is a Caddy process running one site.
type binaryGateway struct {
	base, admin string
	out         *syncBuffer
}

// startBinaryGateway runs the built binary with the admin API on a free
// port, JSON logs on its output and the given global options and site.
func startBinaryGateway(t *testing.T, storage, global, site string) *binaryGateway {
	t.Helper()
	bin := caddyBinary(t)
	port, adminPort := freePort(t), freePort(t)
	if storage == "" {
		storage = t.TempDir()
	}
	cfg := fmt.Sprintf(`%s

http://127.0.0.1:%d {
%s
}
`, testGlobals{admin: fmt.Sprintf("127.0.0.1:%d", adminPort), storage: storage, extra: global}, port, site)
	g := &binaryGateway{
		base:  fmt.Sprintf("http://127.0.0.1:%d", port),
		admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort),
	}
	g.out = runCaddyBinary(t, bin, cfg)
	waitForHTTP(t, g.admin+"/config", g.out)
	return g
}

// logLines returns the process's JSON log lines with the given message.
func (g *binaryGateway) logLines(msg string) []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(g.out.String()))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// heapAlloc reads the process's live heap from the admin API's expvars.
func (g *binaryGateway) heapAlloc(t *testing.T) uint64 {
	t.Helper()
	var vars struct {
		Memstats struct{ HeapAlloc uint64 } `json:"memstats"`
	}
	if status := getJSON(t, g.admin+"/debug/vars", &vars); status != 200 {
		t.Fatalf("/debug/vars: %d", status)
	}
	return vars.Memstats.HeapAlloc
}

// runCaddyJSON runs `bin run --config <cfg as a .json file>` with its own
// HOME, for at most badConfigWait, and returns its output and exit error.
func runCaddyJSON(t *testing.T, bin, cfg string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), badConfigWait)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "run", "--config", path)
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return string(out), err
}

func dials(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		conn.Close()
	}
	return err == nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// processAlive reports whether pid runs (a zombie does not).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z'
}

// caddyBinary returns the xcaddy-built binary named by MUX_CADDY_BIN. On CI
// the variable must be set: these tests may not be skipped there.
func caddyBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: this test starts the built Caddy (a real process); ./scripts/test runs it")
	}
	bin := os.Getenv("MUX_CADDY_BIN")
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("MUX_CADDY_BIN is not set; CI must run the binary tests (see .ci/run)")
		}
		t.Skip("MUX_CADDY_BIN not set; run ./scripts/test to build Caddy with xcaddy and run these")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

// recordingBackend is a destination that records when each event id
// (Idempotency-Key) arrived, then waits delay and answers 200, or 500 to
// ids that fail says fail.
type recordingBackend struct {
	*httptest.Server
	delay time.Duration
	fail  func(id string) bool

	mu  sync.Mutex
	got map[string][]time.Time
}

func newRecordingBackend(t *testing.T, delay time.Duration, fail func(string) bool) *recordingBackend {
	b := &recordingBackend{delay: delay, fail: fail, got: map[string][]time.Time{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Idempotency-Key")
		if b.fail != nil && b.fail(id) {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		// The backend acts on arrival: an attempt whose gateway dies
		// while it waits has been received.
		b.mu.Lock()
		b.got[id] = append(b.got[id], time.Now())
		b.mu.Unlock()
		select {
		case <-time.After(b.delay):
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(b.Close)
	return b
}

// received returns how many times each id arrived.
func (b *recordingBackend) received() map[string]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]int{}
	for id, ts := range b.got {
		out[id] = len(ts)
	}
	return out
}

// arrivals returns when id arrived, each time.
func (b *recordingBackend) arrivals(id string) []time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]time.Time(nil), b.got[id]...)
}

// postEvent sends one signed event, signed now; err is a failed
// connection (a gateway that is down).
func postEvent(client *http.Client, url string, body []byte) (int, error) {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(string(body)))
	if err != nil {
		return 0, err
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	req.Header.Set("Mux-Signature", "t="+ts+",v1="+macHex(testSecret, ts, string(body)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// waitDelivered waits until backend received every id (bounded by limit)
// and returns how many deliveries were repeats.
func waitDelivered(t *testing.T, b *recordingBackend, limit time.Duration, out *syncBuffer, ids ...string) int {
	t.Helper()
	testwait.Until(t, limit, func() bool {
		got := b.received()
		for _, id := range ids {
			if got[id] == 0 {
				return false
			}
		}
		return true
	}, func() string {
		got := b.received()
		var missing []string
		for _, id := range ids {
			if got[id] == 0 {
				missing = append(missing, id)
			}
		}
		return fmt.Sprintf("never delivered: %v\n%s", missing, tail(out.String(), 4096))
	})
	repeats := 0
	for _, n := range b.received() {
		repeats += max(n-1, 0)
	}
	return repeats
}

func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%d", prefix, i)
	}
	return out
}

// waitQueueOpen waits until the admin API shows the gateway's queue.
func waitQueueOpen(t *testing.T, admin string, out *syncBuffer) {
	t.Helper()
	testwait.Until(t, 30*time.Second, func() bool {
		resp, err := http.Get(admin + "/mux-webhook/queue")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, func() string { return tail(out.String(), 4096) })
}

// queueGatewayConfig is the Caddyfile of a gateway process: its admin
// API on adminPort, JSON logs, global (the mux_webhook global option),
// and one site on port that queues every verified event for destination
// app.
func queueGatewayConfig(adminPort int, global string, port int) string {
	return fmt.Sprintf(`%s

http://127.0.0.1:%d {
	mux_webhook %s
	mux_deliver app
}
`, testGlobals{admin: fmt.Sprintf("127.0.0.1:%d", adminPort), extra: global}, port, testSecret)
}
