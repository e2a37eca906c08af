// The delivery queue's settings: the mux_webhook app's `queue` and
// `destination` options (their JSON form), checked and turned into the
// queue package's Config and Destinations when the app is provisioned;
// {env.*}/{file.*} secrets resolved; the keys that tell stores and
// workers apart across reloads.

package muxwebhook

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// QueueConfig configures the delivery queue (README: "Queue: mux_deliver").
type QueueConfig struct {
	// Dir is the embedded JetStream server's store. Default:
	// {Caddy's data directory}/mux_webhook/jetstream.
	Dir string `json:"dir,omitempty"`
	// NATS connects to an external NATS server or cluster instead of
	// starting the embedded server.
	NATS *NATSConfig `json:"nats,omitempty"`
	// Stream is the JetStream stream's name. Default: MUX_WEBHOOK.
	Stream string `json:"stream,omitempty"`
	// MaxBytes bounds the stream; when it is full, mux_deliver answers 503
	// and stored events are never dropped. Default: 1 GiB.
	MaxBytes int64 `json:"max_bytes,omitempty"`
	// DeadMaxBytes bounds <stream>_DEAD, the dead letters' own stream
	// (a full stream never keeps a copy from becoming a dead letter); when
	// it is full, copies at their last attempt stay queued, retried at
	// the last retry interval, until dead letters are purged or
	// redelivered. Default: 1 GiB.
	DeadMaxBytes int64 `json:"dead_max_bytes,omitempty"`
	// DedupeWindow: a redelivered event id is queued once per destination
	// within it. Default: 24h.
	DedupeWindow caddy.Duration `json:"dedupe_window,omitempty"`
	// EnqueueTimeout bounds how long mux_deliver waits for every copy to
	// be stored before it answers 503. Default: 2s.
	EnqueueTimeout caddy.Duration `json:"enqueue_timeout,omitempty"`
	// Partitions spreads the copies over this many streams
	// (<stream>_0 … <stream>_<n-1>), by a hash of the event's object.id
	// (its id when it has none): each has its own store and fsyncs, so
	// events are accepted in parallel; an object's copies stay in one.
	// max_bytes is their total. Changing it strands nothing: every
	// stream of the queue that exists is drained. Default: 4 on the
	// embedded server, 1 with nats (1 to 64).
	Partitions int `json:"partitions,omitempty"`
}

// NATSConfig is an external NATS server or cluster.
type NATSConfig struct {
	// URLs of the servers, e.g. nats://10.0.0.1:4222.
	URLs []string `json:"urls,omitempty"`
	// Creds is a credentials file.
	Creds string `json:"creds,omitempty"`
	// User and Password, or Token, authenticate instead.
	User     string `json:"user,omitempty"`
	Password string `json:"password,omitempty"`
	Token    string `json:"token,omitempty"`
	// Replicas of the stream. Default: 1; use 3 on a 3-node cluster.
	Replicas int `json:"replicas,omitempty"`
	// TLSCA is a PEM file of the CA that signed the servers' certificates;
	// without it, tls:// URLs are checked against the system's roots.
	TLSCA string `json:"tls_ca,omitempty"`
	// TLSClientCert and TLSClientKey are PEM files of a client
	// certificate, for servers that verify clients.
	TLSClientCert string `json:"tls_client_cert,omitempty"`
	TLSClientKey  string `json:"tls_client_key,omitempty"`
	// Instance names this Caddy among those sharing the cluster: in its
	// delivery log lines and live log entries, the queue status, the
	// caddy_mux_webhook_instance metric and its NATS connection's name.
	// Default: the host name.
	Instance string `json:"instance,omitempty"`
}

