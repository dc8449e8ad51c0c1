package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/dbusapi"
)

// Paths and objects of a small, fixed view: one OpenSC module with a
// reader slot holding a card, one SoftHSM module with a token, one session.
const (
	tModOpenSC = dbusapi.RootPath + "/modules/opensc_2dpkcs11"
	tModHSM    = dbusapi.RootPath + "/modules/softhsm2"
	tReader    = dbusapi.RootPath + "/readers/Virtual_20PCD_2000_2000"
	tSlotCard  = dbusapi.RootPath + "/slots/opensc_2dpkcs11_0"
	tSlotHSM   = dbusapi.RootPath + "/slots/softhsm2_7"
	tTokCard   = dbusapi.RootPath + "/tokens/4"
	tTokHSM    = dbusapi.RootPath + "/tokens/1"
	tSession   = dbusapi.RootPath + "/sessions/12"
)

func v(x any) godbus.Variant { return godbus.MakeVariant(x) }

func testObjects() managedObjects {
	return managedObjects{
		tModOpenSC: {dbusapi.ModuleInterface: {"Library": v("/usr/lib/opensc-pkcs11.so"), "Description": v("OpenSC smartcard framework"), "Manufacturer": v("OpenSC Project"), "LibraryVersion": v("0.23"), "WaitMode": v(uint32(1)), "State": v(uint32(1))}},
		tModHSM:    {dbusapi.ModuleInterface: {"Library": v("/usr/lib/softhsm/libsofthsm2.so"), "Description": v("Implementation of PKCS11"), "Manufacturer": v("SoftHSM"), "LibraryVersion": v("2.6"), "WaitMode": v(uint32(2)), "State": v(uint32(1))}},
		tReader:    {dbusapi.ReaderInterface: {"Name": v("Virtual PCD 00 00"), "State": v(uint32(2)), "Atr": v([]byte{0x3b, 0x80}), "EventCount": v(uint32(3))}},
		tSlotCard:  {dbusapi.SlotInterface: {"Module": v(godbus.ObjectPath(tModOpenSC)), "SlotId": v(uint64(0)), "Description": v("Virtual PCD 00 00"), "Reader": v(godbus.ObjectPath(tReader)), "Removable": v(true), "Token": v(godbus.ObjectPath(tTokCard))}},
		tSlotHSM:   {dbusapi.SlotInterface: {"Module": v(godbus.ObjectPath(tModHSM)), "SlotId": v(uint64(7)), "Description": v("SoftHSM slot ID 0x7"), "Reader": v(godbus.ObjectPath("/")), "Removable": v(false), "Token": v(godbus.ObjectPath(tTokHSM))}},
		tTokCard:   {dbusapi.TokenInterface: {"Slot": v(godbus.ObjectPath(tSlotCard)), "Generation": v(uint64(4)), "Label": v("Bus Card"), "Manufacturer": v("slotwatch"), "Model": v("PKCS#15"), "Serial": v("b0500001"), "Flags": v(uint32(0x40d)), "UsedForLogin": v(false)}},
		tTokHSM:    {dbusapi.TokenInterface: {"Slot": v(godbus.ObjectPath(tSlotHSM)), "Generation": v(uint64(1)), "Label": v("Session HSM"), "Manufacturer": v("SoftHSM project"), "Model": v("SoftHSM v2"), "Serial": v("388f01ec"), "Flags": v(uint32(0x42d)), "UsedForLogin": v(true)}},
		tSession:   {dbusapi.SessionInterface: {"Token": v(godbus.ObjectPath(tTokHSM)), "Generation": v(uint64(1)), "Owner": v(":1.42"), "OwnerPid": v(uint32(4242)), "ReadWrite": v(true), "State": v(uint32(3))}},
	}
}

func testManager() map[string]godbus.Variant {
	return map[string]godbus.Variant{"Version": v("0.1.0"), "InstanceId": v("abc"), "State": v(uint32(1)), "StateReason": v(""), "LastGeneration": v(uint64(4)), "LoginTokenPresent": v(true)}
}

func fakeCmdline(pid uint32) string { return fmt.Sprintf("cmd-of-%d --flag", pid) }

