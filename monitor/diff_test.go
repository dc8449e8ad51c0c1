package monitor

import (
	"fmt"
	"slices"
	"testing"
)

// TestDiff: the pure diff, snapshot against snapshot, without a loop, a
// module or PC/SC: which events, in which order.
func TestDiff(t *testing.T) {
	key := func(id uint) SlotKey { return SlotKey{Module: "m", ID: id} }
	tok := func(gen uint64, id uint, label string) *Token {
		return &Token{Generation: gen, Slot: key(id), Label: label, Serial: label}
	}
	slot := func(id uint, t *Token) Slot {
		return Slot{Key: key(id), Description: fmt.Sprint("slot ", id), Token: t}
	}
	reader := func(name string, st ReaderState, events uint16) Reader {
		return Reader{Name: name, State: st, EventCount: events, Attachment: 1}
	}
	module := func(st ModuleState) ModuleView { return ModuleView{Name: "m", State: st, WaitMode: WaitBlocking} }
	snap := func(slots []Slot, readers []Reader, mods ...ModuleView) *Snapshot {
		return &Snapshot{State: StateRunning, Slots: slots, Readers: readers, Modules: mods}
	}
	base := snap([]Slot{slot(0, tok(1, 0, "a")), slot(1, nil)}, []Reader{reader("r0", ReaderPresent, 1)}, module(ModuleRunning))
	flagged := tok(1, 0, "a")
	flagged.Flags = 4

	tests := []struct {
		name string
		next *Snapshot
		want []string
	}{
		{"nothing changed", snap([]Slot{slot(0, tok(1, 0, "a")), slot(1, nil)}, []Reader{reader("r0", ReaderPresent, 1)}, module(ModuleRunning)), nil},
		{"a removal", snap([]Slot{slot(0, nil), slot(1, nil)}, []Reader{reader("r0", ReaderEmpty, 2)}, module(ModuleRunning)),
			[]string{"token-removed 1", "reader-changed r0"}},
		{"a swap in one gap is a removal, then an insertion", snap([]Slot{slot(0, tok(2, 0, "a")), slot(1, nil)}, []Reader{reader("r0", ReaderPresent, 3)}, module(ModuleRunning)),
			[]string{"token-removed 1", "reader-changed r0", "token-inserted 2"}},
		{"flags change in place", snap([]Slot{slot(0, flagged), slot(1, nil)}, []Reader{reader("r0", ReaderPresent, 1)}, module(ModuleRunning)),
			[]string{"token-changed 1"}},
		{"an insertion in another slot", snap([]Slot{slot(0, tok(1, 0, "a")), slot(1, tok(2, 1, "b"))}, []Reader{reader("r0", ReaderPresent, 1)}, module(ModuleRunning)),
			[]string{"token-inserted 2"}},
		{"a failing module: state first, removals before the rest", func() *Snapshot {
			s := snap(nil, []Reader{reader("r0", ReaderPresent, 1)}, module(ModuleFailed))
			s.State, s.StateReason = StateDegraded, "module m failed"
			return s
		}(), []string{"state-changed", "token-removed 1", "slot-removed m/0", "slot-removed m/1", "module-changed m"}},
		{"readers come and go", snap([]Slot{slot(0, tok(1, 0, "a")), slot(1, nil)}, []Reader{reader("r1", ReaderEmpty, 0)}, module(ModuleRunning)),
			[]string{"reader-removed r0", "reader-added r1"}},
		{"a new slot with a token", snap([]Slot{slot(0, tok(1, 0, "a")), slot(1, nil), slot(2, tok(3, 2, "c"))}, []Reader{reader("r0", ReaderPresent, 1)}, module(ModuleRunning)),
			[]string{"slot-added m/2", "token-inserted 3"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, ev := range diff(base, tt.next) {
				switch {
				case ev.Token != nil:
					got = append(got, fmt.Sprintf("%s %d", ev.Kind, ev.Token.Generation))
				case ev.Slot != nil:
					got = append(got, fmt.Sprintf("%s %s", ev.Kind, ev.Slot.Key))
				case ev.Reader != nil:
					got = append(got, fmt.Sprintf("%s %s", ev.Kind, ev.Reader.Name))
				case ev.Module != nil:
					got = append(got, fmt.Sprintf("%s %s", ev.Kind, ev.Module.Name))
				default:
					got = append(got, ev.Kind.String())
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("diff = %q, want %q", got, tt.want)
			}
		})
	}
	// Events point into the snapshots: what went into old, the rest into next.
	next := snap([]Slot{slot(0, tok(2, 0, "a")), slot(1, nil)}, nil, module(ModuleRunning))
	evs := diff(base, next)
	if evs[0].Token != base.Slots[0].Token || evs[len(evs)-1].Token != next.Slots[0].Token {
		t.Errorf("events do not point into their snapshots: %v", evs)
	}
}