// DestinationConfig is where mux_deliver delivers, by name.
type DestinationConfig struct {
	// URL receives a POST per event.
	URL string `json:"url,omitempty"`
	// Timeout bounds each attempt. Default: 30s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Retry are the delays between attempts; the last one repeats.
	// Default: 10s 1m 5m 30m 1h.
	Retry []caddy.Duration `json:"retry,omitempty"`
	// MaxAttempts makes an event a dead letter after this many failed
	// attempts. Default: 0, until max_age.
	MaxAttempts int `json:"max_attempts,omitempty"`
	// MaxAge makes an event a dead letter once it is this old. Default: 72h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`
	// Concurrency is how many attempts run at once per Caddy instance.
	// Default: 4.
	Concurrency int `json:"concurrency,omitempty"`
	// StallAfter: when events wait this long past their due attempt with
	// nothing attempted (by any instance), the destination is stalled:
	// said by the status, an ERROR line and the
	// caddy_mux_webhook_queue_stalled metric. Default: 1m.
	StallAfter caddy.Duration `json:"stall_after,omitempty"`
	// Breaker trips the destination after Failures failed attempts in a
	// row for its own reasons (no answer, a timeout, a 5xx or a 429):
	// its events then wait, using no attempt and not dying of max_age,
	// and one is attempted as a probe every Probe; the first 2xx resets
	// it. Per Caddy instance. Default: 10 failures, a 30s probe; Off
	// turns it off.
	Breaker *BreakerConfig `json:"breaker,omitempty"`
	// Rate paces the attempts this Caddy instance makes: "<n>/<s|m|h>",
	// at most n per second, minute or hour, spaced evenly (a burst of
	// one second's worth at most). A copy waiting for its turn waits in
	// the queue and uses no attempt. Default: unlimited.
	Rate string `json:"rate,omitempty"`
	// Sign re-signs every attempt with this secret ({env.*} or {file.*}
	// as for mux_webhook); without it, Mux's original signature is sent.
	Sign string `json:"sign,omitempty"`
	// Header adds request headers.
	Header map[string]string `json:"header,omitempty"`
	// Order "object" delivers the events of one Mux object (object.id)
	// one at a time, in the order they were accepted: an event is
	// attempted only once every earlier one of its object is delivered
	// or a dead letter; other objects are not held up. Default: no
	// order.
	Order string `json:"order,omitempty"`
}

// provisionQueue opens (or shares) the store and checks the
// destinations. It returns nil when neither is configured.
func (a *App) provisionQueue(ctx caddy.Context) (*appQueue, error) {
	if a.Queue == nil && len(a.Destinations) == 0 && !a.historyExplicit() {
		return nil, nil
	}
	// Neither a queue nor a destination: the store is opened for history
	// alone, and failing to open it is no load error.
	historyOnly := a.Queue == nil && len(a.Destinations) == 0
	cfg := QueueConfig{}
	if a.Queue != nil {
		cfg = *a.Queue
	}
	if cfg.EnqueueTimeout == 0 {
		cfg.EnqueueTimeout = caddy.Duration(queue.DefaultEnqueueTimeout)
	}
	if cfg.Dir == "" {
		cfg.Dir = filepath.Join(caddy.AppDataDir(), "mux_webhook", "jetstream")
	}
	if cfg.Stream != "" {
		if err := queue.ValidStream(cfg.Stream); err != nil {
			return nil, fmt.Errorf("mux_webhook: %v", err)
		}
	}
	if cfg.MaxBytes < 0 || cfg.DeadMaxBytes < 0 || cfg.DedupeWindow < 0 || cfg.EnqueueTimeout < 0 {
		return nil, errors.New("mux_webhook: queue max_bytes, dead_max_bytes, dedupe_window and enqueue_timeout must not be negative")
	}
	if cfg.Partitions < 0 || cfg.Partitions > queue.MaxPartitions {
		return nil, fmt.Errorf("mux_webhook: queue partitions %d: use 1 to %d", cfg.Partitions, queue.MaxPartitions)
	}
	if cfg.NATS == nil {
		// One spelling per directory: the store's pool key, its workers'
		// keys and the hand-back ledger name it, so that a reload to
		// `dir D/` or to a symlink to D shares the open store (a second
		// store on it would be refused: the directory is locked).
		dir, err := canonicalDir(cfg.Dir)
		if err != nil {
			return nil, err
		}
		cfg.Dir = dir
	}
	d := &appQueue{
		cfg: cfg, destinations: map[string]queue.Destination{}, workerKeys: map[string]string{}, logger: ctx.Logger(),
		instance: hostname(), opened: make(chan struct{}), historyOnly: historyOnly,
	}
	for name, dc := range a.Destinations {
		dest, signSecret, err := dc.destination(name)
		if err != nil {
			return nil, err
		}
		d.destinations[name] = dest
		key, err := workerKey(dc, dest, signSecret)
		if err != nil {
			return nil, err
		}
		d.workerKeys[name] = key
	}
	qc := queue.Config{
		Dir: cfg.Dir, Stream: cfg.Stream, MaxBytes: cfg.MaxBytes, DedupeWindow: time.Duration(cfg.DedupeWindow), Partitions: cfg.Partitions,
		Logger:       d.logger,
		DeadMaxBytes: cfg.DeadMaxBytes,
	}
	d.poolKey = "mux_webhook.queue.dir." + cfg.Dir
	if n := cfg.NATS; n != nil {
		// Password and token may be {env.*} or {file.*}, resolved here as
		// secrets are: never as plain text in the JSON config.
		password, err := configValue(n.Password)
		if err != nil && n.Password != "" {
			return nil, errors.New("mux_webhook: queue nats password: a placeholder in it is unset or empty")
		}
		token, err := configValue(n.Token)
		if err != nil && n.Token != "" {
			return nil, errors.New("mux_webhook: queue nats token: a placeholder in it is unset or empty")
		}
		if n.Instance != "" {
			if !instanceName.MatchString(n.Instance) {
				return nil, fmt.Errorf("mux_webhook: queue nats instance %q: use letters, digits, '.', '_' and '-' only (at most 64)", n.Instance)
			}
			d.instance = n.Instance
		}
		if (n.TLSClientCert == "") != (n.TLSClientKey == "") {
			return nil, errors.New("mux_webhook: queue nats: a TLS client certificate needs both its cert and its key file")
		}
		qc.URLs, qc.Creds, qc.User, qc.Password, qc.Token, qc.Replicas = n.URLs, n.Creds, n.User, password, token, n.Replicas
		// Read again at each connection: a password rotated on the server
		// and then in its {file.*} is taken up at the next reconnection,
		// without a reload.
		qc.PasswordFunc = rereadSecret(n.Password, password)
		qc.TokenFunc = rereadSecret(n.Token, token)
		qc.TLSCA, qc.TLSCert, qc.TLSKey = n.TLSCA, n.TLSClientCert, n.TLSClientKey
		qc.Name = "mux_webhook " + d.instance
		// The instance is in the key: a reload that renames it opens a
		// connection with the new name. So are the credentials, as a
		// salted hash of their resolved values: a password rotated in its
		// {file.*} and reloaded connects anew with it.
		d.poolKey = "mux_webhook.queue.nats." + strings.Join(n.URLs, ",") + "." + cfg.Stream + "." + d.instance +
			"." + n.TLSCA + "." + n.TLSClientCert + "." + n.TLSClientKey +
			"." + saltedHash([]byte(n.Creds), credsContent(n.Creds), []byte(n.User), []byte(password), []byte(token))
	}
	d.qc = qc
	var historyOn bool
	d.historyCfg, historyOn = a.historyConfig(d.instance)
	d.historyOn.Store(historyOn)
	d.historyCfg.Destination = d.replayable
	d.historyCfg.MaxBytes = a.HistoryMaxBytes
	for name, cfgJSON := range d.workerKeys {
		d.workerKeys[name] = d.poolKey + ".destination." + name + "." + cfgJSON
	}
	return d, nil
}

