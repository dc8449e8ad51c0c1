package dbusapi

import (
	"fmt"

	godbus "github.com/godbus/dbus/v5"
)

// Dispatch: godbus gets one handler per interface, exported for the whole
// subtree of the root path. Each looks the called path up in the object
// tree (objects.go) and calls the live object's handler; for a path with no
// object it answers like a tombstone: a removed token's path, and the paths
// of its sessions, answer TokenRemoved (not UnknownObject) until the daemon
// restarts, so a client racing a removal gets the one error that tells it
// what happened; any other path answers UnknownObject.

func (s *Service) exportDispatch() error {
	for _, e := range []struct {
		path  godbus.ObjectPath
		iface string
		v     any
	}{
		{RootPath, objectManagerInterface, objectManager{s.objs}},
		{RootPath, ManagerInterface, managerDispatch{s}},
		{RootPath, TokenInterface, tokenDispatch{s}},
		{RootPath, SessionInterface, sessionDispatch{s}},
		{RootPath, ModuleInterface, noMethods{}},
		{RootPath, ReaderInterface, noMethods{}},
		{RootPath, SlotInterface, noMethods{}},
		{RootPath, propertiesInterface, propsDispatch{s.objs, s.deadPath}},
		{RootPath, introspectInterface, introspector{s.trees()}},
		// "/" is nobody's object; without these godbus would answer
		// UnknownInterface there.
		{"/", ManagerInterface, managerDispatch{s}},
		{"/", introspectInterface, introspector{s.trees()}},
	} {
		if err := s.conn.ExportSubtree(e.v, e.path, e.iface); err != nil {
			return err
		}
	}
	return nil
}

// trees are the object trees this service serves.
func (s *Service) trees() []*objects {
	if s.gnome != nil {
		return []*objects{s.objs, s.gnome.objs}
	}
	return []*objects{s.objs}
}

// dead answers a method call on a path without a live object (after the
// argument check, so that bad arguments are InvalidArgs everywhere).
func (s *Service) dead(msg godbus.Message, iface, method string) *godbus.Error {
	path := msgPath(msg)
	if s.objs.has(path) {
		// An object that exists but does not have this interface.
		return godbus.NewError("org.freedesktop.DBus.Error.UnknownInterface",
			[]any{fmt.Sprintf("%s does not implement %s", path, iface)})
	}
	if _, err := checkCall(msg, path, iface, method); err != nil {
		return toDBus(s.log, err)
	}
	return s.deadPath(path)
}

// deadPath is TokenRemoved for a generation slotwatch handed out (a live
// one has its object) and for a session whose token generation is dead (or
// so old that it is forgotten); UnknownObject otherwise (never issued, or a
// session closed normally while its token is still there).
func (s *Service) deadPath(path godbus.ObjectPath) *godbus.Error {
	n, ok := generationOf(path)
	parent := path[:len(path)-len(lastElement(path))-1]
	snap := s.mon.Snapshot()
	switch {
	case ok && parent == tokensPath && n > 0 && n <= snap.LastGeneration:
	case ok && parent == sessionsPath:
		gen, issued, forgotten := s.br.SessionGeneration(n)
		if !issued {
			return unknownObject(path)
		}
		if _, live := snap.Token(gen); live && !forgotten {
			return unknownObject(path) // closed normally; its token is still there
		}
	default:
		return unknownObject(path)
	}
	return godbus.NewError(ErrTokenRemoved, []any{string(path) + " belongs to a removed token"})
}

// noMethods is the handler of an interface that has only properties.
type noMethods struct{}

type managerDispatch struct{ s *Service }

func (d managerDispatch) Reload(msg godbus.Message) *godbus.Error {
	if h, ok := d.s.objs.handler(msgPath(msg), ManagerInterface); ok {
		return h.(*manager).Reload(msg)
	}
	return d.s.dead(msg, ManagerInterface, "Reload")
}

type tokenDispatch struct{ s *Service }

func (d tokenDispatch) live(msg godbus.Message) *tokenObject {
	if h, ok := d.s.objs.handler(msgPath(msg), TokenInterface); ok {
		return h.(*tokenObject)
	}
	return nil
}

func (d tokenDispatch) OpenSession(msg godbus.Message, readWrite bool) (godbus.ObjectPath, *godbus.Error) {
	if t := d.live(msg); t != nil {
		return t.OpenSession(msg, readWrite)
	}
	return noObject, d.s.dead(msg, TokenInterface, "OpenSession")
}

func (d tokenDispatch) CloseAllSessions(msg godbus.Message) *godbus.Error {
	if t := d.live(msg); t != nil {
		return t.CloseAllSessions(msg)
	}
	return d.s.dead(msg, TokenInterface, "CloseAllSessions")
}

