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
	} {
		if err := s.conn.ExportSubtree(e.v, e.path, e.iface); err != nil {
			return err
		}
	}
	return nil
}

// dead answers for a path under a tombstone: TokenRemoved for a
// generation slotwatch handed out or a session that went with its token,
// UnknownObject otherwise (never issued, or a session closed normally).
func (s *Service) dead(msg godbus.Message) *godbus.Error {
	path, _ := msg.Headers[godbus.FieldPath].Value().(godbus.ObjectPath)
	n, ok := generationOf(path)
	parent := path[:len(path)-len(lastElement(path))-1]
	switch {
	case ok && parent == tokensPath && n > 0 && n <= s.mon.Snapshot().LastGeneration:
	case ok && parent == sessionsPath && s.sessions.isDead(n):
	default:
		return godbus.NewError("org.freedesktop.DBus.Error.UnknownObject", []any{"no object at " + string(path)})
	}
	return godbus.NewError(ErrTokenRemoved, []any{string(path) + " belongs to a removed token"})
}

type tokenTombstone struct{ s *Service }

func (t tokenTombstone) OpenSession(msg godbus.Message, _ bool) (godbus.ObjectPath, *godbus.Error) {
	return noObject, t.s.dead(msg)
}
func (t tokenTombstone) CloseAllSessions(msg godbus.Message) *godbus.Error { return t.s.dead(msg) }
func (t tokenTombstone) InitToken(msg godbus.Message, pin []byte, _ string, _ bool) *godbus.Error {
	wipe(pin)
	return t.s.dead(msg)
}
func (t tokenTombstone) ListCertificates(msg godbus.Message) ([]certificate, *godbus.Error) {
	return nil, t.s.dead(msg)
}

type sessionTombstone struct{ s *Service }

func (t sessionTombstone) Login(msg godbus.Message, _ uint32, pin []byte) *godbus.Error {
	wipe(pin)
	return t.s.dead(msg)
}
func (t sessionTombstone) Logout(msg godbus.Message) *godbus.Error { return t.s.dead(msg) }
func (t sessionTombstone) Close(msg godbus.Message) *godbus.Error  { return t.s.dead(msg) }
func (t sessionTombstone) FindObjects(msg godbus.Message, _ map[string]godbus.Variant) ([]foundObject, *godbus.Error) {
	return nil, t.s.dead(msg)
}
func (t sessionTombstone) Sign(msg godbus.Message, _ []byte, _ uint32, _ []byte) ([]byte, *godbus.Error) {
	return nil, t.s.dead(msg)
}

type propertiesTombstone struct{ s *Service }

func (t propertiesTombstone) Get(msg godbus.Message, _, _ string) (godbus.Variant, *godbus.Error) {
	return godbus.Variant{}, t.s.dead(msg)
}
func (t propertiesTombstone) GetAll(msg godbus.Message, _ string) (map[string]godbus.Variant, *godbus.Error) {
	return nil, t.s.dead(msg)
}
func (t propertiesTombstone) Set(msg godbus.Message, _, _ string, _ godbus.Variant) *godbus.Error {
	return t.s.dead(msg)
}
