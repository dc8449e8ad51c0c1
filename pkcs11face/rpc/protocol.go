package rpc

// Wire facts of p11-kit's RPC protocol as Debian 12's p11-kit 0.24.1
// client module speaks it. They were read from p11-kit's sources
// (rpc-message.h/.c, rpc-transport.c, rpc-client.c, rpc-server.c at tag
// 0.24.1); the Go below is our own.
//
// Stream: the client writes one version byte, the server answers one
// byte (the version both will speak), then frames follow in both
// directions. A frame is a 12-byte header of three big-endian uint32s —
// call code, options length, body length — followed by the options (the
// client's module name, "client"; ignored) and the body. The call code
// is a per-connection sequence number chosen by the client; the answer
// carries the same code, which is how the client matches answers to the
// threads waiting for them.
//
// Body: uint32 call id, the call's signature string as a byte array,
// then the arguments in the order of that signature. Integers are big
// endian; a CK_ULONG ('u') travels as 64 bits whatever the client's
// CK_ULONG size; a byte array is a uint32 length and the bytes, length
// 0xffffffff meaning a NULL pointer. An error answer is call id 0
// (callError) with signature "u" and the CK_RV; it must never carry
// CKR_OK (the client turns that into CKR_DEVICE_ERROR).

// handshake is what the client sends as the first argument of
// C_Initialize; anything else is refused with CKR_GENERAL_ERROR, as
// p11-kit's own server does.
const handshake = "PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"

// protocolVersion is the highest version byte we speak. 0.24.1 speaks
// only version 0 (later p11-kit releases add calls under version 1 and
// 2 and fall back to what the server answers), so we answer 0 to any
// offer.
const protocolVersion = 0

// frameHeaderLen is the size of a frame header: code, options length,
// body length.
const frameHeaderLen = 12

// callID numbers the calls in the order of p11-kit's call table; the
// numbers are part of the wire format.
type callID uint32

const (
	callError callID = iota
	callInitialize
	callFinalize
	callGetInfo
	callGetSlotList
	callGetSlotInfo
	callGetTokenInfo
	callGetMechanismList
	callGetMechanismInfo
	callInitToken
	callOpenSession
	callCloseSession
	callCloseAllSessions
	callGetSessionInfo
	callInitPIN
	callSetPIN
	callGetOperationState
	callSetOperationState
	callLogin
	callLogout
	callCreateObject
	callCopyObject
	callDestroyObject
	callGetObjectSize
	callGetAttributeValue
	callSetAttributeValue
	callFindObjectsInit
	callFindObjects
	callFindObjectsFinal
	callEncryptInit
	callEncrypt
	callEncryptUpdate
	callEncryptFinal
	callDecryptInit
	callDecrypt
	callDecryptUpdate
	callDecryptFinal
	callDigestInit
	callDigest
	callDigestUpdate
	callDigestKey
	callDigestFinal
	callSignInit
	callSign
	callSignUpdate
	callSignFinal
	callSignRecoverInit
	callSignRecover
	callVerifyInit
	callVerify
	callVerifyUpdate
	callVerifyFinal
	callVerifyRecoverInit
	callVerifyRecover
	callDigestEncryptUpdate
	callDecryptDigestUpdate
	callSignEncryptUpdate
	callDecryptVerifyUpdate
	callGenerateKey
	callGenerateKeyPair
	callWrapKey
	callUnwrapKey
	callDeriveKey
	callSeedRandom
	callGenerateRandom
	callWaitForSlotEvent
	callMax
)

// callSpec is one row of the call table: the PKCS#11 name and the
// request and response signatures. Signature letters: u CK_ULONG, y
// byte, v CK_VERSION, s space-padded string, z string, M mechanism, A
// attribute, prefix a = array of, prefix f = an output buffer (only its
// size travels in the request).
type callSpec struct {
	name     string
	request  string
	response string
}

