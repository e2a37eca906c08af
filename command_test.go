package muxwebhook

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// runCommand runs `caddy mux-webhook <args>` in-process.
func runCommand(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	cmd := newCommand()
	var out bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetIn(strings.NewReader(stdin))
	err := cmd.Execute()
	return out.String(), err
}

func TestEventsCommand(t *testing.T) {
	t.Setenv(SecretEnv, "")
	raw, err := os.ReadFile("catalog/mux-event-types.txt")
	if err != nil {
		t.Fatal(err)
	}
	countPrefix := func(prefix, suffix string) int {
		n := 0
		for _, typ := range strings.Fields(string(raw)) {
			if strings.HasPrefix(typ, prefix) && strings.HasSuffix(typ, suffix) {
				n++
			}
		}
		return n
	}
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"events"}, 117},
		{[]string{"events", "video.live_stream.*"}, countPrefix("video.live_stream.", "")},
		{[]string{"events", "*.errored"}, countPrefix("", ".errored")},
		{[]string{"events", "video.asset.ready"}, 1},
	}
	for _, tt := range tests {
		out, err := runCommand(t, "", tt.args...)
		if err != nil {
			t.Fatalf("%v: %v", tt.args, err)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if !strings.HasPrefix(lines[0], "TYPE") || len(lines)-1 != tt.want {
			t.Errorf("%v: %d rows (header %q), want %d", tt.args, len(lines)-1, lines[0], tt.want)
		}
	}

	out, err := runCommand(t, "", "events", "--json", "video.upload.*")
	if err != nil {
		t.Fatal(err)
	}
	var list []EventType
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	if len(list) != countPrefix("video.upload.", "") || list[0].Object != "upload" || list[0].Description == "" {
		t.Errorf("--json: %+v", list)
	}

	_, err = runCommand(t, "", "events", "vidoe.asset.*")
	if err == nil || !strings.Contains(err.Error(), "closest known: video.asset.*") {
		t.Errorf("typo: err = %v", err)
	}
	if _, err := runCommand(t, "", "events", "a b"); err == nil {
		t.Error("pattern with a space accepted")
	}
}

func TestSignCommand(t *testing.T) {
	t.Setenv(SecretEnv, "env-secret")
	body := `{"type":"video.asset.ready"}`
	out, err := runCommand(t, body, "sign", "--timestamp", "1700000000")
	if err != nil {
		t.Fatal(err)
	}
	want := "t=1700000000,v1=" + macHex("env-secret", "1700000000", body)
	if strings.TrimSpace(out) != want {
		t.Errorf("sign (env secret, stdin) = %q, want %q", out, want)
	}

	file := filepath.Join(t.TempDir(), "body.json")
	if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = runCommand(t, "", "sign", "--secret", "flag-secret", "--timestamp", "42", file)
	if err != nil {
		t.Fatal(err)
	}
	if want := "t=42,v1=" + macHex("flag-secret", "42", body); strings.TrimSpace(out) != want {
		t.Errorf("sign (flag secret, file) = %q, want %q", out, want)
	}

	t.Setenv(SecretEnv, "")
	if _, err := runCommand(t, body, "sign"); err == nil || !strings.Contains(err.Error(), "MUX_WEBHOOK_SECRET") {
		t.Errorf("no secret: err = %v", err)
	}
	if _, err := runCommand(t, body, "sign", "--secret", "s", "--timestamp", "soon"); err == nil {
		t.Error("bad --timestamp accepted")
	}
}

func TestVerifyCommand(t *testing.T) {
	t.Setenv(SecretEnv, "")
	body := string(event("video.asset.ready", "v1", ""))
	now := time.Now().Unix()
	header := func(secret string, ts int64, b string) string {
		s := strconv.FormatInt(ts, 10)
		return "t=" + s + ",v1=" + macHex(secret, s, b)
	}
	tests := []struct {
		name, header, body, want string
		ok                       bool
	}{
		{"valid", header("k", now, body), body, "valid: video.asset.ready event v1", true},
		{"mismatch", header("other", now, body), body, "mismatch:", false},
		{"tampered", header("k", now, body), body + " ", "mismatch:", false},
		{"expired", header("k", now-600, body), body, "expired:", false},
		{"future", header("k", now+600, body), body, "future:", false},
		{"malformed", "t=12x,v1=00", body, "malformed:", false},
		{"no v1", "t=1", body, "no_v1:", false},
		{"missing", "", body, "missing:", false},
		{"bad json", header("k", now, "nope"), "nope", "bad_json:", false},
		{"no type", header("k", now, `{"id":1}`), `{"id":1}`, "no_type:", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := runCommand(t, tt.body, "verify", "--secret", "k", "--header", tt.header)
			if tt.ok {
				if err != nil || !strings.Contains(out, tt.want) {
					t.Fatalf("out %q err %v, want %q", out, err, tt.want)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("err = %v, want one line starting %q", err, tt.want)
			}
		})
	}
	out, err := runCommand(t, body, "verify", "--secret", "k", "--tolerance", "15m", "--header", header("k", now-600, body))
	if err != nil || !strings.Contains(out, "valid:") {
		t.Errorf("--tolerance 15m: %q %v", out, err)
	}
	if _, err := runCommand(t, body, "verify", "--secret", "k"); err == nil || !strings.Contains(err.Error(), "--header") {
		t.Errorf("without --header: %v", err)
	}
}

