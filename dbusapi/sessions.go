package dbusapi

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	godbus "github.com/godbus/dbus/v5"
	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// brokered is one PKCS#11 session slotwatch holds for a bus client.
type brokered struct {
	n      uint64 // the number in its object path, never reused
	mod    *module.Module
	id     uint64 // the module registry's session id
	owner  string // unique bus name of the connection that opened it
	pid    uint32
	tok    monitor.Token
	rw     bool
	path   godbus.ObjectPath
	closed bool // guarded by sessionTable.mu
}

// sessionTable holds the brokered sessions by path number.
type sessionTable struct {
	mu   sync.Mutex // guards all following fields
	next uint64
	byN  map[uint64]*brokered
	// recent remembers the token generation of the last len(recent)
	// sessions opened (a ring indexed by session number), so that a closed
	// session's path can tell "its token is gone" (TokenRemoved) from "it
	// was closed" (UnknownObject) in bounded memory.
	recent [1 << 16]struct{ n, gen uint64 }
}

func newSessionTable() *sessionTable { return &sessionTable{byN: map[uint64]*brokered{}} }

// generation returns the token generation session n was opened on. known
// is false for a number never issued; forgotten is true for one issued so
// long ago that the ring no longer holds it (its token is then almost
// surely gone, and callers treat it so).
func (t *sessionTable) generation(n uint64) (gen uint64, known, forgotten bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if n == 0 || n > t.next {
		return 0, false, false
	}
	e := t.recent[n%uint64(len(t.recent))]
	if e.n != n {
		return 0, true, true
	}
	return e.gen, true, false
}

func (t *sessionTable) add(b *brokered) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.next++
	b.n = t.next
	b.path = sessionPath(b.n)
	t.byN[b.n] = b
	t.recent[b.n%uint64(len(t.recent))] = struct{ n, gen uint64 }{b.n, b.tok.Generation}
}

// take removes a session from the table; only the first caller gets it.
func (t *sessionTable) take(b *brokered) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if b.closed {
		return false
	}
	b.closed = true
	delete(t.byN, b.n)
	return true
}

func (t *sessionTable) where(match func(*brokered) bool) []*brokered {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []*brokered
	for _, b := range t.byN {
		if match(b) {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b *brokered) int { return int(a.n) - int(b.n) })
	return out
}

func (t *sessionTable) all() []*brokered {
	return t.where(func(*brokered) bool { return true })
}

func (t *sessionTable) ofGeneration(gen uint64) []*brokered {
	return t.where(func(b *brokered) bool { return b.tok.Generation == gen })
}

// loginTable records which caller is logged in to each token generation.
// PKCS#11 login state belongs to the token for the whole process, and
// slotwatch is that process: without this, one caller's Login would unlock
// private objects and keys for every other caller's sessions.
type loginTable struct {
	mu    sync.Mutex // guards owner
	owner map[uint64]string
}

func newLoginTable() *loginTable { return &loginTable{owner: map[uint64]string{}} }

func (l *loginTable) get(gen uint64) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.owner[gen]
}

func (l *loginTable) set(gen uint64, owner string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if owner == "" {
		delete(l.owner, gen)
	} else {
		l.owner[gen] = owner
	}
}

// loggedInByOther tells whether another caller than owner is logged in to
// generation gen.
func (s *Service) loggedInByOther(gen uint64, owner string) bool {
	lo := s.logins.get(gen)
	return lo != "" && lo != owner
}

// closeSession closes a session in the module and takes its object off the
// bus. When the caller who logged the token in closes its last session on
// it, slotwatch logs the token out: the login must not outlive its owner
// for the other callers' sessions.
func (s *Service) closeSession(b *brokered, why string) error {
	if !s.sessions.take(b) {
		return nil
	}
	s.objs.remove(b.path)
	err := b.mod.CloseSession(b.id)
	s.log.Debug("session closed", "session", b.path, "owner", b.owner, "why", why)
	gen := b.tok.Generation
	if s.logins.get(gen) == b.owner {
		rest := s.sessions.ofGeneration(gen)
		mine := false
		for _, r := range rest {
			mine = mine || r.owner == b.owner
		}
		if !mine {
			if len(rest) > 0 {
				// Any session logs the token out; PKCS#11 has no per-session login.
				if lerr := rest[0].mod.Logout(rest[0].id); lerr != nil {
					s.log.Warn("logging out after the login owner left", "token", tokenPath(gen), "err", lerr)
				}
			}
			s.logins.set(gen, "")
			s.refreshStates(gen)
		}
	}
	return err
}

