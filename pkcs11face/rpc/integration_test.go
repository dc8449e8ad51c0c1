package rpc

// Integration with the real client: p11-kit-client.so from Debian's
// p11-kit-modules, driven by OpenSC's pkcs11-tool in a child process and
// by miekg/pkcs11 inside this test process, talking to Serve over a unix
// socket in a temporary directory.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/slotwatch/slotwatch/internal/p11kitpath"
)

const (
	testSlot = 7
	testPIN  = "123456"
	// vendorMech has parameters the 0.24.1 client cannot marshal, so it
	// leaves it out of C_GetMechanismList.
	vendorMech = pkcs11.CKM_VENDOR_DEFINED | 0x1234
)

var fakeSignature = bytes.Repeat([]byte("slotwatch-fake-signature/"), 11)[:256]

// token is a Handler with one slot holding one token: a certificate, its
// RSA public key and a private key that "signs" with fixed bytes.
type token struct {
	Unsupported

	mu       sync.Mutex
	objects  map[pkcs11.ObjectHandle]*object
	sessions map[pkcs11.SessionHandle]*session
	next     pkcs11.SessionHandle
	loggedIn bool
	signed   [][]byte // data of every Sign/SignFinal
	logins   []string
	events   chan uint
	waits    int
}

type object struct {
	attrs     map[uint][]byte
	sensitive map[uint]bool
}

type session struct {
	found   []pkcs11.ObjectHandle
	signing bool
	data    []byte
}

func attrBool(v bool) []byte {
	if v {
		return []byte{1}
	}
	return []byte{0}
}

func newToken(t testing.TB) *token {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42),
		Subject:      pkix.Name{CommonName: "slotwatch test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	id := []byte{0x01}
	modulus := key.N.Bytes()
	exponent := big.NewInt(int64(key.E)).Bytes()
	return &token{
		objects: map[pkcs11.ObjectHandle]*object{
			1: {attrs: map[uint][]byte{
				pkcs11.CKA_CLASS:            ulongBytes(pkcs11.CKO_CERTIFICATE),
				pkcs11.CKA_CERTIFICATE_TYPE: ulongBytes(pkcs11.CKC_X_509),
				pkcs11.CKA_TOKEN:            attrBool(true),
				pkcs11.CKA_PRIVATE:          attrBool(false),
				pkcs11.CKA_MODIFIABLE:       attrBool(false),
				pkcs11.CKA_LABEL:            []byte("test cert"),
				pkcs11.CKA_ID:               id,
				pkcs11.CKA_VALUE:            der,
				pkcs11.CKA_SUBJECT:          cert.RawSubject,
				pkcs11.CKA_ISSUER:           cert.RawIssuer,
				pkcs11.CKA_SERIAL_NUMBER:    []byte{0x02, 0x01, 42},
			}},
			2: {attrs: map[uint][]byte{
				pkcs11.CKA_CLASS:           ulongBytes(pkcs11.CKO_PUBLIC_KEY),
				pkcs11.CKA_KEY_TYPE:        ulongBytes(pkcs11.CKK_RSA),
				pkcs11.CKA_TOKEN:           attrBool(true),
				pkcs11.CKA_PRIVATE:         attrBool(false),
				pkcs11.CKA_LABEL:           []byte("test key"),
				pkcs11.CKA_ID:              id,
				pkcs11.CKA_VERIFY:          attrBool(true),
				pkcs11.CKA_ENCRYPT:         attrBool(false),
				pkcs11.CKA_WRAP:            attrBool(false),
				pkcs11.CKA_MODULUS:         modulus,
				pkcs11.CKA_MODULUS_BITS:    ulongBytes(uint(key.N.BitLen())),
				pkcs11.CKA_PUBLIC_EXPONENT: exponent,
			}},
			3: {attrs: map[uint][]byte{
				pkcs11.CKA_CLASS:               ulongBytes(pkcs11.CKO_PRIVATE_KEY),
				pkcs11.CKA_KEY_TYPE:            ulongBytes(pkcs11.CKK_RSA),
				pkcs11.CKA_TOKEN:               attrBool(true),
				pkcs11.CKA_PRIVATE:             attrBool(true),
				pkcs11.CKA_LABEL:               []byte("test key"),
				pkcs11.CKA_ID:                  id,
				pkcs11.CKA_SIGN:                attrBool(true),
				pkcs11.CKA_DECRYPT:             attrBool(false),
				pkcs11.CKA_UNWRAP:              attrBool(false),
				pkcs11.CKA_SENSITIVE:           attrBool(true),
				pkcs11.CKA_EXTRACTABLE:         attrBool(false),
				pkcs11.CKA_ALWAYS_AUTHENTICATE: attrBool(false),
				pkcs11.CKA_MODULUS:             modulus,
				pkcs11.CKA_MODULUS_BITS:        ulongBytes(uint(key.N.BitLen())),
				pkcs11.CKA_PUBLIC_EXPONENT:     exponent,
				pkcs11.CKA_ALLOWED_MECHANISMS: append(ulongBytes(pkcs11.CKM_RSA_PKCS),
					ulongBytes(pkcs11.CKM_SHA256_RSA_PKCS)...),
			}, sensitive: map[uint]bool{pkcs11.CKA_PRIVATE_EXPONENT: true, pkcs11.CKA_PRIME_1: true}},
		},
		sessions: map[pkcs11.SessionHandle]*session{},
		next:     0x100,
		events:   make(chan uint, 4),
	}
}

