package monitor

// The pure diff: what changed from one snapshot to the next, as events in
// the order subscribers must see them. No side effects: commit
// (publish.go) acts on the events (generations die and are born) and
// publishes them.

// diff returns the events that lead from old to next:
//
//  1. StateChanged, if the monitor's state or its reason changed;
//  2. TokenRemoved for every token of old whose generation is not in its
//     slot in next (a subscriber sees the old generation go before
//     anything else happens in its slot);
//  3. SlotRemoved, ReaderRemoved, ModuleRemoved;
//  4. ModuleChanged (new or changed modules), ReaderAdded/ReaderChanged,
//     SlotAdded/SlotChanged;
//  5. TokenInserted for every generation new in next, TokenChanged for a
//     token whose flags or reader changed in place.
//
// Within each group the order is the snapshots' (modules and readers by
// name, slots by module and id). The events carry pointers into old (for
// what went) and next (for the rest); their Snapshot field is left for the
// caller to set.
func diff(old, next *Snapshot) []Event {
	var evs []Event
	if next.State != old.State || next.StateReason != old.StateReason {
		evs = append(evs, Event{Kind: StateChanged})
	}
	for i := range old.Slots {
		ot := old.Slots[i].Token
		if ot == nil {
			continue
		}
		if ns, ok := next.Slot(old.Slots[i].Key); !ok || ns.Token == nil || ns.Token.Generation != ot.Generation {
			evs = append(evs, Event{Kind: TokenRemoved, Token: ot})
		}
	}
	for i := range old.Slots {
		if _, ok := next.Slot(old.Slots[i].Key); !ok {
			evs = append(evs, Event{Kind: SlotRemoved, Slot: &old.Slots[i]})
		}
	}
	for i := range old.Readers {
		if _, ok := next.Reader(old.Readers[i].Name); !ok {
			evs = append(evs, Event{Kind: ReaderRemoved, Reader: &old.Readers[i]})
		}
	}
	for i := range old.Modules {
		if _, ok := findModule(next, old.Modules[i].Name); !ok {
			evs = append(evs, Event{Kind: ModuleRemoved, Module: &old.Modules[i]})
		}
	}
	for i := range next.Modules {
		nm := &next.Modules[i]
		if om, ok := findModule(old, nm.Name); !ok || *om != *nm {
			evs = append(evs, Event{Kind: ModuleChanged, Module: nm})
		}
	}
	for i := range next.Readers {
		nr := &next.Readers[i]
		or, ok := old.Reader(nr.Name)
		switch {
		case !ok:
			evs = append(evs, Event{Kind: ReaderAdded, Reader: nr})
		case !sameReader(or, nr):
			evs = append(evs, Event{Kind: ReaderChanged, Reader: nr})
		}
	}
	for i := range next.Slots {
		ns := &next.Slots[i]
		os, ok := old.Slot(ns.Key)
		switch {
		case !ok:
			evs = append(evs, Event{Kind: SlotAdded, Slot: ns})
		case os.Description != ns.Description || os.Reader != ns.Reader || os.Removable != ns.Removable || os.Manufacturer != ns.Manufacturer:
			evs = append(evs, Event{Kind: SlotChanged, Slot: ns})
		}
	}
	for i := range next.Slots {
		nt := next.Slots[i].Token
		if nt == nil {
			continue
		}
		ot, ok := old.Token(nt.Generation)
		switch {
		case !ok:
			evs = append(evs, Event{Kind: TokenInserted, Token: nt})
		case ot.Flags != nt.Flags || ot.Reader != nt.Reader:
			evs = append(evs, Event{Kind: TokenChanged, Token: nt})
		}
	}
	return evs
}

func findModule(s *Snapshot, name string) (*ModuleView, bool) {
	for i := range s.Modules {
		if s.Modules[i].Name == name {
			return &s.Modules[i], true
		}
	}
	return nil, false
}
