package rpc

import (
	"crypto/sha256"
	"sync"

	"github.com/miekg/pkcs11"
)

// Results kept for a length query.
//
// PKCS#11 lets a caller ask a function for the size of its output (NULL
// buffer) or offer too small a buffer, then call again with the same
// arguments; the operation is not ended meanwhile. The Handler returns
// whole results instead, so a call that consumes its input or ends the
// operation cannot simply be asked twice: the server runs it once and
// keeps the result until the caller takes it. A kept result is handed
// out only to a call of the same function on the same session with the
// identical request (compared by SHA-256 of everything but the buffer
// size); any other call of that function goes to the Handler, and
// starting a new operation, closing the session or finalizing forgets
// it, so a result can never turn up for an operation it was not made in.

type pendingKey struct {
	session pkcs11.SessionHandle
	call    callID
}

type pendingResult struct {
	request [sha256.Size]byte
	out     []byte
	seq     uint64 // age, for eviction
}

// maxPending bounds the results kept per connection; a caller that keeps
// asking for lengths and never collects loses the oldest.
const maxPending = 32

// output runs a call whose result goes to an "fy" buffer through the kept
// results. body is the request body; its last 4 bytes are the buffer
// size (done has checked that nothing follows it).
func (s *server) output(e *encoder, sh pkcs11.SessionHandle, id callID, body []byte, buf outBuffer, run func() ([]byte, error)) error {
	key := pendingKey{sh, id}
	fingerprint := sync.OnceValue(func() [sha256.Size]byte {
		return sha256.Sum256(body[:len(body)-4])
	})
	out, kept := s.takePending(key, fingerprint)
	if !kept {
		var err error
		if out, err = run(); err != nil {
			return err
		}
		if len(out) >= maxArrayLen {
			return errBadResult
		}
	}
	if !e.outBytes(out, buf) {
		s.storePending(key, fingerprint(), out)
	}
	return nil
}

// takePending removes and returns the result kept under key if it was
// made for the same request.
func (s *server) takePending(key pendingKey, fingerprint func() [sha256.Size]byte) ([]byte, bool) {
	s.mu.Lock()
	p, ok := s.pending[key]
	delete(s.pending, key)
	s.mu.Unlock()
	if !ok || p.request != fingerprint() {
		return nil, false
	}
	return p.out, true
}

func (s *server) storePending(key pendingKey, request [sha256.Size]byte, out []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.initialized {
		return // finalized meanwhile
	}
	if _, ok := s.pending[key]; !ok && len(s.pending) >= maxPending {
		var oldest pendingKey
		first := true
		for k, p := range s.pending {
			if first || p.seq < s.pending[oldest].seq {
				oldest, first = k, false
			}
		}
		delete(s.pending, oldest)
	}
	s.pendingSeq++
	s.pending[key] = &pendingResult{request: request, out: out, seq: s.pendingSeq}
}

func (s *server) dropPending(sh pkcs11.SessionHandle, ids []callID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		delete(s.pending, pendingKey{sh, id})
	}
}

func (s *server) dropSession(sh pkcs11.SessionHandle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.pending {
		if k.session == sh {
			delete(s.pending, k)
		}
	}
}

func (s *server) dropAllPending() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.pending)
}