// refreshStates republishes the State of every session of a generation
// after its login changed. A caller who is not the login owner sees its
// session as public: it cannot use the login.
func (s *Service) refreshStates(gen uint64) {
	lo := s.logins.get(gen)
	for _, b := range s.sessions.ofGeneration(gen) {
		st := uint(pkcs11.CKS_RO_PUBLIC_SESSION)
		if b.rw {
			st = pkcs11.CKS_RW_PUBLIC_SESSION
		}
		if lo == b.owner {
			if real, err := b.mod.SessionState(b.id); err == nil {
				st = real
			}
		}
		s.objs.set(b.path, SessionInterface, map[string]any{"State": uint32(st)})
	}
}

// dropSession takes a dead generation's session off the bus without a
// module call: its handle must never reach the module again (rule 4); the
// monitor reclaims it once the generation drained. Its path then answers
// TokenRemoved.
func (s *Service) dropSession(b *brokered) {
	if s.sessions.take(b) {
		s.objs.remove(b.path)
	}
}

// callerGone closes every session of a connection that left the bus.
func (s *Service) callerGone(name string) {
	for _, b := range s.sessions.where(func(b *brokered) bool { return b.owner == name }) {
		s.closeSession(b, "owner left the bus")
	}
}

// hold acquires a token generation for one call (rule 4).
func (s *Service) hold(gen uint64) (release func(), err error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.GenerationWait)
	defer cancel()
	return s.mon.Acquire(ctx, gen)
}

// Limits on client input. PKCS#11 PINs are short; 256 bytes is generous.
const (
	maxPIN        = 256
	maxLabel      = 32 // CK_TOKEN_INFO.label
	maxSignData   = 1 << 16
	maxKeyID      = 256
	maxFindResult = 1000
)

func wipe(b []byte) { clear(b) }

// tokenObject is the Token interface of one live generation.
type tokenObject struct {
	s   *Service
	tok monitor.Token
}

func (t *tokenObject) module() (*module.Module, error) {
	m, ok := t.s.module(t.tok.Slot.Module)
	if !ok {
		return nil, fmt.Errorf("module %q is not loaded", t.tok.Slot.Module)
	}
	return m, nil
}

// OpenSession opens a PKCS#11 session on this token for the caller.
func (t *tokenObject) OpenSession(msg godbus.Message, readWrite bool) (godbus.ObjectPath, *godbus.Error) {
	sender, err := checkCall(msg, tokenPath(t.tok.Generation), TokenInterface, "OpenSession")
	if err != nil {
		return noObject, toDBus(t.s.log, err)
	}
	p, err := t.openSession(sender, readWrite)
	return p, toDBus(t.s.log, err)
}

func (t *tokenObject) openSession(owner string, readWrite bool) (godbus.ObjectPath, error) {
	s := t.s
	release, err := s.hold(t.tok.Generation)
	if err != nil {
		return noObject, err
	}
	defer release()
	mod, err := t.module()
	if err != nil {
		return noObject, err
	}
	ms, err := t.openVerified(mod, owner, readWrite)
	if err != nil {
		return noObject, err
	}
	b := &brokered{mod: mod, id: ms.ID, owner: owner, pid: s.callers.pid(owner), tok: t.tok, rw: readWrite}
	s.sessions.add(b)
	state, _ := mod.SessionState(ms.ID)
	err = s.objs.add(b.path, iface{
		name:    SessionInterface,
		methods: &sessionObject{s: s, b: b},
		props: map[string]any{
			"Token":      tokenPath(t.tok.Generation),
			"Generation": t.tok.Generation,
			"Owner":      owner,
			"OwnerPid":   b.pid,
			"ReadWrite":  readWrite,
			"State":      uint32(state),
		},
	})
	if err != nil {
		s.closeSession(b, "export failed")
		return noObject, err
	}
	// The token may have gone while we opened: then removeToken may have
	// run before the session was in the table. Checking after adding
	// closes that window (the snapshot changes before the event is applied).
	if _, live := s.mon.Snapshot().Token(t.tok.Generation); !live {
		s.dropSession(b)
		// removeToken may have taken the session from the table before its
		// object was added: then only this call can remove the object.
		s.objs.remove(b.path)
		return noObject, monitor.ErrTokenRemoved
	}
	// A caller that left before we registered it is not seen by
	// NameOwnerChanged any more.
	if b.pid == 0 && !s.nameHasOwner(owner) {
		s.closeSession(b, "owner left the bus")
		s.objs.remove(b.path)
		return noObject, namedError(ErrTokenRemoved, "caller %s left the bus", owner)
	}
	return b.path, nil
}

