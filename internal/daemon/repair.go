package daemon

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/standin/standin/applier"
)

// RepairRequest is the body of POST /replica/repair on the replica control
// socket: show what is pending in a group and, with Drop, roll a pending
// apply that cannot finish back to the last good point.
type RepairRequest struct {
	Group string `json:"group"`
	Drop  bool   `json:"drop_pending"`
}

// Repair serves a RepairRequest on rep (the daemon's store, or a store the
// CLI opened itself when no daemon runs).
func Repair(rep *applier.Replica, req RepairRequest) (applier.PendingReport, error) {
	if req.Drop {
		return rep.DropPending(req.Group)
	}
	return rep.Pending(req.Group)
}

func repairControl(mux *http.ServeMux, rep *applier.Replica) {
	mux.HandleFunc("POST /replica/repair", func(w http.ResponseWriter, r *http.Request) {
		var req RepairRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		res, err := Repair(rep, req)
		switch {
		case errors.Is(err, applier.ErrNoGroup), errors.Is(err, applier.ErrBadName):
			reply(w, http.StatusNotFound, apiError{Error: err.Error(), Code: "not_found"})
		case err != nil:
			reply(w, http.StatusConflict, apiError{Error: err.Error(), Code: "refused"})
		default:
			reply(w, http.StatusOK, res)
		}
	})
}
