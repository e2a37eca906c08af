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
	"syscall"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(FileStore{})
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
	// sigSuffix ends the name of the sidecar that keeps, beside each
	// event file, the Mux-Signature header value that verified it; replay
	// checks the file against it before signing it again. A .sig file is
	// never an event.
	sigSuffix = ".sig"
	// maxSigFile bounds what replay reads of a sidecar (Go's default
	// limit for all request headers together).
	maxSigFile = 1 << 20
	// ReplayHeader marks deliveries made by `caddy mux-webhook replay`.
	// mux_store answers them 503 without writing: the event is in the
	// spool already, and a 2xx would make replay count it as delivered.
	ReplayHeader = "Mux-Webhook-Replay"
)

// FileStore is a terminal handler that writes the raw body of the event that
// mux_webhook verified earlier in the request to a file, and answers 202
// once the file is durably on disk (503 if it cannot be written, so that
// Mux retries). It reads the body kept with the verified event, not the
// request body, so it also works in handle_errors after a failed
// reverse_proxy. Without a verified event it refuses (500) and writes
// nothing. A delivery made by `caddy mux-webhook replay` (ReplayHeader) is
// answered 503 without writing, so that replay stops instead of counting
// an event as delivered that only went back to the spool.
type FileStore struct {
	// Path is the file to write, with placeholders, e.g.
	// /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json.
	// Configuration placeholders ({env.*}, {file.*}) are resolved once,
	// when the config loads: they must not be empty, and must not contain
	// braces or backslashes. The text before the first remaining
	// placeholder must be an absolute directory; the files stay under
	// it. The remaining (request) placeholders are filled per request
	// with sanitised values (no "/", "..", or control characters). A file
	// that already exists with the same content counts as written; with
	// other content, the new file gets a numbered suffix (name-1.json,
	// ...). Beside each file, name.json.sig keeps the Mux-Signature
	// header value that verified it, for `caddy mux-webhook replay`.
	Path string `json:"path,omitempty"`

	// Status is the status answered once the file is on disk. Default: 202.
	Status int `json:"status,omitempty"`

	template string // Path with its config placeholders resolved
	root     string // the absolute directory the files must stay under
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (FileStore) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_store",
		New: func() caddy.Module { return new(FileStore) },
	}
}

// Provision sets the default status, resolves the configuration
// placeholders of the path and finds its fixed root.
func (s *FileStore) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	if s.Status == 0 {
		s.Status = http.StatusAccepted
	}
	if s.Path == "" {
		return nil // Validate says what to write
	}
	template, err := resolveConfigPlaceholders(s.Path)
	if err != nil {
		return err
	}
	root, err := storeRoot(s.Path, template)
	if err != nil {
		return err
	}
	s.template, s.root = template, root
	return nil
}

// Validate checks the configuration.
func (s *FileStore) Validate() error {
	if s.Path == "" {
		return errors.New("mux_store: a path template is required, e.g. mux_store /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json")
	}
	if s.Status < 200 || s.Status > 299 {
		return fmt.Errorf("mux_store: status must be a 2xx code, got %d", s.Status)
	}
	return nil
}

// isConfigPlaceholder reports whether a placeholder key is resolved when
// the config loads rather than per request.
func isConfigPlaceholder(key string) bool {
	return strings.HasPrefix(key, "env.") || strings.HasPrefix(key, "file.")
}