func TestClientBuildListing(t *testing.T) {
	l := buildListing(testObjects(), testManager(), fakeCmdline)
	want := &listing{
		Manager: managerInfo{Version: "0.1.0", InstanceID: "abc", State: "running", StateCode: 1, LastGeneration: 4, LoginTokenPresent: true},
		Modules: []moduleInfo{
			{Path: string(tModOpenSC), Name: "opensc-pkcs11", Library: "/usr/lib/opensc-pkcs11.so", Description: "OpenSC smartcard framework", Manufacturer: "OpenSC Project", LibraryVersion: "0.23", WaitMode: "blocking", WaitModeCode: 1, State: "running", StateCode: 1},
			{Path: string(tModHSM), Name: "softhsm2", Library: "/usr/lib/softhsm/libsofthsm2.so", Description: "Implementation of PKCS11", Manufacturer: "SoftHSM", LibraryVersion: "2.6", WaitMode: "polling", WaitModeCode: 2, State: "running", StateCode: 1},
		},
		Readers: []readerInfo{{Path: string(tReader), Name: "Virtual PCD 00 00", State: "present", StateCode: 2, EventCount: 3, ATR: "3b80"}},
		Slots: []slotInfo{
			{Path: string(tSlotCard), Module: "opensc-pkcs11", SlotID: 0, Description: "Virtual PCD 00 00", Reader: "Virtual PCD 00 00", Removable: true, Token: string(tTokCard)},
			{Path: string(tSlotHSM), Module: "softhsm2", SlotID: 7, Description: "SoftHSM slot ID 0x7", Token: string(tTokHSM)},
		},
		Tokens: []tokenInfo{
			{Path: string(tTokHSM), Generation: 1, Label: "Session HSM", Serial: "388f01ec", Manufacturer: "SoftHSM project", Model: "SoftHSM v2", Flags: 0x42d, UsedForLogin: true, Slot: string(tSlotHSM), Module: "softhsm2", SlotID: 7},
			{Path: string(tTokCard), Generation: 4, Label: "Bus Card", Serial: "b0500001", Manufacturer: "slotwatch", Model: "PKCS#15", Flags: 0x40d, Slot: string(tSlotCard), Module: "opensc-pkcs11", SlotID: 0, Reader: "Virtual PCD 00 00"},
		},
		Sessions: []sessionInfo{{Path: string(tSession), Token: string(tTokHSM), TokenLabel: "Session HSM", Generation: 1, Owner: ":1.42", OwnerPid: 4242, Command: "cmd-of-4242 --flag", ReadWrite: true, State: "rw-user", StateCode: 3}},
	}
	if !reflect.DeepEqual(l, want) {
		got, _ := json.MarshalIndent(l, "", " ")
		exp, _ := json.MarshalIndent(want, "", " ")
		t.Fatalf("buildListing:\n%s\nwant\n%s", got, exp)
	}
}

// TestClientListingJSONKeys pins the JSON keys: scripts depend on them.
func TestClientListingJSONKeys(t *testing.T) {
	var buf bytes.Buffer
	if err := writeJSON(&buf, buildListing(testObjects(), testManager(), fakeCmdline)); err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(buf.Bytes(), &doc); err != nil {
		t.Fatalf("not one JSON document: %v\n%s", err, buf.String())
	}
	keysOf := func(x any) []string { return slices.Sorted(maps.Keys(x.(map[string]any))) }
	first := func(key string) any { return doc[key].([]any)[0] }
	for _, tc := range []struct {
		what string
		obj  any
		keys string
	}{
		{"document", doc, "manager modules readers sessions slots tokens"},
		{"manager", doc["manager"], "instance_id last_generation login_token_present state state_code state_reason version"},
		{"module", first("modules"), "description library library_version manufacturer name path released state state_code wait_mode wait_mode_code"},
		{"reader", first("readers"), "atr event_count name path state state_code"},
		{"slot", first("slots"), "description module path reader removable slot_id token"},
		{"token", first("tokens"), "flags generation label manufacturer model module path reader serial slot slot_id used_for_login"},
		{"session", first("sessions"), "command generation owner owner_pid path read_write state state_code token token_label"},
	} {
		if got := strings.Join(keysOf(tc.obj), " "); got != tc.keys {
			t.Errorf("%s keys:\n got %s\nwant %s", tc.what, got, tc.keys)
		}
	}
	// Empty collections are [] (not null).
	buf.Reset()
	writeJSON(&buf, buildListing(nil, nil, nil))
	for _, key := range []string{"modules", "readers", "slots", "tokens", "sessions"} {
		if !strings.Contains(buf.String(), fmt.Sprintf("%q: []", key)) {
			t.Errorf("empty %s is not []:\n%s", key, buf.String())
		}
	}
}

// columnsAligned checks that in lines, every column (split on 2+ blanks)
// starts where the header's does.
func columnsAligned(t *testing.T, lines []string) {
	t.Helper()
	starts := func(s string) []int {
		var out []int
		for i := range s {
			if s[i] != ' ' && (i == 0 || (i >= 2 && s[i-1] == ' ' && s[i-2] == ' ')) {
				out = append(out, i)
			}
		}
		return out
	}
	header := starts(lines[0])
	for _, l := range lines[1:] {
		if got := starts(l); !slices.Equal(got, header) {
			t.Errorf("columns of %q start at %v, the header's at %v", l, got, header)
		}
	}
}