func (s *Service) nameHasOwner(name string) bool {
	var has bool
	if err := s.conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, name).Store(&has); err != nil {
		return true
	}
	return has
}

// openVerified opens a module session on this token's slot and checks that
// the token in the slot is still this one. A card swapped before the
// monitor noticed would otherwise give the caller a session on the new card
// under the old generation: the module binds a session to whatever token is
// in the slot when it is opened. If the identity differs, the session is
// closed and the call fails with TokenRemoved; the monitor's own wake-up
// brings the new generation.
func (t *tokenObject) openVerified(mod *module.Module, owner string, readWrite bool) (*module.Session, error) {
	ms, err := mod.OpenSession(owner, t.tok.Slot.ID, t.tok.Generation, readWrite)
	if err != nil {
		return nil, err
	}
	if t.stillInSlot(mod) {
		return ms, nil
	}
	mod.CloseSession(ms.ID)
	return nil, namedError(ErrTokenRemoved, "the token in slot %s is no longer generation %d", t.tok.Slot, t.tok.Generation)
}

// stillInSlot tells whether the module shows this generation's token (same
// label, serial, manufacturer, model) in its slot now.
func (t *tokenObject) stillInSlot(mod *module.Module) bool {
	ti, err := mod.TokenInfo(t.tok.Slot.ID)
	return err == nil && ti.Label == t.tok.Label && ti.Serial == t.tok.Serial &&
		ti.Manufacturer == t.tok.Manufacturer && ti.Model == t.tok.Model
}

// CloseAllSessions closes the caller's own sessions on this token, and
// nobody else's.
func (t *tokenObject) CloseAllSessions(msg godbus.Message) *godbus.Error {
	sender, err := checkCall(msg, tokenPath(t.tok.Generation), TokenInterface, "CloseAllSessions")
	if err != nil {
		return toDBus(t.s.log, err)
	}
	if _, live := t.s.mon.Snapshot().Token(t.tok.Generation); !live {
		return toDBus(t.s.log, monitor.ErrTokenRemoved)
	}
	var first error
	for _, b := range t.s.sessions.where(func(b *brokered) bool {
		return b.owner == sender && b.tok.Generation == t.tok.Generation
	}) {
		if err := t.s.closeSession(b, "CloseAllSessions"); err != nil && first == nil {
			first = err
		}
	}
	return toDBus(t.s.log, first)
}

// InitToken initializes the token. Without force it refuses while anyone
// holds a session on the slot and names them all; with force it closes
// them first.
func (t *tokenObject) InitToken(msg godbus.Message, soPIN []byte, label string, force bool) *godbus.Error {
	defer wipe(soPIN)
	if _, err := checkCall(msg, tokenPath(t.tok.Generation), TokenInterface, "InitToken"); err != nil {
		return toDBus(t.s.log, err)
	}
	return toDBus(t.s.log, t.initToken(soPIN, label, force))
}

