// Package pkcs11face is slotwatch's PKCS#11 face: p11-kit's RPC protocol on
// a unix socket, for every PKCS#11 program that loads p11-kit-client.so.
//
// It owns the socket (Listen: this user only, a stale socket replaced
// safely), the connections — each a broker caller named after its process
// from SO_PEERCRED, whose sessions close when it goes — the slot IDs every
// connection sees (stable for the daemon's life), each connection's
// C_WaitForSlotEvent queue fed by the monitor, and the mapping of the
// broker's and modules' errors to CK_RV (errors.go). The protocol itself is
// package rpc; the invariants (who owns which session, login and object)
// are the broker's: this package only translates.
//
// Files: listen.go (socket, peer credentials), server.go (accept, callers),
// conn.go (slots, tokens, sessions, logins, searches, slot events),
// crypto.go (the calls passed through to the module), slots.go (slot IDs,
// event queues), errors.go (CK_RV mapping).
package pkcs11face
