// The mux_store handler: writes the verified event to a file, durably, so
// that nothing is lost while a backend is down (Mux gives up after about a
// day); `caddy mux-webhook replay` delivers the files later.
//
//	mux_store /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json

package muxwebhook

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Store{})
	httpcaddyfile.RegisterDirective("mux_store", parseStoreCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("mux_store", httpcaddyfile.Before, "respond")
}

// Bounds of the store.
const (
	// maxStoreVersions bounds the suffixed files for one path whose
	// contents differ.
	maxStoreVersions = 100
	// maxPathValue bounds one placeholder's value in a file path.
	maxPathValue = 200
	// storeTempPrefix starts the names of files being written; replay
	// skips them.
	storeTempPrefix = ".mux_store-"
	// ReplayHeader marks deliveries made by `caddy mux-webhook replay`.
	// mux_store answers them 503 without writing: the event is in the
	// spool already, and a 2xx would make replay count it as delivered.
	ReplayHeader = "Mux-Webhook-Replay"
)

// Store is a terminal handler that writes the raw body of the event that
// mux_webhook verified earlier in the request to a file, and answers 202
// once the file is durably on disk (503 if it cannot be written, so that
// Mux retries). It reads the body kept with the verified event, not the
// request body, so it also works in handle_errors after a failed
// reverse_proxy. Without a verified event it refuses (500) and writes
// nothing. A delivery made by `caddy mux-webhook replay` (ReplayHeader) is
// answered 503 without writing, so that replay stops instead of counting
// an event as delivered that only went back to the spool.
type Store struct {
	// Path is the file to write, with placeholders, e.g.
	// /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json.
	// Placeholder values are sanitised (no "/", "..", or control
	// characters), and the result must stay under the part of the path
	// before the first placeholder. A file that already exists with the
	// same content counts as written; with other content, the new file
	// gets a numbered suffix (name-1.json, ...).
	Path string `json:"path,omitempty"`

	// Status is the status answered once the file is on disk. Default: 202.
	Status int `json:"status,omitempty"`

	root   string // the absolute directory the files must stay under
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Store) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_store",
		New: func() caddy.Module { return new(Store) },
	}
}

// Provision sets the default status and finds the fixed root of the path.
func (s *Store) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	if s.Status == 0 {
		s.Status = http.StatusAccepted
	}
	root, err := storeRoot(s.Path)
	if err != nil {
		return err
	}
	s.root = root
	return nil
}

// Validate checks the configuration.
func (s *Store) Validate() error {
	if s.Path == "" {
		return errors.New("mux_store: a path template is required, e.g. mux_store /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json")
	}
	if s.Status < 200 || s.Status > 299 {
		return fmt.Errorf("mux_store: status must be a 2xx code, got %d", s.Status)
	}
	return nil
}

// storeRoot returns the absolute directory made of the path template's
// text before its first placeholder.
func storeRoot(template string) (string, error) {
	if template == "" {
		return "", nil
	}
	fixed := template
	if i := strings.IndexByte(template, '{'); i >= 0 {
		fixed = template[:i]
	}
	dir := fixed
	if !strings.HasSuffix(fixed, "/") {
		dir = filepath.Dir(fixed)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("mux_store: path %q: %v", template, err)
	}
	return abs, nil
}

// ServeHTTP writes the verified event's body and answers Status.
func (s *Store) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	ev := EventFromRequest(r)
	if ev == nil {
		s.logger.Error("mux_store: no verified event in this request; put mux_webhook before it in the route", zap.String("uri", r.RequestURI))
		return caddyhttp.Error(http.StatusInternalServerError, errors.New("mux_store: no verified event"))
	}
	if r.Header.Get(ReplayHeader) != "" {
		s.logger.Warn("mux_store: a replayed event failed again; it stays in the spool",
			zap.String("type", ev.Type), zap.String("id", ev.ID))
		return caddyhttp.Error(http.StatusServiceUnavailable, errors.New("mux_store: replayed event not delivered; it stays in the spool"))
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		repl = caddy.NewReplacer()
	}
	path, err := s.resolve(repl)
	if err != nil {
		s.logger.Error("mux_store: refusing to write outside the store", zap.String("id", ev.ID), zap.Error(err))
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	written, err := writeOnce(path, ev.Body)
	if err != nil {
		s.logger.Error("mux_store: could not store the event; answering 503 so that Mux retries",
			zap.String("type", ev.Type), zap.String("id", ev.ID), zap.String("path", path), zap.Error(err))
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("mux_store: %w", err))
	}
	s.logger.Info("mux webhook stored", zap.String("type", ev.Type), zap.String("id", ev.ID), zap.String("path", written))
	w.WriteHeader(s.Status)
	return nil
}

