package broker

import (
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/module"
)

// Limits on what a client hands in.
const (
	maxKeyID    = 256
	maxLabelLen = 256 // a template's label
	maxSignData = 1 << 16
)

// Template selects objects; a nil field matches any value.
type Template struct {
	Class   *uint   // CKA_CLASS (CKO_*)
	ID      []byte  // CKA_ID
	Label   *string // CKA_LABEL
	KeyType *uint   // CKA_KEY_TYPE (CKK_*)
}

func (t Template) attributes() ([]*pkcs11.Attribute, error) {
	var attrs []*pkcs11.Attribute
	if t.Class != nil {
		attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_CLASS, *t.Class))
	}
	if t.ID != nil {
		if len(t.ID) > maxKeyID {
			return nil, errorf(ErrInvalidArgument, "id must be at most %d bytes, got %d", maxKeyID, len(t.ID))
		}
		attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_ID, t.ID))
	}
	if t.Label != nil {
		if len(*t.Label) > maxLabelLen {
			return nil, errorf(ErrInvalidArgument, "label must be at most %d bytes, got %d", maxLabelLen, len(*t.Label))
		}
		attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_LABEL, *t.Label))
	}
	if t.KeyType != nil {
		attrs = append(attrs, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, *t.KeyType))
	}
	return attrs, nil
}

// Object is one FindObjects result. Absent attributes are nil.
type Object struct {
	Class   uint
	ID      []byte
	Label   *string
	KeyType *uint  // keys only
	Value   []byte // certificates only (DER)
}

// Certificate is one ListCertificates entry.
type Certificate struct {
	ID      []byte
	Label   string
	Subject string // from the DER, "" if it does not parse
	DER     []byte
}

// FindObjects returns the objects on session id's token that match t, at
// most Limits.FindResults. While another caller is logged in, objects that
// need a login (CKA_PRIVATE) are left out: they are visible only through
// that caller's login.
func (b *Broker) FindObjects(c Caller, id uint64, t Template) ([]Object, error) {
	var attrs []*pkcs11.Attribute
	h, s, end, err := b.begin(c, id, false, func() (err error) {
		attrs, err = t.attributes()
		return err
	})
	if err != nil {
		return nil, err
	}
	defer end()
	handles, err := h.mod.FindObjects(s.modID, attrs, b.limits.FindResults)
	if err != nil {
		return nil, err
	}
	hidePrivate := b.loggedInByOther(h, c)
	out := []Object{}
	for _, o := range handles {
		if hidePrivate && isPrivate(h.mod, s.modID, o) {
			continue
		}
		obj, err := describe(h.mod, s.modID, o)
		if err != nil {
			return nil, err
		}
		out = append(out, obj)
	}
	return out, nil
}

// begin starts a call on c's session id: it takes one of c's call slots,
// checks that c owns the session, then validates the call's arguments
// (after the ownership check: a stranger learns nothing from them), then
// holds the session's token, shared or exclusive. end undoes it all.
func (b *Broker) begin(c Caller, id uint64, exclusive bool, validate func() error) (h *held, s *session, end func(), err error) {
	exit, err := b.enter(c)
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := b.waitCtx()
	defer cancel()
	for validated := false; ; validated = true {
		if s, err = b.own(c, id); err == nil && validate != nil && !validated {
			err = validate()
		}
		if err == nil && s.suspended != nil {
			// Its token is away after an outage: wait for it, then
			// take the session as it is then (resumed, or closed).
			if err = b.awaitResume(ctx, s); err == nil {
				continue
			}
		}
		if err != nil {
			exit()
			return nil, nil, nil, err
		}
		h, err = b.hold(ctx, s.info.Generation, exclusive)
		if errors.Is(err, ErrTokenRemoved) && b.replaced(s) {
			continue // suspended since it was read
		}
		if err != nil {
			exit()
			return nil, nil, nil, err
		}
		return h, s, func() { h.done(); exit() }, nil
	}
}

// loggedInByOther tells whether another caller than c owns h's login. h
// is held, so the answer stays true for the call.
func (b *Broker) loggedInByOther(h *held, c Caller) bool {
	lo := b.loginOf(h.state)
	return lo != "" && lo != c.ID
}

// describe reads the result attributes of one object, one at a time: an
// attribute the object does not have (key_type of a certificate) must not
// fail the others. Any other error (the token went meanwhile) fails the
// call: a half-described object would mislead.
func describe(mod *module.Module, sid uint64, h pkcs11.ObjectHandle) (Object, error) {
	var failed error
	get := func(t uint) ([]byte, bool) {
		a, err := mod.GetAttributes(sid, h, []*pkcs11.Attribute{pkcs11.NewAttribute(t, nil)})
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
	class, ok := get(pkcs11.CKA_CLASS)
	if !ok {
		if failed != nil {
			return Object{}, failed
		}
		return Object{}, fmt.Errorf("object %d has no CKA_CLASS: %w", h, module.ErrAttributeTypeInvalid)
	}
	o := Object{Class: ulong(class)}
	if v, ok := get(pkcs11.CKA_ID); ok {
		o.ID = append([]byte{}, v...)
	}
	if v, ok := get(pkcs11.CKA_LABEL); ok {
		l := string(v)
		o.Label = &l
	}
	switch o.Class {
	case pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY, pkcs11.CKO_SECRET_KEY:
		if v, ok := get(pkcs11.CKA_KEY_TYPE); ok {
			kt := ulong(v)
			o.KeyType = &kt
		}
	case pkcs11.CKO_CERTIFICATE:
		if v, ok := get(pkcs11.CKA_VALUE); ok {
			o.Value = append([]byte{}, v...)
		}
	}
	if failed != nil {
		return Object{}, failed
	}
	return o, nil
}

// isPrivate tells whether an object needs a login to be seen
// (CKA_PRIVATE); an object whose attribute cannot be read counts as
// private.
func isPrivate(mod *module.Module, sid uint64, h pkcs11.ObjectHandle) bool {
	a, err := mod.GetAttributes(sid, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil)})
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

