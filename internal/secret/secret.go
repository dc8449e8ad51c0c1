// Package secret keeps small secrets — a PIN slotwatch must present again
// after a recovery — in memory of their own: an anonymous mapping, locked
// so it is never written to swap, marked MADV_DONTDUMP so it is left out of
// core dumps, and wiped (zeroed, unlocked, unmapped) when released. Go's
// heap gives none of this: a PIN copied there may stay in freed memory,
// swap or a crash dump for as long as the process lives.
package secret

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
)

// madvDontDump is MADV_DONTDUMP (Linux 3.4), not in package syscall.
const madvDontDump = 16

// MaxLen bounds a secret: one page holds it.
var MaxLen = os.Getpagesize()

// ErrTooLong: the secret does not fit the page.
var ErrTooLong = errors.New("secret: too long")

// Secret is one secret in locked memory. The zero value and nil are empty.
// Safe for concurrent use.
type Secret struct {
	mu  sync.Mutex
	mem []byte // the whole mapping; nil once wiped
	n   int
}

// New copies b into locked, non-dumpable memory. It fails if the memory
// cannot be locked (RLIMIT_MEMLOCK): a secret that may be swapped out is
// not kept at all.
func New(b []byte) (*Secret, error) {
	if len(b) > MaxLen {
		return nil, ErrTooLong
	}
	mem, err := syscall.Mmap(-1, 0, MaxLen, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, fmt.Errorf("secret: mmap: %w", err)
	}
	if err := syscall.Mlock(mem); err != nil {
		syscall.Munmap(mem)
		return nil, fmt.Errorf("secret: mlock (RLIMIT_MEMLOCK?): %w", err)
	}
	if err := syscall.Madvise(mem, madvDontDump); err != nil {
		syscall.Munlock(mem)
		syscall.Munmap(mem)
		return nil, fmt.Errorf("secret: madvise(MADV_DONTDUMP): %w", err)
	}
	copy(mem, b)
	return &Secret{mem: mem, n: len(b)}, nil
}

// Use calls f with the secret (nil once wiped). f must not keep the slice.
func (s *Secret) Use(f func(b []byte) error) error {
	if s == nil {
		return f(nil)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil {
		return f(nil)
	}
	return f(s.mem[:s.n:s.n])
}

// Wipe zeroes the secret and gives its memory back. Idempotent; nil-safe.
func (s *Secret) Wipe() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil {
		return
	}
	clear(s.mem)
	syscall.Munlock(s.mem)
	syscall.Munmap(s.mem)
	s.mem, s.n = nil, 0
}

// Wiped tells whether Wipe ran (or s is nil).
func (s *Secret) Wiped() bool {
	if s == nil {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mem == nil
}
