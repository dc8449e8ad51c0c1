package rpc

import (
	"context"

	"github.com/miekg/pkcs11"
)

// Handler carries out the PKCS#11 calls of one client connection. Serve
// calls one method per decoded call, with the client's arguments.
//
// Errors: return a pkcs11.Error (possibly wrapped) to answer that CK_RV;
// any other error is answered CKR_GENERAL_ERROR and logged. A method
// must never return pkcs11.Error(CKR_OK) as an error.
//
// Concurrency: the calls of one connection may run at the same time, as
// calls from several threads of one process into a module initialized
// with CKF_OS_LOCKING_OK may; a Handler must be safe for that.
//
// Context: ctx is done when the client finalizes or the connection ends.
// WaitForSlotEvent must return when it is; the others should.
//
// Arguments: session, object and slot numbers are the client's, not
// checked here. Byte slices passed in belong to the server and must not
// be kept after the method returns: PIN arguments are wiped right after.
// Attribute templates use miekg/pkcs11's representation (CK_ULONG values
// as native-endian CK_ULONG bytes, CK_BBOOL as one byte, as
// pkcs11.NewAttribute makes them), so they can be passed on unchanged.
//
// Output buffers: methods return their whole result; the server takes
// care of PKCS#11's length queries and CKR_BUFFER_TOO_SMALL for the
// client. For Encrypt, Decrypt, Digest, Sign, SignRecover,
// VerifyRecover, their Update and Final calls and the four dual-function
// updates, which consume input or end an operation, the server keeps a
// result the client could not take yet and hands it out when the client
// asks again with the same arguments, so the Handler sees each step of an
// operation once. GetOperationState and WrapKey end nothing and may be
// called once for the length and once for the data.
type Handler interface {
	GetInfo(ctx context.Context) (pkcs11.Info, error)
	// GetSlotList returns the slot IDs, only those with a token when
	// tokenPresent.
	GetSlotList(ctx context.Context, tokenPresent bool) ([]uint, error)
	GetSlotInfo(ctx context.Context, slot uint) (pkcs11.SlotInfo, error)
	GetTokenInfo(ctx context.Context, slot uint) (pkcs11.TokenInfo, error)
	// GetMechanismList returns the CKM_* types of slot. (The 0.24.1
	// client drops mechanisms whose parameters it cannot marshal; that is
	// its business.)
	GetMechanismList(ctx context.Context, slot uint) ([]uint, error)
	GetMechanismInfo(ctx context.Context, slot uint, mechanism uint) (pkcs11.MechanismInfo, error)
	// InitToken gets the label with trailing blanks and NULs removed and
	// cut to 32 bytes: the 0.24.1 client sends the label up to its first
	// NUL, although PKCS#11 defines it as 32 blank-padded bytes.
	InitToken(ctx context.Context, slot uint, soPIN []byte, label string) error
	// OpenSession gets the CKF_* session flags; there is no notification
	// callback over RPC.
	OpenSession(ctx context.Context, slot uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(ctx context.Context, sh pkcs11.SessionHandle) error
	CloseAllSessions(ctx context.Context, slot uint) error
	GetSessionInfo(ctx context.Context, sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error)
	// InitPIN, SetPIN and Login get nil for a NULL PIN (protected
	// authentication path).
	InitPIN(ctx context.Context, sh pkcs11.SessionHandle, pin []byte) error
	SetPIN(ctx context.Context, sh pkcs11.SessionHandle, oldPIN, newPIN []byte) error
	GetOperationState(ctx context.Context, sh pkcs11.SessionHandle) ([]byte, error)
	SetOperationState(ctx context.Context, sh pkcs11.SessionHandle, state []byte, encryptionKey, authenticationKey pkcs11.ObjectHandle) error
	Login(ctx context.Context, sh pkcs11.SessionHandle, userType uint, pin []byte) error
	Logout(ctx context.Context, sh pkcs11.SessionHandle) error

	CreateObject(ctx context.Context, sh pkcs11.SessionHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	CopyObject(ctx context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(ctx context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) error
	GetObjectSize(ctx context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) (uint, error)
	// GetAttributeValue returns one AttributeResult per requested type,
	// in order. The server applies PKCS#11's rules per attribute (length
	// only for a NULL buffer, CK_UNAVAILABLE_INFORMATION and
	// CKR_BUFFER_TOO_SMALL for a short one) and picks the call's CK_RV.
	// A returned error fails the whole call instead.
	GetAttributeValue(ctx context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, types []uint) ([]AttributeResult, error)
	SetAttributeValue(ctx context.Context, sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, template []*pkcs11.Attribute) error
	FindObjectsInit(ctx context.Context, sh pkcs11.SessionHandle, template []*pkcs11.Attribute) error
	// FindObjects returns at most max handles. max comes from the client
	// and may be huge: do not allocate by it.
	FindObjects(ctx context.Context, sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, error)
	FindObjectsFinal(ctx context.Context, sh pkcs11.SessionHandle) error

	EncryptInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error
	Encrypt(ctx context.Context, sh pkcs11.SessionHandle, data []byte) ([]byte, error)
	EncryptUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) ([]byte, error)
	EncryptFinal(ctx context.Context, sh pkcs11.SessionHandle) ([]byte, error)
	DecryptInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error
	Decrypt(ctx context.Context, sh pkcs11.SessionHandle, data []byte) ([]byte, error)
	DecryptUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) ([]byte, error)
	DecryptFinal(ctx context.Context, sh pkcs11.SessionHandle) ([]byte, error)
	DigestInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism) error
	Digest(ctx context.Context, sh pkcs11.SessionHandle, data []byte) ([]byte, error)
	DigestUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) error
	DigestKey(ctx context.Context, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle) error
	DigestFinal(ctx context.Context, sh pkcs11.SessionHandle) ([]byte, error)
	SignInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error
	Sign(ctx context.Context, sh pkcs11.SessionHandle, data []byte) ([]byte, error)
	SignUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) error
	SignFinal(ctx context.Context, sh pkcs11.SessionHandle) ([]byte, error)
	SignRecoverInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error
	SignRecover(ctx context.Context, sh pkcs11.SessionHandle, data []byte) ([]byte, error)
	VerifyInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error
	Verify(ctx context.Context, sh pkcs11.SessionHandle, data, signature []byte) error
	VerifyUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) error
	VerifyFinal(ctx context.Context, sh pkcs11.SessionHandle, signature []byte) error
	VerifyRecoverInit(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error
	VerifyRecover(ctx context.Context, sh pkcs11.SessionHandle, signature []byte) ([]byte, error)
	DigestEncryptUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) ([]byte, error)
	DecryptDigestUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) ([]byte, error)
	SignEncryptUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) ([]byte, error)
	DecryptVerifyUpdate(ctx context.Context, sh pkcs11.SessionHandle, part []byte) ([]byte, error)

	GenerateKey(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	GenerateKeyPair(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, publicTemplate, privateTemplate []*pkcs11.Attribute) (public, private pkcs11.ObjectHandle, err error)
	WrapKey(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, wrappingKey, key pkcs11.ObjectHandle) ([]byte, error)
	UnwrapKey(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, unwrappingKey pkcs11.ObjectHandle, wrapped []byte, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DeriveKey(ctx context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, baseKey pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	SeedRandom(ctx context.Context, sh pkcs11.SessionHandle, seed []byte) error
	// GenerateRandom returns exactly n random bytes; n is at most
	// Options.MaxMessageSize.
	GenerateRandom(ctx context.Context, sh pkcs11.SessionHandle, n int) ([]byte, error)

	// WaitForSlotEvent gets the CKF_* flags (CKF_DONT_BLOCK: return
	// CKR_NO_EVENT at once if nothing happened) and returns the slot of
	// the next event. It may block; it must return when ctx is done.
	WaitForSlotEvent(ctx context.Context, flags uint) (slot uint, err error)
}

// AttributeResult is the outcome of one attribute of a GetAttributeValue
// call.
type AttributeResult struct {
	// Value is the attribute's value in PKCS#11's memory layout, as
	// miekg/pkcs11 returns it. Its size must suit the attribute's type
	// as p11-kit marshals it: 1 byte for the CK_BBOOL attributes, one
	// CK_ULONG for the CK_ULONG ones, 0 or 8 bytes for dates, whole
	// CK_ULONGs for CKA_ALLOWED_MECHANISMS; a value that does not is
	// logged and reported as CKR_ATTRIBUTE_TYPE_INVALID.
	Value []byte
	// Err is nil when Value holds the attribute, or a pkcs11.Error with
	// CKR_ATTRIBUTE_SENSITIVE (the object will not reveal it) or
	// CKR_ATTRIBUTE_TYPE_INVALID (the object has no such attribute).
	// Either makes the attribute unavailable to the client and becomes
	// the call's CK_RV. Any other error fails the whole call with it.
	Err error
}

// Unsupported answers every call with CKR_FUNCTION_NOT_SUPPORTED. Embed it
// in a Handler to implement only some calls.
type Unsupported struct{}

var _ Handler = Unsupported{}

var errNotSupported = pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)

func (Unsupported) GetInfo(context.Context) (pkcs11.Info, error) {
	return pkcs11.Info{}, errNotSupported
}
func (Unsupported) GetSlotList(context.Context, bool) ([]uint, error) { return nil, errNotSupported }
func (Unsupported) GetSlotInfo(context.Context, uint) (pkcs11.SlotInfo, error) {
	return pkcs11.SlotInfo{}, errNotSupported
}
func (Unsupported) GetTokenInfo(context.Context, uint) (pkcs11.TokenInfo, error) {
	return pkcs11.TokenInfo{}, errNotSupported
}
func (Unsupported) GetMechanismList(context.Context, uint) ([]uint, error) {
	return nil, errNotSupported
}
func (Unsupported) GetMechanismInfo(context.Context, uint, uint) (pkcs11.MechanismInfo, error) {
	return pkcs11.MechanismInfo{}, errNotSupported
}
func (Unsupported) InitToken(context.Context, uint, []byte, string) error { return errNotSupported }
func (Unsupported) OpenSession(context.Context, uint, uint) (pkcs11.SessionHandle, error) {
	return 0, errNotSupported
}
func (Unsupported) CloseSession(context.Context, pkcs11.SessionHandle) error { return errNotSupported }
func (Unsupported) CloseAllSessions(context.Context, uint) error             { return errNotSupported }
func (Unsupported) GetSessionInfo(context.Context, pkcs11.SessionHandle) (pkcs11.SessionInfo, error) {
	return pkcs11.SessionInfo{}, errNotSupported
}
func (Unsupported) InitPIN(context.Context, pkcs11.SessionHandle, []byte) error {
	return errNotSupported
}
func (Unsupported) SetPIN(context.Context, pkcs11.SessionHandle, []byte, []byte) error {
	return errNotSupported
}
func (Unsupported) GetOperationState(context.Context, pkcs11.SessionHandle) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) SetOperationState(context.Context, pkcs11.SessionHandle, []byte, pkcs11.ObjectHandle, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) Login(context.Context, pkcs11.SessionHandle, uint, []byte) error {
	return errNotSupported
}
func (Unsupported) Logout(context.Context, pkcs11.SessionHandle) error { return errNotSupported }
func (Unsupported) CreateObject(context.Context, pkcs11.SessionHandle, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	return 0, errNotSupported
}
func (Unsupported) CopyObject(context.Context, pkcs11.SessionHandle, pkcs11.ObjectHandle, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	return 0, errNotSupported
}
func (Unsupported) DestroyObject(context.Context, pkcs11.SessionHandle, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) GetObjectSize(context.Context, pkcs11.SessionHandle, pkcs11.ObjectHandle) (uint, error) {
	return 0, errNotSupported
}
func (Unsupported) GetAttributeValue(context.Context, pkcs11.SessionHandle, pkcs11.ObjectHandle, []uint) ([]AttributeResult, error) {
	return nil, errNotSupported
}
func (Unsupported) SetAttributeValue(context.Context, pkcs11.SessionHandle, pkcs11.ObjectHandle, []*pkcs11.Attribute) error {
	return errNotSupported
}
func (Unsupported) FindObjectsInit(context.Context, pkcs11.SessionHandle, []*pkcs11.Attribute) error {
	return errNotSupported
}
func (Unsupported) FindObjects(context.Context, pkcs11.SessionHandle, int) ([]pkcs11.ObjectHandle, error) {
	return nil, errNotSupported
}
func (Unsupported) FindObjectsFinal(context.Context, pkcs11.SessionHandle) error {
	return errNotSupported
}
func (Unsupported) EncryptInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) Encrypt(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) EncryptUpdate(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) EncryptFinal(context.Context, pkcs11.SessionHandle) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DecryptInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) Decrypt(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DecryptUpdate(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DecryptFinal(context.Context, pkcs11.SessionHandle) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DigestInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism) error {
	return errNotSupported
}
func (Unsupported) Digest(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DigestUpdate(context.Context, pkcs11.SessionHandle, []byte) error {
	return errNotSupported
}
func (Unsupported) DigestKey(context.Context, pkcs11.SessionHandle, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) DigestFinal(context.Context, pkcs11.SessionHandle) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) SignInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) Sign(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) SignUpdate(context.Context, pkcs11.SessionHandle, []byte) error {
	return errNotSupported
}
func (Unsupported) SignFinal(context.Context, pkcs11.SessionHandle) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) SignRecoverInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) SignRecover(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) VerifyInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) Verify(context.Context, pkcs11.SessionHandle, []byte, []byte) error {
	return errNotSupported
}
func (Unsupported) VerifyUpdate(context.Context, pkcs11.SessionHandle, []byte) error {
	return errNotSupported
}
func (Unsupported) VerifyFinal(context.Context, pkcs11.SessionHandle, []byte) error {
	return errNotSupported
}
func (Unsupported) VerifyRecoverInit(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle) error {
	return errNotSupported
}
func (Unsupported) VerifyRecover(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DigestEncryptUpdate(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DecryptDigestUpdate(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) SignEncryptUpdate(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) DecryptVerifyUpdate(context.Context, pkcs11.SessionHandle, []byte) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) GenerateKey(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	return 0, errNotSupported
}
func (Unsupported) GenerateKeyPair(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, []*pkcs11.Attribute, []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	return 0, 0, errNotSupported
}
func (Unsupported) WrapKey(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle, pkcs11.ObjectHandle) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) UnwrapKey(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle, []byte, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	return 0, errNotSupported
}
func (Unsupported) DeriveKey(context.Context, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	return 0, errNotSupported
}
func (Unsupported) SeedRandom(context.Context, pkcs11.SessionHandle, []byte) error {
	return errNotSupported
}
func (Unsupported) GenerateRandom(context.Context, pkcs11.SessionHandle, int) ([]byte, error) {
	return nil, errNotSupported
}
func (Unsupported) WaitForSlotEvent(context.Context, uint) (uint, error) { return 0, errNotSupported }
