package shipper

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// Errors callers branch on.
var (
	ErrNotPaired = errors.New("this primary is not paired with that replica")
	ErrRefused   = errors.New("the replica refused")
)

// credDir is where the credentials for one replica live on the primary.
func credDir(store, replica string) string {
	safe := strings.NewReplacer(":", "_", "/", "_", "[", "", "]", "").Replace(replica)
	return filepath.Join(store, "replicas", safe)
}

// Join pairs this primary with a replica using a one-time token: it pins the
// replica's CA from the token, sends a CSR with the token's secret and
// stores the client certificate it gets in STORE/replicas/ADDR/.
func Join(ctx context.Context, store, replica, token, name string) (wire.PairReply, error) {
	tok, err := pki.ParseToken(token)
	if err != nil {
		return wire.PairReply{}, err
	}
	if replica == "" {
		replica = tok.Addr
	}
	host, _, err := net.SplitHostPort(replica)
	if err != nil {
		return wire.PairReply{}, fmt.Errorf("--replica %q: want HOST:PORT: %w", replica, err)
	}
	keyPEM, csrPEM, err := pki.NewCSR(name)
	if err != nil {
		return wire.PairReply{}, err
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedClientTLS(tok.CAFingerprint, host)}}
	body, _ := json.Marshal(wire.PairRequest{Secret: tok.Secret, CSR: csrPEM, Name: name})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+replica+wire.Prefix+"/pair", bytes.NewReader(body))
	if err != nil {
		return wire.PairReply{}, err
	}
	var rep wire.PairReply
	if err := doJSON(hc, req, &rep); err != nil {
		return rep, fmt.Errorf("pairing with %s: %w", replica, err)
	}
	if _, err := pki.CheckJoinReply(tok, keyPEM, rep.Cert, rep.CA); err != nil {
		return rep, fmt.Errorf("pairing with %s: %w", replica, err)
	}
	dir := credDir(store, replica)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return rep, err
	}
	for name, data := range map[string][]byte{"ca.pem": rep.CA, "client.pem": rep.Cert, "client.key": keyPEM} {
		if err := fsutil.WriteFileAtomic(filepath.Join(dir, name), data, 0o600); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// client talks to one replica with the primary's client certificate.
type client struct {
	base string
	hc   *http.Client
}

func newClient(store, replica string) (*client, error) {
	dir := credDir(store, replica)
	ca, err1 := os.ReadFile(filepath.Join(dir, "ca.pem"))
	cert, err2 := os.ReadFile(filepath.Join(dir, "client.pem"))
	key, err3 := os.ReadFile(filepath.Join(dir, "client.key"))
	if err := errors.Join(err1, err2, err3); err != nil {
		return nil, fmt.Errorf("%w %s (run 'standin pair token' on the replica, then 'standin pair join --store %s --replica %s --token TOKEN' here): %v", ErrNotPaired, replica, store, replica, err)
	}
	host, _, err := net.SplitHostPort(replica)
	if err != nil {
		return nil, err
	}
	cfg, err := pki.ClientTLS(ca, cert, key, host)
	if err != nil {
		return nil, err
	}
	return &client{base: "https://" + replica + wire.Prefix, hc: &http.Client{Transport: &http.Transport{
		TLSClientConfig:     cfg,
		TLSHandshakeTimeout: 15 * time.Second,
		IdleConnTimeout:     time.Minute,
		// Uploads ask first (Expect: 100-continue): a refusal (quota, size,
		// offset) is read before the body is sent, not lost to the reset of
		// a connection the replica closes with the body unread.
		ExpectContinueTimeout: 5 * time.Second,
	}}}, nil
}

// RemoteError is a refusal by the replica.
type RemoteError struct {
	Status  int
	Msg     string
	Code    string
	Missing []wire.MissingBlocks // code "missing_chunks"
}

func (e *RemoteError) Error() string { return fmt.Sprintf("replica: %s (%s)", e.Msg, e.Code) }
func (e *RemoteError) Unwrap() error {
	if err := pki.CodeError(e.Code); err != nil {
		return err
	}
	switch e.Code {
	case "refused", "forbidden", "corrupt":
		return ErrRefused
	case "failed_over":
		return ErrFailedOver
	case "quota":
		return ErrQuota
	}
	return nil
}

func doJSON(hc *http.Client, req *http.Request, out any) error {
	resp, err := hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			var ce *tls.CertificateVerificationError
			if errors.As(err, &ce) || strings.Contains(err.Error(), "certificate") {
				return fmt.Errorf("TLS: the replica's certificate does not match the pinned one: %w", err)
			}
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var e wire.Error
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e = wire.Error{Error: strings.TrimSpace(string(b)), Code: "failure"}
		}
		return &RemoteError{Status: resp.StatusCode, Msg: e.Error, Code: e.Code, Missing: e.Missing}
	}
	if out == nil {
		return nil
	}
	lr := &io.LimitedReader{R: resp.Body, N: maxReplyBytes + 1}
	if err := json.NewDecoder(lr).Decode(out); err != nil {
		if lr.N <= 0 {
			return fmt.Errorf("replica reply of more than %d bytes refused", maxReplyBytes)
		}
		return fmt.Errorf("replica reply: %w", err)
	}
	return nil
}