var (
	errSlot    = pkcs11.Error(pkcs11.CKR_SLOT_ID_INVALID)
	errSession = pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)
)

func (tk *token) GetInfo(context.Context) (pkcs11.Info, error) {
	return pkcs11.Info{CryptokiVersion: pkcs11.Version{Major: 2, Minor: 40}, ManufacturerID: "slotwatch",
		LibraryDescription: "slotwatch test", LibraryVersion: pkcs11.Version{Major: 0, Minor: 1}}, nil
}

func (tk *token) GetSlotList(context.Context, bool) ([]uint, error) { return []uint{testSlot}, nil }

func (tk *token) GetSlotInfo(_ context.Context, slot uint) (pkcs11.SlotInfo, error) {
	if slot != testSlot {
		return pkcs11.SlotInfo{}, errSlot
	}
	return pkcs11.SlotInfo{SlotDescription: "slotwatch virtual reader", ManufacturerID: "slotwatch",
		Flags: pkcs11.CKF_TOKEN_PRESENT | pkcs11.CKF_REMOVABLE_DEVICE | pkcs11.CKF_HW_SLOT}, nil
}

func (tk *token) GetTokenInfo(_ context.Context, slot uint) (pkcs11.TokenInfo, error) {
	if slot != testSlot {
		return pkcs11.TokenInfo{}, errSlot
	}
	return pkcs11.TokenInfo{Label: "slotwatch test token", ManufacturerID: "slotwatch", Model: "fake",
		SerialNumber: "0001", Flags: pkcs11.CKF_TOKEN_INITIALIZED | pkcs11.CKF_USER_PIN_INITIALIZED | pkcs11.CKF_LOGIN_REQUIRED,
		MaxPinLen: 8, MinPinLen: 4}, nil
}

func (tk *token) GetMechanismList(_ context.Context, slot uint) ([]uint, error) {
	if slot != testSlot {
		return nil, errSlot
	}
	return []uint{pkcs11.CKM_RSA_PKCS, vendorMech, pkcs11.CKM_SHA256_RSA_PKCS}, nil
}

func (tk *token) GetMechanismInfo(_ context.Context, slot, mech uint) (pkcs11.MechanismInfo, error) {
	if slot != testSlot {
		return pkcs11.MechanismInfo{}, errSlot
	}
	return pkcs11.MechanismInfo{MinKeySize: 2048, MaxKeySize: 2048, Flags: pkcs11.CKF_HW | pkcs11.CKF_SIGN}, nil
}

func (tk *token) OpenSession(_ context.Context, slot, flags uint) (pkcs11.SessionHandle, error) {
	if slot != testSlot {
		return 0, errSlot
	}
	tk.mu.Lock()
	defer tk.mu.Unlock()
	tk.next++
	tk.sessions[tk.next] = &session{}
	return tk.next, nil
}