func (t *tokenObject) initToken(soPIN []byte, label string, force bool) error {
	if err := checkPIN(soPIN, t.tok.Flags); err != nil {
		return err
	}
	if len(label) == 0 || len(label) > maxLabel || strings.ContainsRune(label, 0) {
		return invalidArgs("label must be 1 to %d bytes without NUL, got %d bytes", maxLabel, len(label))
	}
	release, err := t.s.hold(t.tok.Generation)
	if err != nil {
		return err
	}
	defer release()
	mod, err := t.module()
	if err != nil {
		return err
	}
	holders := t.s.sessions.where(func(b *brokered) bool {
		return b.tok.Slot == t.tok.Slot
	})
	if len(holders) > 0 && !force {
		var names []string
		seen := map[string]bool{}
		for _, b := range holders {
			d := describeCaller(b.owner, b.pid)
			if !seen[d] {
				seen[d] = true
				names = append(names, d)
			}
		}
		return namedError(ErrSessionsExist, "%d session(s) open on this token, held by: %s", len(holders), strings.Join(names, "; "))
	}
	// Never initialize a card that was swapped in before the monitor
	// noticed: that would wipe somebody else's token.
	if !t.stillInSlot(mod) {
		return namedError(ErrTokenRemoved, "the token in slot %s is no longer generation %d", t.tok.Slot, t.tok.Generation)
	}
	for _, b := range holders {
		t.s.closeSession(b, "InitToken with force")
	}
	return mod.InitToken(t.tok.Slot.ID, soPIN, label)
}

// certificate is one entry of ListCertificates: (id, label, subject, DER).
type certificate struct {
	ID      []byte
	Label   string
	Subject string
	DER     []byte
}

// ListCertificates lists the token's certificates with a short-lived
// session of slotwatch's own.
func (t *tokenObject) ListCertificates(msg godbus.Message) ([]certificate, *godbus.Error) {
	sender, err := checkCall(msg, tokenPath(t.tok.Generation), TokenInterface, "ListCertificates")
	if err != nil {
		return nil, toDBus(t.s.log, err)
	}
	certs, err := t.listCertificates(sender)
	return certs, toDBus(t.s.log, err)
}

func (t *tokenObject) listCertificates(caller string) ([]certificate, error) {
	release, err := t.s.hold(t.tok.Generation)
	if err != nil {
		return nil, err
	}
	defer release()
	mod, err := t.module()
	if err != nil {
		return nil, err
	}
	ms, err := t.openVerified(mod, caller, false)
	if err != nil {
		return nil, err
	}
	defer mod.CloseSession(ms.ID)
	objs, err := mod.FindObjects(ms.ID, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE)}, maxFindResult)
	if err != nil {
		return nil, err
	}
	hidePrivate := t.s.loggedInByOther(t.tok.Generation, caller)
	certs := []certificate{}
	for _, o := range objs {
		if hidePrivate && isPrivate(mod, ms.ID, o) {
			continue
		}
		attrs, err := mod.GetAttributes(ms.ID, o, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil),
		})
		if err != nil {
			return nil, err
		}
		c := certificate{ID: []byte{}, DER: []byte{}}
		for _, a := range attrs {
			switch a.Type {
			case pkcs11.CKA_ID:
				c.ID = append(c.ID, a.Value...)
			case pkcs11.CKA_LABEL:
				c.Label = string(a.Value)
			case pkcs11.CKA_VALUE:
				c.DER = append(c.DER, a.Value...)
			}
		}
		if cert, err := x509.ParseCertificate(c.DER); err == nil {
			c.Subject = cert.Subject.String()
		}
		certs = append(certs, c)
	}
	return certs, nil
}

// sessionObject is the Session interface of one brokered session.
type sessionObject struct {
	s *Service
	b *brokered
}

// begin checks that the caller owns the session and holds its generation
// for the call.
func (o *sessionObject) begin(msg godbus.Message, method string) (release func(), err error) {
	sender, err := checkCall(msg, o.b.path, SessionInterface, method)
	if err != nil {
		return nil, err
	}
	if sender != o.b.owner {
		return nil, accessDenied("session %s belongs to %s", o.b.path, o.b.owner)
	}
	return o.s.hold(o.b.tok.Generation)
}

