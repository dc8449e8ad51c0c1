package dbusapi

import (
	"fmt"
	"strconv"
	"strings"
	"sync"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/monitor"
)

// GNOME compatibility (serve --gnome-compat): the same view, also served
// as gnome-settings-daemon's smartcard service, so that GNOME Shell's
// login and unlock screens and GDM use slotwatch unchanged.
//
// GNOME's model is coarser than slotwatch's: one Token object per slot
// that ever held a token, never removed, whose IsInserted flips. The
// mapping keeps every transition the monitor reports, in order: each
// TokenRemoved is IsInserted=false, each TokenInserted is IsInserted=true,
// so a swap (removed then inserted, even inside one event gap) is false
// then true, and the new card's Name and UsedToLogin are published before
// its true. The objects are fed by the same goroutine and events as the
// native objects (Service.apply).

// GnomeMode says whether the service also serves GNOME's smartcard name.
type GnomeMode int

const (
	// GnomeOff: only slotwatch's own name.
	GnomeOff GnomeMode = iota
	// GnomeQueue (--gnome-compat): own org.gnome.SettingsDaemon.Smartcard,
	// or, while gsd-smartcard owns it, wait in the name's queue and take
	// it over when gsd-smartcard exits.
	GnomeQueue
	// GnomeReplace (--gnome-compat=replace): take the name over from its
	// owner if the owner allows replacement; else wait as GnomeQueue.
	GnomeReplace
)

// The names of gnome-settings-daemon's smartcard service (xml/gnome/).
const (
	GnomeBusName          = "org.gnome.SettingsDaemon.Smartcard"
	GnomeRootPath         = godbus.ObjectPath("/org/gnome/SettingsDaemon/Smartcard")
	GnomeManagerPath      = GnomeRootPath + "/Manager"
	GnomeDriversPath      = GnomeManagerPath + "/Drivers"
	GnomeTokensPath       = GnomeManagerPath + "/Tokens"
	GnomeLoginTokenPath   = GnomeTokensPath + "/login_token"
	GnomeManagerInterface = GnomeBusName + ".Manager"
	GnomeDriverInterface  = GnomeBusName + ".Driver"
	GnomeTokenInterface   = GnomeBusName + ".Token"

	// ErrGnomeFindingSmartcard is GetLoginToken's error when the session
	// was not logged in with a smart card.
	ErrGnomeFindingSmartcard = GnomeBusName + ".Manager.Error.FindingSmartcard"
)

// gnomeEscape makes a path element the way gnome-settings-daemon does:
// every byte outside [A-Za-z0-9] becomes _XX_ (two lower-case hex digits).
func gnomeEscape(s string) string {
	if s == "" {
		return "_"
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "_%02x_", c)
		}
	}
	return b.String()
}

func gnomeDriverPath(library string) godbus.ObjectPath {
	return GnomeDriversPath + "/" + godbus.ObjectPath(gnomeEscape(library))
}

func gnomeTokenPath(library string, slot uint) godbus.ObjectPath {
	return GnomeTokensPath + "/" + godbus.ObjectPath("token_from_"+gnomeEscape(library)+"_slot_"+strconv.FormatUint(uint64(slot), 10))
}

// gnome is the GNOME-compatible object tree. The service's event goroutine
// changes it; GetLoginToken and GetInsertedTokens read it.
type gnome struct {
	s         *Service
	objs      *objects
	loginName string // PKCS11_LOGIN_TOKEN_NAME, "" if none

	mu       sync.Mutex
	tokens   map[godbus.ObjectPath]*gnomeToken // every Token object but the alias
	drivers  map[godbus.ObjectPath]bool
	aliasFor godbus.ObjectPath // the inserted login token the alias follows, "" if none
}

// gnomeToken is the state of one Token object: the slot's last token.
type gnomeToken struct {
	slot     monitor.SlotKey
	inserted bool
	login    bool
}

func newGnome(s *Service) *gnome {
	return &gnome{
		s:         s,
		objs:      newObjects(s.out, GnomeRootPath),
		loginName: s.opts.LoginTokenName,
		tokens:    map[godbus.ObjectPath]*gnomeToken{},
		drivers:   map[godbus.ObjectPath]bool{},
	}
}

// export puts the root, the Manager, the login token alias and the
// snapshot's drivers and tokens on the bus, and the handlers godbus
// calls for the whole subtree.
func (g *gnome) export(snap *monitor.Snapshot) error {
	for _, e := range []struct {
		iface string
		v     any
	}{
		{objectManagerInterface, objectManager{g.objs}},
		{GnomeManagerInterface, gnomeManager{g}},
		{GnomeDriverInterface, noMethods{}},
		{GnomeTokenInterface, noMethods{}},
		{propertiesInterface, propsDispatch{g.objs, unknownObject}},
		{introspectInterface, introspector{g.s.trees()}},
	} {
		if err := g.s.conn.ExportSubtree(e.v, GnomeRootPath, e.iface); err != nil {
			return err
		}
	}
	if err := g.objs.add(GnomeRootPath, iface{name: objectManagerInterface, methods: objectManager{g.objs}}); err != nil {
		return err
	}
	if err := g.objs.add(GnomeManagerPath, iface{name: GnomeManagerInterface, methods: gnomeManager{g}}); err != nil {
		return err
	}
	if g.loginName != "" {
		// As GNOME does: the alias exists from the start, so that a login
		// screen asking for the login token while it is out of its reader
		// gets an object to watch.
		if err := g.objs.add(GnomeLoginTokenPath, iface{name: GnomeTokenInterface, props: map[string]any{
			"Name": g.loginName, "Driver": noObject, "IsInserted": false, "UsedToLogin": true,
		}}); err != nil {
			return err
		}
	}
	for i := range snap.Modules {
		g.driver(&snap.Modules[i])
	}
	for _, t := range snap.Tokens() {
		g.inserted(t, snap)
	}
	return nil
}