func (tk *token) session(sh pkcs11.SessionHandle) (*session, error) {
	s, ok := tk.sessions[sh]
	if !ok {
		return nil, errSession
	}
	return s, nil
}

func (tk *token) CloseSession(_ context.Context, sh pkcs11.SessionHandle) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	if _, err := tk.session(sh); err != nil {
		return err
	}
	delete(tk.sessions, sh)
	return nil
}

func (tk *token) CloseAllSessions(context.Context, uint) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	clear(tk.sessions)
	return nil
}

func (tk *token) GetSessionInfo(_ context.Context, sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error) {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	if _, err := tk.session(sh); err != nil {
		return pkcs11.SessionInfo{}, err
	}
	state := uint(pkcs11.CKS_RO_PUBLIC_SESSION)
	if tk.loggedIn {
		state = pkcs11.CKS_RO_USER_FUNCTIONS
	}
	return pkcs11.SessionInfo{SlotID: testSlot, State: state, Flags: pkcs11.CKF_SERIAL_SESSION}, nil
}

func (tk *token) Login(_ context.Context, sh pkcs11.SessionHandle, userType uint, pin []byte) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	if _, err := tk.session(sh); err != nil {
		return err
	}
	tk.logins = append(tk.logins, string(pin))
	if userType != pkcs11.CKU_USER {
		return pkcs11.Error(pkcs11.CKR_USER_TYPE_INVALID)
	}
	if string(pin) != testPIN {
		return pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)
	}
	tk.loggedIn = true
	return nil
}

func (tk *token) Logout(context.Context, pkcs11.SessionHandle) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	tk.loggedIn = false
	return nil
}

func (tk *token) visible(o *object) bool {
	return tk.loggedIn || o.attrs[pkcs11.CKA_PRIVATE][0] == 0
}

func (tk *token) FindObjectsInit(_ context.Context, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	s, err := tk.session(sh)
	if err != nil {
		return err
	}
	s.found = nil
	for h, o := range tk.objects {
		if !tk.visible(o) {
			continue
		}
		match := true
		for _, a := range tmpl {
			if v, ok := o.attrs[a.Type]; !ok || !bytes.Equal(v, a.Value) {
				match = false
			}
		}
		if match {
			s.found = append(s.found, h)
		}
	}
	slices.Sort(s.found)
	return nil
}

func (tk *token) FindObjects(_ context.Context, sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, error) {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	s, err := tk.session(sh)
	if err != nil {
		return nil, err
	}
	n := min(max, len(s.found))
	out := s.found[:n]
	s.found = s.found[n:]
	return out, nil
}

func (tk *token) FindObjectsFinal(context.Context, pkcs11.SessionHandle) error { return nil }

func (tk *token) GetAttributeValue(_ context.Context, sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle, types []uint) ([]AttributeResult, error) {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	if _, err := tk.session(sh); err != nil {
		return nil, err
	}
	o, ok := tk.objects[oh]
	if !ok || !tk.visible(o) {
		return nil, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)
	}
	res := make([]AttributeResult, len(types))
	for i, t := range types {
		switch v, ok := o.attrs[t]; {
		case ok:
			res[i].Value = v
		case o.sensitive[t]:
			res[i].Err = pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)
		default:
			res[i].Err = pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
		}
	}
	return res, nil
}

func (tk *token) SignInit(_ context.Context, sh pkcs11.SessionHandle, m *pkcs11.Mechanism, key pkcs11.ObjectHandle) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	s, err := tk.session(sh)
	if err != nil {
		return err
	}
	if !tk.loggedIn {
		return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	if key != 3 {
		return pkcs11.Error(pkcs11.CKR_KEY_HANDLE_INVALID)
	}
	if m.Mechanism != pkcs11.CKM_RSA_PKCS && m.Mechanism != pkcs11.CKM_SHA256_RSA_PKCS {
		return pkcs11.Error(pkcs11.CKR_MECHANISM_INVALID)
	}
	s.signing, s.data = true, nil
	return nil
}

func (tk *token) Sign(_ context.Context, sh pkcs11.SessionHandle, data []byte) ([]byte, error) {
	return tk.finishSign(sh, data)
}