func TestClientListText(t *testing.T) {
	for _, tc := range []struct {
		name string
		objs managedObjects
		mgr  map[string]godbus.Variant
		want []string // substrings, in order
	}{
		{"full", testObjects(), testManager(), []string{
			"slotwatch 0.1.0 on unix:path=/bus: running, last generation 4, login token present",
			"Readers (1)", `"Virtual PCD 00 00"  present  3`,
			"Slots (2)", "opensc-pkcs11/0", "generation 4", "softhsm2/7",
			"Tokens (2)", `1           "Session HSM"  388f01ec`, `4           "Bus Card"`,
			"Modules (2)", "opensc-pkcs11  running  blocking", "softhsm2       running  polling",
			`1 session(s) open; see "slotwatch sessions"`,
		}},
		{"empty and degraded", nil, map[string]godbus.Variant{"Version": v("0.1.0"), "State": v(uint32(2)), "StateReason": v("pcscd is not running")}, []string{
			"slotwatch 0.1.0 on unix:path=/bus: degraded (pcscd is not running), last generation 0\n",
			"Readers (0)\n  none", "Slots (0)\n  none", "Tokens (0)\n  none", "Modules (0)\n  none",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := writeListText(&buf, buildListing(tc.objs, tc.mgr, nil), "unix:path=/bus"); err != nil {
				t.Fatal(err)
			}
			out := buf.String()
			rest := out
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("output lacks %q (in order):\n%s", w, out)
				}
				rest = rest[i+len(w):]
			}
			// Each table's rows line up under its header.
			for _, block := range strings.Split(out, "\n\n")[1:] {
				lines := strings.Split(strings.TrimRight(block, "\n"), "\n")
				if len(lines) > 2 && !strings.Contains(block, "session(s) open") {
					columnsAligned(t, lines[1:])
				}
			}
		})
	}
}

func TestClientSessionsText(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sessions []sessionInfo
		want     []string
	}{
		{"none", nil, []string{"no sessions open"}},
		{"two", []sessionInfo{
			{Path: string(tSession), TokenLabel: "Session HSM", Generation: 1, Owner: ":1.42", OwnerPid: 4242, Command: "ssh-agent -D", ReadWrite: true, State: "rw-user"},
			{Path: string(dbusapi.RootPath) + "/sessions/130", TokenLabel: "Bus Card", Generation: 4, Owner: ":1.7", State: "ro-public"},
		}, []string{
			"SESSION  TOKEN          GENERATION  MODE        STATE      OWNER  PID   COMMAND",
			`12       "Session HSM"  1           read-write  rw-user    :1.42  4242  ssh-agent -D`,
			`130      "Bus Card"     4           read-only   ro-public  :1.7   -     -`,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := writeSessionsText(&buf, tc.sessions); err != nil {
				t.Fatal(err)
			}
			if got := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n"); !slices.Equal(got, tc.want) {
				t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestClientWriteError(t *testing.T) {
	dbusErr := godbus.Error{Name: dbusapi.ErrBusy, Body: []any{"the token could not be reached in time"}}
	for _, tc := range []struct {
		name string
		err  error
		code int
		out  string
	}{
		{"nil", nil, 0, ""},
		{"help", flag.ErrHelp, 0, ""},
		{"plain error", errors.New("boom"), 1, "slotwatch list: boom\n"},
		{"not running", notRunning("unix:path=/x"), 2, "slotwatch: the daemon is not running on unix:path=/x (start it with `slotwatch serve` or `systemctl --user start slotwatch`)\n"},
		{"usage", usageError("list", "unexpected argument %q", "x"), 64, "slotwatch list: unexpected argument \"x\"\nRun \"slotwatch list -h\" for its options.\n"},
		{"flag error, already printed", &exitError{code: exitUsage, err: errors.New("flag provided but not defined: -x")}, 64, ""},
		{"dbus error", dbusErrorFor("list", "unix:path=/x", dbusErr), 1, "slotwatch list: io.github.slotwatch.Slotwatch1.Error.Busy: the token could not be reached in time\n"},
		{"wrapped", fmt.Errorf("context: %w", notRunning("a")), 2, notRunningMessage("a") + "\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if code := writeError(&buf, "list", tc.err); code != tc.code || buf.String() != tc.out {
				t.Fatalf("writeError = %d, %q; want %d, %q", code, buf.String(), tc.code, tc.out)
			}
		})
	}
}

func TestClientDBusError(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code int
		msg  string
	}{
		{"daemon error", godbus.Error{Name: dbusapi.ErrPinIncorrect, Body: []any{"CKR_PIN_INCORRECT"}}, 1, "slotwatch list: io.github.slotwatch.Slotwatch1.Error.PinIncorrect: CKR_PIN_INCORRECT"},
		{"pointer error", &godbus.Error{Name: "org.freedesktop.DBus.Error.AccessDenied", Body: []any{"not yours"}}, 1, "slotwatch list: org.freedesktop.DBus.Error.AccessDenied: not yours"},
		{"no message", godbus.Error{Name: "org.example.Error.Odd"}, 1, "slotwatch list: org.example.Error.Odd: (no message)"},
		{"service unknown", godbus.Error{Name: "org.freedesktop.DBus.Error.ServiceUnknown", Body: []any{"x"}}, 2, notRunningMessage("ADDR")},
		{"name has no owner", godbus.Error{Name: "org.freedesktop.DBus.Error.NameHasNoOwner", Body: []any{"x"}}, 2, notRunningMessage("ADDR")},
		{"activation failed", godbus.Error{Name: "org.freedesktop.DBus.Error.Spawn.ChildExited", Body: []any{"exited 1"}}, 2, "slotwatch: the daemon is not running on ADDR and the bus could not start it: org.freedesktop.DBus.Error.Spawn.ChildExited: exited 1"},
		{"not a D-Bus error", io.ErrUnexpectedEOF, 1, "slotwatch list: unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := dbusErrorFor("list", "ADDR", tc.err)
			var ee *exitError
			if !errors.As(err, &ee) || ee.code != tc.code || ee.msg != tc.msg {
				t.Fatalf("dbusErrorFor = %#v, want code %d, %q", err, tc.code, tc.msg)
			}
			if !errors.Is(err, tc.err) && !errors.As(err, new(godbus.Error)) && !errors.As(err, new(*godbus.Error)) {
				t.Errorf("the cause is not kept: %v", err)
			}
		})
	}
}

func TestClientParseFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int // of writeError
		cf   clientFlags
	}{
		{nil, 0, clientFlags{}},
		{[]string{"--json"}, 0, clientFlags{json: true}},
		{[]string{"--address", "unix:path=/b", "--json"}, 0, clientFlags{address: "unix:path=/b", json: true}},
		{[]string{"-address=unix:path=/b"}, 0, clientFlags{address: "unix:path=/b"}},
		{[]string{"extra"}, 64, clientFlags{}},
		{[]string{"--bogus"}, 64, clientFlags{}},
		{[]string{"-h"}, 0, clientFlags{}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var cf clientFlags
			cmd := newListCmd(func(got clientFlags) error { cf = got; return nil })
			cmd.SetOut(io.Discard)
			_, err := execute(cmd, tc.args)
			if code := writeError(io.Discard, "list", err); code != tc.code {
				t.Fatalf("exit code %d (%v), want %d", code, err, tc.code)
			}
			if err == nil && cf != tc.cf {
				t.Fatalf("flags %+v, want %+v", cf, tc.cf)
			}
		})
	}
}

func TestClientInitTokenArgs(t *testing.T) {
	pinFile := filepath.Join(t.TempDir(), "pin")
	for _, tc := range []struct {
		name string
		args []string
		err  string // "" = valid; else a substring of the message (exit 64)
	}{
		{"by label, pin file", []string{"--label", "Old", "--label-new", "New", "--so-pin-file", pinFile}, ""},
		{"by serial, stdin, force", []string{"--serial", "1234", "--label-new", "New", "--so-pin-stdin", "--force"}, ""},
		{"by path", []string{"--token", "/io/github/slotwatch/Slotwatch1/tokens/3", "--label-new", "New"}, ""},
		{"by generation", []string{"--token", "3", "--label-new", "New"}, ""},
		{"no token", []string{"--label-new", "New"}, "exactly one of --token, --serial and --label"},
		{"two selectors", []string{"--label", "A", "--serial", "1", "--label-new", "New"}, "exactly one of"},
		{"bad path", []string{"--token", "/io/github/slotwatch/Slotwatch1/sessions/3", "--label-new", "New"}, "neither a generation nor a token path"},
		{"no new label", []string{"--label", "A"}, "--label-new is required"},
		{"label too long", []string{"--label", "A", "--label-new", strings.Repeat("x", 33)}, "at most 32"},
		{"both pin sources", []string{"--label", "A", "--label-new", "B", "--so-pin-file", pinFile, "--so-pin-stdin"}, "exclude each other"},
		{"pin as an argument", []string{"--label", "A", "--label-new", "B", "--so-pin", "1234"}, "flag provided but not defined"},
		{"positional", []string{"--label", "A", "--label-new", "B", "1234"}, "unexpected argument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stderr := os.Stderr
			os.Stderr, _ = os.Open(os.DevNull) // flag's own messages
			var a *initTokenArgs
			_, err := execute(newInitTokenCmd(func(got *initTokenArgs) error { a = got; return nil }), tc.args)
			os.Stderr.Close()
			os.Stderr = stderr
			if tc.err == "" {
				if err != nil {
					t.Fatalf("parse: %v", err)
				}
				if a.labelNew != "New" {
					t.Fatalf("label-new %q", a.labelNew)
				}
				return
			}
			var ee *exitError
			if !errors.As(err, &ee) || ee.code != exitUsage || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("parse: %v, want exit 64 with %q", err, tc.err)
			}
		})
	}
}

