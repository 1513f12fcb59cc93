package applier

import (
	"net/http"
	"time"

	"github.com/standin/standin/internal/netlimit"
)

// Connection handling of the replica API (see internal/netlimit for the
// listener side): every request body must make progress (at least
// netlimit.MinProgress bytes per BodyTimeout, so slow but moving uploads are
// never cut), every response is written within WriteTimeout, and requests
// without a verified client certificate (pairing, refusals) close their
// connection after the answer, so an unauthenticated client cannot park idle
// keep-alive connections.

// limited wraps the API handler.
func (s *Server) limited(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		// A deadline of the previous request on this connection must not
		// cut this one's response (the server sets none without WriteTimeout).
		rc.SetWriteDeadline(time.Time{})
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			w.Header().Set("Connection", "close")
		}
		if s.BodyTimeout > 0 && r.Body != nil && r.Body != http.NoBody {
			r.Body = &netlimit.ProgressReader{R: r.Body, SetDeadline: rc.SetReadDeadline, Window: s.BodyTimeout}
		}
		h.ServeHTTP(w, r)
	})
}

// writeDeadline bounds writing the response that follows (the request's
// work, e.g. a long apply, is done by now).
func (s *Server) writeDeadline(w http.ResponseWriter) {
	if s.WriteTimeout > 0 {
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(s.WriteTimeout))
	}
}

// closeAfter reports whether a refusal with this status ends the connection:
// unauthenticated or forbidden clients, and bodies left unread.
func closeAfter(status int) bool {
	switch status {
	case http.StatusUnauthorized, http.StatusForbidden, http.StatusRequestEntityTooLarge, http.StatusInsufficientStorage:
		return true
	}
	return false
}

// checkBodySize refuses, before reading it, an upload body longer than the
// bytes left of its cycle, or a cycle larger than MaxCycleBytes (413).
func (s *Server) checkBodySize(r *http.Request, off, total int64) error {
	if total > s.MaxCycleBytes {
		return fail(http.StatusRequestEntityTooLarge, "too_large", "cycle of %d bytes is larger than this replica accepts (%d bytes)", total, s.MaxCycleBytes)
	}
	if r.ContentLength > total-off {
		return fail(http.StatusRequestEntityTooLarge, "too_large", "upload body of %d bytes is longer than the %d bytes left of the %d-byte cycle from offset %d", r.ContentLength, total-off, total, off)
	}
	return nil
}
