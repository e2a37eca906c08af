package muxwebhook

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"go.uber.org/zap"
)

// TestConsoleRefusesCrossSiteChanges: the refusal matrix of the console's
// changes on a site route. Reads always pass; a change passes only with
// the console's header and, when the browser names them, an Origin of this
// host and Sec-Fetch-Site: same-origin.
func TestConsoleRefusesCrossSiteChanges(t *testing.T) {
	const host = "hooks.example.com"
	type hdr = map[string]string
	cases := []struct {
		name    string
		method  string
		host    string
		headers hdr
		refused string // part of the refusal, "" when accepted
	}{
		{"a read needs nothing", "GET", host, hdr{}, ""},
		{"a read from another site is still only a read", "GET", host, hdr{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, ""},
		{"HEAD", "HEAD", host, hdr{"Sec-Fetch-Site": "cross-site"}, ""},
		{"the console's page", "POST", host, hdr{ConsoleHeader: "1", "Origin": "https://" + host, "Sec-Fetch-Site": "same-origin"}, ""},
		{"the console's page, DELETE", "DELETE", host, hdr{ConsoleHeader: "1", "Origin": "https://" + host, "Sec-Fetch-Site": "same-origin"}, ""},
		{"curl with the header", "POST", host, hdr{ConsoleHeader: "1"}, ""},
		{"explicit default port in Host", "POST", host + ":443", hdr{ConsoleHeader: "1", "Origin": "https://" + host}, ""},
		{"behind a TLS proxy", "POST", host, hdr{ConsoleHeader: "1", "Origin": "https://" + host}, ""},
		{"a port of its own", "POST", "127.0.0.1:8080", hdr{ConsoleHeader: "1", "Origin": "http://127.0.0.1:8080"}, ""},
		{"host names are case-insensitive", "POST", "Hooks.Example.com", hdr{ConsoleHeader: "1", "Origin": "https://" + host}, ""},

		{"a form POST (no header)", "POST", host, hdr{"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://" + host, "Sec-Fetch-Site": "same-origin"}, ConsoleHeader},
		{"a form POST from another site", "POST", host, hdr{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, "cross-site"},
		{"curl without the header", "POST", host, hdr{}, ConsoleHeader},
		{"the header with another value", "POST", host, hdr{ConsoleHeader: "yes"}, ConsoleHeader},
		{"DELETE without the header", "DELETE", host, hdr{}, ConsoleHeader},
		{"PUT without the header", "PUT", host, hdr{}, ConsoleHeader},
		{"cross-site Origin with the header", "POST", host, hdr{ConsoleHeader: "1", "Origin": "https://evil.example"}, "evil.example"},
		{"an Origin on another port", "POST", "127.0.0.1:8080", hdr{ConsoleHeader: "1", "Origin": "http://127.0.0.1:9999"}, "Origin"},
		{"an Origin of another scheme's port", "POST", host + ":443", hdr{ConsoleHeader: "1", "Origin": "http://" + host}, "Origin"},
		{"a subdomain is another site", "POST", host, hdr{ConsoleHeader: "1", "Origin": "https://evil." + host}, "Origin"},
		{"an opaque origin", "POST", host, hdr{ConsoleHeader: "1", "Origin": "null"}, "Origin"},
		{"an empty Origin", "POST", host, hdr{ConsoleHeader: "1", "Origin": ""}, "Origin"},
		{"Sec-Fetch-Site cross-site", "POST", host, hdr{ConsoleHeader: "1", "Sec-Fetch-Site": "cross-site"}, "cross-site"},
		{"Sec-Fetch-Site same-site", "POST", host, hdr{ConsoleHeader: "1", "Origin": "https://" + host, "Sec-Fetch-Site": "same-site"}, "same-site"},
		{"Sec-Fetch-Site none (typed in the address bar)", "POST", host, hdr{ConsoleHeader: "1", "Sec-Fetch-Site": "none"}, "none"},
	}
	ui := &Console{logger: zap.NewNop()}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest(c.method, "/queue/redeliver", strings.NewReader(`{"destination":"app","all":true}`))
			r.Host = c.host
			r.Header.Set("Content-Type", "application/json")
			for k, v := range c.headers {
				r.Header[http.CanonicalHeaderKey(k)] = []string{v}
			}
			err := consoleChange(r)
			if c.refused == "" && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if c.refused != "" && (err == nil || !strings.Contains(err.Error(), c.refused)) {
				t.Fatalf("got %v, want a refusal that mentions %q", err, c.refused)
			}
			// Through the handler: a refusal is a 403 that says why; an
			// accepted change reaches the queue (here: none configured).
			w := httptest.NewRecorder()
			if err := ui.ServeHTTP(w, r, nil); err != nil {
				t.Fatal(err)
			}
			var body struct{ Error string }
			_ = json.Unmarshal(w.Body.Bytes(), &body)
			switch {
			case c.refused != "" && (w.Code != http.StatusForbidden || !strings.HasPrefix(body.Error, "refused: ")):
				t.Errorf("handler: %d %s, want 403 with the reason", w.Code, w.Body)
			case c.refused == "" && (w.Code != http.StatusNotFound || !strings.Contains(body.Error, "no delivery queue")):
				t.Errorf("handler: %d %s, want the queue's own answer", w.Code, w.Body)
			}
		})
	}
}

