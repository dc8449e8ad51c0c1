package dbusapi

import (
	"errors"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
)

// sessionObject is the Session interface of one brokered session. The
// broker owns the session; this is its face on the bus.
type sessionObject struct {
	s    *Service
	id   uint64
	path godbus.ObjectPath
}

// begin checks the call against the contract and that the caller owns the
// session, before anything else: a stranger learns AccessDenied, not
// whether its arguments would have been right.
func (o *sessionObject) begin(msg godbus.Message, method string) (broker.Caller, error) {
	c, err := o.s.callerOf(msg, o.path, SessionInterface, method)
	if err != nil {
		return c, err
	}
	if info, ok := o.s.br.Session(o.id); ok && info.Caller.ID != c.ID {
		return c, accessDenied("session %s belongs to %s", o.path, info.Caller.ID)
	}
	return c, nil
}

// reply maps an error of a call on this session; a session that closed
// under the call answers like its tombstone.
func (o *sessionObject) reply(err error) *godbus.Error {
	if errors.Is(err, broker.ErrNoSuchSession) {
		return o.s.deadPath(o.path)
	}
	return o.s.reply(err)
}

// Login logs the caller in to the session's token. The PIN is wiped in
// every copy the service holds, the message body's included.
func (o *sessionObject) Login(msg godbus.Message, userType uint32, pin []byte) *godbus.Error {
	defer wipeSecrets(msg, pin)
	c, err := o.begin(msg, "Login")
	if err != nil {
		return o.reply(err)
	}
	return o.reply(o.s.br.Login(c, o.id, uint(userType), pin))
}

// Logout logs the caller out of the session's token.
func (o *sessionObject) Logout(msg godbus.Message) *godbus.Error {
	c, err := o.begin(msg, "Logout")
	if err != nil {
		return o.reply(err)
	}
	return o.reply(o.s.br.Logout(c, o.id))
}

// Close closes the session.
func (o *sessionObject) Close(msg godbus.Message) *godbus.Error {
	c, err := o.begin(msg, "Close")
	if err != nil {
		return o.reply(err)
	}
	return o.reply(o.s.br.CloseSession(c, o.id))
}

// FindObjects returns the objects matching a template, one a{sv} each.
func (o *sessionObject) FindObjects(msg godbus.Message, template map[string]godbus.Variant) ([]map[string]godbus.Variant, *godbus.Error) {
	c, err := o.begin(msg, "FindObjects")
	if err != nil {
		return nil, o.reply(err)
	}
	// Decode from the message as received: godbus's conversion into the
	// parameter unwraps nested variants, which the contract does not allow.
	if raw, ok := msg.Body[0].(map[string]godbus.Variant); ok {
		template = raw
	}
	tmpl, err := decodeTemplate(template)
	if err != nil {
		return nil, o.reply(err)
	}
	objs, err := o.s.br.FindObjects(c, o.id, tmpl)
	if err != nil {
		return nil, o.reply(err)
	}
	out := make([]map[string]godbus.Variant, len(objs))
	for i, obj := range objs {
		out[i] = encodeObject(obj)
	}
	return out, nil
}

// Sign signs data with the private key whose CKA_ID is keyID.
func (o *sessionObject) Sign(msg godbus.Message, keyID []byte, mechanism uint32, data []byte) ([]byte, *godbus.Error) {
	c, err := o.begin(msg, "Sign")
	if err != nil {
		return nil, o.reply(err)
	}
	sig, err := o.s.br.Sign(c, o.id, keyID, uint(mechanism), data)
	if err != nil {
		return nil, o.reply(err)
	}
	return sig, nil
}

// sessionObjects puts the broker's sessions on the bus (broker.Observer).
// The broker calls it in order per session, so a session's
// InterfacesAdded, PropertiesChanged and InterfacesRemoved go out in the
// order they happened.
type sessionObjects struct{ s *Service }

func (so sessionObjects) SessionOpened(info broker.SessionInfo) {
	p := sessionPath(info.ID)
	err := so.s.objs.add(p, iface{
		name:    SessionInterface,
		methods: &sessionObject{s: so.s, id: info.ID, path: p},
		props: map[string]any{
			"Token":      tokenPath(info.Generation),
			"Generation": info.Generation,
			"Owner":      info.Caller.ID,
			"OwnerPid":   info.Caller.PID,
			"ReadWrite":  info.ReadWrite,
			"State":      uint32(info.State),
		},
	})
	so.s.logAdd(p, err)
}

// SessionChanged: a login or logout changed its State, or it resumed on a
// new generation of the same card after an outage.
func (so sessionObjects) SessionChanged(info broker.SessionInfo) {
	so.s.objs.set(sessionPath(info.ID), SessionInterface, map[string]any{
		"Token":      tokenPath(info.Generation),
		"Generation": info.Generation,
		"State":      uint32(info.State),
	})
}

func (so sessionObjects) SessionClosed(info broker.SessionInfo, why string) {
	so.s.objs.remove(sessionPath(info.ID))
	so.s.log.Debug("session closed", "session", sessionPath(info.ID), "owner", info.Caller.String(), "why", why)
}
