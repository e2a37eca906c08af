// Health: the queue heals itself. The embedded NATS server's warnings and
// errors go to the store's logger; an embedded JetStream that shut itself
// down (its disk filled) is started again once there is room; and the
// store says, at any moment, why it cannot accept (Store.Down), so that
// an operator sees it in the status, a log line and a metric.

package queue

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

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
	if s.server != nil && (!s.server.current().JetStreamEnabled() || s.natsLog.broken.Load()) {
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
	const firstWait = 5 * time.Second
	var lastTry time.Time // of the latest start, while down
	wait := firstWait
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		broken := s.natsLog.broken.Load()
		if s.server.current().JetStreamEnabled() && !broken {
			if down {
				down, lastTry, wait = false, time.Time{}, firstWait
				s.log.Info("mux_webhook queue: the embedded store accepts events again", zap.String("dir", s.cfg.Dir))
			}
			continue
		}
		if !down {
			down = true
			s.log.Error("mux_webhook queue: the embedded store stopped; mux_deliver answers 503 until it has room again",
				zap.String("dir", s.cfg.Dir), zap.String("reason", s.natsLog.lastError()))
		}
		if free, err := freeBytes(s.cfg.Dir); err != nil || free < minFreeToRestart || time.Since(lastTry) < wait {
			continue
		}
		if !lastTry.IsZero() {
			// The last start did not hold (a disk that fails for another
			// reason than room): less and less often, up to every 5 min.
			wait = min(2*wait, 5*time.Minute)
		}
		lastTry = time.Now()
		s.log.Warn("mux_webhook queue: the embedded store's disk has room again; starting the embedded server again", zap.String("dir", s.cfg.Dir))
		if s.cfg.healPause != nil {
			s.cfg.healPause()
		}
		if err := s.server.restart(); err != nil {
			s.log.Error("mux_webhook queue: starting the embedded server again failed; trying again", zap.String("dir", s.cfg.Dir), zap.Error(err))
		}
	}
}

// embedded is the in-process NATS server, replaced whole when it must
// start again: nats-server's JetStream cannot be restarted in a running
// server without races in the server itself. The store's connection
// reaches it through InProcessConn, so it reconnects to the new one.
type embedded struct {
	opts func() *server.Options // a fresh copy for each server
	log  *natsLog
	cur  atomic.Pointer[server.Server]
}

// InProcessConn connects to the running server (nats.InProcessConnProvider).
func (e *embedded) InProcessConn() (net.Conn, error) {
	return e.cur.Load().InProcessConn()
}

func (e *embedded) current() *server.Server { return e.cur.Load() }

// start starts a server on the store and waits until it is ready.
func (e *embedded) start() error {
	srv, err := server.NewServer(e.opts())
	if err != nil {
		return fmt.Errorf("queue: embedded NATS server: %v", err)
	}
	srv.SetLogger(e.log, true, false)
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return errors.New("queue: the embedded NATS server did not start within 10s")
	}
	e.cur.Store(srv)
	return nil
}

// restart shuts the running server down and starts another on the same
// store: its JetStream recovers the stream and the consumers from disk
// (everything acknowledged was fsynced), and the connection reconnects.
func (e *embedded) restart() error {
	e.shutdown()
	e.log.broken.Store(false) // errors from here on are the new server's
	return e.start()
}

func (e *embedded) shutdown() {
	srv := e.cur.Load()
	srv.Shutdown()
	srv.WaitForShutdown()
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
