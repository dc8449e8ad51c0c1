package rpc

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// C_GetAttributeValue: PKCS#11's per-attribute rules on the wire.

// getAttributeValue applies PKCS#11's rules for C_GetAttributeValue to
// each attribute of the Handler's result: the value when it fits, only
// its length for a NULL pValue, CK_UNAVAILABLE_INFORMATION with
// CKR_BUFFER_TOO_SMALL when it does not fit, CK_UNAVAILABLE_INFORMATION
// with the Handler's reason when the object does not reveal it. These
// CK_RVs go in a regular answer after the attributes, not as an error
// answer, or the client would fill in nothing.
func (s *server) getAttributeValue(ctx context.Context, d *decoder, e *encoder) error {
	sh := pkcs11.SessionHandle(d.ulong())
	o := pkcs11.ObjectHandle(d.ulong())
	reqs := d.attrBuffer()
	if err := d.done(); err != nil {
		return err
	}
	types := make([]uint, len(reqs))
	for i, r := range reqs {
		if isTemplateType(r.typ) {
			return pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
		}
		types[i] = r.typ
	}
	results, err := s.h.GetAttributeValue(ctx, sh, o, types)
	if err != nil {
		return err
	}
	if len(results) != len(reqs) {
		return fmt.Errorf("%w: GetAttributeValue returned %d results for %d attributes", errBadResult, len(results), len(reqs))
	}

	rv := uint(pkcs11.CKR_OK)
	e.sig += "aA"
	e.u32(uint32(len(reqs)))
	for i, r := range reqs {
		res := results[i]
		if res.Err == nil && !validValue(r.typ, res.Value) {
			s.log.Warn("p11-kit rpc: attribute value of the wrong size from the Handler",
				"type", fmt.Sprintf("0x%x", r.typ), "size", len(res.Value))
			res.Err = pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
		}
		if res.Err != nil {
			var perr pkcs11.Error
			if !errors.As(res.Err, &perr) ||
				(perr != pkcs11.CKR_ATTRIBUTE_SENSITIVE && perr != pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) {
				return res.Err
			}
			e.unavailableAttr(r.typ)
			rv = worseAttrRV(rv, uint(perr))
			continue
		}
		switch {
		case r.size == 0 && len(res.Value) > 0:
			e.attrValue(r.typ, res.Value, true)
		case uint64(len(res.Value)) <= uint64(r.size):
			e.attrValue(r.typ, res.Value, false)
		default:
			e.unavailableAttr(r.typ)
			rv = worseAttrRV(rv, pkcs11.CKR_BUFFER_TOO_SMALL)
		}
	}
	e.ulong(rv)
	return nil
}

// worseAttrRV picks the CK_RV of a C_GetAttributeValue where several
// attributes failed. PKCS#11 lets any of them be returned; the order
// chosen puts what the caller cannot fix by retrying first.
func worseAttrRV(a, b uint) uint {
	rank := func(rv uint) int {
		switch rv {
		case pkcs11.CKR_ATTRIBUTE_SENSITIVE:
			return 3
		case pkcs11.CKR_ATTRIBUTE_TYPE_INVALID:
			return 2
		case pkcs11.CKR_BUFFER_TOO_SMALL:
			return 1
		}
		return 0
	}
	if rank(b) > rank(a) {
		return b
	}
	return a
}
