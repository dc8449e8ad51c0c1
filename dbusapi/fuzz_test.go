package dbusapi

import (
	"log/slog"
	"testing"

	godbus "github.com/godbus/dbus/v5"
)

// FuzzDecodeTemplate feeds FindObjects templates built from fuzzed keys and
// values of every D-Bus type a client could send. The decoder must never
// panic, and must accept only the contract's keys with their exact types.
//
//	go test -run '^$' -fuzz FuzzDecodeTemplate -fuzztime 30s ./dbusapi
func FuzzDecodeTemplate(f *testing.F) {
	f.Add("class", uint8(0), uint32(3), []byte{1}, "label")
	f.Add("id", uint8(1), uint32(0), []byte{}, "")
	f.Add("label", uint8(2), uint32(7), []byte("x"), "signing key")
	f.Add("key_type", uint8(0), uint32(3), []byte{}, "")
	f.Add("value", uint8(1), uint32(0), []byte{0}, "")
	f.Add("", uint8(3), uint32(0), []byte{}, "")
	f.Fuzz(func(t *testing.T, key string, kind uint8, u uint32, b []byte, s string) {
		var v any
		switch kind % 6 {
		case 0:
			v = u
		case 1:
			v = b
		case 2:
			v = s
		case 3:
			v = int32(u)
		case 4:
			v = godbus.MakeVariant(u) // a variant in a variant
		case 5:
			v = []string{s}
		}
		tmpl, err := decodeTemplate(map[string]godbus.Variant{key: godbus.MakeVariant(v)})
		if err != nil {
			if name := toDBus(slog.New(slog.DiscardHandler), err).Name; name != ErrInvalidArgs {
				t.Fatalf("template {%q: %T} answered %s, want InvalidArgs", key, v, name)
			}
			return
		}
		ok := (key == "class" || key == "key_type") && kind%6 == 0 ||
			key == "id" && kind%6 == 1 && len(b) <= maxKeyID ||
			key == "label" && kind%6 == 2 && len(s) <= 256
		set := 0
		for _, isSet := range []bool{tmpl.Class != nil, tmpl.ID != nil, tmpl.Label != nil, tmpl.KeyType != nil} {
			if isSet {
				set++
			}
		}
		if !ok || set != 1 {
			t.Fatalf("template {%q: %T} accepted (%d keys set)", key, v, set)
		}
	})
}

// FuzzGenerationOf: object paths from clients never crash the path
// parsers, and what parses as a generation names the same token path back.
func FuzzGenerationOf(f *testing.F) {
	for _, p := range []string{"/io/github/slotwatch/Slotwatch1/tokens/1", "/", "/x/18446744073709551615", "/x/-1", "/x/1/", ""} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p string) {
		path := godbus.ObjectPath(p)
		g, ok := generationOf(path)
		if ok && generationOfMust(t, tokenPath(g)) != g {
			t.Fatalf("generation %d from %q does not round-trip", g, p)
		}
		_ = lastElement(path)
	})
}

func generationOfMust(t *testing.T, p godbus.ObjectPath) uint64 {
	g, ok := generationOf(p)
	if !ok {
		t.Fatalf("%s does not parse", p)
	}
	return g
}