// checkPIN validates a PIN from a client. An empty PIN means "ask the
// reader's PIN pad", which only a token with a protected authentication
// path has.
func checkPIN(pin []byte, tokenFlags uint) error {
	if len(pin) > maxPIN {
		return invalidArgs("a PIN must be at most %d bytes, got %d", maxPIN, len(pin))
	}
	if len(pin) == 0 && tokenFlags&pkcs11.CKF_PROTECTED_AUTHENTICATION_PATH == 0 {
		return invalidArgs("empty PIN, and this token has no PIN pad (CKF_PROTECTED_AUTHENTICATION_PATH)")
	}
	return nil
}

// Login logs the session's token in.
func (o *sessionObject) Login(msg godbus.Message, userType uint32, pin []byte) *godbus.Error {
	defer wipe(pin)
	err := func() error {
		if _, err := checkCall(msg, o.b.path, SessionInterface, "Login"); err != nil {
			return err
		}
		switch userType {
		case pkcs11.CKU_SO, pkcs11.CKU_USER:
		case pkcs11.CKU_CONTEXT_SPECIFIC:
			// It has to come between C_SignInit and C_Sign, which Sign
			// makes in one call.
			return namedError(ErrNotSupported, "context-specific login is not offered in this version")
		default:
			return invalidArgs("unknown user type %d (0 SO, 1 user, 2 context specific)", userType)
		}
		if err := checkPIN(pin, o.b.tok.Flags); err != nil {
			return err
		}
		release, err := o.begin(msg, "Login")
		if err != nil {
			return err
		}
		defer release()
		gen := o.b.tok.Generation
		if o.s.loggedInByOther(gen, o.b.owner) {
			return namedError(ErrAlreadyLoggedIn, "the token is logged in by another client; it must log out (or close its sessions) first")
		}
		err = o.b.mod.Login(o.b.id, uint(userType), pin)
		if err == nil {
			o.s.logins.set(gen, o.b.owner)
		}
		o.s.refreshStates(gen)
		return err
	}()
	return toDBus(o.s.log, err)
}

// Logout logs the session's token out.
func (o *sessionObject) Logout(msg godbus.Message) *godbus.Error {
	release, err := o.begin(msg, "Logout")
	if err != nil {
		return toDBus(o.s.log, err)
	}
	defer release()
	// Only the caller who logged in can log out. (Some modules, SoftHSM2
	// among them, also answer CKR_OK to a logout nobody asked for; the
	// contract says NotLoggedIn.)
	gen := o.b.tok.Generation
	if o.s.logins.get(gen) != o.b.owner {
		return toDBus(o.s.log, namedError(ErrNotLoggedIn, "this client is not logged in to the token"))
	}
	err = o.b.mod.Logout(o.b.id)
	if err == nil || errors.Is(err, module.ErrUserNotLoggedIn) {
		o.s.logins.set(gen, "")
	}
	o.s.refreshStates(gen)
	return toDBus(o.s.log, err)
}

// Close closes the session.
func (o *sessionObject) Close(msg godbus.Message) *godbus.Error {
	release, err := o.begin(msg, "Close")
	if err != nil {
		return toDBus(o.s.log, err)
	}
	defer release()
	return toDBus(o.s.log, o.s.closeSession(o.b, "Close"))
}

// foundObject is one FindObjects result: the contract's a(a{sv}), a struct
// holding the object's attributes, leaves room for more fields later.
type foundObject struct {
	Attributes map[string]godbus.Variant
}

// FindObjects returns the objects matching a template.
func (o *sessionObject) FindObjects(msg godbus.Message, template map[string]godbus.Variant) ([]foundObject, *godbus.Error) {
	out, err := o.findObjects(msg, template)
	return out, toDBus(o.s.log, err)
}

func (o *sessionObject) findObjects(msg godbus.Message, template map[string]godbus.Variant) ([]foundObject, error) {
	release, err := o.begin(msg, "FindObjects")
	if err != nil {
		return nil, err
	}
	defer release()
	// Decode from the message as received: godbus's conversion into the
	// parameter unwraps nested variants, which the contract does not allow.
	if raw, ok := msg.Body[0].(map[string]godbus.Variant); ok {
		template = raw
	}
	attrs, err := decodeTemplate(template)
	if err != nil {
		return nil, err
	}
	handles, err := o.b.mod.FindObjects(o.b.id, attrs, maxFindResult)
	if err != nil {
		return nil, err
	}
	hidePrivate := o.s.loggedInByOther(o.b.tok.Generation, o.b.owner)
	out := []foundObject{}
	for _, h := range handles {
		if hidePrivate && isPrivate(o.b.mod, o.b.id, h) {
			continue // visible only through another caller's login
		}
		obj, err := o.describe(h)
		if err != nil {
			return nil, err
		}
		out = append(out, foundObject{obj})
	}
	return out, nil
}

