package dbusapi

import (
	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/monitor"
)

// tokenObject is the Token interface of one live generation: each method
// checks the call against the contract, learns the caller, and asks the
// broker.
type tokenObject struct {
	s   *Service
	tok monitor.Token
}

func (t *tokenObject) path() godbus.ObjectPath { return tokenPath(t.tok.Generation) }

// OpenSession opens a PKCS#11 session on this token for the caller.
func (t *tokenObject) OpenSession(msg godbus.Message, readWrite bool) (godbus.ObjectPath, *godbus.Error) {
	c, err := t.s.callerOf(msg, t.path(), TokenInterface, "OpenSession")
	if err != nil {
		return noObject, t.s.reply(err)
	}
	info, err := t.s.br.OpenSession(c, t.tok.Generation, readWrite)
	if err != nil {
		return noObject, t.s.reply(err)
	}
	return sessionPath(info.ID), nil
}

// CloseAllSessions closes the caller's own sessions on this token, and
// nobody else's.
func (t *tokenObject) CloseAllSessions(msg godbus.Message) *godbus.Error {
	c, err := t.s.callerOf(msg, t.path(), TokenInterface, "CloseAllSessions")
	if err != nil {
		return t.s.reply(err)
	}
	return t.s.reply(t.s.br.CloseAllSessions(c, t.tok.Generation))
}

// InitToken initializes the token (broker.InitToken says when it refuses
// and whose sessions it closes). The SO PIN is wiped in every copy the
// service holds, the message body's included.
func (t *tokenObject) InitToken(msg godbus.Message, soPIN []byte, label string, force bool) *godbus.Error {
	defer wipeSecrets(msg, soPIN)
	c, err := t.s.callerOf(msg, t.path(), TokenInterface, "InitToken")
	if err != nil {
		return t.s.reply(err)
	}
	err = t.s.br.InitToken(c, t.tok.Generation, soPIN, label, force)
	if se, ok := err.(*broker.SessionsExistError); ok {
		t.s.log.Warn("InitToken refused: sessions are open", "token", t.path(), "caller", c.String(), "refusal", se.Error())
	}
	return t.s.reply(err)
}

// certificate is one entry of ListCertificates: (id, label, subject, DER).
type certificate struct {
	ID      []byte
	Label   string
	Subject string
	DER     []byte
}

// ListCertificates lists the token's certificates.
func (t *tokenObject) ListCertificates(msg godbus.Message) ([]certificate, *godbus.Error) {
	c, err := t.s.callerOf(msg, t.path(), TokenInterface, "ListCertificates")
	if err != nil {
		return nil, t.s.reply(err)
	}
	certs, err := t.s.br.ListCertificates(c, t.tok.Generation)
	if err != nil {
		return nil, t.s.reply(err)
	}
	out := make([]certificate, len(certs))
	for i, cert := range certs {
		out[i] = certificate(cert)
	}
	return out, nil
}

// wipeSecrets clears a PIN argument and every byte array of the message
// body godbus decoded it from: godbus may hand the method a copy.
func wipeSecrets(msg godbus.Message, secret []byte) {
	clear(secret)
	for _, v := range msg.Body {
		if b, ok := v.([]byte); ok {
			clear(b)
		}
	}
}
