package monitor

import "time"

// backoff is a capped exponential delay: Min, 2·Min, 4·Min, … up to Max.
type backoff struct {
	Min, Max time.Duration
	next     time.Duration
}

// Next returns the delay to wait now and doubles the following one.
func (b *backoff) Next() time.Duration {
	if b.next == 0 {
		b.next = b.Min
	}
	d := b.next
	b.next = min(2*b.next, b.Max)
	return d
}

// Reset starts again from Min after a success.
func (b *backoff) Reset() { b.next = 0 }

// sleep waits for d or until stop is closed; it reports whether d passed.
func sleep(d time.Duration, stop <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}
