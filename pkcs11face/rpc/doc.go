// Package rpc is the server side of p11-kit's RPC protocol, as spoken by
// p11-kit-client.so from p11-kit 0.24.1 (Debian 12) over a unix socket.
//
// A process that loads p11-kit-client.so with P11_KIT_SERVER_ADDRESS
// pointing at our socket gets an ordinary PKCS#11 module whose every call
// travels here. Serve owns one such connection: the version handshake,
// the framing, decoding each call, PKCS#11's output-buffer conventions
// (length queries, CKR_BUFFER_TOO_SMALL, per-attribute results of
// C_GetAttributeValue), C_Initialize and C_Finalize, and encoding the
// answer. Everything a call means is left to a Handler; this package
// knows nothing of slots, tokens or sessions beyond the handle numbers
// it passes through, and nothing of the daemon behind the Handler.
//
// # What the 0.24.1 client does, and what Serve does about it
//
//   - One connection per loaded module instance: the client connects in
//     C_Initialize and closes the socket right after C_Finalize. Every
//     thread of the client process shares that connection.
//   - Several calls may be outstanding on the connection at once. The
//     client numbers each request in the frame header and its threads
//     take the answer carrying their own number, in whatever order the
//     answers arrive. C_WaitForSlotEvent is forwarded as an ordinary call
//     on that same connection. p11-kit's own server answers one request
//     at a time, so there a blocked C_WaitForSlotEvent stalls every other
//     thread of the client until an event comes; Serve instead runs the
//     calls of one connection concurrently (Options.MaxInFlight of them)
//     and never lets waits take every slot, so a blocked wait holds up
//     nobody. A call that arrives while nothing else runs is answered on
//     the reading goroutine (no hand-over: p11-kit server's speed for the
//     common one-call-at-a-time client); a call arriving meanwhile waits
//     for it, as it would with p11-kit's server, unless the running one is
//     a C_WaitForSlotEvent, which always runs on a goroutine of its own.
//   - C_Finalize from another thread while a wait is blocked: Serve
//     cancels the wait's context and answers it with
//     CKR_CRYPTOKI_NOT_INITIALIZED, as PKCS#11 asks. The order matters:
//     0.24.1 aborts the client process (an assertion on the connection's
//     reference count in rpc-transport.c) when the waiting thread lets go
//     of the connection after the finalizing thread has closed it, so
//     Serve answers the waits first and holds the C_Finalize answer back
//     for 100 ms.
//   - The client passes the length of the caller's output buffer, and 0
//     when the caller passed NULL to learn the length. 0.24.1 also sends
//     0 for a non-NULL buffer of length 0, so both are a length query
//     here.
//
// Protocol facts the code depends on are collected in protocol.go.
package rpc
