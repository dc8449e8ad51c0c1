package monitor

import (
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/slotwatch/slotwatch/module"
)

// The loop's handling of modules: initialization, finalization, failure and
// recovery (rule 6), and replacement of the module set (Reload).

func (l *loop) moduleTrack(name string) *moduleTrack {
	for _, mt := range l.modules {
		if mt.name == name {
			return mt
		}
	}
	return nil
}

// initModule initializes a module and starts its waiter.
func (l *loop) initModule(mt *moduleTrack) {
	if err := mt.mod.Initialize(); err != nil {
		mt.lastErr = err
		mt.retryAt = time.Now().Add(mt.retry.Next())
		l.log.Warn("module initialization failed", "module", mt.name, "err", err, "retry_at", mt.retryAt)
		return
	}
	mt.initialized = true
	mt.failures, mt.missed = 0, 0
	mt.nextSafety = time.Time{}
	mt.lastErr = nil
	mt.retryAt = time.Time{}
	mt.view = ModuleView{}
	mt.failed = false
	if mt.waitMode != WaitPolling && mt.waitMode != WaitPCSC {
		// Decided after the first read (decideWaitMode): a module whose
		// slots stand for readers needs no waiter.
		mt.waitMode = WaitUnknown
	}
}

// finalizeModule stops the waiter (C_Finalize unblocks it, rule 7) and
// finalizes the module.
func (l *loop) finalizeModule(mt *moduleTrack) {
	if !mt.initialized {
		return
	}
	mt.initialized = false
	if mt.waiterStop != nil {
		close(mt.waiterStop)
	}
	if err := mt.mod.Finalize(); err != nil {
		l.log.Warn("module finalize failed", "module", mt.name, "err", err)
	}
	if mt.waiterDone != nil {
		select {
		case <-mt.waiterDone:
		case <-time.After(2 * time.Second):
			// A module whose wait ignores C_Finalize: its thread stays
			// blocked in the module. Nothing in Go can end it; report it.
			l.log.Error("module's C_WaitForSlotEvent did not return after C_Finalize; its waiter thread is lost", "module", mt.name)
		}
	}
	mt.waiterStop, mt.waiterDone = nil, nil
}

// replaceModules applies a new module set: removed modules are finalized
// (their slots, and so their tokens, leave the next snapshot), new ones are
// initialized.
func (l *loop) replaceModules(mods []Module) {
	keep := map[Module]bool{}
	for _, mod := range mods {
		keep[mod] = true
	}
	var kept []*moduleTrack
	have := map[Module]bool{}
	for _, mt := range l.modules {
		if keep[mt.mod] {
			kept = append(kept, mt)
			have[mt.mod] = true
			continue
		}
		l.log.Info("module removed", "module", mt.name)
		l.m.leases.unmanage(mt.name, ErrTokenRemoved)
		l.finalizeModule(mt)
	}
	for _, mod := range mods {
		if have[mod] {
			continue
		}
		mt := &moduleTrack{mod: mod, name: mod.Name(), retry: backoff{Min: l.cfg.RetryMin, Max: l.cfg.ModuleRetryMax}}
		l.log.Info("module added", "module", mt.name)
		l.initModule(mt)
		kept = append(kept, mt)
	}
	slices.SortFunc(kept, func(a, b *moduleTrack) int { return strings.Compare(a.name, b.name) })
	l.modules = kept
}

// moduleReadFailed counts a failed read; a module that keeps failing is
// finalized and initialized again (rule 6).
func (l *loop) moduleReadFailed(mt *moduleTrack, err error, now time.Time) {
	mt.failures++
	mt.lastErr = err
	l.log.Warn("module read failed", "module", mt.name, "err", err, "failures", mt.failures)
	if errors.Is(err, module.ErrNotInitialized) || mt.failures >= l.cfg.FailuresBeforeReinit {
		l.failModule(mt, err)
		return
	}
	mt.rereadAt = now.Add(mt.retry.Next())
}

// failModule removes every token of a failing module at once and schedules
// its re-initialization. The finalize itself waits until no operation holds
// one of its generations (rule 4).
func (l *loop) failModule(mt *moduleTrack, err error) {
	l.log.Error("module failing; it will be initialized again", "module", mt.name, "err", err)
	mt.failed = true
	mt.lastErr = err
	mt.retryAt = time.Now().Add(mt.retry.Next())
}

// checkMissedEvents compares what a safety re-read found with the current
// view: a change no event announced means the module's wait missed it (or
// hangs). Too many of those make the module failing: initializing it
// again starts a fresh wait.
func (l *loop) checkMissedEvents(mt *moduleTrack, newSlots map[SlotKey]*Slot) {
	changed := false
	for k, s := range newSlots {
		if k.Module != mt.name {
			continue
		}
		old := l.slots[k]
		switch {
		case old == nil:
			changed = true
		case (old.Token == nil) != (s.Token == nil):
			changed = true
		case old.Token != nil && old.Token.Generation != s.Token.Generation:
			changed = true
		}
	}
	for k := range l.slots {
		if _, ok := newSlots[k]; !ok && k.Module == mt.name {
			changed = true
		}
	}
	if !changed {
		return
	}
	mt.missed++
	l.log.Warn("a re-read found a change the module's C_WaitForSlotEvent did not announce", "module", mt.name, "missed", mt.missed)
	if mt.missed >= l.cfg.MissedEventsBeforeReinit {
		mt.missed = 0
		l.failModule(mt, errors.New("C_WaitForSlotEvent misses events"))
	}
}