var calls = [callMax]callSpec{
	callError:               {"ERROR", "", "u"},
	callInitialize:          {"C_Initialize", "ayyay", ""},
	callFinalize:            {"C_Finalize", "", ""},
	callGetInfo:             {"C_GetInfo", "", "vsusv"},
	callGetSlotList:         {"C_GetSlotList", "yfu", "au"},
	callGetSlotInfo:         {"C_GetSlotInfo", "u", "ssuvv"},
	callGetTokenInfo:        {"C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs"},
	callGetMechanismList:    {"C_GetMechanismList", "ufu", "au"},
	callGetMechanismInfo:    {"C_GetMechanismInfo", "uu", "uuu"},
	callInitToken:           {"C_InitToken", "uayz", ""},
	callOpenSession:         {"C_OpenSession", "uu", "u"},
	callCloseSession:        {"C_CloseSession", "u", ""},
	callCloseAllSessions:    {"C_CloseAllSessions", "u", ""},
	callGetSessionInfo:      {"C_GetSessionInfo", "u", "uuuu"},
	callInitPIN:             {"C_InitPIN", "uay", ""},
	callSetPIN:              {"C_SetPIN", "uayay", ""},
	callGetOperationState:   {"C_GetOperationState", "ufy", "ay"},
	callSetOperationState:   {"C_SetOperationState", "uayuu", ""},
	callLogin:               {"C_Login", "uuay", ""},
	callLogout:              {"C_Logout", "u", ""},
	callCreateObject:        {"C_CreateObject", "uaA", "u"},
	callCopyObject:          {"C_CopyObject", "uuaA", "u"},
	callDestroyObject:       {"C_DestroyObject", "uu", ""},
	callGetObjectSize:       {"C_GetObjectSize", "uu", "u"},
	callGetAttributeValue:   {"C_GetAttributeValue", "uufA", "aAu"},
	callSetAttributeValue:   {"C_SetAttributeValue", "uuaA", ""},
	callFindObjectsInit:     {"C_FindObjectsInit", "uaA", ""},
	callFindObjects:         {"C_FindObjects", "ufu", "au"},
	callFindObjectsFinal:    {"C_FindObjectsFinal", "u", ""},
	callEncryptInit:         {"C_EncryptInit", "uMu", ""},
	callEncrypt:             {"C_Encrypt", "uayfy", "ay"},
	callEncryptUpdate:       {"C_EncryptUpdate", "uayfy", "ay"},
	callEncryptFinal:        {"C_EncryptFinal", "ufy", "ay"},
	callDecryptInit:         {"C_DecryptInit", "uMu", ""},
	callDecrypt:             {"C_Decrypt", "uayfy", "ay"},
	callDecryptUpdate:       {"C_DecryptUpdate", "uayfy", "ay"},
	callDecryptFinal:        {"C_DecryptFinal", "ufy", "ay"},
	callDigestInit:          {"C_DigestInit", "uM", ""},
	callDigest:              {"C_Digest", "uayfy", "ay"},
	callDigestUpdate:        {"C_DigestUpdate", "uay", ""},
	callDigestKey:           {"C_DigestKey", "uu", ""},
	callDigestFinal:         {"C_DigestFinal", "ufy", "ay"},
	callSignInit:            {"C_SignInit", "uMu", ""},
	callSign:                {"C_Sign", "uayfy", "ay"},
	callSignUpdate:          {"C_SignUpdate", "uay", ""},
	callSignFinal:           {"C_SignFinal", "ufy", "ay"},
	callSignRecoverInit:     {"C_SignRecoverInit", "uMu", ""},
	callSignRecover:         {"C_SignRecover", "uayfy", "ay"},
	callVerifyInit:          {"C_VerifyInit", "uMu", ""},
	callVerify:              {"C_Verify", "uayay", ""},
	callVerifyUpdate:        {"C_VerifyUpdate", "uay", ""},
	callVerifyFinal:         {"C_VerifyFinal", "uay", ""},
	callVerifyRecoverInit:   {"C_VerifyRecoverInit", "uMu", ""},
	callVerifyRecover:       {"C_VerifyRecover", "uayfy", "ay"},
	callDigestEncryptUpdate: {"C_DigestEncryptUpdate", "uayfy", "ay"},
	callDecryptDigestUpdate: {"C_DecryptDigestUpdate", "uayfy", "ay"},
	callSignEncryptUpdate:   {"C_SignEncryptUpdate", "uayfy", "ay"},
	callDecryptVerifyUpdate: {"C_DecryptVerifyUpdate", "uayfy", "ay"},
	callGenerateKey:         {"C_GenerateKey", "uMaA", "u"},
	callGenerateKeyPair:     {"C_GenerateKeyPair", "uMaAaA", "uu"},
	callWrapKey:             {"C_WrapKey", "uMuufy", "ay"},
	callUnwrapKey:           {"C_UnwrapKey", "uMuayaA", "u"},
	callDeriveKey:           {"C_DeriveKey", "uMuaA", "u"},
	callSeedRandom:          {"C_SeedRandom", "uay", ""},
	callGenerateRandom:      {"C_GenerateRandom", "ufy", "ay"},
	callWaitForSlotEvent:    {"C_WaitForSlotEvent", "u", "u"},
}

func (c callID) String() string {
	if c < callMax {
		return calls[c].name
	}
	return "unknown call"
}