func TestSendCommand(t *testing.T) {
	t.Setenv(SecretEnv, testSecret)
	assets, live := newUpstream(t, "assets"), newUpstream(t, "live")
	g := startGateway(t, routingSite(assets, live))

	out, err := runCommand(t, "", "send", "--to", g.url+"/mux", "--type", "video.asset.ready", "--passthrough", "p-1")
	if err != nil {
		t.Fatalf("send: %v\n%s", err, out)
	}
	if !strings.Contains(out, "200 OK assets got video.asset.ready") {
		t.Errorf("send printed %q", out)
	}
	got := assets.requests()
	if len(got) != 1 {
		t.Fatalf("assets got %d requests", len(got))
	}
	ev, err := DecodeEvent(got[0].Body)
	if err != nil {
		t.Fatal(err)
	}
	if pass, _ := ev.DataValue("passthrough"); pass != "p-1" || ev.ObjectType != "asset" || len(ev.ID) != 36 {
		t.Errorf("sent event: %+v passthrough %q", ev, pass)
	}

	// --count with a fixed --id: the same event id three times.
	out, err = runCommand(t, "", "send", "--to", g.url+"/mux", "--type", "video.live_stream.active", "--count", "3", "--id", "same-id")
	if err != nil {
		t.Fatalf("send --count: %v", err)
	}
	if strings.Count(out, "video.live_stream.active same-id -> 200 OK") != 3 || len(live.requests()) != 3 {
		t.Errorf("send --count 3 printed %q; live got %d", out, len(live.requests()))
	}

	// --data replaces the sample data.
	data := filepath.Join(t.TempDir(), "data.json")
	if err := os.WriteFile(data, []byte(`{"custom":[1,2]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := runCommand(t, "", "send", "--to", g.url+"/mux", "--type", "video.asset.created", "--data", data); err != nil {
		t.Fatal(err)
	}
	last := assets.requests()[len(assets.requests())-1]
	if ev, _ := DecodeEvent(last.Body); ev == nil || string(ev.Data) != `{"custom":[1,2]}` {
		t.Errorf("--data not used: %s", last.Body)
	}

	// A wrong secret gets 401: printed, and a non-zero exit.
	out, err = runCommand(t, "", "send", "--to", g.url+"/mux", "--type", "video.asset.ready", "--secret", "wrong")
	if err == nil || !strings.Contains(out, "401 Unauthorized") {
		t.Errorf("wrong secret: out %q err %v", out, err)
	}
	for _, args := range [][]string{
		{"send", "--type", "video.asset.ready"},
		{"send", "--to", g.url, "--type", "video.asset.ready", "--count", "0"},
		{"send", "--to", "localhost:1", "--type", "video.asset.ready"},
	} {
		if _, err := runCommand(t, "", args...); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
}

// TestSamplePayloadShapes checks every catalog type's sample against the
// envelope Mux's SDK types describe.
func TestSamplePayloadShapes(t *testing.T) {
	for _, e := range Catalog() {
		body, err := SampleEvent(e.Type, SampleOptions{})
		if err != nil {
			t.Fatalf("%s: %v", e.Type, err)
		}
		var env struct {
			Type      *string `json:"type"`
			ID        *string `json:"id"`
			CreatedAt *string `json:"created_at"`
			Object    *struct {
				Type string `json:"type"`
				ID   string `json:"id"`
			} `json:"object"`
			Environment *struct {
				Name string `json:"name"`
				ID   string `json:"id"`
			} `json:"environment"`
			Data     map[string]any `json:"data"`
			Attempts []any          `json:"attempts"`
		}
		if err := json.Unmarshal(body, &env); err != nil {
			t.Fatalf("%s: %v", e.Type, err)
		}
		switch {
		case env.Type == nil || *env.Type != e.Type,
			env.ID == nil || len(*env.ID) != 36,
			env.CreatedAt == nil,
			env.Object == nil || env.Object.Type == "" || env.Object.ID == "",
			env.Environment == nil || env.Environment.ID == "" || env.Environment.Name == "",
			env.Data == nil,
			env.Attempts == nil:
			t.Errorf("%s: sample lacks part of the envelope: %s", e.Type, body)
		}
		if _, err := time.Parse(time.RFC3339Nano, *env.CreatedAt); err != nil {
			t.Errorf("%s: created_at %q: %v", e.Type, *env.CreatedAt, err)
		}
		if ev, err := DecodeEvent(body); err != nil || ev.Type != e.Type {
			t.Errorf("%s: DecodeEvent: %v", e.Type, err)
		}
	}
	a, _ := SampleEvent("video.asset.ready", SampleOptions{})
	b, _ := SampleEvent("video.asset.ready", SampleOptions{})
	if bytes.Equal(a, b) {
		t.Error("two samples are identical; ids should be fresh")
	}
	if _, err := SampleEvent("x", SampleOptions{Data: []byte("{")}); err == nil {
		t.Error("invalid --data accepted")
	}
}

// TestCommandsDoNotFollowRedirects: send and replay never carry a signed
// event to where a redirect points; a 3xx is a failure, and says so.
func TestCommandsDoNotFollowRedirects(t *testing.T) {
	t.Setenv(SecretEnv, testSecret)
	elsewhere := newUpstream(t, "elsewhere")
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Location", "http://user:hunter3@"+elsewhere.hostPort()+"/mux")
		w.WriteHeader(http.StatusTemporaryRedirect)
	}))
	t.Cleanup(redirector.Close)

	out, err := runCommand(t, "", "send", "--to", redirector.URL+"/mux", "--type", "video.asset.ready")
	if err == nil || !strings.Contains(out, "307 Temporary Redirect") || !strings.Contains(out, "not followed") {
		t.Errorf("send: err %v, printed %q", err, out)
	}
	if strings.Contains(out, "hunter3") {
		t.Errorf("send printed the Location's password: %q", out)
	}

	spool := t.TempDir()
	path := filepath.Join(spool, "r-1.json")
	storeGenuine(t, path, testSecret, event("video.asset.ready", "r-1", ""))
	out, err = runCommand(t, "", "replay", "--from", spool, "--to", redirector.URL+"/mux")
	if err == nil || !strings.Contains(err.Error(), "stopped at r-1.json") || !strings.Contains(out, "not followed") {
		t.Errorf("replay: err %v, printed %q", err, out)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("a redirected replay moved the file: %v", err)
	}
	if n := len(elsewhere.requests()); n != 0 {
		t.Errorf("the redirect target got %d signed events", n)
	}
}

// TestCommandsRedactURLPassword: no error or output shows the password of
// a --to URL.
func TestCommandsRedactURLPassword(t *testing.T) {
	t.Setenv(SecretEnv, testSecret)
	closed := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	spool := t.TempDir()
	storeGenuine(t, filepath.Join(spool, "p-1.json"), testSecret, event("video.asset.ready", "p-1", ""))
	for _, args := range [][]string{
		{"send", "--type", "video.asset.ready", "--to", "http://user:hunter2@" + closed + "/mux"},
		{"send", "--type", "video.asset.ready", "--to", "ftp://user:hunter2@" + closed + "/mux"},
		{"send", "--type", "video.asset.ready", "--to", "http://user:hunter2@[::1/mux"},
		{"send", "--type", "video.asset.ready", "--to", "http://user:hunter2@" + closed + "/%zz"},
		{"replay", "--from", spool, "--to", "http://user:hunter2@" + closed + "/mux"},
		{"replay", "--from", spool, "--to", "https://user:hunter2@/mux"},
	} {
		out, err := runCommand(t, "", args...)
		if err == nil {
			t.Errorf("%v: no error", args)
			continue
		}
		if strings.Contains(err.Error()+out, "hunter2") {
			t.Errorf("%v: the password is shown:\n%v\n%s", args, err, out)
		}
	}
}

// TestSendEscapesResponseControls: a response body cannot drive the
// terminal: control characters are printed as escapes.
func TestSendEscapesResponseControls(t *testing.T) {
	t.Setenv(SecretEnv, testSecret)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok \x1b[2J\x1b]0;pwned\x07 \u009b31m \x7f \xff \u202e é")
	}))
	t.Cleanup(srv.Close)
	out, err := runCommand(t, "", "send", "--to", srv.URL, "--type", "video.asset.ready")
	if err != nil {
		t.Fatalf("send: %v\n%s", err, out)
	}
	for _, raw := range []string{"\x1b", "\x07", "\u009b", "\x7f", "\xff", "\u202e"} {
		if strings.Contains(out, raw) {
			t.Errorf("printed a raw %q: %q", raw, out)
		}
	}
	if want := `ok \x1b[2J\x1b]0;pwned\a \u009b31m \x7f \xff \u202e é`; !strings.Contains(out, want) {
		t.Errorf("printed %q, want it to contain %q", out, want)
	}
}

func TestPrintable(t *testing.T) {
	tests := map[string]string{
		"plain text, é ü 日本": "plain text, é ü 日本",
		"tab\there\r\n":      `tab\there\r\n`,
		"\x00\x1b\x7f":       `\x00\x1b\x7f`,
		"\u0085\u009f":       `\u0085\u009f`,
		"bad\xffutf8":        `bad\xffutf8`,
		"\ufffd":             "\ufffd",
	}
	for in, want := range tests {
		if got := printable(in); got != want {
			t.Errorf("printable(%q) = %q, want %q", in, got, want)
		}
	}
}