func TestClientSelectToken(t *testing.T) {
	tokens := []tokenInfo{
		{Path: string(tTokHSM), Generation: 1, Label: "Same", Serial: "s1"},
		{Path: string(tTokCard), Generation: 4, Label: "Same", Serial: "s2"},
		{Path: string(dbusapi.RootPath) + "/tokens/5", Generation: 5, Label: "Other", Serial: "s3"},
	}
	for _, tc := range []struct {
		name string
		args initTokenArgs
		gen  uint64
		err  string
	}{
		{"serial", initTokenArgs{serial: "s2"}, 4, ""},
		{"label", initTokenArgs{label: "Other"}, 5, ""},
		{"generation", initTokenArgs{token: "1"}, 1, ""},
		{"path", initTokenArgs{token: string(tTokCard)}, 4, ""},
		{"ambiguous label", initTokenArgs{label: "Same"}, 0, `2 tokens labelled "Same" are present: generation 1 (serial s1), generation 4 (serial s2); choose one with --token GENERATION`},
		{"absent", initTokenArgs{serial: "nope"}, 0, `no token with serial "nope" is present`},
		{"dead generation", initTokenArgs{token: "2"}, 0, "no token at /io/github/slotwatch/Slotwatch1/tokens/2 is present"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := selectToken(tokens, &tc.args)
			if tc.err != "" {
				var ee *exitError
				if !errors.As(err, &ee) || ee.code != exitFailure || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("selectToken: %v, want exit 1 with %q", err, tc.err)
				}
				return
			}
			if err != nil || tok.Generation != tc.gen {
				t.Fatalf("selectToken = %d, %v; want %d", tok.Generation, err, tc.gen)
			}
		})
	}
}

func TestClientReadPIN(t *testing.T) {
	long := strings.Repeat("9", maxSOPIN)
	for _, tc := range []struct {
		name, in, pin string
		fileErr       string // firstLine ("" = ok)
		lineErr       string // readPINLine
		lineRestPIN   string // what readPINLine returns when it differs
	}{
		{name: "newline", in: "1234\n", pin: "1234"},
		{name: "no newline", in: "1234", pin: "1234"},
		{name: "crlf", in: "1234\r\n", pin: "1234"},
		{name: "blanks kept", in: " 12 34 \n", pin: " 12 34 "},
		{name: "empty", in: "\n", pin: ""},
		{name: "nothing", in: "", pin: ""},
		{name: "trailing blank lines", in: "1234\n\n  \n", pin: "1234"},
		{name: "two lines", in: "1234\n5678\n", pin: "1234", fileErr: "more than one line"},
		{name: "longest", in: long + "\n", pin: long},
		{name: "too long", in: long + "0\n", fileErr: "a PIN has at most 256", lineErr: "longer than 256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pin, err := firstLine([]byte(tc.in))
			if tc.fileErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.fileErr) {
					t.Errorf("firstLine: %q, %v; want error %q", pin, err, tc.fileErr)
				}
			} else if err != nil || string(pin) != tc.pin {
				t.Errorf("firstLine = %q, %v; want %q", pin, err, tc.pin)
			}
			pin, err = readPINLine(strings.NewReader(tc.in))
			if tc.lineErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.lineErr) {
					t.Errorf("readPINLine: %q, %v; want error %q", pin, err, tc.lineErr)
				}
			} else if err != nil || string(pin) != tc.pin {
				t.Errorf("readPINLine = %q, %v; want %q", pin, err, tc.pin)
			}
		})
	}
	// readPINLine stops at the line end: the rest stays in the reader.
	r := strings.NewReader("1234\nrest")
	if pin, err := readPINLine(r); err != nil || string(pin) != "1234" {
		t.Fatalf("readPINLine = %q, %v", pin, err)
	}
	if rest, _ := io.ReadAll(r); string(rest) != "rest" {
		t.Fatalf("readPINLine consumed past the line: %q left", rest)
	}
	// A PIN file.
	f := filepath.Join(t.TempDir(), "so.pin")
	os.WriteFile(f, []byte("87654321\n"), 0o600)
	if pin, err := readPINFile(f); err != nil || string(pin) != "87654321" {
		t.Fatalf("readPINFile = %q, %v", pin, err)
	}
	if _, err := readPINFile(f + ".missing"); err == nil {
		t.Fatal("readPINFile of a missing file succeeded")
	}
}