// rereadSecret returns a function that resolves raw's {env.*} and
// {file.*} placeholders again at each call, or nil when raw has none;
// while they resolve to nothing, it keeps last, the value resolved at
// load.
func rereadSecret(raw, last string) func() string {
	if !strings.Contains(raw, "{") {
		return nil
	}
	return func() string {
		v, err := configValue(raw)
		if err != nil || v == "" {
			return last
		}
		return v
	}
}

// credsContent is a creds file's content, for the pool key: a file fixed
// in place (an expired JWT replaced) and reloaded connects anew with it.
// Unreadable, it is nil: connecting will say why.
func credsContent(path string) []byte {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return b
}

// canonicalDir is the store directory as one path: absolute, symlinks
// resolved. It creates the directory (0700) if it does not exist: a path
// that does not exist yet has no resolved form.
func canonicalDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err == nil {
		err = os.MkdirAll(abs, 0o700)
	}
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", fmt.Errorf("mux_webhook: queue dir %s: %v: give the queue a directory Caddy can create and write", dir, err)
	}
	return abs, nil
}

// The embedded queue's message limit holds an event of the largest
// max_body: this fails to build if it did not.
const _ = uint64(queue.MaxEvent - MaxMaxBody)

// instanceName is what an instance may be called: it appears in log
// lines, a metric label and the NATS connection's name.
var instanceName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// hostname is the default instance name: the host's name if it is a valid
// instance name, else "mux_webhook".
func hostname() string {
	if h, err := os.Hostname(); err == nil && instanceName.MatchString(h) {
		return h
	}
	return "mux_webhook"
}

// poolKeySalt makes the pool keys' hashes (workers, NATS stores) ones no
// one can test a guessed secret against.
var poolKeySalt = func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
}()

// workerKey tells a destination's workers apart across reloads: the same
// configuration with the same resolved values ({env.*}, {file.*}: a
// secret rotated in its file and reloaded) keeps its workers; anything
// else gets new ones. It holds no secret, only a salted hash.
func workerKey(dc *DestinationConfig, dest queue.Destination, signSecret []byte) (string, error) {
	dcJSON, err := json.Marshal(dc)
	if err != nil {
		return "", err
	}
	fields := [][]byte{dcJSON, signSecret}
	for _, k := range slices.Sorted(maps.Keys(dest.Header)) {
		fields = append(fields, []byte(k), []byte(dest.Header[k]))
	}
	return saltedHash(fields...), nil
}

// saltedHash is an HMAC of the fields, each prefixed by its length, under
// this process's random salt: it tells values apart in a pool key without
// holding them.
func saltedHash(fields ...[]byte) string {
	m := hmac.New(sha256.New, poolKeySalt)
	for _, b := range fields {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		m.Write(n[:])
		m.Write(b)
	}
	return hex.EncodeToString(m.Sum(nil))
}

