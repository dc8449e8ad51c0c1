package policy

import (
	"slices"
	"strings"
	"time"

	"github.com/slotwatch/slotwatch/monitor"
)

// The removal grace, and suspend and resume: a removal in scope acts only
// once its grace is over, counted from the resume while the system sleeps,
// and not at all if the same card comes back meanwhile.

// sleepHoldLimit bounds how long removals wait for a Resume that does not
// come (logind restarted or the system bus went away while the system
// slept). The clock Go's timers run on stands still while the system is
// suspended, so this counts only the time awake between Sleep and Resume,
// which is seconds.
const sleepHoldLimit = 2 * time.Minute

// pendingRemoval is a removal whose action waits for its grace.
type pendingRemoval struct {
	tok   *monitor.Token
	grace time.Duration
	due   time.Time // zero while the system sleeps: the grace starts at the resume
}

// sleepChange is one Sleep (start) or Resume call.
type sleepChange struct {
	start bool
	at    time.Time
}

// Sleep tells the policy that the system is about to sleep (logind's
// PrepareForSleep(true)): removal graces stop running until Resume. It
// never blocks and may be called from any goroutine.
func (p *Policy) Sleep() { p.queueSleep(true) }

// Resume tells the policy that the system has resumed (logind's
// PrepareForSleep(false)): the grace of every removal that waits starts
// now. It never blocks and may be called from any goroutine.
func (p *Policy) Resume() { p.queueSleep(false) }

func (p *Policy) queueSleep(start bool) {
	p.mu.Lock()
	p.sleeps = append(p.sleeps, sleepChange{start: start, at: time.Now()})
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// takeSleeps applies the Sleep and Resume calls made since the last time,
// in order; on the policy's goroutine only.
func (p *Policy) takeSleeps() {
	p.mu.Lock()
	changes := p.sleeps
	p.sleeps = nil
	p.mu.Unlock()
	for _, c := range changes {
		if c.start {
			p.sleep(c.at)
		} else {
			p.resume(c.at, "resumed from sleep")
		}
	}
}

// sleep stops every running grace: it starts again at the resume.
func (p *Policy) sleep(at time.Time) {
	if p.asleep {
		return
	}
	p.asleep = true
	p.sleepLimit = at.Add(sleepHoldLimit)
	for i := range p.pending {
		p.pending[i].due = time.Time{}
	}
	p.log.Info("going to sleep: removal actions wait for the resume", "waiting", len(p.pending))
}

// resume starts the grace of every removal that waits for it.
func (p *Policy) resume(at time.Time, why string) {
	if !p.asleep {
		p.log.Debug("resume without a sleep before it")
		return
	}
	p.asleep = false
	for i := range p.pending {
		if p.pending[i].due.IsZero() {
			p.pending[i].due = at.Add(p.pending[i].grace)
		}
	}
	p.log.Info(why+": removal graces start now", "waiting", len(p.pending))
}

// expire carries out the actions whose grace ended by now, and stops
// waiting for a Resume that did not come within sleepHoldLimit.
func (p *Policy) expire(now time.Time) {
	if p.asleep && !now.Before(p.sleepLimit) {
		p.log.Warn("no resume within the limit after going to sleep; removal graces start now", "limit", sleepHoldLimit)
		p.resume(now, "no resume signal")
	}
	var due []pendingRemoval
	kept := p.pending[:0]
	for _, r := range p.pending {
		if !r.due.IsZero() && !now.Before(r.due) {
			due = append(due, r)
		} else {
			kept = append(kept, r)
		}
	}
	clear(p.pending[len(kept):])
	p.pending = kept
	for _, r := range due {
		p.removalAction(r.tok, "token removed and not back within the removal grace")
	}
}

// removed acts on the removal of tok, a token in scope: at once without a
// grace, otherwise once the grace is over (counted from the resume while
// the system sleeps).
func (p *Policy) removed(tok *monitor.Token) {
	grace := p.cfg.RemovalGrace
	if grace <= 0 {
		p.removalAction(tok, "token removed")
		return
	}
	r := pendingRemoval{tok: tok, grace: grace}
	if !p.asleep {
		r.due = time.Now().Add(grace)
	}
	p.pending = append(p.pending, r)
	p.log.Debug("token removed: the removal action waits for the grace", "label", tok.Label, "serial", tok.Serial,
		"generation", tok.Generation, "grace", grace, "asleep", p.asleep)
}

// back drops the oldest waiting removal of the same card as tok (same
// serial, blanks trimmed, and label): it came back within its grace.
func (p *Policy) back(tok *monitor.Token) {
	for i, r := range p.pending {
		if sameCard(r.tok, tok) {
			p.pending = slices.Delete(p.pending, i, i+1)
			p.log.Info("token back within the removal grace; no removal action", "label", tok.Label, "serial", tok.Serial,
				"removed_generation", r.tok.Generation, "generation", tok.Generation)
			return
		}
	}
}

// sameCard tells whether a and b have the same serial and label.
func sameCard(a, b *monitor.Token) bool {
	return strings.TrimSpace(a.Serial) == strings.TrimSpace(b.Serial) && a.Label == b.Label
}
