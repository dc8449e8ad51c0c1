package pkcs11face

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/slotwatch/slotwatch/monitor"
)

func TestListen(t *testing.T) {
	t.Run("private directory and socket", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "run", "slotwatch", "pkcs11")
		l, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Type() != os.ModeSocket || st.Mode().Perm() != 0o600 {
			t.Errorf("socket mode %v, want a socket 0600", st.Mode())
		}
		dst, _ := os.Stat(filepath.Dir(path))
		if dst.Mode().Perm() != 0o700 {
			t.Errorf("directory mode %v, want 0700", dst.Mode().Perm())
		}
	})
	t.Run("a stale socket is replaced", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "pkcs11")
		old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		old.SetUnlinkOnClose(false)
		old.Close() // the file stays, nobody listens: a daemon that died
		l, err := Listen(path)
		if err != nil {
			t.Fatalf("stale socket: %v", err)
		}
		l.Close()
	})
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, path string)
		want  string
	}{
		{"a live server keeps its socket", func(t *testing.T, path string) {
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}, "another server answers there"},
		{"a file that is not a socket is left alone", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "is not a socket"},
		{"a directory others can write to is refused", func(t *testing.T, path string) {
			if err := os.Chmod(filepath.Dir(path), 0o777); err != nil {
				t.Fatal(err)
			}
		}, "writable by others"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "pkcs11")
			tc.setup(t, path)
			l, err := Listen(path)
			if err == nil {
				l.Close()
				t.Fatal("Listen succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Listen: %v, want %q", err, tc.want)
			}
		})
	}
}

func TestSlotIDsAreStable(t *testing.T) {
	tab := newSlotTable()
	a, b := tab.id(key("m", 7)), tab.id(key("m", 3))
	if a == b || tab.id(key("m", 7)) != a {
		t.Fatalf("ids %d %d, then %d", a, b, tab.id(key("m", 7)))
	}
	if k, ok := tab.key(b); !ok || k != key("m", 3) {
		t.Fatalf("key(%d) = %v %v", b, k, ok)
	}
}

func key(module string, id uint) monitor.SlotKey { return monitor.SlotKey{Module: module, ID: id} }
