package pkcs11face

import (
	"context"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/broker"
	"github.com/slotwatch/slotwatch/pkcs11face/rpc"
)

// The functions slotwatch has no rule of its own for pass through to the
// module on the client's session (broker.SessionCall): the broker checks
// the session and the objects named, the module does the rest. Each is one
// C call; multi-part operations keep their state in the module's session,
// which belongs to this client alone.

func none(err error) ([]pkcs11.ObjectHandle, error) { return nil, err }

func objs(hs ...pkcs11.ObjectHandle) []pkcs11.ObjectHandle {
	var out []pkcs11.ObjectHandle
	for _, h := range hs {
		if h != 0 { // CK_INVALID_HANDLE: "no key" (SetOperationState)
			out = append(out, h)
		}
	}
	return out
}

// Object management.

func (c *conn) CreateObject(_ context.Context, h pkcs11.SessionHandle, template []*pkcs11.Attribute) (o pkcs11.ObjectHandle, err error) {
	err = c.call(h, "C_CreateObject", broker.MakesObjects, nil, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		o, err = ctx.CreateObject(sh, template)
		return objs(o), err
	})
	return o, err
}

func (c *conn) CopyObject(_ context.Context, h pkcs11.SessionHandle, src pkcs11.ObjectHandle, template []*pkcs11.Attribute) (o pkcs11.ObjectHandle, err error) {
	err = c.call(h, "C_CopyObject", broker.MakesObjects, objs(src), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		o, err = ctx.CopyObject(sh, src, template)
		return objs(o), err
	})
	return o, err
}

func (c *conn) DestroyObject(_ context.Context, h pkcs11.SessionHandle, o pkcs11.ObjectHandle) error {
	return c.call(h, "C_DestroyObject", broker.MakesObjects, objs(o), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		return none(ctx.DestroyObject(sh, o))
	})
}

func (c *conn) GetObjectSize(_ context.Context, h pkcs11.SessionHandle, o pkcs11.ObjectHandle) (size uint, err error) {
	err = c.call(h, "C_GetObjectSize", broker.UsesObjects, objs(o), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		size, err = ctx.GetObjectSize(sh, o)
		return none(err)
	})
	return size, err
}

func (c *conn) SetAttributeValue(_ context.Context, h pkcs11.SessionHandle, o pkcs11.ObjectHandle, template []*pkcs11.Attribute) error {
	return c.call(h, "C_SetAttributeValue", broker.MakesObjects, objs(o), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		return none(ctx.SetAttributeValue(sh, o, template))
	})
}

// GetAttributeValue reads one attribute at a time: miekg's wrapper fails
// the whole template on the first attribute the object lacks or keeps
// secret, where PKCS#11 answers each one; the RPC layer applies PKCS#11's
// rules to the results.
func (c *conn) GetAttributeValue(_ context.Context, h pkcs11.SessionHandle, o pkcs11.ObjectHandle, types []uint) (out []rpc.AttributeResult, err error) {
	err = c.call(h, "C_GetAttributeValue", broker.UsesObjects, objs(o), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		for _, t := range types {
			got, err := ctx.GetAttributeValue(sh, o, []*pkcs11.Attribute{pkcs11.NewAttribute(t, nil)})
			switch e, _ := err.(pkcs11.Error); {
			case err == nil && len(got) == 1:
				out = append(out, rpc.AttributeResult{Value: got[0].Value})
			case e == pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, e == pkcs11.CKR_ATTRIBUTE_SENSITIVE:
				out = append(out, rpc.AttributeResult{Err: e})
			default:
				if err == nil {
					err = pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
				}
				return nil, err
			}
		}
		return nil, nil
	})
	return out, err
}

// Cryptographic operations: Init names the key; the others only the session.

func (c *conn) initOp(h pkcs11.SessionHandle, fn string, key pkcs11.ObjectHandle, f func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error) error {
	return c.call(h, fn, broker.UsesObjects, objs(key), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		return none(f(ctx, sh))
	})
}

func (c *conn) dataOp(h pkcs11.SessionHandle, fn string, f func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error)) (out []byte, err error) {
	err = c.call(h, fn, broker.NoObjects, nil, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		out, err = f(ctx, sh)
		return none(err)
	})
	return out, err
}

func mechs(m *pkcs11.Mechanism) []*pkcs11.Mechanism { return []*pkcs11.Mechanism{m} }

