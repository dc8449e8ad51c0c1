package module

import (
	"cmp"
	"slices"
	"sync"
)

// Set is the daemon's one set of loaded modules, by name: the daemon
// resolves it from the config and the p11-kit registry and hands it to the
// monitor (which watches them) and to the broker (which finds a token's
// module in it). A reload replaces its contents.
type Set struct {
	mu     sync.RWMutex // guards byName
	byName map[string]*Module
}

// NewSet returns a set holding mods.
func NewSet(mods ...*Module) *Set {
	s := &Set{}
	s.Replace(mods)
	return s
}

// Lookup returns the module named name.
func (s *Set) Lookup(name string) (*Module, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m, ok := s.byName[name]
	return m, ok
}

// Replace makes mods the set's contents.
func (s *Set) Replace(mods []*Module) {
	byName := make(map[string]*Module, len(mods))
	for _, m := range mods {
		byName[m.Name()] = m
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byName = byName
}

// List returns the modules, by name.
func (s *Set) List() []*Module {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Module, 0, len(s.byName))
	for _, m := range s.byName {
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b *Module) int { return cmp.Compare(a.Name(), b.Name()) })
	return out
}
