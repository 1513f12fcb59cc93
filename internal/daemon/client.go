package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/standin/standin/internal/exitcode"
)

// ErrNoDaemon means the control socket of a store did not answer.
var ErrNoDaemon = errors.New("no standin daemon is running for this store")

// Client talks to a store's daemon over its control socket.
type Client struct {
	store string
	hc    *http.Client
}

// NewClient returns a client for the daemon of store.
func NewClient(store string) *Client {
	sock := SocketPath(store)
	return &Client{store: store, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}}
}

// send performs a control request and returns the 200 reply (the caller
// closes its body). Every other outcome is an error with its exit code.
func (c *Client) send(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://standin"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if _, serr := os.Stat(c.store); serr != nil {
			return nil, exitcode.With(exitcode.NotFound, fmt.Errorf("store %s: %w", c.store, serr))
		}
		return nil, exitcode.With(exitcode.NoDaemon, fmt.Errorf("%w (store %s; start it with 'standin mount --store %s MOUNTPOINT'): %v", ErrNoDaemon, c.store, c.store, err))
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	var e apiError
	json.NewDecoder(resp.Body).Decode(&e)
	code := exitcode.Failure
	switch e.Code {
	case "not_found":
		code = exitcode.NotFound
	case "usage":
		code = exitcode.Usage
	case "busy":
		code = exitcode.Busy
	}
	return nil, exitcode.With(code, errors.New(e.Error))
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Status fetches the daemon's status; blocks adds dirty block ranges.
func (c *Client) Status(ctx context.Context, blocks bool) (StatusReply, error) {
	var r StatusReply
	path := "/status"
	if blocks {
		path += "?blocks=1"
	}
	err := c.do(ctx, http.MethodGet, path, nil, &r)
	return r, err
}

// Cut cuts the named images (all when empty) and returns the staged cycles.
func (c *Client) Cut(ctx context.Context, images []string, out any) error {
	return c.do(ctx, http.MethodPost, "/cut", CutRequest{Images: images}, out)
}

// WaitReady polls the control socket until it answers or timeout passes.
func (c *Client) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := c.Status(ctx, false)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Call performs a control call: GET when body is nil, else POST of body as JSON.
func (c *Client) Call(ctx context.Context, path string, body, out any) error {
	method := http.MethodGet
	if body != nil {
		method = http.MethodPost
	}
	return c.do(ctx, method, path, body, out)
}

// Stream posts body and calls on for every NDJSON event of the reply until
// the stream ends. A non-200 reply is an error like Call's.
func (c *Client) Stream(ctx context.Context, path string, body any, on func(json.RawMessage) error) error {
	resp, err := c.send(ctx, http.MethodPost, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var m json.RawMessage
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("daemon stream ended: %w", err)
		}
		if err := on(m); err != nil {
			return err
		}
	}
}