// TestConsoleQueueOnSiteRoute: mux_webhook_ui serves the delivery queue
// to the console on a site route: reads as they are, and changes only
// from the console's own page. A form post from another site leaves the
// dead letter where it is; the console's request redelivers it.
func TestConsoleQueueOnSiteRoute(t *testing.T) {
	app, failing, got := failingBackend(t)
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(filepath.Join(t.TempDir(), "js"),
		fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 20ms\n\t\t\tmax_attempts 1\n\t\t}", app.URL),
	), fmt.Sprintf(`
	mux_webhook /mux %s
	handle /mux {
		mux_deliver app
	}
	handle_path /mux-webhook/* {
		mux_webhook_ui
	}`, testSecret))
	g.load(cfg)
	console := g.url + "/mux-webhook"
	if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, event("video.asset.errored", "ui-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("event: %d", status)
	}
	var dead []struct {
		ID        string `json:"id"`
		LastError string `json:"last_error"`
	}
	testwait.For(t, func() bool {
		dead = nil
		getJSON(t, console+"/queue/dead?destination=app", &dead)
		return len(dead) == 1
	}, func() string { return fmt.Sprintf("dead letters on the site route: %+v", dead) })
	if dead[0].ID != "ui-1" || dead[0].LastError != "app answered 500" {
		t.Errorf("dead letter: %+v", dead[0])
	}
	var status []QueueStatus
	if code := getJSON(t, console+"/queue", &status); code != 200 || len(status) != 1 || status[0].Dead != 1 {
		t.Errorf("queue on the site route: %d %+v", code, status)
	}
	failing.Store(false)

	post := func(headers map[string]string, contentType, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, console+"/queue/redeliver", strings.NewReader(body))
		req.Header.Set("Content-Type", contentType)
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		code, _, text := do(t, req)
		return code, text
	}
	for _, c := range []struct {
		name    string
		headers map[string]string
		ct      string
		body    string
	}{
		{"a cross-site form", map[string]string{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, "text/plain", `{"destination":"app","all":true,"x":"="}`},
		{"a same-site form", map[string]string{"Origin": g.url, "Sec-Fetch-Site": "same-origin"}, "application/x-www-form-urlencoded", "destination=app&all=true"},
		{"a foreign Origin with the header", map[string]string{"Origin": "https://evil.example", ConsoleHeader: "1"}, "application/json", `{"destination":"app","all":true}`},
	} {
		if code, text := post(c.headers, c.ct, c.body); code != http.StatusForbidden || !strings.Contains(text, `"error":"refused: `) {
			t.Errorf("%s: %d %s, want 403 and why", c.name, code, text)
		}
	}
	dead = nil
	if getJSON(t, console+"/queue/dead?destination=app", &dead); len(dead) != 1 {
		t.Fatalf("after refused requests: %+v, want the dead letter still there", dead)
	}
	// A DELETE from elsewhere cannot purge either.
	req, _ := http.NewRequest(http.MethodDelete, console+"/queue/dead?destination=app", nil)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Origin", "https://evil.example")
	if code, _, _ := do(t, req); code != http.StatusForbidden {
		t.Errorf("a cross-site purge: %d, want 403", code)
	}

	// The console's page: same origin, with its header.
	code, text := post(map[string]string{"Origin": g.url, "Sec-Fetch-Site": "same-origin", ConsoleHeader: "1"}, "application/json", `{"destination":"app","ids":["ui-1"]}`)
	if code != http.StatusOK || !strings.Contains(text, `"redelivered":1`) {
		t.Fatalf("the console's redeliver: %d %s", code, text)
	}
	testwait.For(t, func() bool { return got.Load() == 1 }, func() string { return "the redelivered event never arrived" })
	// Errors say what is wrong, as JSON.
	if code, text := post(map[string]string{ConsoleHeader: "1"}, "application/json", `{"destination":"nope","all":true}`); code != http.StatusBadRequest || !strings.Contains(text, `unknown destination \"nope\"`) {
		t.Errorf("unknown destination: %d %s", code, text)
	}
}

