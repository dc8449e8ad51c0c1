package broker

import (
	"errors"
	"fmt"
	"strings"

	"github.com/slotwatch/slotwatch/monitor"
)

// What the broker answers besides the module's own errors (package module's
// sentinels, which pass through wrapped). A face maps each to exactly one
// error of its own; match with errors.Is.
var (
	// ErrInvalidArgument: the call's arguments are wrong (a PIN too long, an
	// unknown user type or mechanism, an empty label).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrAccessDenied: the session belongs to another caller.
	ErrAccessDenied = errors.New("access denied")
	// ErrBusy: the token could not be had within Limits.TokenWait (another
	// caller's login, an InitToken, a removed token draining), another
	// InitToken runs on it, or the caller is past one of its Limits.
	ErrBusy = errors.New("busy")
	// ErrSessionsExist: InitToken without force, or an SO login, while
	// sessions are open; the error is a *SessionsExistError naming them.
	ErrSessionsExist = errors.New("sessions exist")
	// ErrNotLoggedIn: the caller is not logged in (Logout), or another
	// caller's login is in the way of an operation that needs one (Sign).
	ErrNotLoggedIn = errors.New("not logged in")
	// ErrAlreadyLoggedIn: another caller is logged in to the token.
	ErrAlreadyLoggedIn = errors.New("already logged in")
	// ErrNotSupported: slotwatch does not offer this (a mechanism, a
	// context-specific login).
	ErrNotSupported = errors.New("not supported")
	// ErrTokenRemoved: the generation is dead; the card now in the slot,
	// if any, is another one.
	ErrTokenRemoved = monitor.ErrTokenRemoved
	// ErrNoSuchSession: no open session has this id (closed, or never
	// issued); SessionGeneration tells which.
	ErrNoSuchSession = errors.New("no such session")
	// ErrCallerGone: the caller left (Leave) before the call completed.
	ErrCallerGone = errors.New("caller left")
	// ErrNoSuchObject: an object handle the caller was not given on this
	// token (by a search or by a call that made the object).
	ErrNoSuchObject = errors.New("no such object")
)

// Error is a broker error with a message for people; errors.Is matches its
// Kind.
type Error struct {
	Kind error
	Msg  string
}

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Kind }

func errorf(kind error, format string, args ...any) error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

// SessionsExistError is ErrSessionsExist with who holds the sessions.
type SessionsExistError struct {
	What     string   // what was refused: "InitToken", "SO login"
	Sessions int      // how many sessions are open
	Holders  []Caller // each holder once, by their first session
	Cause    error    // the module's answer, if it refused (CKR_SESSION_READ_ONLY_EXISTS)
}

func (e *SessionsExistError) Error() string {
	names := make([]string, len(e.Holders))
	for i, h := range e.Holders {
		names[i] = h.String()
	}
	held := "held by nobody slotwatch brokers (another process of this user, or slotwatch's own lookups)"
	if len(names) > 0 {
		held = "held by: " + strings.Join(names, "; ")
	}
	return fmt.Sprintf("%s refused: %d session(s) open on this token, %s", e.What, e.Sessions, held)
}

func (e *SessionsExistError) Is(target error) bool { return target == ErrSessionsExist }
func (e *SessionsExistError) Unwrap() error        { return e.Cause }