func TestClientInitTokenSessionsExist(t *testing.T) {
	tok := tokenInfo{Label: "Session HSM", Generation: 1}
	msg := "1 session(s) open on this token, held by: :1.9 (pid 77, ssh-agent -D)"
	for _, tc := range []struct {
		name string
		err  error
		code int
		want []string
	}{
		{"sessions exist", godbus.Error{Name: dbusapi.ErrSessionsExist, Body: []any{msg}}, 3,
			[]string{"slotwatch init-token: io.github.slotwatch.Slotwatch1.Error.SessionsExist: " + msg, "--force", `"Session HSM" (generation 1)`}},
		{"wrong pin", godbus.Error{Name: dbusapi.ErrPinIncorrect, Body: []any{"CKR_PIN_INCORRECT"}}, 1,
			[]string{"slotwatch init-token: io.github.slotwatch.Slotwatch1.Error.PinIncorrect: CKR_PIN_INCORRECT"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			code := writeError(&buf, "init-token", initTokenError("ADDR", tok, tc.err))
			if code != tc.code {
				t.Errorf("exit code %d, want %d", code, tc.code)
			}
			for _, w := range tc.want {
				if !strings.Contains(buf.String(), w) {
					t.Errorf("message %q lacks %q", buf.String(), w)
				}
			}
		})
	}
}

