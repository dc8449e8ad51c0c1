package dbusapi

import (
	godbus "github.com/godbus/dbus/v5"
)

// Tombstones: a removed token's path, and its sessions' paths, keep
// answering every method with TokenRemoved (not UnknownObject) until the
// daemon restarts, so a client racing a removal gets the one error that
// tells it what happened. They are godbus subtree handlers under
// .../tokens and .../sessions; a live object's exact export takes
// precedence over them.

func (s *Service) exportTombstones() error {
	for _, e := range []struct {
		path  godbus.ObjectPath
		iface string
		v     any
	}{
		{tokensPath, TokenInterface, tokenTombstone{s}},
		{tokensPath, propertiesInterface, propertiesTombstone{s}},
		{tokensPath, introspectInterface, introspector{s.objs}},
		{sessionsPath, SessionInterface, sessionTombstone{s}},
		{sessionsPath, propertiesInterface, propertiesTombstone{s}},
		{sessionsPath, introspectInterface, introspector{s.objs}},
		// "/" is nobody's object; without these godbus would answer
		// UnknownInterface there.
		{"/", ManagerInterface, rootGuard{}},
		{"/", introspectInterface, introspector{s.objs}},
	} {
		if err := s.objs.export(e.v, e.path, e.iface); err != nil {
			return err
		}
	}
	return nil
}

// dead answers for a path under a tombstone: TokenRemoved for a
// generation slotwatch handed out (a live one has its own object), and for
// a session whose token generation is dead; UnknownObject otherwise (never
// issued, or a session closed normally while its token is still there).
func (s *Service) dead(msg godbus.Message, iface, method string) *godbus.Error {
	path := msgPath(msg)
	if _, err := checkCall(msg, path, iface, method); err != nil {
		return toDBus(s.log, err)
	}
	return s.deadPath(path)
}

func (s *Service) deadPath(path godbus.ObjectPath) *godbus.Error {
	n, ok := generationOf(path)
	parent := path[:len(path)-len(lastElement(path))-1]
	snap := s.mon.Snapshot()
	switch {
	case ok && parent == tokensPath && n > 0 && n <= snap.LastGeneration:
	case ok && parent == sessionsPath:
		gen, issued := s.sessions.generation(n)
		if _, live := snap.Token(gen); !issued || live {
			return unknownObject(path)
		}
	default:
		return unknownObject(path)
	}
	return godbus.NewError(ErrTokenRemoved, []any{string(path) + " belongs to a removed token"})
}

type tokenTombstone struct{ s *Service }

func (t tokenTombstone) OpenSession(msg godbus.Message, _ bool) (godbus.ObjectPath, *godbus.Error) {
	return noObject, t.s.dead(msg, TokenInterface, "OpenSession")
}
func (t tokenTombstone) CloseAllSessions(msg godbus.Message) *godbus.Error {
	return t.s.dead(msg, TokenInterface, "CloseAllSessions")
}
func (t tokenTombstone) InitToken(msg godbus.Message, pin []byte, _ string, _ bool) *godbus.Error {
	wipe(pin)
	return t.s.dead(msg, TokenInterface, "InitToken")
}
func (t tokenTombstone) ListCertificates(msg godbus.Message) ([]certificate, *godbus.Error) {
	return nil, t.s.dead(msg, TokenInterface, "ListCertificates")
}

type sessionTombstone struct{ s *Service }

func (t sessionTombstone) Login(msg godbus.Message, _ uint32, pin []byte) *godbus.Error {
	wipe(pin)
	return t.s.dead(msg, SessionInterface, "Login")
}
func (t sessionTombstone) Logout(msg godbus.Message) *godbus.Error {
	return t.s.dead(msg, SessionInterface, "Logout")
}
func (t sessionTombstone) Close(msg godbus.Message) *godbus.Error {
	return t.s.dead(msg, SessionInterface, "Close")
}
func (t sessionTombstone) FindObjects(msg godbus.Message, _ map[string]godbus.Variant) ([]foundObject, *godbus.Error) {
	return nil, t.s.dead(msg, SessionInterface, "FindObjects")
}
func (t sessionTombstone) Sign(msg godbus.Message, _ []byte, _ uint32, _ []byte) ([]byte, *godbus.Error) {
	return nil, t.s.dead(msg, SessionInterface, "Sign")
}

type propertiesTombstone struct{ s *Service }

// dead answers a Properties call on a dead path: its own signature
// check, then the tombstone's answer.
func (t propertiesTombstone) dead(msg godbus.Message, sig string) *godbus.Error {
	if err := (propsGuard{path: msgPath(msg)}).check(msg, sig); err != nil {
		return err
	}
	return t.s.deadPath(msgPath(msg))
}

// rootGuard answers Manager calls sent to "/".
type rootGuard struct{}

func (rootGuard) Reload(msg godbus.Message) *godbus.Error { return unknownObject(msgPath(msg)) }

func (t propertiesTombstone) Get(msg godbus.Message, _, _ string) (godbus.Variant, *godbus.Error) {
	return godbus.Variant{}, t.dead(msg, "ss")
}
func (t propertiesTombstone) GetAll(msg godbus.Message, _ string) (map[string]godbus.Variant, *godbus.Error) {
	return nil, t.dead(msg, "s")
}
func (t propertiesTombstone) Set(msg godbus.Message, _, _ string, _ godbus.Variant) *godbus.Error {
	return t.dead(msg, "ssv")
}