func (tk *token) SignUpdate(_ context.Context, sh pkcs11.SessionHandle, part []byte) error {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	s, err := tk.session(sh)
	if err != nil {
		return err
	}
	if !s.signing {
		return pkcs11.Error(pkcs11.CKR_OPERATION_NOT_INITIALIZED)
	}
	s.data = append(s.data, part...)
	return nil
}

func (tk *token) SignFinal(_ context.Context, sh pkcs11.SessionHandle) ([]byte, error) {
	return tk.finishSign(sh, nil)
}

func (tk *token) finishSign(sh pkcs11.SessionHandle, data []byte) ([]byte, error) {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	s, err := tk.session(sh)
	if err != nil {
		return nil, err
	}
	if !s.signing {
		return nil, pkcs11.Error(pkcs11.CKR_OPERATION_NOT_INITIALIZED)
	}
	s.signing = false
	tk.signed = append(tk.signed, append(s.data, data...))
	return fakeSignature, nil
}

func (tk *token) WaitForSlotEvent(ctx context.Context, flags uint) (uint, error) {
	tk.mu.Lock()
	tk.waits++
	tk.mu.Unlock()
	if flags&pkcs11.CKF_DONT_BLOCK != 0 {
		select {
		case slot := <-tk.events:
			return slot, nil
		default:
			return 0, pkcs11.Error(pkcs11.CKR_NO_EVENT)
		}
	}
	select {
	case slot := <-tk.events:
		return slot, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (tk *token) waitCount() int {
	tk.mu.Lock()
	defer tk.mu.Unlock()
	return tk.waits
}

// clientModule finds p11-kit-client.so, skipping the test without it.
func clientModule(t *testing.T) string {
	t.Helper()
	path := filepath.Join(p11kitpath.ModuleDir(), "p11-kit-client.so")
	if _, err := os.Stat(path); err != nil {
		t.Skipf("p11-kit-client.so not found (%v); install Debian's p11-kit-modules", err)
	}
	return path
}

// listen serves h on a unix socket in a temporary directory, one Serve
// per connection, and returns the P11_KIT_SERVER_ADDRESS for it and a
// function that reports how many connections were made.
func listen(t *testing.T, h Handler) (address string, conns func() int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s") // well within sun_path's 108 bytes
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	n := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			n++
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := Serve(ctx, c, h, Options{}); err != nil && !errors.Is(err, context.Canceled) {
					t.Errorf("Serve: %v", err)
				}
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		wg.Wait()
	})
	return "unix:path=" + path, func() int { mu.Lock(); defer mu.Unlock(); return n }
}

// runTool runs pkcs11-tool on p11-kit-client.so against address.
func runTool(t *testing.T, module, address string, args ...string) (string, error) {
	t.Helper()
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		t.Skip("pkcs11-tool not found; install Debian's opensc")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool, append([]string{"--module", module}, args...)...)
	cmd.Env = append(os.Environ(), "P11_KIT_SERVER_ADDRESS="+address)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill() // by PID; Wait below has not returned
		}
	})
	err = cmd.Wait()
	return out.String(), err
}

func mustContain(t *testing.T, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}