func (c *conn) EncryptInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_EncryptInit", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.EncryptInit(sh, mechs(m), key) })
}
func (c *conn) Encrypt(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_Encrypt", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.Encrypt(sh, data) })
}
func (c *conn) EncryptUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_EncryptUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.EncryptUpdate(sh, data) })
}
func (c *conn) EncryptFinal(_ context.Context, h pkcs11.SessionHandle) ([]byte, error) {
	return c.dataOp(h, "C_EncryptFinal", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.EncryptFinal(sh) })
}

func (c *conn) DecryptInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_DecryptInit", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.DecryptInit(sh, mechs(m), key) })
}
func (c *conn) Decrypt(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_Decrypt", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.Decrypt(sh, data) })
}
func (c *conn) DecryptUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_DecryptUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.DecryptUpdate(sh, data) })
}
func (c *conn) DecryptFinal(_ context.Context, h pkcs11.SessionHandle) ([]byte, error) {
	return c.dataOp(h, "C_DecryptFinal", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.DecryptFinal(sh) })
}

func (c *conn) DigestInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism) error {
	return c.initOp(h, "C_DigestInit", 0, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.DigestInit(sh, mechs(m)) })
}
func (c *conn) Digest(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_Digest", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.Digest(sh, data) })
}
func (c *conn) DigestUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) error {
	_, err := c.dataOp(h, "C_DigestUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return nil, ctx.DigestUpdate(sh, data) })
	return err
}
func (c *conn) DigestKey(_ context.Context, h pkcs11.SessionHandle, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_DigestKey", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.DigestKey(sh, key) })
}
func (c *conn) DigestFinal(_ context.Context, h pkcs11.SessionHandle) ([]byte, error) {
	return c.dataOp(h, "C_DigestFinal", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.DigestFinal(sh) })
}

func (c *conn) SignInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_SignInit", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.SignInit(sh, mechs(m), key) })
}
func (c *conn) Sign(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_Sign", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.Sign(sh, data) })
}
func (c *conn) SignUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) error {
	_, err := c.dataOp(h, "C_SignUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return nil, ctx.SignUpdate(sh, data) })
	return err
}
func (c *conn) SignFinal(_ context.Context, h pkcs11.SessionHandle) ([]byte, error) {
	return c.dataOp(h, "C_SignFinal", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.SignFinal(sh) })
}
func (c *conn) SignRecoverInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_SignRecoverInit", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.SignRecoverInit(sh, mechs(m), key) })
}
func (c *conn) SignRecover(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_SignRecover", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.SignRecover(sh, data) })
}

func (c *conn) VerifyInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_VerifyInit", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.VerifyInit(sh, mechs(m), key) })
}
func (c *conn) Verify(_ context.Context, h pkcs11.SessionHandle, data, sig []byte) error {
	_, err := c.dataOp(h, "C_Verify", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return nil, ctx.Verify(sh, data, sig) })
	return err
}
func (c *conn) VerifyUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) error {
	_, err := c.dataOp(h, "C_VerifyUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return nil, ctx.VerifyUpdate(sh, data) })
	return err
}
func (c *conn) VerifyFinal(_ context.Context, h pkcs11.SessionHandle, sig []byte) error {
	_, err := c.dataOp(h, "C_VerifyFinal", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return nil, ctx.VerifyFinal(sh, sig) })
	return err
}
func (c *conn) VerifyRecoverInit(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	return c.initOp(h, "C_VerifyRecoverInit", key, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) error { return ctx.VerifyRecoverInit(sh, mechs(m), key) })
}
func (c *conn) VerifyRecover(_ context.Context, h pkcs11.SessionHandle, sig []byte) ([]byte, error) {
	return c.dataOp(h, "C_VerifyRecover", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.VerifyRecover(sh, sig) })
}

// Dual-function operations.

func (c *conn) DigestEncryptUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_DigestEncryptUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) {
		return ctx.DigestEncryptUpdate(sh, data)
	})
}
func (c *conn) DecryptDigestUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_DecryptDigestUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) {
		return ctx.DecryptDigestUpdate(sh, data)
	})
}
func (c *conn) SignEncryptUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_SignEncryptUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.SignEncryptUpdate(sh, data) })
}
func (c *conn) DecryptVerifyUpdate(_ context.Context, h pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return c.dataOp(h, "C_DecryptVerifyUpdate", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) {
		return ctx.DecryptVerifyUpdate(sh, data)
	})
}

