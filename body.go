// Reading the request body: bounded by max_body in size, by body_timeout
// in time, and allocated as bytes arrive, never by what Content-Length
// claims.

package muxwebhook

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

// firstBodyBuffer is the most a body buffer starts with before any byte
// arrived; it then grows fourfold as bytes arrive, up to the claimed
// length (or max_body for a chunked body). Webhooks are a few KiB: they
// fit the first buffer exactly, in one allocation.
const firstBodyBuffer = 16 << 10

// readBody reads the whole body, refusing more than MaxBody bytes
// (ErrTooLarge) and a body that does not arrive within BodyTimeout
// (ErrBodyTimeout).
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	if r.ContentLength > h.MaxBody {
		return nil, ErrTooLarge
	}
	if r.Body == nil || r.Body == http.NoBody {
		return []byte{}, nil
	}
	// The body must arrive within body_timeout: a read deadline on the
	// connection (HTTP/1 and HTTP/2), lifted once the body is in, since the
	// route after mux_webhook may take longer; where the server cannot set
	// one, a timer that closes the body.
	var body []byte
	var err error
	timedOut := false
	timeout := time.Duration(h.BodyTimeout)
	rc := http.NewResponseController(w)
	if rc.SetReadDeadline(time.Now().Add(timeout)) == nil {
		body, err = readBounded(r.Body, r.ContentLength, h.MaxBody)
		if err == nil {
			_ = rc.SetReadDeadline(time.Time{})
		} else {
			// Leave the connection unreadable (it closes after the
			// answer), or net/http would wait for the rest of the body
			// before answering.
			_ = rc.SetReadDeadline(time.Now())
		}
	} else {
		// No deadline here: read in a goroutine and stop waiting when the
		// time is up (closing the body would not do: net/http's Close
		// waits for a Read in progress). The reader goes on until the
		// client sends or goes, at most max_body bytes.
		type outcome struct {
			body []byte
			err  error
		}
		done := make(chan outcome, 1)
		go func() {
			b, e := readBounded(r.Body, r.ContentLength, h.MaxBody)
			done <- outcome{b, e}
		}()
		timer := time.NewTimer(timeout)
		select {
		case o := <-done:
			timer.Stop()
			body, err = o.body, o.err
		case <-timer.C:
			timedOut, err = true, ErrBodyTimeout
		}
	}
	switch {
	case err == nil:
		return body, nil
	case errors.Is(err, ErrTooLarge):
		return nil, err
	case timedOut || errors.Is(err, ErrBodyTimeout) || isTimeout(err):
		return nil, ErrBodyTimeout
	}
	// A request_body limit earlier in the route is a size problem too.
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		return nil, ErrTooLarge
	}
	return nil, fmt.Errorf("%w: %v", ErrReadBody, err)
}

// dropUnreadBody makes the connection forget a body the handler refuses
// without reading: net/http would otherwise wait for (up to 256 KiB of)
// it before answering, which a client that sends nothing drags out
// forever. The connection is closed after the answer.
func dropUnreadBody(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody {
		return
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Now())
}

func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	ne, ok := errors.AsType[net.Error](err)
	return ok && ne.Timeout()
}

// readBounded reads a body that claims length bytes (-1: unknown), at most
// limit. Memory follows the bytes that arrived: a buffer of at most
// firstBodyBuffer to start with, grown fourfold, never beyond the claim.
func readBounded(rd io.Reader, length, limit int64) ([]byte, error) {
	want := length // the most bytes this body may hold
	if want < 0 {
		want = limit + 1 // one more, to tell "too large"
	}
	if want == 0 {
		return []byte{}, nil
	}
	first := int64(firstBodyBuffer)
	if length < 0 {
		first = 512 // chunked: no claim to size the first buffer by
	}
	buf := make([]byte, 0, min(want, first))
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) >= want {
				break
			}
			grown := make([]byte, len(buf), min(want, int64(cap(buf))*4))
			copy(grown, buf)
			buf = grown
		}
		n, err := rd.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	if int64(len(buf)) > limit {
		return nil, ErrTooLarge
	}
	if length >= 0 && int64(len(buf)) < length {
		return nil, io.ErrUnexpectedEOF
	}
	return buf, nil
}

// restoreBody gives the request its body back for the next handlers, as a
// plain body of known length: a chunked delivery reaches an upstream with a
// Content-Length, and the proxy may re-read it on retries via GetBody.
// The slice is not pooled: the proxy transport may read it after ServeHTTP
// has returned.
func restoreBody(r *http.Request, body []byte) {
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(body)), nil
	}
	r.ContentLength = int64(len(body))
	r.TransferEncoding = nil
	r.Header.Del("Transfer-Encoding")
	if r.Header.Get("Content-Length") != "" {
		r.Header.Set("Content-Length", strconv.Itoa(len(body)))
	}
}