// ListCertificates lists the certificates of token generation gen, with a
// short-lived session of the broker's own (never one of c's, so it needs
// no session and counts against none).
func (b *Broker) ListCertificates(c Caller, gen uint64) ([]Certificate, error) {
	exit, err := b.enter(c)
	if err != nil {
		return nil, err
	}
	defer exit()
	ctx, cancel := b.waitCtx()
	defer cancel()
	h, err := b.hold(ctx, gen, false)
	if err != nil {
		return nil, err
	}
	defer h.done()
	ms, err := h.mod.OpenSession(c.ID+" (ListCertificates)", h.tok.Slot.ID, gen, false)
	if err != nil {
		return nil, err
	}
	defer h.mod.CloseSession(ms.ID)
	if !h.stillInSlot() {
		return nil, h.swapped()
	}
	objs, err := h.mod.FindObjects(ms.ID, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE)}, b.limits.FindResults)
	if err != nil {
		return nil, err
	}
	hidePrivate := b.loggedInByOther(h, c)
	certs := []Certificate{}
	for _, o := range objs {
		if hidePrivate && isPrivate(h.mod, ms.ID, o) {
			continue
		}
		attrs, err := h.mod.GetAttributes(ms.ID, o, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil),
		})
		if err != nil {
			return nil, err
		}
		cert := Certificate{ID: []byte{}, DER: []byte{}}
		for _, a := range attrs {
			switch a.Type {
			case pkcs11.CKA_ID:
				cert.ID = append(cert.ID, a.Value...)
			case pkcs11.CKA_LABEL:
				cert.Label = string(a.Value)
			case pkcs11.CKA_VALUE:
				cert.DER = append(cert.DER, a.Value...)
			}
		}
		if x, err := x509.ParseCertificate(cert.DER); err == nil {
			cert.Subject = x.Subject.String()
		}
		certs = append(certs, cert)
	}
	return certs, nil
}

// Sign signs data with the private key whose CKA_ID is keyID, on session
// id, with a CKM_* mechanism slotwatch offers (signMechanism). It fails
// with ErrNotLoggedIn while another caller owns the token's login: that
// login is not c's to use.
func (b *Broker) Sign(c Caller, id uint64, keyID []byte, mechanism uint, data []byte) ([]byte, error) {
	var mech *pkcs11.Mechanism
	h, s, end, err := b.begin(c, id, false, func() (err error) {
		if len(keyID) == 0 || len(keyID) > maxKeyID {
			return errorf(ErrInvalidArgument, "key_id must be 1 to %d bytes, got %d", maxKeyID, len(keyID))
		}
		if len(data) == 0 || len(data) > maxSignData {
			return errorf(ErrInvalidArgument, "data must be 1 to %d bytes, got %d", maxSignData, len(data))
		}
		mech, err = signMechanism(mechanism)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer end()
	if b.loggedInByOther(h, c) {
		return nil, errorf(ErrNotLoggedIn, "the token is logged in by another client, not by this one")
	}
	keys, err := h.mod.FindObjects(s.modID, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, keyID),
	}, 2)
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		if h.tok.Flags&pkcs11.CKF_LOGIN_REQUIRED != 0 && b.loginOf(h.state) != c.ID {
			// Its keys are private: not found is what "not logged in" looks like.
			return nil, errorf(ErrNotLoggedIn, "no private key with id %x is visible: this token needs a login first", keyID)
		}
		return nil, errorf(ErrInvalidArgument, "no private key with id %x on this token (or not logged in)", keyID)
	}
	// Some modules accept C_SignInit with a mechanism of the wrong key type
	// and fail C_Sign with CKR_GENERAL_ERROR; say what is wrong instead.
	if kt, err := h.mod.GetAttributes(s.modID, keys[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)}); err == nil && len(kt) == 1 {
		if want := mechanismKeyType(mechanism); want != ulong(kt[0].Value) {
			return nil, errorf(ErrNotSupported, "mechanism 0x%x needs a %s key; key %x is not one", mechanism, keyTypeName(want), keyID)
		}
	}
	return h.mod.Sign(s.modID, mech, keys[0], data)
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
func signMechanism(m uint) (*pkcs11.Mechanism, error) {
	switch m {
	case pkcs11.CKM_ECDSA, pkcs11.CKM_ECDSA_SHA256, pkcs11.CKM_RSA_PKCS, pkcs11.CKM_SHA256_RSA_PKCS:
		return pkcs11.NewMechanism(m, nil), nil
	case pkcs11.CKM_RSA_PKCS_PSS, pkcs11.CKM_SHA256_RSA_PKCS_PSS:
		return pkcs11.NewMechanism(m, pkcs11.NewPSSParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, 32)), nil
	}
	return nil, errorf(ErrNotSupported, "mechanism 0x%x is not offered (CKM_ECDSA, CKM_ECDSA_SHA256, CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS are)", m)
}
