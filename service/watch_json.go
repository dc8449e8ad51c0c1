package main

import (
	"encoding/hex"
	"time"

	"github.com/slotwatch/slotwatch/dbusapi"
	"github.com/slotwatch/slotwatch/monitor"
)

// `slotwatch watch --json` speaks of the monitor's view with the event
// names and keys of `slotwatch monitor --json` (client_monitor.go), and
// names objects by the paths the daemon would give them, so one consumer
// reads both. The in-process monitor tells a slot's change, which the
// daemon's signals do not, and that a token removed by an outage will not
// come back: slot_changed and token_lost are watch's only.

const (
	evSlotChanged = "slot_changed"
	evTokenLost   = "token_lost"
)

var watchEventNames = map[monitor.EventKind]string{
	monitor.TokenInserted: evTokenInserted, monitor.TokenRemoved: evTokenRemoved, monitor.TokenChanged: evTokenChanged,
	monitor.SlotAdded: evSlotAdded, monitor.SlotRemoved: evSlotRemoved, monitor.SlotChanged: evSlotChanged,
	monitor.ReaderAdded: evReaderAdded, monitor.ReaderRemoved: evReaderRemoved, monitor.ReaderChanged: evReaderChanged,
	monitor.ModuleChanged: evModuleChanged, monitor.ModuleRemoved: evModuleRemoved, monitor.StateChanged: evManagerState,
	monitor.TokenLost: evTokenLost,
}

// watchEvent is an in-process event as `slotwatch monitor` reports it.
func watchEvent(ev monitor.Event, now time.Time) monitorEvent {
	e := monitorEvent{Time: now, Event: watchEventNames[ev.Kind]}
	switch {
	case ev.Token != nil:
		t := watchToken(ev.Token)
		e.Token = &t
	case ev.Slot != nil:
		s := watchSlot(ev.Slot)
		e.Slot = &s
	case ev.Reader != nil:
		r := watchReader(ev.Reader)
		e.Reader = &r
	case ev.Module != nil:
		m := watchModule(ev.Module)
		e.Module = &m
	default:
		m := watchManager(ev.Snapshot)
		e.Manager = &m
	}
	return e
}

// watchListing is a snapshot as `slotwatch list` shows the daemon's view
// (with no sessions: watch brokers none).
func watchListing(s *monitor.Snapshot) *listing {
	l := &listing{Manager: watchManager(s), Modules: []moduleInfo{}, Readers: []readerInfo{}, Slots: []slotInfo{}, Tokens: []tokenInfo{}, Sessions: []sessionInfo{}}
	for i := range s.Modules {
		l.Modules = append(l.Modules, watchModule(&s.Modules[i]))
	}
	for i := range s.Readers {
		l.Readers = append(l.Readers, watchReader(&s.Readers[i]))
	}
	for i := range s.Slots {
		l.Slots = append(l.Slots, watchSlot(&s.Slots[i]))
	}
	for _, t := range s.Tokens() {
		l.Tokens = append(l.Tokens, watchToken(t))
	}
	return l
}

func watchManager(s *monitor.Snapshot) managerInfo {
	return managerInfo{
		State: managerStateName(uint32(s.State)), StateCode: uint32(s.State), StateReason: s.StateReason,
		LastGeneration: s.LastGeneration,
	}
}

func watchModule(m *monitor.ModuleView) moduleInfo {
	return moduleInfo{
		Path: string(dbusapi.ModulePath(m.Name)), Name: m.Name, Library: m.Path, Description: m.Description,
		Manufacturer: m.Manufacturer, LibraryVersion: m.LibraryVersion,
		WaitMode: waitModeName(uint32(m.WaitMode)), WaitModeCode: uint32(m.WaitMode),
		State: moduleStateName(uint32(m.State)), StateCode: uint32(m.State), Released: m.Released,
	}
}

func watchReader(r *monitor.Reader) readerInfo {
	return readerInfo{
		Path: string(dbusapi.ReaderPath(r.Name)), Name: r.Name,
		State: readerStateName(uint32(r.State)), StateCode: uint32(r.State),
		EventCount: uint32(r.EventCount), ATR: hex.EncodeToString(r.Atr),
	}
}

func watchSlot(s *monitor.Slot) slotInfo {
	out := slotInfo{
		Path: string(dbusapi.SlotPath(s.Key)), Module: s.Key.Module, SlotID: uint64(s.Key.ID),
		Description: s.Description, Reader: s.Reader, Removable: s.Removable,
	}
	if s.Token != nil {
		out.Token = string(dbusapi.TokenPath(s.Token.Generation))
	}
	return out
}

func watchToken(t *monitor.Token) tokenInfo {
	return tokenInfo{
		Path: string(dbusapi.TokenPath(t.Generation)), Generation: t.Generation,
		Label: t.Label, Serial: t.Serial, Manufacturer: t.Manufacturer, Model: t.Model, Flags: uint32(t.Flags),
		Slot: string(dbusapi.SlotPath(t.Slot)), Module: t.Slot.Module, SlotID: uint64(t.Slot.ID), Reader: t.Reader,
	}
}