// Keys.

func (c *conn) GenerateKey(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, template []*pkcs11.Attribute) (key pkcs11.ObjectHandle, err error) {
	err = c.call(h, "C_GenerateKey", broker.MakesObjects, nil, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		key, err = ctx.GenerateKey(sh, mechs(m), template)
		return objs(key), err
	})
	return key, err
}

func (c *conn) GenerateKeyPair(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, pub, priv []*pkcs11.Attribute) (pk, sk pkcs11.ObjectHandle, err error) {
	err = c.call(h, "C_GenerateKeyPair", broker.MakesObjects, nil, func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		pk, sk, err = ctx.GenerateKeyPair(sh, mechs(m), pub, priv)
		return objs(pk, sk), err
	})
	return pk, sk, err
}

func (c *conn) WrapKey(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, wrapping, key pkcs11.ObjectHandle) (out []byte, err error) {
	err = c.call(h, "C_WrapKey", broker.UsesObjects, objs(wrapping, key), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		out, err = ctx.WrapKey(sh, mechs(m), wrapping, key)
		return none(err)
	})
	return out, err
}

func (c *conn) UnwrapKey(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, unwrapping pkcs11.ObjectHandle, wrapped []byte, template []*pkcs11.Attribute) (key pkcs11.ObjectHandle, err error) {
	err = c.call(h, "C_UnwrapKey", broker.MakesObjects, objs(unwrapping), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		key, err = ctx.UnwrapKey(sh, mechs(m), unwrapping, wrapped, template)
		return objs(key), err
	})
	return key, err
}

func (c *conn) DeriveKey(_ context.Context, h pkcs11.SessionHandle, m *pkcs11.Mechanism, base pkcs11.ObjectHandle, template []*pkcs11.Attribute) (key pkcs11.ObjectHandle, err error) {
	err = c.call(h, "C_DeriveKey", broker.MakesObjects, objs(base), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		key, err = ctx.DeriveKey(sh, mechs(m), base, template)
		return objs(key), err
	})
	return key, err
}

// Random numbers, PINs, operation state.

func (c *conn) SeedRandom(_ context.Context, h pkcs11.SessionHandle, seed []byte) error {
	_, err := c.dataOp(h, "C_SeedRandom", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return nil, ctx.SeedRandom(sh, seed) })
	return err
}

func (c *conn) GenerateRandom(_ context.Context, h pkcs11.SessionHandle, n int) ([]byte, error) {
	if n < 0 || n > maxRandom {
		return nil, pkcs11.Error(pkcs11.CKR_ARGUMENTS_BAD)
	}
	return c.dataOp(h, "C_GenerateRandom", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.GenerateRandom(sh, n) })
}

// maxRandom bounds one C_GenerateRandom (the RPC message limit bounds it
// anyway; this says so clearly).
const maxRandom = 1 << 20

// InitPIN and SetPIN pass the PINs as the client sent them, never as Go
// strings (broker.InitPIN: the module reads them in place; the RPC layer
// wipes the request afterwards). Refused while another client owns the
// token's login.
func (c *conn) InitPIN(_ context.Context, h pkcs11.SessionHandle, pin []byte) error {
	return asPKCS11(c.srv.b.InitPIN(c.caller, uint64(h), pin))
}

func (c *conn) SetPIN(_ context.Context, h pkcs11.SessionHandle, oldPIN, newPIN []byte) error {
	return asPKCS11(c.srv.b.SetPIN(c.caller, uint64(h), oldPIN, newPIN))
}

func (c *conn) GetOperationState(_ context.Context, h pkcs11.SessionHandle) ([]byte, error) {
	return c.dataOp(h, "C_GetOperationState", func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]byte, error) { return ctx.GetOperationState(sh) })
}

func (c *conn) SetOperationState(_ context.Context, h pkcs11.SessionHandle, state []byte, encKey, authKey pkcs11.ObjectHandle) error {
	return c.call(h, "C_SetOperationState", broker.UsesObjects, objs(encKey, authKey), func(ctx *pkcs11.Ctx, sh pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
		return none(ctx.SetOperationState(sh, state, encKey, authKey))
	})
}
