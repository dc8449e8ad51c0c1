package secret

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"unsafe"
)

func TestKeepUseWipe(t *testing.T) {
	pin := []byte("123456")
	s, err := New(pin)
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	s.Use(func(b []byte) error { got = append(got, b...); return nil })
	if !bytes.Equal(got, pin) {
		t.Fatalf("Use gave %q, want %q", got, pin)
	}
	start := uintptr(unsafe.Pointer(&s.mem[0]))
	flags := smapsFlags(t, start)
	for _, want := range []string{"lo", "dd"} { // locked, do not dump
		if !strings.Contains(" "+flags+" ", " "+want+" ") {
			t.Errorf("the secret's mapping has VmFlags %q, want %q among them", flags, want)
		}
	}
	s.Wipe()
	s.Wipe() // idempotent
	if !s.Wiped() {
		t.Fatal("Wiped false after Wipe")
	}
	s.Use(func(b []byte) error {
		if b != nil {
			t.Fatalf("Use after Wipe gave %q", b)
		}
		return nil
	})
	if flags := smapsFlags(t, start); flags != "" {
		t.Fatalf("the mapping is still there after Wipe (VmFlags %q)", flags)
	}
	var nilSecret *Secret
	nilSecret.Wipe()
	if !nilSecret.Wiped() {
		t.Fatal("nil secret not wiped")
	}
}

func TestTooLong(t *testing.T) {
	if _, err := New(make([]byte, MaxLen+1)); err != ErrTooLong {
		t.Fatalf("New(too long) = %v, want ErrTooLong", err)
	}
}

// smapsFlags returns the VmFlags of the mapping starting at addr in this
// process, "" if there is none.
func smapsFlags(t *testing.T, addr uintptr) string {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	prefix := fmt.Sprintf("%x-", addr)
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if isMappingHeader(line) {
			in = strings.HasPrefix(line, prefix)
			continue
		}
		if in && strings.HasPrefix(line, "VmFlags:") {
			return strings.TrimSpace(strings.TrimPrefix(line, "VmFlags:"))
		}
	}
	return ""
}

// isMappingHeader: "7f01a000-7f01b000 rw-p ..." starts a mapping's entry.
func isMappingHeader(line string) bool {
	first, _, _ := strings.Cut(line, " ")
	lo, hi, ok := strings.Cut(first, "-")
	return ok && lo != "" && hi != "" && strings.Trim(lo+hi, "0123456789abcdef") == ""
}