// TestConsoleWithoutSlash: /mux-webhook, without its slash, leads to the
// console. On Caddy's admin API its ServeMux redirects the pattern
// "/mux-webhook/"'s root; on a site route mounted with handle_path
// /mux-webhook* (as examples/Caddyfile does: handle_path /mux-webhook/*
// never sees /mux-webhook, which a catch-all answered 404),
// mux_webhook_ui redirects to the slash form, whose relative requests
// (events, queue) resolve under /mux-webhook/, keeping the query; the
// slash form, and the endpoints, are served as they were.
func TestConsoleWithoutSlash(t *testing.T) {
	g := startGatewayWithAdmin(t, liveLogGlobal, fmt.Sprintf(`
	mux_webhook /mux %s
	handle_path /mux-webhook* {
		mux_webhook_ui
	}
	handle {
		respond 404
	}`, testSecret))
	client := &http.Client{
		Timeout:       10 * time.Second,
		Transport:     &http.Transport{DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	get := func(url string) (int, string) {
		t.Helper()
		resp, err := client.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Location")
	}
	for _, c := range []struct{ url, want string }{
		{g.admin + "/mux-webhook", "/mux-webhook/"},
		{g.url + "/mux-webhook", "./mux-webhook/"},
		{g.url + "/mux-webhook?x=1", "./mux-webhook/?x=1"},
	} {
		code, loc := get(c.url)
		if code < 300 || code > 399 || loc != c.want {
			t.Errorf("GET %s: %d Location %q, want a redirect to %q", c.url, code, loc, c.want)
			continue
		}
		u, _ := url.Parse(c.url)
		to, _ := u.Parse(loc)
		if code, _ := get(to.String()); code != http.StatusOK {
			t.Errorf("GET %s (the redirect of %s): %d, want 200", to, c.url, code)
		}
	}
	for _, u := range []string{g.url + "/mux-webhook/", g.url + "/mux-webhook/index.html", g.url + "/mux-webhook/events"} {
		if code, loc := get(u); code != http.StatusOK {
			t.Errorf("GET %s: %d %q, want 200", u, code, loc)
		}
	}
	if code, _ := get(g.url + "/mux-webhookx"); code != http.StatusNotFound {
		t.Errorf("GET /mux-webhookx: %d, want 404", code)
	}
}
