// Package exitcode is the one place where errors become process exit codes.
// The table is part of the CLI contract documented in docs/cli.md.
package exitcode

import (
	"errors"
)

// Exit codes of the standin binary.
const (
	OK       = 0 // success
	Failure  = 1 // any error not listed below
	Usage    = 2 // wrong flags or arguments
	Corrupt  = 3 // input failed verification (hash, structure, truncation)
	Refused  = 4 // input is well-formed but refused: foreign identity, gap, replay, out of order
	NoDaemon = 5 // the daemon of the store is not running (control socket unreachable)
	NotFound = 6 // a named file, image or store does not exist
	Busy     = 7 // the resource is in use (mount busy, store locked by another daemon)
)

// Error carries an exit code with an error.
type Error struct {
	Code int
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// With wraps err so that Code(err) returns code.
func With(code int, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Code: code, Err: err}
}

// classifiers let packages map their sentinel errors to codes without this
// package importing them (it sits below every other package).
var classifiers []func(error) (int, bool)

// Register adds a classifier consulted by Code.
func Register(f func(error) (int, bool)) { classifiers = append(classifiers, f) }

// Code returns the exit code for err.
func Code(err error) int {
	if err == nil {
		return OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	for _, f := range classifiers {
		if c, ok := f(err); ok {
			return c
		}
	}
	return Failure
}