func TestPkcs11Tool(t *testing.T) {
	module := clientModule(t)
	tk := newToken(t)
	address, conns := listen(t, tk)

	t.Run("info", func(t *testing.T) {
		out, err := runTool(t, module, address, "-I")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		mustContain(t, out, "Cryptoki version 2.40", "Manufacturer     slotwatch", "Library          slotwatch test (ver 0.1)")
	})
	t.Run("slots", func(t *testing.T) {
		for _, flag := range []string{"-L", "-T"} {
			out, err := runTool(t, module, address, flag)
			if err != nil {
				t.Fatalf("%s: %v\n%s", flag, err, out)
			}
			mustContain(t, out, "Slot 0 (0x7): slotwatch virtual reader", "token label        : slotwatch test token",
				"token manufacturer : slotwatch", "token model        : fake", "serial num         : 0001",
				"login required", "pin min/max        : 4/8")
		}
	})
	t.Run("mechanisms", func(t *testing.T) {
		out, err := runTool(t, module, address, "-M")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		mustContain(t, out, "RSA-PKCS, keySize={2048,2048}, hw, sign", "SHA256-RSA-PKCS, keySize={2048,2048}, hw, sign")
		if strings.Contains(out, "0x80001234") {
			t.Errorf("mechanism the client cannot marshal listed:\n%s", out)
		}
	})
	t.Run("objects", func(t *testing.T) {
		out, err := runTool(t, module, address, "-O")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		mustContain(t, out, "Certificate Object; type = X.509 cert", "label:      test cert", "ID:         01",
			"Public Key Object; RSA 2048 bits", "label:      test key")
		if strings.Contains(out, "Private Key Object") {
			t.Errorf("private key listed without login:\n%s", out)
		}
		out, err = runTool(t, module, address, "--login", "--pin", testPIN, "-O")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		mustContain(t, out, "Private Key Object; RSA", "Usage:      sign", "Access:     sensitive")
	})
	t.Run("sign", func(t *testing.T) {
		dir := t.TempDir()
		in, sig := filepath.Join(dir, "in"), filepath.Join(dir, "sig")
		if err := os.WriteFile(in, []byte("data to sign"), 0o600); err != nil {
			t.Fatal(err)
		}
		tk.mu.Lock()
		tk.signed = nil
		tk.mu.Unlock()
		out, err := runTool(t, module, address, "--login", "--pin", testPIN, "-s", "-m", "SHA256-RSA-PKCS",
			"--id", "01", "-i", in, "-o", sig)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		got, err := os.ReadFile(sig)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, fakeSignature) {
			t.Errorf("signature %x, want the fake one", got)
		}
		tk.mu.Lock()
		defer tk.mu.Unlock()
		if len(tk.signed) != 1 || string(tk.signed[0]) != "data to sign" {
			t.Errorf("Handler signed %q, want one signature over the input", tk.signed)
		}
	})
	t.Run("wrong PIN", func(t *testing.T) {
		out, err := runTool(t, module, address, "--login", "--pin", "000000", "-O")
		if err == nil {
			t.Fatalf("login with a wrong PIN succeeded:\n%s", out)
		}
		mustContain(t, out, "CKR_PIN_INCORRECT")
	})
	if conns() == 0 {
		t.Error("pkcs11-tool never connected")
	}
}

