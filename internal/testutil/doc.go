// Package testutil holds scaffolding shared by the tests of several
// packages: fuzz guards (a watchdog against hangs, a bound on allocations),
// a temporary directory in memory, and checks run as an unprivileged user.
//
// It is imported only by _test.go files; production code must not import it.
package testutil
