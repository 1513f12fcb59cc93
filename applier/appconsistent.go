package applier

// App-consistent recovery points: a point made from cycles that were cut
// while the group's applications were quiesced (the primary's freeze command
// succeeded before the cut's barrier) is marked app-consistent, and
// retention prefers such points when it picks the point of a slot.

// appConsistent reports whether every cycle of a commit carries
// format.FlagAppConsistent. The flag is part of the verified header, so the
// replica never records a point app-consistent on the strength of a flag it
// did not verify.
func appConsistent(cs []*openedCycle) bool {
	if len(cs) == 0 {
		return false
	}
	for _, c := range cs {
		if !c.r.Header().AppConsistent() {
			return false
		}
	}
	return true
}

// preferPoint reports whether p rather than cur should be the point kept for
// their retention slot: an app-consistent point beats a crash-consistent one
// whatever their order; between two of the same kind the newer one wins.
func preferPoint(p, cur pointRec) bool {
	if p.AppConsistent != cur.AppConsistent {
		return p.AppConsistent
	}
	return !p.Time.Before(cur.Time)
}
