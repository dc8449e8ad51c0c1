package pkcs11face

import (
	"context"
	"slices"
	"sync"

	"github.com/slotwatch/slotwatch/monitor"
)

// slotTable gives every slot slotwatch has seen a PKCS#11 slot ID for the
// daemon's life: the same slot keeps its ID while it comes and goes (a
// reader unplugged and plugged again), and an ID never names another slot.
// Every connection sees the same IDs.
type slotTable struct {
	mu   sync.Mutex
	ids  map[monitor.SlotKey]uint
	keys map[uint]monitor.SlotKey
	next uint
}

func newSlotTable() *slotTable {
	return &slotTable{ids: map[monitor.SlotKey]uint{}, keys: map[uint]monitor.SlotKey{}}
}

// id returns k's slot ID, giving it the next one if k is new.
func (t *slotTable) id(k monitor.SlotKey) uint {
	t.mu.Lock()
	defer t.mu.Unlock()
	id, ok := t.ids[k]
	if !ok {
		id = t.next
		t.next++
		t.ids[k], t.keys[id] = id, k
	}
	return id
}

// key returns the slot an ID names.
func (t *slotTable) key(id uint) (monitor.SlotKey, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k, ok := t.keys[id]
	return k, ok
}

// slotIDs returns the IDs of snap's slots in ID order (slots of a module
// in the order the module lists them get increasing IDs when first seen).
func (t *slotTable) slotIDs(snap *monitor.Snapshot, tokenPresent bool) []uint {
	var ids []uint
	for i := range snap.Slots {
		s := &snap.Slots[i]
		id := t.id(s.Key)
		if !tokenPresent || s.Token != nil {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// slotEvents is one connection's C_WaitForSlotEvent queue: the slots where
// a token was inserted or removed (or the slot itself came or went) since
// the connection's last C_WaitForSlotEvent, in the order slotwatch
// published them, each once until it is taken.
type slotEvents struct {
	table *slotTable
	sub   *monitor.Subscription

	mu      sync.Mutex
	pending []uint
	queued  map[uint]bool
	arrived chan struct{} // closed and replaced whenever a slot is queued
	closed  bool
}

// watchSlots subscribes to m and queues events until ctx ends.
func watchSlots(ctx context.Context, m *monitor.Monitor, table *slotTable) *slotEvents {
	_, sub := m.Subscribe()
	e := &slotEvents{table: table, sub: sub, queued: map[uint]bool{}, arrived: make(chan struct{})}
	go e.run(ctx)
	return e
}

func (e *slotEvents) run(ctx context.Context) {
	defer e.close()
	for {
		ev, err := e.sub.Next(ctx)
		if err != nil {
			return
		}
		var key monitor.SlotKey
		switch ev.Kind {
		case monitor.TokenInserted, monitor.TokenRemoved:
			key = ev.Token.Slot
		case monitor.SlotAdded, monitor.SlotRemoved:
			key = ev.Slot.Key
		default:
			continue
		}
		e.push(e.table.id(key))
	}
}

func (e *slotEvents) push(id uint) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.queued[id] {
		return
	}
	e.queued[id] = true
	e.pending = append(e.pending, id)
	close(e.arrived)
	e.arrived = make(chan struct{})
}

func (e *slotEvents) close() {
	e.sub.Close()
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.closed {
		e.closed = true
		close(e.arrived)
	}
}

// next takes the oldest queued slot. With block it waits for one until ctx
// ends; ok is false when none came.
func (e *slotEvents) next(ctx context.Context, block bool) (id uint, ok bool) {
	for {
		e.mu.Lock()
		if len(e.pending) > 0 {
			id = e.pending[0]
			e.pending = e.pending[1:]
			delete(e.queued, id)
			e.mu.Unlock()
			return id, true
		}
		arrived, closed := e.arrived, e.closed
		e.mu.Unlock()
		if !block || closed {
			return 0, false
		}
		select {
		case <-arrived:
		case <-ctx.Done():
			return 0, false
		}
	}
}