// maxReplyBytes bounds a JSON reply of the replica (the largest, a group's
// state, is a few hundred bytes per image).
const maxReplyBytes = 16 << 20

func (c *client) uploadPath(group string, r wire.CycleRef) string {
	return fmt.Sprintf("%s/groups/%s/uploads/%s/%d/%d", c.base, url.PathEscape(group), url.PathEscape(r.ID), r.Gen, r.Seq)
}

func (c *client) state(ctx context.Context, group string, r wire.CycleRef) (wire.UploadState, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.uploadPath(group, r), nil)
	if err != nil {
		return wire.UploadState{}, err
	}
	var st wire.UploadState
	return st, doJSON(c.hc, req, &st)
}

// upload sends the cycle file at path from the first byte not yet durable on
// the replica. It returns the bytes it sent.
func (c *client) upload(ctx context.Context, group, name string, r wire.CycleRef, path string, lim *limiter) (int64, error) {
	var sent int64
	hash, _, err := fileHash(path)
	if err != nil {
		return 0, err
	}
	for attempt := 0; attempt < 3; attempt++ {
		st, err := c.state(ctx, group, r)
		if err != nil {
			return sent, err
		}
		if st.Applied {
			return sent, nil
		}
		if st.FileHash != "" && st.FileHash != hash {
			// Another variant of the cycle (thinned or whole) is there.
			if err := c.discard(ctx, group, name, r); err != nil {
				return sent, err
			}
			continue
		}
		if st.Complete {
			return sent, nil
		}
		f, err := os.Open(path)
		if err != nil {
			return sent, err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return sent, err
		}
		total := fi.Size()
		if st.Offset > total {
			f.Close()
			return sent, fmt.Errorf("replica holds %d bytes of a %d-byte cycle", st.Offset, total)
		}
		body := &countingReader{r: lim.reader(ctx, io.NewSectionReader(f, st.Offset, total-st.Offset))}
		u := fmt.Sprintf("%s?offset=%d&total=%d&name=%s&hash=%s", c.uploadPath(group, r), st.Offset, total, url.QueryEscape(name), hash)
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, u, body)
		if err != nil {
			f.Close()
			return sent, err
		}
		req.ContentLength = total - st.Offset
		req.Header.Set("Expect", "100-continue")
		var rep wire.UploadState
		err = doJSON(c.hc, req, &rep)
		f.Close()
		sent += body.n.Load()
		var re *RemoteError
		if errors.As(err, &re) && re.Status == http.StatusConflict {
			continue // the durable offset moved or another variant is there: ask again
		}
		if err != nil {
			return sent, err
		}
		if rep.Complete {
			return sent, nil
		}
	}
	return sent, errors.New("upload did not complete after 3 attempts")
}

func (c *client) commit(ctx context.Context, group string, cr wire.CommitRequest) (wire.CommitReply, error) {
	b, _ := json.Marshal(cr)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("%s/groups/%s/commit", c.base, url.PathEscape(group)), bytes.NewReader(b))
	if err != nil {
		return wire.CommitReply{}, err
	}
	var rep wire.CommitReply
	return rep, doJSON(c.hc, req, &rep)
}

// announceSeed tells the replica which seed the group's relationship starts
// from; it answers with the images it holds.
func (c *client) announceSeed(ctx context.Context, group string, e wire.SeedExpect) (wire.GroupState, error) {
	b, _ := json.Marshal(e)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("%s/groups/%s/seed", c.base, url.PathEscape(group)), bytes.NewReader(b))
	if err != nil {
		return wire.GroupState{}, err
	}
	var rep wire.GroupState
	return rep, doJSON(c.hc, req, &rep)
}

type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// limiter throttles uploads to the group's bandwidth (token bucket), following
// the time-of-day schedule.
type limiter struct {
	g  *Group
	rl *rate.Limiter
}

const burst = 64 << 10

func newLimiter(g *Group) *limiter {
	return &limiter{g: g, rl: rate.NewLimiter(rate.Inf, burst)}
}

func (l *limiter) reader(ctx context.Context, r io.Reader) io.Reader {
	return readerFunc(func(p []byte) (int, error) {
		bw := l.g.Rate(time.Now())
		if bw <= 0 {
			l.rl.SetLimit(rate.Inf)
			return r.Read(p)
		}
		if l.rl.Limit() != rate.Limit(bw) {
			l.rl.SetLimit(rate.Limit(bw))
		}
		if len(p) > burst {
			p = p[:burst]
		}
		n, err := r.Read(p)
		if n > 0 {
			if werr := l.rl.WaitN(ctx, n); werr != nil {
				return n, werr
			}
		}
		return n, err
	})
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }
