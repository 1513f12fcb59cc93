package daemon

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/standin/standin/shipper"
)

// ReplicateRequest is the body of the /replicate/* control calls.
type ReplicateRequest struct {
	Group  shipper.Group `json:"group"` // enable
	Name   string        `json:"name"`  // disable, pause, resume, now
	Wait   bool          `json:"wait"`  // now
	Paused bool          `json:"paused"`
	Window string        `json:"window,omitempty"` // resync: "HH:MM-HH:MM"
	// AppConsistent: now --app-consistent (freeze, cut, thaw).
	AppConsistent bool `json:"app_consistent,omitempty"`
}

func replicationControl(mux *http.ServeMux, sh *shipper.Shipper) {
	handle := func(f func(ReplicateRequest, *http.Request) (any, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			var req ReplicateRequest
			if r.Method == http.MethodPost {
				if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
					reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
					return
				}
			}
			v, err := f(req, r)
			if err != nil {
				code, status := "failure", http.StatusInternalServerError
				if errors.Is(err, shipper.ErrNoGroup) {
					code, status = "not_found", http.StatusNotFound
				}
				reply(w, status, apiError{Error: err.Error(), Code: code})
				return
			}
			reply(w, http.StatusOK, v)
		}
	}
	ok := map[string]bool{"ok": true}
	mux.HandleFunc("GET /replicate", handle(func(ReplicateRequest, *http.Request) (any, error) {
		return sh.Status(), nil
	}))
	mux.HandleFunc("GET /replicate/config", handle(func(ReplicateRequest, *http.Request) (any, error) {
		return sh.Groups(), nil
	}))
	mux.HandleFunc("POST /replicate/enable", handle(func(req ReplicateRequest, _ *http.Request) (any, error) {
		return ok, sh.Enable(req.Group)
	}))
	mux.HandleFunc("POST /replicate/disable", handle(func(req ReplicateRequest, _ *http.Request) (any, error) {
		return ok, sh.Disable(req.Name)
	}))
	mux.HandleFunc("POST /replicate/pause", handle(func(req ReplicateRequest, _ *http.Request) (any, error) {
		return ok, sh.Update(req.Name, func(g *shipper.Group) { g.Paused = req.Paused })
	}))
	mux.HandleFunc("POST /replicate/now", handle(func(req ReplicateRequest, r *http.Request) (any, error) {
		if req.AppConsistent {
			return ok, sh.NowAppConsistent(r.Context(), req.Name, req.Wait)
		}
		return ok, sh.Now(r.Context(), req.Name, req.Wait)
	}))
	mux.HandleFunc("POST /replicate/resync", handle(func(req ReplicateRequest, _ *http.Request) (any, error) {
		return ok, sh.Resync(req.Name, req.Window)
	}))
}