// resolve fills the template with sanitised placeholder values and checks
// that the result stays under the store's root.
func (s *Store) resolve(repl *caddy.Replacer) (string, error) {
	out, err := repl.ReplaceFunc(s.Path, func(_ string, val any) (any, error) {
		return sanitizePathValue(caddy.ToString(val)), nil
	})
	if err != nil {
		return "", err
	}
	path, err := filepath.Abs(out)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(path, s.root+string(filepath.Separator)) {
		return "", fmt.Errorf("path %q is not under %q", path, s.root)
	}
	return path, nil
}

// sanitizePathValue makes a placeholder value safe as (part of) one path
// element: separators, control characters and invalid UTF-8 become "_",
// ".." becomes "__", a leading dot "_", and the length is bounded.
func sanitizePathValue(v string) string {
	var b strings.Builder
	for i, r := range v {
		if b.Len() >= maxPathValue {
			break
		}
		switch {
		case r == '/' || r == '\\' || r < 0x20 || r == 0x7f || r == utf8.RuneError:
			b.WriteByte('_')
		case r == '.' && i == 0:
			b.WriteByte('_')
		default:
			b.WriteRune(r)
		}
	}
	out := strings.ReplaceAll(b.String(), "..", "__")
	if out == "" {
		return "_"
	}
	return out
}

// writeOnce writes data to path durably (a temporary file in the same
// directory, fsync, an atomic link that never overwrites, fsync of the
// directory). An existing file with the same content counts as written;
// with other content, the next free "-N" suffix is used. It returns the
// path written.
func writeOnce(path string, data []byte) (string, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(dir, storeTempPrefix+"*.tmp")
	if err != nil {
		return "", err
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName)
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Chmod(tmpName, 0o640); err != nil {
		return "", err
	}
	for n := range maxStoreVersions {
		candidate := withSuffix(path, n)
		err := os.Link(tmpName, candidate)
		if err == nil {
			return candidate, syncDir(dir)
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", err
		}
		same, err := sameContent(candidate, data)
		if err != nil {
			return "", err
		}
		if same {
			return candidate, nil
		}
	}
	return "", fmt.Errorf("%d different versions of %s already exist", maxStoreVersions, path)
}

// withSuffix returns path for n == 0, else path with "-n" before its
// extension.
func withSuffix(path string, n int) string {
	if n == 0 {
		return path
	}
	ext := filepath.Ext(path)
	return strings.TrimSuffix(path, ext) + "-" + strconv.Itoa(n) + ext
}

// sameContent reports whether the file holds exactly data.
func sameContent(path string, data []byte) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	got, err := io.ReadAll(io.LimitReader(f, int64(len(data))+1))
	if err != nil {
		return false, err
	}
	return bytes.Equal(got, data), nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// parseStoreCaddyfile parses the directive the way Caddy's root directive
// is parsed, so that a path template starting with "/" is not taken for a
// path matcher:
//
//	mux_store [<matcher>] <path-template> {
//		status <code>
//	}
func parseStoreCaddyfile(h httpcaddyfile.Helper) ([]httpcaddyfile.ConfigValue, error) {
	h.Next() // directive name
	var matcherSet caddy.ModuleMap
	switch h.CountRemainingArgs() {
	case 1:
	case 2:
		var err error
		if matcherSet, err = h.ExtractMatcherSet(); err != nil {
			return nil, err
		}
		h.Next() // the directive name again: matcher parsing resets
	default:
		return nil, h.Errf("mux_store: want [<matcher>] <path-template>, e.g. mux_store /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json")
	}
	s := new(Store)
	if !h.NextArg() {
		return nil, h.ArgErr()
	}
	s.Path = h.Val()
	for h.NextBlock(0) {
		switch h.Val() {
		case "status":
			var v string
			if !h.AllArgs(&v) {
				return nil, h.ArgErr()
			}
			code, err := strconv.Atoi(v)
			if err != nil || code < 200 || code > 299 {
				return nil, h.Errf("mux_store: status %q: want a 2xx code, e.g. 202", v)
			}
			s.Status = code
		default:
			return nil, h.Errf("mux_store: unknown option %q; expected status", h.Val())
		}
	}
	return h.NewRoute(matcherSet, s), nil
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*Store)(nil)
	_ caddy.Provisioner           = (*Store)(nil)
	_ caddy.Validator             = (*Store)(nil)
)
