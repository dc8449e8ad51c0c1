package monitor

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Committing a refresh: the new snapshot, the events of the pure diff
// (diff.go), their side effects on generations (rule 4), and publishing.

// commit makes newSlots (with the readers and modules read meanwhile) the
// current view: it builds the snapshot, diffs it against the published one,
// acts on the events — a removed token's generation dies at once (its
// sessions are retired and reclaimed once drained, rule 4), an inserted
// one is registered for leases — and publishes the snapshot with them.
func (l *loop) commit(newSlots map[SlotKey]*Slot) {
	old := l.m.Snapshot()
	next := l.buildSnapshot(newSlots)
	evs := diff(old, next)
	now := time.Now()
	for i, ev := range evs {
		switch ev.Kind {
		case TokenRemoved:
			if l.cfg.ResumeWindow > 0 && l.removedByOutage(ev.Token, newSlots) {
				evs[i].Outage = true
				l.loseToken(ev.Token, now)
			}
			l.killGeneration(ev.Token)
		case SlotRemoved:
			delete(l.slotTrack, ev.Slot.Key)
			delete(l.lastRead, ev.Slot.Key)
			delete(l.lastReads, ev.Slot.Key)
			delete(l.slotInfoAt, ev.Slot.Key)
		case TokenInserted:
			l.m.leases.add(ev.Token.Generation, ev.Token.Slot)
		}
	}
	for _, t := range l.settleLost(now) {
		l.log.Info("a token lost to an outage will not resume", "generation", t.Generation, "slot", t.Slot)
		evs = append(evs, Event{Kind: TokenLost, Token: t})
	}
	l.slots = newSlots
	if len(evs) == 0 && old.Seq != 0 {
		return
	}
	l.seq++
	next.Seq = l.seq
	for i := range evs {
		evs[i].Snapshot = next
	}
	for _, ev := range evs {
		l.log.Debug("event", "event", ev.String())
	}
	l.m.publish(next, evs)
}

// buildSnapshot assembles an immutable snapshot from the loop's state.
func (l *loop) buildSnapshot(slots map[SlotKey]*Slot) *Snapshot {
	s := &Snapshot{PCSC: l.cfg.PCSC && l.pcscUp, LastGeneration: l.lastGen}
	var problems []string
	if l.cfg.PCSC && !l.pcscUp && l.pcscErr != nil {
		problems = append(problems, l.pcscErr.Error())
	}
	for _, mt := range l.modules {
		mv := mt.view
		if mv.Name == "" {
			mv = l.moduleInfo(mt)
			if mt.initialized {
				mt.view = mv
			}
		}
		mv.WaitMode = mt.waitMode
		mv.State, mv.StateReason = ModuleRunning, ""
		mv.Released = mt.released
		if (!mt.initialized && !mt.released) || mt.failed {
			mv.State = ModuleFailed
			reason := "not initialized"
			if mt.lastErr != nil {
				reason = mt.lastErr.Error()
			}
			mv.StateReason = reason
			problems = append(problems, fmt.Sprintf("module %s failed: %s", mt.name, reason))
		}
		s.Modules = append(s.Modules, mv)
	}
	for _, name := range slices.Sorted(maps.Keys(l.readers)) {
		s.Readers = append(s.Readers, *l.readers[name])
	}
	for _, k := range slices.SortedFunc(maps.Keys(slots), func(a, b SlotKey) int {
		if c := strings.Compare(a.Module, b.Module); c != 0 {
			return c
		}
		return int(a.ID) - int(b.ID)
	}) {
		s.Slots = append(s.Slots, *slots[k])
	}
	switch {
	case len(problems) > 0:
		s.State, s.StateReason = StateDegraded, strings.Join(problems, "; ")
	default:
		s.State = StateRunning
	}
	return s
}

// moduleInfo reads the module's C_GetInfo for the snapshot.
func (l *loop) moduleInfo(mt *moduleTrack) ModuleView {
	v := ModuleView{Name: mt.name, Path: mt.mod.Path()}
	if !mt.initialized {
		return v
	}
	info, err := mt.mod.Info()
	if err != nil {
		return v
	}
	v.Description, v.Manufacturer, v.LibraryVersion = info.Description, info.Manufacturer, info.LibraryVersion.String()
	return v
}

// publishState publishes the current view with another State, e.g.
// Recovering while a source is being brought back.
func (l *loop) publishState(state State, reason string) {
	old := l.m.Snapshot()
	if old.State == state && old.StateReason == reason {
		return
	}
	next := *old
	next.State, next.StateReason = state, reason
	l.seq++
	next.Seq = l.seq
	l.m.publish(&next, []Event{{Kind: StateChanged, Snapshot: &next}})
}

// killGeneration marks a removed token's generation dead: new operations on
// it fail at once, and its sessions are reclaimed when the last holder
// returns (rule 4).
func (l *loop) killGeneration(t *Token) {
	l.reclaimGen[t.Generation] = t.Slot
	if mt := l.moduleTrack(t.Slot.Module); mt != nil {
		mt.mod.RetireGeneration(t.Slot.ID, t.Generation)
	}
	if l.m.leases.kill(t.Generation) {
		l.reclaim(t.Generation)
	}
}

// reclaim forgets a drained generation's sessions without ever passing their
// handles to the module, then lets the slot's next generation open sessions.
func (l *loop) reclaim(gen uint64) {
	key, ok := l.reclaimGen[gen]
	if !ok {
		return
	}
	delete(l.reclaimGen, gen)
	if mt := l.moduleTrack(key.Module); mt != nil {
		if n := mt.mod.ReclaimSlot(key.ID, gen); n > 0 {
			l.log.Debug("reclaimed sessions of a removed token", "slot", key, "generation", gen, "sessions", n)
		}
	}
	l.m.leases.reclaimed(gen)
}
