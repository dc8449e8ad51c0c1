package dbusapi

import (
	"github.com/slotwatch/slotwatch/monitor"
)

// The monitor's view on the bus: one object per module, reader, slot and
// token, added, changed and removed as the monitor's events say.

// exportSnapshot puts every object of a snapshot on the bus (at start).
func (s *Service) exportSnapshot(snap *monitor.Snapshot) {
	for i := range snap.Modules {
		s.addModule(&snap.Modules[i])
	}
	for i := range snap.Readers {
		s.addReader(&snap.Readers[i])
	}
	for i := range snap.Slots {
		s.addSlot(&snap.Slots[i])
	}
	for _, t := range snap.Tokens() {
		s.addToken(t)
	}
}

// apply puts one event on the bus. Called from follow, in order.
func (s *Service) apply(ev monitor.Event) {
	switch ev.Kind {
	case monitor.TokenRemoved:
		s.removeToken(ev.Token, ev.Outage)
	case monitor.TokenInserted:
		s.addToken(ev.Token)
		s.br.TokenBack(ev.Token) // sessions suspended by an outage, if it resumes a generation
	case monitor.TokenLost:
		s.br.TokenLost(ev.Token.Generation)
	case monitor.TokenChanged:
		s.objs.set(tokenPath(ev.Token.Generation), TokenInterface, map[string]any{"Flags": uint32(ev.Token.Flags)})
	case monitor.SlotAdded:
		s.addSlot(ev.Slot)
	case monitor.SlotRemoved:
		s.objs.remove(slotPath(ev.Slot.Key))
	case monitor.SlotChanged:
		s.objs.set(slotPath(ev.Slot.Key), SlotInterface, map[string]any{
			"Description": ev.Slot.Description,
			"Reader":      readerPath(ev.Slot.Reader),
			"Removable":   ev.Slot.Removable,
		})
	case monitor.ReaderAdded:
		s.addReader(ev.Reader)
	case monitor.ReaderRemoved:
		s.objs.remove(readerPath(ev.Reader.Name))
	case monitor.ReaderChanged:
		s.objs.set(readerPath(ev.Reader.Name), ReaderInterface, readerProps(ev.Reader))
	case monitor.ModuleRemoved:
		s.objs.remove(modulePath(ev.Module.Name))
	case monitor.ModuleChanged:
		p := modulePath(ev.Module.Name)
		if !s.objs.has(p) {
			s.addModule(ev.Module)
		}
		s.objs.set(p, ModuleInterface, moduleProps(ev.Module))
	}
	s.objs.set(RootPath, ManagerInterface, s.managerProps(ev.Snapshot))
}

func moduleProps(m *monitor.ModuleView) map[string]any {
	return map[string]any{
		"Library":        m.Path,
		"Description":    m.Description,
		"Manufacturer":   m.Manufacturer,
		"LibraryVersion": m.LibraryVersion,
		"WaitMode":       uint32(m.WaitMode),
		"State":          uint32(m.State),
		"Released":       m.Released,
	}
}

func (s *Service) addModule(m *monitor.ModuleView) {
	s.logAdd(modulePath(m.Name), s.objs.add(modulePath(m.Name),
		iface{name: ModuleInterface, props: moduleProps(m)}))
}

func readerProps(r *monitor.Reader) map[string]any {
	atr := r.Atr
	if atr == nil {
		atr = []byte{}
	}
	return map[string]any{
		"Name":       r.Name,
		"State":      uint32(r.State),
		"Atr":        atr,
		"EventCount": uint32(r.EventCount),
	}
}

func (s *Service) addReader(r *monitor.Reader) {
	s.logAdd(readerPath(r.Name), s.objs.add(readerPath(r.Name),
		iface{name: ReaderInterface, props: readerProps(r)}))
}

func (s *Service) addSlot(sl *monitor.Slot) {
	tok := noObject
	if sl.Token != nil {
		tok = tokenPath(sl.Token.Generation)
	}
	s.logAdd(slotPath(sl.Key), s.objs.add(slotPath(sl.Key), iface{
		name: SlotInterface,
		props: map[string]any{
			"Module":      modulePath(sl.Key.Module),
			"SlotId":      uint64(sl.Key.ID),
			"Description": sl.Description,
			"Reader":      readerPath(sl.Reader),
			"Removable":   sl.Removable,
			"Token":       tok,
		},
	}))
}

// addToken exports a new generation's token, points its slot at it, and
// announces it with TokenInserted (after InterfacesAdded, so a client that
// reacts to the signal finds the object).
func (s *Service) addToken(t *monitor.Token) {
	p := tokenPath(t.Generation)
	err := s.objs.add(p, iface{
		name:    TokenInterface,
		methods: &tokenObject{s: s, tok: *t},
		props: map[string]any{
			"Slot":         slotPath(t.Slot),
			"Generation":   t.Generation,
			"Label":        t.Label,
			"Manufacturer": t.Manufacturer,
			"Model":        t.Model,
			"Serial":       t.Serial,
			"Flags":        uint32(t.Flags),
			"UsedForLogin": s.usedForLogin(t),
		},
	})
	if s.logAdd(p, err) {
		return
	}
	s.objs.set(slotPath(t.Slot), SlotInterface, map[string]any{"Token": p})
	s.out.emit(RootPath, ManagerInterface+".TokenInserted", p, slotPath(t.Slot), t.Generation)
}

// removeToken takes a removed generation off the bus: its sessions first
// (the broker forgets them and their owners see the objects go — or, for
// a token lost to an outage, suspends them: they stay, and follow the same
// card when it is back), then the token; its path keeps answering
// TokenRemoved through the tombstone.
func (s *Service) removeToken(t *monitor.Token, outage bool) {
	if outage {
		s.br.TokenAway(t.Generation)
	} else {
		s.br.TokenGone(t.Generation)
	}
	p := tokenPath(t.Generation)
	s.objs.remove(p)
	s.objs.set(slotPath(t.Slot), SlotInterface, map[string]any{"Token": noObject})
	s.out.emit(RootPath, ManagerInterface+".TokenRemoved", p, slotPath(t.Slot), t.Generation)
}