func TestClientHelpers(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{unescapePathElement("Virtual_20PCD_2000_2000"), "Virtual PCD 00 00"},
		{unescapePathElement("opensc_2dpkcs11"), "opensc-pkcs11"},
		{unescapePathElement("_"), ""},
		{unescapePathElement("_31abc"), "1abc"},
		{unescapePathElement("a_2e"), "a."},
		{unescapePathElement("odd_"), "odd_"},
		{formatCmdline([]byte("/usr/bin/ssh-agent\x00-D\x00\x00")), "/usr/bin/ssh-agent -D"},
		{formatCmdline([]byte("evil\nname\x00x")), "evil?name x"},
		{formatCmdline(nil), ""},
		{managerStateName(3), "recovering"},
		{managerStateName(9), "unknown(9)"},
		{readerStateName(3), "mute"},
		{moduleStateName(2), "failed"},
		{waitModeName(0), "unknown"},
		{sessionStateName(0), "ro-public"},
		{sessionStateName(4), "rw-so"},
		{sessionStateName(5), "unknown(5)"},
		{quoted("Bus Card"), `"Bus Card"`},
		{quoted("Renamed"), "Renamed"},
		{quoted(""), `""`},
		{quoted("a\tb"), `"a\tb"`},
		{commandLine(uint32(os.Getpid())), formatCmdline([]byte(strings.Join(os.Args, "\x00")))},
		{commandLine(0), ""},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

// sig builds a signal as the daemon sends it.
func sig(name string, path godbus.ObjectPath, body ...any) *godbus.Signal {
	return &godbus.Signal{Sender: ":1.2", Path: path, Name: name, Body: body}
}

func propsChanged(path godbus.ObjectPath, iface string, changed map[string]godbus.Variant) *godbus.Signal {
	return sig(sigPropertiesChanged, path, iface, changed, []string{})
}

// TestClientWatcher feeds the watcher a sequence of signals as the daemon
// sends them and checks the events, in order.
func TestClientWatcher(t *testing.T) {
	objs := testObjects()
	delete(objs, tTokCard) // the card is not in yet
	objs[tSlotCard][dbusapi.SlotInterface]["Token"] = v(godbus.ObjectPath("/"))
	objs[tReader][dbusapi.ReaderInterface]["State"] = v(uint32(1))
	w := newWatcher(objs, testManager(), fakeCmdline)
	card := testObjects()[tTokCard]
	newSession := dbusapi.RootPath + godbus.ObjectPath("/sessions/13")

	steps := []struct {
		sig  *godbus.Signal
		want []string // event, then key=value of its JSON fields
	}{
		// What the first snapshot already showed: dropped.
		{sig(sigInterfacesAdded, dbusapi.RootPath, tTokHSM, testObjects()[tTokHSM]), nil},
		{sig(sigTokenInserted, dbusapi.RootPath, tTokHSM, tSlotHSM, uint64(1)), nil},
		{propsChanged(tReader, dbusapi.ReaderInterface, map[string]godbus.Variant{"State": v(uint32(1))}), nil},
		// A card comes.
		{propsChanged(tReader, dbusapi.ReaderInterface, map[string]godbus.Variant{"State": v(uint32(2)), "EventCount": v(uint32(4))}),
			[]string{"reader_changed reader=Virtual PCD 00 00 state=present state_code=2 event_count=4"}},
		{sig(sigInterfacesAdded, dbusapi.RootPath, tTokCard, card), nil},
		{propsChanged(tSlotCard, dbusapi.SlotInterface, map[string]godbus.Variant{"Token": v(godbus.ObjectPath(tTokCard))}), nil},
		{sig(sigTokenInserted, dbusapi.RootPath, tTokCard, tSlotCard, uint64(4)),
			[]string{"token_inserted token=" + string(tTokCard) + " generation=4 label=Bus Card serial=b0500001 slot=" + string(tSlotCard) + " reader=Virtual PCD 00 00 module=opensc-pkcs11 slot_id=0"}},
		{propsChanged(dbusapi.RootPath, dbusapi.ManagerInterface, map[string]godbus.Variant{"LastGeneration": v(uint64(4))}), nil},
		// A session is opened, logged in, closed.
		{sig(sigInterfacesAdded, dbusapi.RootPath, newSession, map[string]map[string]godbus.Variant{dbusapi.SessionInterface: {
			"Token": v(godbus.ObjectPath(tTokCard)), "Generation": v(uint64(4)), "Owner": v(":1.50"), "OwnerPid": v(uint32(50)), "ReadWrite": v(false), "State": v(uint32(0))}}),
			[]string{"session_opened session=" + string(newSession) + " token=" + string(tTokCard) + " generation=4 label=Bus Card owner=:1.50 owner_pid=50 command=cmd-of-50 --flag read_write=false state=ro-public"}},
		{propsChanged(newSession, dbusapi.SessionInterface, map[string]godbus.Variant{"State": v(uint32(1))}),
			[]string{"session_changed session=" + string(newSession) + " state=ro-user state_code=1"}},
		{sig(sigInterfacesRemoved, dbusapi.RootPath, newSession, []string{dbusapi.SessionInterface}),
			[]string{"session_closed session=" + string(newSession) + " command=cmd-of-50 --flag owner_pid=50"}},
		// The token's flags change (a wrong PIN).
		{propsChanged(tTokCard, dbusapi.TokenInterface, map[string]godbus.Variant{"Flags": v(uint32(0x1040d))}),
			[]string{"token_changed token=" + string(tTokCard) + " flags=66573"}},
		// The card goes: the object first, then the signal; the label is
		// still known.
		{sig(sigInterfacesRemoved, dbusapi.RootPath, tTokCard, []string{dbusapi.TokenInterface}), nil},
		{propsChanged(tSlotCard, dbusapi.SlotInterface, map[string]godbus.Variant{"Token": v(godbus.ObjectPath("/"))}), nil},
		{sig(sigTokenRemoved, dbusapi.RootPath, tTokCard, tSlotCard, uint64(4)),
			[]string{"token_removed token=" + string(tTokCard) + " generation=4 label=Bus Card serial=b0500001 reader=Virtual PCD 00 00"}},
		// A token never seen as an object: what the signal says.
		{sig(sigTokenRemoved, dbusapi.RootPath, dbusapi.RootPath+"/tokens/9", tSlotCard, uint64(9)),
			[]string{"token_removed token=" + string(dbusapi.RootPath) + "/tokens/9 generation=9 label= slot=" + string(tSlotCard) + " module=opensc-pkcs11"}},
		// The reader goes, with its slot.
		{sig(sigInterfacesRemoved, dbusapi.RootPath, tSlotCard, []string{dbusapi.SlotInterface}),
			[]string{"slot_removed slot=" + string(tSlotCard) + " module=opensc-pkcs11 slot_id=0 reader=Virtual PCD 00 00"}},
		{sig(sigInterfacesRemoved, dbusapi.RootPath, tReader, []string{dbusapi.ReaderInterface}),
			[]string{"reader_removed reader=Virtual PCD 00 00"}},
		{sig(sigInterfacesRemoved, dbusapi.RootPath, tReader, []string{dbusapi.ReaderInterface}), nil},
		// Health.
		{propsChanged(dbusapi.RootPath, dbusapi.ManagerInterface, map[string]godbus.Variant{"State": v(uint32(2)), "StateReason": v("pcscd is gone")}),
			[]string{"manager_state state=degraded state_code=2 state_reason=pcscd is gone"}},
		{propsChanged(dbusapi.RootPath, dbusapi.ManagerInterface, map[string]godbus.Variant{"StateReason": v("pcscd is gone")}), nil},
		{propsChanged(tModOpenSC, dbusapi.ModuleInterface, map[string]godbus.Variant{"State": v(uint32(2))}),
			[]string{"module_changed module=opensc-pkcs11 state=failed wait_mode=blocking"}},
		// Others' names, and unknown signals.
		{sig(sigNameOwnerChanged, "/org/freedesktop/DBus", "org.example.Other", ":1.3", ""), nil},
		{sig(sigNameOwnerChanged, "/org/freedesktop/DBus", dbusapi.BusName, "", ":1.2"), nil},
		{sig("org.freedesktop.DBus.NameAcquired", "/org/freedesktop/DBus", ":1.9"), nil},
		{sig(sigTokenInserted, dbusapi.RootPath, "bad body"), nil},
		// The daemon leaves.
		{sig(sigNameOwnerChanged, "/org/freedesktop/DBus", dbusapi.BusName, ":1.2", ""), []string{"daemon_left owner=:1.2"}},
	}
	now := time.Date(2025, 1, 2, 3, 4, 5, 6e6, time.UTC)
	for i, st := range steps {
		events := w.handle(st.sig, now)
		if len(events) != len(st.want) {
			t.Fatalf("step %d (%s %v): %d events %+v, want %d", i, st.sig.Name, st.sig.Body, len(events), events, len(st.want))
		}
		for j, e := range events {
			f := e.fields()
			name, pairs, _ := strings.Cut(st.want[j], " ")
			if f["event"] != name || f["time"] != "2025-01-02T03:04:05.006Z" {
				t.Errorf("step %d: event %v at %v, want %s", i, f["event"], f["time"], name)
			}
			for _, kv := range splitPairs(pairs) {
				if got := fmt.Sprint(f[kv[0]]); got != kv[1] {
					t.Errorf("step %d %s: %s = %q, want %q", i, name, kv[0], got, kv[1])
				}
			}
			if text := e.text(); !strings.HasPrefix(text, "03:04:05.006 ") || strings.Count(text, "\n") != 1 {
				t.Errorf("step %d: text %q is not one timestamped line", i, text)
			}
		}
	}
}

// splitPairs splits "a=x y b=z" into [a x y] [b z]: values may have blanks,
// keys are lower_snake_case words before "=".
func splitPairs(s string) [][2]string {
	var out [][2]string
	for _, word := range strings.Split(s, " ") {
		if k, val, ok := strings.Cut(word, "="); ok && k != "" && strings.Trim(k, "abcdefghijklmnopqrstuvwxyz_") == "" {
			out = append(out, [2]string{k, val})
		} else if len(out) > 0 {
			out[len(out)-1][1] += " " + word
		}
	}
	return out
}

// TestClientMonitorEventKeys pins each event kind's JSON keys.
func TestClientMonitorEventKeys(t *testing.T) {
	l := buildListing(testObjects(), testManager(), nil)
	now := time.Now()
	common := "event time "
	for _, tc := range []struct {
		e    monitorEvent
		keys string
	}{
		{monitorEvent{Event: evState, Snapshot: l, Address: "a"}, "address event snapshot time"},
		{monitorEvent{Event: evTokenInserted, Token: &l.Tokens[0]}, common + "generation label module reader serial slot slot_id token"},
		{monitorEvent{Event: evTokenRemoved, Token: &l.Tokens[0]}, common + "generation label module reader serial slot slot_id token"},
		{monitorEvent{Event: evTokenChanged, Token: &l.Tokens[0]}, common + "flags generation label module reader serial slot slot_id token"},
		{monitorEvent{Event: evReaderChanged, Reader: &l.Readers[0]}, common + "atr event_count path reader state state_code"},
		{monitorEvent{Event: evSlotAdded, Slot: &l.Slots[0]}, common + "description module reader slot slot_id"},
		{monitorEvent{Event: evModuleChanged, Module: &l.Modules[0]}, common + "library module path released state state_code wait_mode"},
		{monitorEvent{Event: evSessionOpened, Session: &l.Sessions[0]}, common + "command generation label owner owner_pid read_write session state state_code token"},
		{monitorEvent{Event: evManagerState, Manager: &l.Manager}, common + "state state_code state_reason"},
		{monitorEvent{Event: evDaemonLeft, Owner: ":1.2"}, common + "owner"},
	} {
		tc.e.Time = now
		var buf bytes.Buffer
		if err := writeEvent(&buf, tc.e, true); err != nil {
			t.Fatal(err)
		}
		if strings.Count(buf.String(), "\n") != 1 {
			t.Errorf("%s: not one line: %q", tc.e.Event, buf.String())
		}
		var m map[string]any
		if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
			t.Fatalf("%s: %v", tc.e.Event, err)
		}
		sorted := func(s string) string { f := strings.Fields(s); slices.Sort(f); return strings.Join(f, " ") }
		if got := strings.Join(slices.Sorted(maps.Keys(m)), " "); got != sorted(tc.keys) {
			t.Errorf("%s keys:\n got %s\nwant %s", tc.e.Event, got, sorted(tc.keys))
		}
	}
	// The text of the first event: the state, one line per object, then a
	// line saying what comes.
	var buf bytes.Buffer
	writeEvent(&buf, monitorEvent{Time: now, Event: evState, Snapshot: l, Address: "unix:path=/b"}, false)
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	if len(lines) != 1+2+1+2+1+1 || !strings.Contains(lines[0], "slotwatch 0.1.0 on unix:path=/b: running, last generation 4") ||
		!strings.Contains(lines[len(lines)-1], "waiting for events") {
		t.Errorf("state text:\n%s", buf.String())
	}
}
