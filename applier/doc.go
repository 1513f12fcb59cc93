// Package applier is the replica side: it verifies cycle files and applies
// them to replica images. This scope is applying to a plain image
// file (standin cycle apply); the replica daemon, recovery points and
// retention build on it.
package applier