// resolveConfigPlaceholders replaces the {env.*} and {file.*} placeholders
// of template with their values (as Caddy resolves them), and leaves every
// other placeholder, and escaped braces, as they are. An empty value, or
// one with braces or backslashes (which would change the placeholders
// that remain), is an error naming the placeholder.
func resolveConfigPlaceholders(template string) (string, error) {
	var b strings.Builder
	last := 0
	for i := 0; i < len(template); i++ {
		if template[i] != '{' || (i > 0 && template[i-1] == '\\') {
			continue
		}
		end := strings.IndexByte(template[i:], '}')
		if end < 0 {
			break
		}
		key := template[i+1 : i+end]
		if !isConfigPlaceholder(key) {
			continue
		}
		v, _ := configValue("{" + key + "}") // unset or empty: "", named below
		switch {
		case v == "" && strings.HasPrefix(key, "env."):
			return "", fmt.Errorf("mux_store: path %q: {%s} is unset or empty; set the environment variable %s to an absolute directory, or write the directory in the path", template, key, key[len("env."):])
		case v == "":
			return "", fmt.Errorf("mux_store: path %q: {%s} is empty or cannot be read; put an absolute directory in the file %s, or write the directory in the path", template, key, key[len("file."):])
		case strings.ContainsAny(v, "{}\\"):
			return "", fmt.Errorf("mux_store: path %q: the value of {%s} contains a brace or a backslash; use a plain directory name", template, key)
		}
		b.WriteString(template[last:i])
		b.WriteString(v)
		last = i + end + 1
		i += end
	}
	b.WriteString(template[last:])
	return b.String(), nil
}

// storeRoot returns the directory made of the resolved template's text
// before its first placeholder, which must be absolute. configured is the
// template as written, for the error messages.
func storeRoot(configured, template string) (string, error) {
	fixed := template
	if i := strings.IndexByte(template, '{'); i >= 0 {
		fixed = template[:i]
	}
	const example = "/var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json"
	if !filepath.IsAbs(fixed) {
		how := fmt.Sprintf("write the full path, e.g. %s", example)
		if configured != template {
			how = fmt.Sprintf("it resolves to %q; set the placeholder's value to an absolute directory, or write the full path, e.g. %s", template, example)
		}
		return "", fmt.Errorf("mux_store: path %q does not start with an absolute directory (files would land under Caddy's working directory); %s", configured, how)
	}
	if strings.HasSuffix(template, sigSuffix) {
		return "", fmt.Errorf("mux_store: path %q ends in %q, which marks the signature files kept beside the events; end it in .json, e.g. %s", configured, sigSuffix, example)
	}
	if strings.Contains(template, string(filepath.Separator)+storeTempPrefix) {
		return "", fmt.Errorf("mux_store: path %q has a name starting with %q, which marks temporary files; choose another name", configured, storeTempPrefix)
	}
	dir := fixed
	if !strings.HasSuffix(fixed, string(filepath.Separator)) {
		dir = filepath.Dir(fixed)
	}
	return filepath.Clean(dir), nil
}