// describe reads the result keys of one object, one attribute at a time:
// an attribute the object does not have (key_type of a certificate) must
// not fail the others. Any other error (the token went meanwhile) fails the
// call: a half-described object would mislead.
func (o *sessionObject) describe(h pkcs11.ObjectHandle) (map[string]godbus.Variant, error) {
	var failed error
	get := func(t uint) ([]byte, bool) {
		a, err := o.b.mod.GetAttributes(o.b.id, h, []*pkcs11.Attribute{pkcs11.NewAttribute(t, nil)})
		switch {
		case err == nil && len(a) == 1:
			return a[0].Value, true
		case err == nil, errors.Is(err, module.ErrAttributeTypeInvalid), errors.Is(err, module.ErrAttributeSensitive):
			return nil, false
		}
		if failed == nil {
			failed = err
		}
		return nil, false
	}
	res := map[string]godbus.Variant{}
	class, ok := get(pkcs11.CKA_CLASS)
	if !ok {
		if failed != nil {
			return nil, failed
		}
		return nil, fmt.Errorf("object %d has no CKA_CLASS", h)
	}
	cls := ulong(class)
	res["class"] = godbus.MakeVariant(uint32(cls))
	if v, ok := get(pkcs11.CKA_ID); ok {
		res["id"] = godbus.MakeVariant(append([]byte{}, v...))
	}
	if v, ok := get(pkcs11.CKA_LABEL); ok {
		res["label"] = godbus.MakeVariant(string(v))
	}
	if cls == pkcs11.CKO_PRIVATE_KEY || cls == pkcs11.CKO_PUBLIC_KEY || cls == pkcs11.CKO_SECRET_KEY {
		if v, ok := get(pkcs11.CKA_KEY_TYPE); ok {
			res["key_type"] = godbus.MakeVariant(uint32(ulong(v)))
		}
	}
	if cls == pkcs11.CKO_CERTIFICATE {
		if v, ok := get(pkcs11.CKA_VALUE); ok {
			res["value"] = godbus.MakeVariant(append([]byte{}, v...))
		}
	}
	if failed != nil {
		return nil, failed
	}
	return res, nil
}

// isPrivate tells whether an object needs a login to be seen
// (CKA_PRIVATE); an object whose attribute cannot be read counts as
// private.
func isPrivate(mod *module.Module, id uint64, h pkcs11.ObjectHandle) bool {
	a, err := mod.GetAttributes(id, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil)})
	if err != nil || len(a) != 1 || len(a[0].Value) == 0 {
		return true
	}
	return a[0].Value[0] != 0
}

// ulong decodes a CK_ULONG attribute value (native byte order, as miekg
// returns it).
func ulong(b []byte) uint {
	var v uint
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint(b[i])
	}
	return v
}

// decodeTemplate turns a client template into PKCS#11 attributes. Only the
// contract's keys with their exact types are accepted.
func decodeTemplate(t map[string]godbus.Variant) ([]*pkcs11.Attribute, error) {
	var attrs []*pkcs11.Attribute
	for _, k := range slices.Sorted(maps.Keys(t)) {
		v := t[k].Value()
		if _, nested := v.(godbus.Variant); nested {
			return nil, invalidArgs("template key %q holds a variant in a variant", k)
		}
		switch k {
		case "class", "key_type":
			u, ok := v.(uint32)
			if !ok {
				return nil, invalidArgs("template key %q wants type u, got %s", k, t[k].Signature())
			}
			typ := uint(pkcs11.CKA_CLASS)
			if k == "key_type" {
				typ = pkcs11.CKA_KEY_TYPE
			}
			attrs = append(attrs, pkcs11.NewAttribute(typ, uint(u)))
		case "id":
			b, ok := v.([]byte)
			if !ok || len(b) > maxKeyID {
				return nil, invalidArgs("template key \"id\" wants ay of at most %d bytes, got %s", maxKeyID, t[k].Signature())
			}
			attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_ID, append([]byte{}, b...)))
		case "label":
			s, ok := v.(string)
			if !ok || len(s) > 256 {
				return nil, invalidArgs("template key \"label\" wants s of at most 256 bytes, got %s", t[k].Signature())
			}
			attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_LABEL, s))
		default:
			return nil, invalidArgs("unknown template key %q (known: class, id, label, key_type)", k)
		}
	}
	return attrs, nil
}