// apply mirrors one monitor event.
func (g *gnome) apply(ev monitor.Event) {
	switch ev.Kind {
	case monitor.TokenInserted:
		g.inserted(ev.Token, ev.Snapshot)
	case monitor.TokenRemoved:
		g.removed(ev.Token.Slot)
	case monitor.SlotRemoved:
		g.removed(ev.Slot.Key) // its token's removal came first; a safety net
	case monitor.ModuleChanged:
		g.driver(ev.Module)
	case monitor.ModuleRemoved:
		// The module's tokens were removed first. Like GNOME, the driver
		// and token objects stay.
		g.mu.Lock()
		var slots []monitor.SlotKey
		for _, t := range g.tokens {
			if t.slot.Module == ev.Module.Name && t.inserted {
				slots = append(slots, t.slot)
			}
		}
		g.mu.Unlock()
		for _, k := range slots {
			g.removed(k)
		}
	}
}

// driver exports a module's Driver object, or updates its description.
func (g *gnome) driver(m *monitor.ModuleView) godbus.ObjectPath {
	p := gnomeDriverPath(m.Path)
	g.mu.Lock()
	known := g.drivers[p]
	g.drivers[p] = true
	g.mu.Unlock()
	props := map[string]any{"Library": m.Path, "Description": m.Description}
	if known {
		g.objs.set(p, GnomeDriverInterface, props)
	} else {
		g.s.logAdd(p, g.objs.add(p, iface{name: GnomeDriverInterface, props: props}))
	}
	return p
}

// moduleView is the module named name in snap (its file is what GNOME's
// paths are made of).
func moduleView(snap *monitor.Snapshot, name string) *monitor.ModuleView {
	for i := range snap.Modules {
		if snap.Modules[i].Name == name {
			return &snap.Modules[i]
		}
	}
	return &monitor.ModuleView{Name: name, Path: name}
}

// inserted publishes a token insertion: the slot's object appears on the
// first one (IsInserted false, as GNOME does), then the token's Name,
// Driver and UsedToLogin, then IsInserted true.
func (g *gnome) inserted(t *monitor.Token, snap *monitor.Snapshot) {
	m := moduleView(snap, t.Slot.Module)
	driver := g.driver(m)
	p := gnomeTokenPath(m.Path, t.Slot.ID)
	login := g.loginName != "" && t.Label == g.loginName

	g.mu.Lock()
	tok, known := g.tokens[p]
	if !known {
		tok = &gnomeToken{slot: t.Slot}
		g.tokens[p] = tok
	}
	wasInserted := tok.inserted
	g.mu.Unlock()

	if !known {
		if g.s.logAdd(p, g.objs.add(p, iface{name: GnomeTokenInterface, props: map[string]any{
			"Name": t.Label, "Driver": driver, "IsInserted": false, "UsedToLogin": false,
		}})) {
			return
		}
	}
	if wasInserted {
		// Never two trues in a row: a subscriber counts transitions.
		g.removed(t.Slot)
	}
	g.objs.set(p, GnomeTokenInterface, map[string]any{"Name": t.Label, "Driver": driver, "UsedToLogin": login})
	g.mu.Lock()
	tok.slot, tok.inserted, tok.login = t.Slot, true, login
	followAlias := login && g.aliasFor == ""
	if followAlias {
		g.aliasFor = p
	}
	g.mu.Unlock()
	g.objs.set(p, GnomeTokenInterface, map[string]any{"IsInserted": true})
	if followAlias {
		g.objs.set(GnomeLoginTokenPath, GnomeTokenInterface, map[string]any{"Driver": driver})
		g.objs.set(GnomeLoginTokenPath, GnomeTokenInterface, map[string]any{"IsInserted": true})
	}
}

// removed publishes the removal of the token in slot k, if one is
// inserted there.
func (g *gnome) removed(k monitor.SlotKey) {
	g.mu.Lock()
	var p godbus.ObjectPath
	var tok *gnomeToken
	for path, t := range g.tokens {
		if t.slot == k && t.inserted {
			p, tok = path, t
		}
	}
	if tok == nil {
		g.mu.Unlock()
		return
	}
	tok.inserted, tok.login = false, false
	// The alias follows another inserted login token, if there is one.
	var next godbus.ObjectPath
	aliasChanged := g.aliasFor == p
	if aliasChanged {
		for path, t := range g.tokens {
			if t.inserted && t.login && (next == "" || path < next) {
				next = path
			}
		}
		g.aliasFor = next
	}
	g.mu.Unlock()

	g.objs.set(p, GnomeTokenInterface, map[string]any{"IsInserted": false, "UsedToLogin": false})
	if aliasChanged && next == "" {
		g.objs.set(GnomeLoginTokenPath, GnomeTokenInterface, map[string]any{"IsInserted": false})
	}
	if aliasChanged && next != "" {
		if vals, _, ok := g.objs.get(next, GnomeTokenInterface); ok {
			g.objs.set(GnomeLoginTokenPath, GnomeTokenInterface, map[string]any{"Driver": vals["Driver"].Value()})
		}
	}
}