func (d tokenDispatch) InitToken(msg godbus.Message, soPIN []byte, label string, force bool) *godbus.Error {
	if t := d.live(msg); t != nil {
		return t.InitToken(msg, soPIN, label, force)
	}
	wipeSecrets(msg, soPIN)
	return d.s.dead(msg, TokenInterface, "InitToken")
}

func (d tokenDispatch) ListCertificates(msg godbus.Message) ([]certificate, *godbus.Error) {
	if t := d.live(msg); t != nil {
		return t.ListCertificates(msg)
	}
	return nil, d.s.dead(msg, TokenInterface, "ListCertificates")
}

type sessionDispatch struct{ s *Service }

func (d sessionDispatch) live(msg godbus.Message) *sessionObject {
	if h, ok := d.s.objs.handler(msgPath(msg), SessionInterface); ok {
		return h.(*sessionObject)
	}
	return nil
}

func (d sessionDispatch) Login(msg godbus.Message, userType uint32, pin []byte) *godbus.Error {
	if o := d.live(msg); o != nil {
		return o.Login(msg, userType, pin)
	}
	wipeSecrets(msg, pin)
	return d.s.dead(msg, SessionInterface, "Login")
}

func (d sessionDispatch) Logout(msg godbus.Message) *godbus.Error {
	if o := d.live(msg); o != nil {
		return o.Logout(msg)
	}
	return d.s.dead(msg, SessionInterface, "Logout")
}

func (d sessionDispatch) Close(msg godbus.Message) *godbus.Error {
	if o := d.live(msg); o != nil {
		return o.Close(msg)
	}
	return d.s.dead(msg, SessionInterface, "Close")
}

func (d sessionDispatch) FindObjects(msg godbus.Message, template map[string]godbus.Variant) ([]map[string]godbus.Variant, *godbus.Error) {
	if o := d.live(msg); o != nil {
		return o.FindObjects(msg, template)
	}
	return nil, d.s.dead(msg, SessionInterface, "FindObjects")
}

func (d sessionDispatch) Sign(msg godbus.Message, keyID []byte, mechanism uint32, data []byte) ([]byte, *godbus.Error) {
	if o := d.live(msg); o != nil {
		return o.Sign(msg, keyID, mechanism, data)
	}
	return nil, d.s.dead(msg, SessionInterface, "Sign")
}

// propsDispatch is org.freedesktop.DBus.Properties for every object. It
// answers with the contract's errors, as GDBus does: every property is
// read-only, and an unknown interface or property is InvalidArgs. dead
// answers for a path without an object.
type propsDispatch struct {
	objs *objects
	dead func(godbus.ObjectPath) *godbus.Error
}

func (d propsDispatch) check(msg godbus.Message, sig string) *godbus.Error {
	got := ""
	if v, ok := msg.Headers[godbus.FieldSignature]; ok {
		if s, ok := v.Value().(godbus.Signature); ok {
			got = s.String()
		}
	}
	if got != sig {
		return godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("takes (%s), got (%s)", sig, got)})
	}
	return nil
}

// lookup returns the values of one interface at the called path.
func (d propsDispatch) lookup(msg godbus.Message, sig, iface string) (map[string]godbus.Variant, *godbus.Error) {
	if err := d.check(msg, sig); err != nil {
		return nil, err
	}
	path := msgPath(msg)
	vals, exists, ok := d.objs.get(path, iface)
	switch {
	case !exists:
		return nil, d.dead(path)
	case !ok:
		return nil, godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no interface %s on %s", iface, path)})
	}
	return vals, nil
}

func (d propsDispatch) Get(msg godbus.Message, iface, name string) (godbus.Variant, *godbus.Error) {
	if err := d.check(msg, "ss"); err != nil {
		return godbus.Variant{}, err
	}
	path := msgPath(msg)
	v, exists, ok, found := d.objs.getOne(path, iface, name)
	switch {
	case !exists:
		return godbus.Variant{}, d.dead(path)
	case !ok:
		return godbus.Variant{}, godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no interface %s on %s", iface, path)})
	case !found:
		return godbus.Variant{}, godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no property %s.%s on %s", iface, name, path)})
	}
	return v, nil
}

func (d propsDispatch) GetAll(msg godbus.Message, iface string) (map[string]godbus.Variant, *godbus.Error) {
	return d.lookup(msg, "s", iface)
}

func (d propsDispatch) Set(msg godbus.Message, iface, name string, _ godbus.Variant) *godbus.Error {
	vals, err := d.lookup(msg, "ssv", iface)
	if err != nil {
		return err
	}
	if _, ok := vals[name]; !ok {
		return godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no property %s.%s on %s", iface, name, msgPath(msg))})
	}
	return godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("property %s.%s is read-only", iface, name)})
}