// destination turns a configured destination into the queue's; it also
// returns the resolved signing secret, if any.
func (dc *DestinationConfig) destination(name string) (queue.Destination, []byte, error) {
	if !queue.ValidDestination(name) {
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination name %q: use letters, digits, _ and - only", name)
	}
	if err := checkDestinationURL(dc.URL); err != nil {
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s url: %v", name, err)
	}
	if dc.Timeout < 0 || dc.MaxAge < 0 || dc.MaxAttempts < 0 || dc.Concurrency < 0 || dc.StallAfter < 0 {
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: timeout, max_age, max_attempts, concurrency and stall_after must not be negative", name)
	}
	d := queue.Destination{
		Name: name, URL: dc.URL, Timeout: time.Duration(dc.Timeout), MaxAttempts: dc.MaxAttempts,
		MaxAge: time.Duration(dc.MaxAge), Concurrency: dc.Concurrency, StallAfter: time.Duration(dc.StallAfter),
	}
	if len(dc.Header) > 0 {
		// Values may hold a token: {env.*} and {file.*} are resolved
		// here, as for sign, and never written back to the config.
		d.Header = make(map[string]string, len(dc.Header))
		for k, v := range dc.Header {
			value, err := configValue(v)
			if err != nil {
				return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: header %s: a placeholder in it is unset or empty", name, k)
			}
			if strings.ContainsAny(value, "\r\n\x00") {
				return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: header %s: the value holds a line break or NUL", name, k)
			}
			d.Header[k] = value
		}
	}
	if b := dc.Breaker; b != nil {
		if err := b.check(); err != nil {
			return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: breaker: %v", name, err)
		}
		d.BreakerFailures, d.BreakerProbe = b.Failures, time.Duration(b.Probe)
		if b.Off {
			d.BreakerFailures = queue.BreakerOff
		}
	}
	switch dc.Order {
	case "":
	case "object":
		d.OrderObject = true
	default:
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: order %q: the only order is object (one object's events one at a time, in order); remove order for none", name, dc.Order)
	}
	if dc.Rate != "" {
		n, per, err := parseRate(dc.Rate)
		if err != nil {
			return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: rate %q: %v", name, dc.Rate, err)
		}
		d.Rate, d.RatePer = n, per
	}
	for _, r := range dc.Retry {
		if r <= 0 {
			return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: retry delays must be greater than 0", name)
		}
		d.Retry = append(d.Retry, time.Duration(r))
	}
	if dc.Sign != "" {
		secrets, err := resolveSecrets([]string{dc.Sign})
		if err != nil {
			return queue.Destination{}, nil, fmt.Errorf("destination %s: sign: %v", name, err)
		}
		secret := secrets[0]
		d.Sign = func(body []byte, at time.Time) string { return Sign(secret, body, at) }
		return d, secret, nil
	}
	return d, nil, nil
}

// parseRate parses a destination's rate, "<n>/<s|m|h>".
func parseRate(v string) (int, time.Duration, error) {
	const want = "want <n>/<s|m|h> with a whole number n above 0, e.g. rate 5/s or rate 100/m"
	count, unit, ok := strings.Cut(v, "/")
	n, err := strconv.Atoi(count)
	if !ok || err != nil || n <= 0 || n > 1_000_000 {
		return 0, 0, errors.New(want)
	}
	per, ok := map[string]time.Duration{"s": time.Second, "m": time.Minute, "h": time.Hour}[unit]
	if !ok {
		return 0, 0, errors.New(want)
	}
	return n, per, nil
}

// BreakerConfig is a destination's circuit breaker.
type BreakerConfig struct {
	// Failures is how many failed attempts in a row trip it. Default
	// (0, with a probe set): 10.
	Failures int `json:"failures,omitempty"`
	// Probe is how often a tripped destination is tried. Default (0,
	// with failures set): 30s.
	Probe caddy.Duration `json:"probe,omitempty"`
	// Off turns the breaker off: every copy keeps its retry schedule.
	Off bool `json:"off,omitempty"`
}

// check is the breaker's load-time error, if any.
func (b *BreakerConfig) check() error {
	if b.Off {
		if b.Failures != 0 || b.Probe != 0 {
			return errors.New("off takes no failures or probe")
		}
		return nil
	}
	if b.Failures < 0 || b.Failures > 1_000_000 || (b.Failures == 0 && b.Probe == 0) {
		return errors.New("want breaker <failures> <probe> with a whole number of failures from 1, e.g. breaker 10 30s, or breaker off")
	}
	if b.Probe < 0 {
		return errors.New("want a probe interval greater than 0, e.g. breaker 10 30s")
	}
	return nil
}
