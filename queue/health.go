// Health: the queue heals itself. The embedded NATS server's warnings and
// errors go to the store's logger; an embedded JetStream that shut itself
// down (its disk filled) is started again once there is room; and the
// store says, at any moment, why it cannot accept (Store.Down), so that
// an operator sees it in the status, a log line and a metric.

package queue

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// healPause runs just before heal starts JetStream again: tests widen
// that moment with it.
var healPause = func() {}

// healInterval is how often the embedded server's JetStream is checked.
const healInterval = time.Second

// minFreeToRestart is the free space the embedded store's filesystem
// needs before JetStream is started again after it filled: less, and the
// first writes would fill it again at once.
const minFreeToRestart = 4 << 20

// natsLog passes the embedded server's log lines to the store's logger:
// warnings and errors as such, notices and debug lines at DEBUG. Its
// latest error is the reason Store.Down gives.
type natsLog struct {
	log     *zap.Logger
	lastErr atomic.Pointer[string]
	// broken is set by a write error (a full disk): nats-server keeps a
	// stream or consumer that failed a write refusing writes until its
	// JetStream starts again. heal clears it once it has.
	broken atomic.Bool
}

func (l *natsLog) Noticef(format string, v ...any) { l.debugf(format, v...) }
func (l *natsLog) Debugf(format string, v ...any)  { l.debugf(format, v...) }
func (l *natsLog) Tracef(format string, v ...any)  {}
func (l *natsLog) Warnf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	if strings.HasPrefix(msg, "Maximum payloads over") {
		// Chosen on purpose (a message holds any max_body): not a warning
		// for the operator at every start.
		l.log.Debug(msg)
		return
	}
	l.log.Warn(msg)
}
func (l *natsLog) Errorf(format string, v ...any) { l.errorf(format, v...) }
func (l *natsLog) Fatalf(format string, v ...any) { l.errorf(format, v...) }

func (l *natsLog) debugf(format string, v ...any) {
	if ce := l.log.Check(zap.DebugLevel, ""); ce != nil {
		ce.Message = fmt.Sprintf(format, v...)
		ce.Write()
	}
}

func (l *natsLog) errorf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.lastErr.Store(&msg)
	if strings.Contains(msg, "write error") || strings.Contains(msg, "no space left") {
		l.broken.Store(true)
	}
	l.log.Error(msg)
}

// lastError is the server's latest error line, or "".
func (l *natsLog) lastError() string {
	if p := l.lastErr.Load(); p != nil {
		return *p
	}
	return ""
}

// ErrDown is wrapped by the errors of Down and of Enqueue while the queue
// cannot store anything.
var ErrDown = errors.New("the delivery queue cannot store events")

// Down reports why the store cannot accept events right now, or nil: the
// embedded server's JetStream shut down (a full disk: the reason is the
// server's own error line), or no connection to NATS.
func (s *Store) Down() error {
	if s.server != nil && (!s.server.JetStreamEnabled() || s.natsLog.broken.Load()) {
		reason := "JetStream stopped"
		if s.natsLog != nil && s.natsLog.lastError() != "" {
			reason = s.natsLog.lastError()
		}
		return fmt.Errorf("%w: the embedded store in %s: %s; it starts again by itself once the disk has room", ErrDown, s.cfg.Dir, reason)
	}
	if s.conn != nil && !s.conn.IsConnected() {
		return fmt.Errorf("%w: not connected to NATS (%s); reconnecting", ErrDown, s.conn.Status())
	}
	return nil
}

// heal watches the embedded server until done is closed: when a write
// failed (the disk full: nats-server then refuses every write to that
// stream or consumer until its JetStream starts again) or JetStream shut
// itself down (out of resources), it logs why at ERROR and, once the
// store's filesystem has room again, starts JetStream again; the stream
// and its consumers come back from the store (everything acknowledged
// was fsynced), and the workers pull again by themselves.
func (s *Store) heal(done <-chan struct{}) {
	t := time.NewTicker(healInterval)
	defer t.Stop()
	down := false
	var lastTry time.Time
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		broken := s.natsLog.broken.Load()
		if s.server.JetStreamEnabled() && !broken {
			if down {
				down = false
				s.log.Info("mux_webhook queue: the embedded store accepts events again", zap.String("dir", s.cfg.Dir))
			}
			continue
		}
		if !down {
			down = true
			s.log.Error("mux_webhook queue: the embedded store stopped; mux_deliver answers 503 until it has room again",
				zap.String("dir", s.cfg.Dir), zap.String("reason", s.natsLog.lastError()))
		}
		if free, err := freeBytes(s.cfg.Dir); err != nil || free < minFreeToRestart || time.Since(lastTry) < 5*time.Second {
			continue
		}
		lastTry = time.Now()
		s.log.Warn("mux_webhook queue: the embedded store's disk has room again; starting its JetStream again", zap.String("dir", s.cfg.Dir))
		if s.server.JetStreamEnabled() {
			if err := s.server.ShutdownJetStream(); err != nil {
				s.log.Error("mux_webhook queue: stopping the embedded store's JetStream failed; trying again", zap.String("dir", s.cfg.Dir), zap.Error(err))
				continue
			}
		}
		s.natsLog.broken.Store(false) // errors from here on are the new JetStream's
		healPause()
		if err := s.server.EnableJetStream(&server.JetStreamConfig{StoreDir: s.cfg.Dir}); err != nil {
			s.log.Error("mux_webhook queue: starting the embedded store again failed; trying again", zap.String("dir", s.cfg.Dir), zap.Error(err))
		}
	}
}

// freeBytes is the space left to an unprivileged writer on dir's
// filesystem.
func freeBytes(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}