// Sign signs data with the private key whose CKA_ID is keyID.
func (o *sessionObject) Sign(msg godbus.Message, keyID []byte, mechanism uint32, data []byte) ([]byte, *godbus.Error) {
	sig, err := o.sign(msg, keyID, mechanism, data)
	return sig, toDBus(o.s.log, err)
}

func (o *sessionObject) sign(msg godbus.Message, keyID []byte, mechanism uint32, data []byte) ([]byte, error) {
	if _, err := checkCall(msg, o.b.path, SessionInterface, "Sign"); err != nil {
		return nil, err
	}
	if len(keyID) == 0 || len(keyID) > maxKeyID {
		return nil, invalidArgs("key_id must be 1 to %d bytes, got %d", maxKeyID, len(keyID))
	}
	if len(data) == 0 || len(data) > maxSignData {
		return nil, invalidArgs("data must be 1 to %d bytes, got %d", maxSignData, len(data))
	}
	mech, err := signMechanism(mechanism)
	if err != nil {
		return nil, err
	}
	release, err := o.begin(msg, "Sign")
	if err != nil {
		return nil, err
	}
	defer release()
	if o.s.loggedInByOther(o.b.tok.Generation, o.b.owner) {
		return nil, namedError(ErrNotLoggedIn, "the token is logged in by another client, not by this one")
	}
	keys, err := o.b.mod.FindObjects(o.b.id, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, keyID),
	}, 2)
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, invalidArgs("no private key with id %x on this token (or not logged in)", keyID)
	}
	// Some modules accept C_SignInit with a mechanism of the wrong key type
	// and fail C_Sign with CKR_GENERAL_ERROR; say what is wrong instead.
	if kt, err := o.b.mod.GetAttributes(o.b.id, keys[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)}); err == nil && len(kt) == 1 {
		if want := mechanismKeyType(uint(mechanism)); want != ulong(kt[0].Value) {
			return nil, namedError(ErrNotSupported, "mechanism 0x%x needs a %s key; key %x is not one", mechanism, keyTypeName(want), keyID)
		}
	}
	return o.b.mod.Sign(o.b.id, mech, keys[0], data)
}

// mechanismKeyType is the key type a signing mechanism slotwatch offers
// works with.
func mechanismKeyType(m uint) uint {
	switch m {
	case pkcs11.CKM_ECDSA, pkcs11.CKM_ECDSA_SHA256:
		return pkcs11.CKK_EC
	}
	return pkcs11.CKK_RSA
}

func keyTypeName(k uint) string {
	if k == pkcs11.CKK_EC {
		return "EC"
	}
	return "RSA"
}

// signMechanism builds the PKCS#11 mechanism for a CKM_* number slotwatch
// brokers. RSA-PSS is offered with SHA-256 only.
func signMechanism(m uint32) (*pkcs11.Mechanism, error) {
	switch m {
	case pkcs11.CKM_ECDSA, pkcs11.CKM_ECDSA_SHA256, pkcs11.CKM_RSA_PKCS, pkcs11.CKM_SHA256_RSA_PKCS:
		return pkcs11.NewMechanism(uint(m), nil), nil
	case pkcs11.CKM_RSA_PKCS_PSS, pkcs11.CKM_SHA256_RSA_PKCS_PSS:
		return pkcs11.NewMechanism(uint(m), pkcs11.NewPSSParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, 32)), nil
	}
	return nil, namedError(ErrNotSupported, "mechanism 0x%x is not offered (CKM_ECDSA, CKM_ECDSA_SHA256, CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS are)", m)
}
