package rpc

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

type callCase struct {
	name   string
	id     callID
	req    *wire
	noInit bool              // run before C_Initialize
	attrs  []AttributeResult // GetAttributeValue's result
	want   []string          // Handler calls, as the recorder logs them
	resp   []byte            // the answer body
}

// callCases has at least one case per call of the table, each a request
// as the 0.24.1 client encodes it and the exact answer expected.
func callCases() []callCase {
	const sh = 5
	ulong0 := fmt.Sprintf("%x", ulongBytes(0))
	pss := pkcs11.NewPSSParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, 32)
	cases := []callCase{
		{name: "Initialize", id: callInitialize, noInit: true, req: initializeRequest(),
			resp: response(callInitialize).b},
		{name: "Finalize", id: callFinalize, req: request(callFinalize), resp: response(callFinalize).b},
		{name: "GetInfo", id: callGetInfo, req: request(callGetInfo), want: []string{"GetInfo()"},
			resp: response(callGetInfo).v(2, 40).s("slotwatch", 32).u(0).s("test library", 32).v(1, 2).b},
		{name: "GetSlotList/query", id: callGetSlotList, req: request(callGetSlotList).y(1).u32(0),
			want: []string{"GetSlotList(true)"}, resp: response(callGetSlotList).auNull(2).b},
		{name: "GetSlotList/fetch", id: callGetSlotList, req: request(callGetSlotList).y(0).u32(8),
			want: []string{"GetSlotList(false)"}, resp: response(callGetSlotList).au(1, 2).b},
		{name: "GetSlotList/too-small", id: callGetSlotList, req: request(callGetSlotList).y(0).u32(1),
			want: []string{"GetSlotList(false)"}, resp: response(callGetSlotList).auNull(2).b},
		{name: "GetSlotInfo", id: callGetSlotInfo, req: request(callGetSlotInfo).u(1),
			want: []string{"GetSlotInfo(1)"},
			resp: response(callGetSlotInfo).s("reader", 64).s("slotwatch", 32).u(7).v(1, 0).v(2, 0).b},
		{name: "GetTokenInfo", id: callGetTokenInfo, req: request(callGetTokenInfo).u(1),
			want: []string{"GetTokenInfo(1)"},
			resp: response(callGetTokenInfo).s("token", 32).s("m", 32).s("model", 16).s("42", 16).
				u(1).u(2).u(3).u(4).u(5).u(6).u(7).u(8).u(9).u(10).u(11).v(1, 1).v(2, 2).
				s("2024010100000000", 16).b},
		{name: "GetMechanismList", id: callGetMechanismList, req: request(callGetMechanismList).u(1).u32(10),
			want: []string{"GetMechanismList(1)"},
			resp: response(callGetMechanismList).au(pkcs11.CKM_RSA_PKCS, pkcs11.CKM_SHA256_RSA_PKCS).b},
		{name: "GetMechanismInfo", id: callGetMechanismInfo,
			req:  request(callGetMechanismInfo).u(1).u(pkcs11.CKM_SHA256_RSA_PKCS),
			want: []string{"GetMechanismInfo(1, 64)"},
			resp: response(callGetMechanismInfo).u(1024).u(4096).u(pkcs11.CKF_SIGN).b},
		{name: "InitToken", id: callInitToken,
			req:  request(callInitToken).u(1).ay([]byte("1234")).arr([]byte("My label" + strings.Repeat(" ", 24) + "junk")),
			want: []string{`InitToken(1, "1234", "My label")`}, resp: response(callInitToken).b},
		{name: "OpenSession", id: callOpenSession, req: request(callOpenSession).u(1).u(6),
			want: []string{"OpenSession(1, 6)"}, resp: response(callOpenSession).u(0x1234).b},
		{name: "CloseSession", id: callCloseSession, req: request(callCloseSession).u(sh),
			want: []string{"CloseSession(5)"}, resp: response(callCloseSession).b},
		{name: "CloseAllSessions", id: callCloseAllSessions, req: request(callCloseAllSessions).u(1),
			want: []string{"CloseAllSessions(1)"}, resp: response(callCloseAllSessions).b},
		{name: "GetSessionInfo", id: callGetSessionInfo, req: request(callGetSessionInfo).u(sh),
			want: []string{"GetSessionInfo(5)"}, resp: response(callGetSessionInfo).u(1).u(3).u(6).u(0).b},
		{name: "InitPIN", id: callInitPIN, req: request(callInitPIN).u(sh).ay([]byte("0000")),
			want: []string{`InitPIN(5, "0000")`}, resp: response(callInitPIN).b},
		{name: "InitPIN/null", id: callInitPIN, req: request(callInitPIN).u(sh).ayNull(0),
			want: []string{`InitPIN(5, nil)`}, resp: response(callInitPIN).b},
		{name: "SetPIN", id: callSetPIN, req: request(callSetPIN).u(sh).ay([]byte("old")).ay([]byte("new")),
			want: []string{`SetPIN(5, "old", "new")`}, resp: response(callSetPIN).b},
		{name: "GetOperationState/query", id: callGetOperationState, req: request(callGetOperationState).u(sh).u32(0),
			want: []string{"GetOperationState(5)"}, resp: response(callGetOperationState).ayNull(5).b},
		{name: "GetOperationState/fetch", id: callGetOperationState, req: request(callGetOperationState).u(sh).u32(100),
			want: []string{"GetOperationState(5)"}, resp: response(callGetOperationState).ay([]byte("state")).b},
		{name: "SetOperationState", id: callSetOperationState,
			req:  request(callSetOperationState).u(sh).ay([]byte("st")).u(1).u(2),
			want: []string{`SetOperationState(5, "st", 1, 2)`}, resp: response(callSetOperationState).b},
		{name: "Login", id: callLogin, req: request(callLogin).u(sh).u(pkcs11.CKU_USER).ay([]byte("123456")),
			want: []string{`Login(5, 1, "123456")`}, resp: response(callLogin).b},
		{name: "Logout", id: callLogout, req: request(callLogout).u(sh),
			want: []string{"Logout(5)"}, resp: response(callLogout).b},
		{name: "CreateObject", id: callCreateObject,
			req: request(callCreateObject).u(sh).u32(3).attrUlong(pkcs11.CKA_CLASS, pkcs11.CKO_DATA).
				attrBool(pkcs11.CKA_TOKEN, true).attrBytes(pkcs11.CKA_LABEL, []byte("x")),
			want: []string{"CreateObject(5, [0x0=" + ulong0 + " 0x1=01 0x3=78])"},
			resp: response(callCreateObject).u(77).b},
		{name: "CopyObject", id: callCopyObject, req: request(callCopyObject).u(sh).u(9).u32(0),
			want: []string{"CopyObject(5, 9, [])"}, resp: response(callCopyObject).u(78).b},
		{name: "DestroyObject", id: callDestroyObject, req: request(callDestroyObject).u(sh).u(9),
			want: []string{"DestroyObject(5, 9)"}, resp: response(callDestroyObject).b},
		{name: "GetObjectSize", id: callGetObjectSize, req: request(callGetObjectSize).u(sh).u(9),
			want: []string{"GetObjectSize(5, 9)"}, resp: response(callGetObjectSize).u(99).b},
		{name: "GetAttributeValue", id: callGetAttributeValue,
			req:   request(callGetAttributeValue).u(sh).u(9).u32(2).u32(pkcs11.CKA_LABEL).u32(0).u32(pkcs11.CKA_CLASS).u32(8),
			attrs: []AttributeResult{{Value: []byte("lbl")}, {Value: ulongBytes(pkcs11.CKO_CERTIFICATE)}},
			want:  []string{"GetAttributeValue(5, 9, [3 0])"},
			resp: response(callGetAttributeValue).u32(2).
				u32(pkcs11.CKA_LABEL).y(1).u32(3).u32(0xffffffff).
				u32(pkcs11.CKA_CLASS).y(1).u32(8).u(pkcs11.CKO_CERTIFICATE).
				u(pkcs11.CKR_OK).b},
		{name: "SetAttributeValue", id: callSetAttributeValue,
			req:  request(callSetAttributeValue).u(sh).u(9).u32(1).attrBytes(pkcs11.CKA_ID, []byte{1}),
			want: []string{"SetAttributeValue(5, 9, [0x102=01])"}, resp: response(callSetAttributeValue).b},
		{name: "FindObjectsInit", id: callFindObjectsInit,
			req:  request(callFindObjectsInit).u(sh).u32(1).attrUlong(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE),
			want: []string{fmt.Sprintf("FindObjectsInit(5, [0x0=%x])", ulongBytes(pkcs11.CKO_CERTIFICATE))},
			resp: response(callFindObjectsInit).b},
		{name: "FindObjects", id: callFindObjects, req: request(callFindObjects).u(sh).u32(10),
			want: []string{"FindObjects(5, 10)"}, resp: response(callFindObjects).au(10, 11).b},
		{name: "FindObjectsFinal", id: callFindObjectsFinal, req: request(callFindObjectsFinal).u(sh),
			want: []string{"FindObjectsFinal(5)"}, resp: response(callFindObjectsFinal).b},
		{name: "DigestInit", id: callDigestInit, req: request(callDigestInit).u(sh).mech(pkcs11.CKM_SHA256, nil),
			want: []string{"DigestInit(5, M(0x250,))"}, resp: response(callDigestInit).b},
		{name: "DigestKey", id: callDigestKey, req: request(callDigestKey).u(sh).u(9),
			want: []string{"DigestKey(5, 9)"}, resp: response(callDigestKey).b},
		{name: "Verify", id: callVerify, req: request(callVerify).u(sh).ay([]byte("data")).ay([]byte("sig")),
			want: []string{`Verify(5, "data", "sig")`}, resp: response(callVerify).b},
		{name: "GenerateKey", id: callGenerateKey,
			req:  request(callGenerateKey).u(sh).mech(pkcs11.CKM_AES_KEY_GEN, nil).u32(1).attrUlong(pkcs11.CKA_VALUE_LEN, 32),
			want: []string{fmt.Sprintf("GenerateKey(5, M(0x1080,), [0x161=%x])", ulongBytes(32))},
			resp: response(callGenerateKey).u(55).b},
		{name: "GenerateKeyPair", id: callGenerateKeyPair,
			req: request(callGenerateKeyPair).u(sh).mech(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil).
				u32(1).attrUlong(pkcs11.CKA_MODULUS_BITS, 2048).u32(1).attrBool(pkcs11.CKA_SIGN, true),
			want: []string{fmt.Sprintf("GenerateKeyPair(5, M(0x0,), [0x121=%x], [0x108=01])", ulongBytes(2048))},
			resp: response(callGenerateKeyPair).u(56).u(57).b},
		{name: "WrapKey", id: callWrapKey,
			req:  request(callWrapKey).u(sh).mech(pkcs11.CKM_AES_KEY_WRAP, []byte{1, 2}).u(8).u(9).u32(100),
			want: []string{"WrapKey(5, M(0x2109,0102), 8, 9)"}, resp: response(callWrapKey).ay([]byte("wrapped")).b},
		{name: "WrapKey/query", id: callWrapKey,
			req:  request(callWrapKey).u(sh).mech(pkcs11.CKM_AES_KEY_WRAP, nil).u(8).u(9).u32(0),
			want: []string{"WrapKey(5, M(0x2109,), 8, 9)"}, resp: response(callWrapKey).ayNull(7).b},
		{name: "UnwrapKey", id: callUnwrapKey,
			req:  request(callUnwrapKey).u(sh).mech(pkcs11.CKM_AES_KEY_WRAP, nil).u(8).ay([]byte("wrapped")).u32(0),
			want: []string{`UnwrapKey(5, M(0x2109,), 8, "wrapped", [])`}, resp: response(callUnwrapKey).u(58).b},
		{name: "DeriveKey", id: callDeriveKey,
			req:  request(callDeriveKey).u(sh).mech(pkcs11.CKM_ECDH1_DERIVE, []byte("p")).u(8).u32(0),
			want: []string{"DeriveKey(5, M(0x1050,70), 8, [])"}, resp: response(callDeriveKey).u(59).b},
		{name: "GenerateRandom", id: callGenerateRandom, req: request(callGenerateRandom).u(sh).u32(4),
			want: []string{"GenerateRandom(5, 4)"}, resp: response(callGenerateRandom).ay([]byte{0xab, 0xab, 0xab, 0xab}).b},
		{name: "GenerateRandom/zero", id: callGenerateRandom, req: request(callGenerateRandom).u(sh).u32(0),
			want: []string{"GenerateRandom(5, 0)"}, resp: response(callGenerateRandom).ay(nil).b},
		{name: "WaitForSlotEvent", id: callWaitForSlotEvent, req: request(callWaitForSlotEvent).u(pkcs11.CKF_DONT_BLOCK),
			want: []string{"WaitForSlotEvent(1)"}, resp: response(callWaitForSlotEvent).u(1).b},
	}
	for id := range initCalls {
		name := strings.TrimPrefix(id.String(), "C_")
		cases = append(cases, callCase{name: name, id: id,
			req:  request(id).u(sh).u32(pkcs11.CKM_RSA_PKCS_PSS).u(pkcs11.CKM_SHA256).u(pkcs11.CKG_MGF1_SHA256).u(32).u(9),
			want: []string{fmt.Sprintf("%s(5, M(0xd,%x), 9)", name, pss)},
			resp: response(id).b})
	}
	for id := range dataCalls {
		name := strings.TrimPrefix(id.String(), "C_")
		cases = append(cases, callCase{name: name, id: id,
			req:  request(id).u(sh).ay([]byte("in")).u32(100),
			want: []string{name + `(5, "in")`},
			resp: response(id).ay([]byte(strings.ToLower(name))).b})
	}
	for id := range finalCalls {
		name := strings.TrimPrefix(id.String(), "C_")
		cases = append(cases, callCase{name: name, id: id,
			req:  request(id).u(sh).u32(100),
			want: []string{name + "(5)"},
			resp: response(id).ay([]byte(strings.ToLower(name))).b})
	}
	for id := range inputCalls {
		if id == callInitPIN {
			continue // above
		}
		name := strings.TrimPrefix(id.String(), "C_")
		cases = append(cases, callCase{name: name, id: id,
			req:  request(id).u(sh).ay([]byte("part")),
			want: []string{name + `(5, "part")`},
			resp: response(id).b})
	}
	slices.SortFunc(cases, func(a, b callCase) int { return int(a.id) - int(b.id) })
	return cases
}