// ServeHTTP writes the verified event's body and answers Status.
func (s *FileStore) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	ev := EventFromRequest(r)
	if ev == nil {
		s.logger.Error("mux_store: no verified event in this request; put mux_webhook before it in the route", zap.String("uri", r.RequestURI))
		return caddyhttp.Error(http.StatusInternalServerError, errors.New("mux_store: no verified event"))
	}
	if ev.Signature == "" {
		s.logger.Error("mux_store: the verified event carries no signature to keep as proof; nothing written", zap.String("id", ev.ID))
		return caddyhttp.Error(http.StatusInternalServerError, errors.New("mux_store: no signature kept with the event"))
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
	written, err := writeOnce(path, ev.Body, ev.Signature)
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
// that the result stays under the store's root. A file name that would end
// in .sig gets a "_" appended, so that no event is taken for a sidecar.
func (s *FileStore) resolve(repl *caddy.Replacer) (string, error) {
	template := s.template
	if template == "" {
		template = s.Path
	}
	out, err := repl.ReplaceFunc(template, func(_ string, val any) (any, error) {
		return sanitizePathValue(caddy.ToString(val)), nil
	})
	if err != nil {
		return "", err
	}
	path, err := filepath.Abs(out)
	if err != nil {
		return "", err
	}
	prefix := s.root
	if !strings.HasSuffix(prefix, string(filepath.Separator)) {
		prefix += string(filepath.Separator)
	}
	if !strings.HasPrefix(path, prefix) || len(path) == len(prefix) {
		return "", fmt.Errorf("path %q is not under %q", path, s.root)
	}
	if strings.HasSuffix(path, sigSuffix) {
		path += "_"
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

// writeOnce writes data to path durably (missing directories created with
// their parents fsynced, a temporary file in the same directory, fsync, an
// atomic link that never overwrites, fsync of the directory), and beside
// it, in path.sig, the signature header value that verified data. An
// existing file with the same content counts as written (its sidecar is
// written if missing); with other content, the next free "-N" suffix is
// used. It returns the path written.
func writeOnce(path string, data []byte, signature string) (string, error) {
	dir := filepath.Dir(path)
	if err := mkdirDurable(dir); err != nil {
		return "", err
	}
	tmpName, err := writeTemp(dir, data)
	if err != nil {
		return "", err
	}
	defer os.Remove(tmpName)
	for n := range maxStoreVersions {
		candidate := withSuffix(path, n)
		err := os.Link(tmpName, candidate)
		if err == nil {
			// The proof belongs to the bytes just linked: replace any
			// stale sidecar left under this name.
			if err := writeSidecar(candidate, signature, true); err != nil {
				// No event without its proof: replay would refuse it
				// for good. Mux retries it (503).
				_ = os.Remove(candidate)
				return "", err
			}
			return candidate, syncDirFunc(dir)
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", err
		}
		same, err := sameContent(candidate, data)
		if err != nil {
			return "", err
		}
		if same {
			// Mux retrying, or an earlier attempt that failed after the
			// link: make sure the proof exists and all of it is on disk.
			if err := writeSidecar(candidate, signature, false); err != nil {
				return "", err
			}
			return candidate, syncDirFunc(dir)
		}
	}
	return "", fmt.Errorf("%d different versions of %s already exist", maxStoreVersions, path)
}

// writeTemp writes data to a new temporary file in dir, fsynced, with mode
// 0640, and returns its name.
func writeTemp(dir string, data []byte) (string, error) {
	tmp, err := os.CreateTemp(dir, storeTempPrefix+"*.tmp")
	if err != nil {
		return "", err
	}
	name := tmp.Name()
	fail := func(err error) (string, error) {
		tmp.Close()
		os.Remove(name)
		return "", err
	}
	if _, err := tmp.Write(data); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Chmod(0o640); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(name)
		return "", err
	}
	return name, nil
}

// writeSidecar writes signature to event+".sig" through a fsynced
// temporary file: renamed over any existing one when replace is set, else
// linked only if none exists. The caller fsyncs the directory.
func writeSidecar(event, signature string, replace bool) error {
	sidecar := event + sigSuffix
	if !replace {
		if _, err := os.Lstat(sidecar); err == nil {
			return nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	tmpName, err := writeTemp(filepath.Dir(event), []byte(signature))
	if err != nil {
		return err
	}
	defer os.Remove(tmpName)
	if replace {
		return os.Rename(tmpName, sidecar)
	}
	if err := os.Link(tmpName, sidecar); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

// mkdirDurable creates dir and its missing parents (mode 0750), and fsyncs
// the parent of every directory it creates, up to the first one that
// existed, so that a stored file cannot vanish with its directory after a
// crash. An existing ancestor that is not a directory is an error.
func mkdirDurable(dir string) error {
	var missing []string
	for d := filepath.Clean(dir); ; {
		fi, err := os.Stat(d)
		if err == nil {
			if !fi.IsDir() {
				return &fs.PathError{Op: "mkdir", Path: d, Err: syscall.ENOTDIR}
			}
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		missing = append(missing, d)
		parent := filepath.Dir(d)
		if parent == d {
			break
		}
		d = parent
	}
	for i := len(missing) - 1; i >= 0; i-- {
		// Another request may create the same directory at the same
		// time; its entry must be on disk before either answers, so the
		// parent is fsynced either way.
		if err := os.Mkdir(missing[i], 0o750); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		if err := syncDirFunc(filepath.Dir(missing[i])); err != nil {
			return err
		}
	}
	return nil
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

// syncDirFunc fsyncs a directory; tests replace it to see which are.
var syncDirFunc = syncDir

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*FileStore)(nil)
	_ caddy.Provisioner           = (*FileStore)(nil)
	_ caddy.Validator             = (*FileStore)(nil)
)
