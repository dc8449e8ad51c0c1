// Package broker shares the tokens slotwatch watches among uncoordinated
// callers: it is the one owner of who holds which PKCS#11 session, who is
// logged in to which token, who may initialize a token, and how much of the
// daemon one caller may use. It knows no transport: a face (dbusapi for the
// D-Bus session bus, later the PKCS#11 socket) decides who a caller is
// (Caller), hands that value in with every call, and turns the errors in
// errors.go into its own.
//
// # What it guarantees
//
//   - A session belongs to the caller that opened it; every call on it from
//     another caller fails with ErrAccessDenied. CloseAll and Leave close the
//     caller's own sessions and nobody else's.
//   - A login belongs to the caller that made it. Another caller's sessions
//     on the same token see no private object and cannot sign, also when
//     the two race: Login and Logout take the token's lock exclusively, every
//     other operation on the token takes it shared, so no operation runs
//     across a change of login. When the login's owner closes its last
//     session on the token (or leaves), the broker logs the token out
//     explicitly, on that session, before it closes it.
//   - Module calls happen only under a held generation: hold is the only way
//     to get a token's module, and it holds the generation (monitor.Acquire),
//     the token's lock and one of the caller's call slots together. A call
//     that cannot get its token within Limits.TokenWait answers ErrBusy, and
//     a slow call holds up only its own token.
//   - InitToken checks the SO PIN before it closes anybody's session where
//     PKCS#11 lets it (see InitToken), and runs at most once at a time per
//     token.
//   - Limits: sessions per caller per token, calls per caller in flight, and
//     objects per FindObjects (Limits).
//
// # Locks
//
// Taken in this order:
//
//  1. the token lock (tokenLock), one per generation: shared for operations,
//     exclusive for Login, Logout, InitToken and a close that logs out;
//     held across module calls;
//  2. Broker.mu: the tables (callers, sessions, tokens). A leaf: never held
//     across a module call or while waiting for a token lock.
//
// Observer calls (the face's objects) are made with the token lock held, so
// a session's opening, state changes and closing reach the face in order.
//
// # Files
//
//   - broker.go: the Broker, its options and limits, callers joining and
//     leaving, hold;
//   - sessions.go: opening and closing sessions, removal of a generation;
//   - login.go: Login and Logout;
//   - inittoken.go: InitToken;
//   - objects.go: FindObjects, ListCertificates and Sign;
//   - tokenlock.go: the token lock with a bounded wait;
//   - caller.go: who a caller is; errors.go: what the broker answers.
package broker