func TestCallsEncoding(t *testing.T) {
	cases := callCases()
	seen := map[callID]bool{}
	for _, c := range cases {
		seen[c.id] = true
		t.Run(c.name, func(t *testing.T) {
			r := &recorder{attrs: c.attrs}
			cl := startServer(t, r, Options{}, !c.noInit)
			got := cl.call(c.req.b)
			if !bytes.Equal(got, c.resp) {
				t.Errorf("answer\n got %x\nwant %x", got, c.resp)
			}
			if log := r.calls(); !slices.Equal(log, c.want) {
				t.Errorf("Handler calls %q, want %q", log, c.want)
			}
		})
	}
	for id := callInitialize; id < callMax; id++ {
		if !seen[id] {
			t.Errorf("no case for %v", id)
		}
	}
}

// TestCallsErrors checks that every call answers a Handler's pkcs11.Error
// as that CK_RV, and a truncated request as CKR_DEVICE_ERROR without
// reaching the Handler.
func TestCallsErrors(t *testing.T) {
	for _, c := range callCases() {
		if c.id == callInitialize || c.id == callFinalize || len(c.want) == 0 {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			r := &recorder{err: pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)}
			cl := startServer(t, r, Options{}, true)
			if got, want := cl.call(c.req.b), errorBody(pkcs11.CKR_SESSION_HANDLE_INVALID); !bytes.Equal(got, want) {
				t.Errorf("Handler error: answer %x, want %x", got, want)
			}
			truncated := c.req.b[:len(c.req.b)-1]
			if got, want := cl.call(truncated), errorBody(pkcs11.CKR_DEVICE_ERROR); !bytes.Equal(got, want) {
				t.Errorf("truncated request: answer %x, want %x", got, want)
			}
			extra := append(slices.Clone(c.req.b), 0)
			if got, want := cl.call(extra), errorBody(pkcs11.CKR_DEVICE_ERROR); !bytes.Equal(got, want) {
				t.Errorf("trailing byte: answer %x, want %x", got, want)
			}
			if n := len(r.calls()); n != 1 {
				t.Errorf("Handler called %d times, want once (malformed requests must not reach it)", n)
			}
		})
	}
}
