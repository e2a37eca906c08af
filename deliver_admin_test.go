package muxwebhook

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestQueueAdminWhileLoading: the admin API serves while a config loads.
// GET /mux-webhook/queue must then not provision the mux_webhook app
// itself: the load would find a half-provisioned app ("unknown
// destination"), and both would write the config's map of apps at once
// (go test -race reports it). It answers once the app has started.
func TestQueueAdminWhileLoading(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	t.Cleanup(backend.Close)
	adminPort := freePort(t)
	cfg, _ := gatewayConfigWith(t, fmt.Sprintf("127.0.0.1:%d", adminPort),
		deliverGlobal(t.TempDir(), "\t\tdestination app "+backend.URL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	stop := make(chan struct{})
	var ok atomic.Int32
	var wg sync.WaitGroup
	wg.Go(func() {
		client := &http.Client{Timeout: time.Second}
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/mux-webhook/queue", adminPort))
			if err == nil {
				if resp.StatusCode == http.StatusOK {
					ok.Add(1)
				}
				resp.Body.Close()
			}
		}
	})
	defer func() {
		close(stop)
		wg.Wait()
	}()
	// Each load starts the admin API anew, then provisions the apps.
	for i := range 10 {
		if err := loadCaddyfile(cfg); err != nil {
			t.Fatalf("load %d, with the queue endpoint polled: %v", i+1, err)
		}
		waitFor(t, func() bool { return ok.Load() > 0 }, func() string { return "GET /mux-webhook/queue never answered 200" })
		ok.Store(0)
		if err := stopCaddy(); err != nil {
			t.Fatal(err)
		}
	}
}