// TestClientInProcess loads p11-kit-client.so into this process through
// miekg/pkcs11 — the library the daemon uses — to drive what
// pkcs11-tool cannot: C_WaitForSlotEvent blocking on one thread while
// other threads use the same connection, and the length queries of
// miekg's Sign and GetAttributeValue.
func TestClientInProcess(t *testing.T) {
	module := clientModule(t)
	tk := newToken(t)
	address, conns := listen(t, tk)
	t.Setenv("P11_KIT_SERVER_ADDRESS", address) // read when the module is loaded

	p := pkcs11.New(module)
	if p == nil {
		t.Fatalf("cannot load %s", module)
	}
	t.Cleanup(p.Destroy)
	if err := p.Initialize(); err != nil {
		t.Fatal(err)
	}
	finalized := false
	t.Cleanup(func() {
		if !finalized {
			p.Finalize()
		}
	})

	info, err := p.GetInfo()
	if err != nil || info.ManufacturerID != "slotwatch" || info.LibraryDescription != "slotwatch test" {
		t.Fatalf("GetInfo = %+v, %v", info, err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil || !slices.Equal(slots, []uint{testSlot}) {
		t.Fatalf("GetSlotList = %v, %v", slots, err)
	}
	mechs, err := p.GetMechanismList(testSlot)
	if err != nil || len(mechs) != 2 {
		t.Errorf("GetMechanismList = %d mechanisms, %v; want the 2 the client can marshal", len(mechs), err)
	}
	sh, err := p.OpenSession(testSlot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login(sh, pkcs11.CKU_USER, testPIN); err != nil {
		t.Fatal(err)
	}

	// Find the private key and read attributes of each kind; miekg asks
	// for the lengths first, then for the values.
	if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{1}),
	}); err != nil {
		t.Fatal(err)
	}
	keys, _, err := p.FindObjects(sh, 10)
	if err != nil || !slices.Equal(keys, []pkcs11.ObjectHandle{3}) {
		t.Fatalf("FindObjects = %v, %v", keys, err)
	}
	p.FindObjectsFinal(sh)
	attrs, err := p.GetAttributeValue(sh, 3, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	obj := tk.objects[3]
	for _, a := range attrs {
		if !bytes.Equal(a.Value, obj.attrs[a.Type]) {
			t.Errorf("attribute %#x = %x, want %x", a.Type, a.Value, obj.attrs[a.Type])
		}
	}
	if _, err := p.GetAttributeValue(sh, 3, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, nil),
	}); !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
		t.Errorf("sensitive attribute: %v", err)
	}

	// miekg's Sign asks for the length, then for the signature: one
	// signature from the Handler.
	if err := p.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_RSA_PKCS, nil)}, 3); err != nil {
		t.Fatal(err)
	}
	sig, err := p.Sign(sh, []byte("hello"))
	if err != nil || !bytes.Equal(sig, fakeSignature) {
		t.Fatalf("Sign = %x, %v", sig, err)
	}
	if err := p.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, 3); err != nil {
		t.Fatal(err)
	}
	p.SignUpdate(sh, []byte("multi"))
	p.SignUpdate(sh, []byte("part"))
	if sig, err := p.SignFinal(sh); err != nil || !bytes.Equal(sig, fakeSignature) {
		t.Fatalf("SignFinal = %x, %v", sig, err)
	}
	tk.mu.Lock()
	signed := slices.Clone(tk.signed)
	tk.mu.Unlock()
	if len(signed) != 2 || string(signed[0]) != "hello" || string(signed[1]) != "multipart" {
		t.Errorf("Handler signed %q", signed)
	}

	// No event yet: CKF_DONT_BLOCK answers at once.
	if ev := <-p.WaitForSlotEvent(pkcs11.CKF_DONT_BLOCK); ev.SlotID != 0 {
		t.Errorf("non-blocking wait reported slot %d", ev.SlotID)
	}

	// A blocking wait on one thread; the other calls of this process go
	// over the same connection meanwhile.
	before := tk.waitCount()
	wait := p.WaitForSlotEvent(0)
	for deadline := time.Now().Add(5 * time.Second); tk.waitCount() == before; {
		if time.Now().After(deadline) {
			t.Fatal("the wait never reached the Handler")
		}
		time.Sleep(time.Millisecond)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread() // distinct client threads
			defer runtime.UnlockOSThread()
			for range 20 {
				if _, err := p.GetTokenInfo(testSlot); err != nil {
					t.Errorf("GetTokenInfo during a wait: %v", err)
					return
				}
				if _, err := p.GetSessionInfo(sh); err != nil {
					t.Errorf("GetSessionInfo during a wait: %v", err)
					return
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("calls stalled behind a blocked C_WaitForSlotEvent")
	}
	select {
	case ev := <-wait:
		t.Fatalf("wait returned %d before any event", ev.SlotID)
	default:
	}
	tk.events <- testSlot
	select {
	case ev := <-wait:
		if ev.SlotID != testSlot {
			t.Errorf("wait reported slot %d, want %d", ev.SlotID, testSlot)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the event did not end the wait")
	}

	if n := conns(); n != 1 {
		t.Errorf("%d connections; the client should use one for everything", n)
	}

	// C_Finalize while another thread is blocked in C_WaitForSlotEvent
	// ends the wait, and the client survives it (0.24.1 aborts if the
	// waiting thread is still on the connection when the finalizing one
	// tears it down). Several rounds, each on a new connection.
	for round := range 5 {
		if round > 0 {
			if err := p.Initialize(); err != nil {
				t.Fatal(err)
			}
		}
		finalized = false
		before := tk.waitCount()
		wait := p.WaitForSlotEvent(0)
		for tk.waitCount() == before {
			time.Sleep(time.Millisecond)
		}
		if err := p.Finalize(); err != nil {
			t.Errorf("Finalize: %v", err)
		}
		finalized = true
		select {
		case <-wait:
		case <-time.After(10 * time.Second):
			t.Fatal("C_Finalize did not end a blocked wait")
		}
	}
}
