// Package tests holds the integration tests that run slotwatch's binary
// against the real stack, and the harness they use (tests/stack,
// tests/vcard).
package tests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// builds caches the binaries built for this test process, by file name.
var builds sync.Map // name → *build

type build struct {
	once sync.Once
	path string
	err  error
}

// buildBinary builds the slotwatch binary once per test process into the
// process's temp dir, with or without the race detector.
func buildBinary(t testing.TB, name string, race bool) string {
	t.Helper()
	v, _ := builds.LoadOrStore(name, &build{})
	b := v.(*build)
	b.once.Do(func() {
		b.path = filepath.Join(testDir, name)
		args := []string{"build", "-o", b.path}
		if race {
			args = append(args, "-race")
		}
		// The go that runs this test, also when it is not on PATH.
		goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
		if out, err := exec.Command(goBin, append(args, "../service")...).CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// slotwatchBin is the binary the tests run: built with the race detector,
// unless SLOTWATCH_TEST_NORACE is set (make stress measures memory, which
// the race detector's own bookkeeping would drown).
func slotwatchBin(t testing.TB) string {
	if os.Getenv("SLOTWATCH_TEST_NORACE") != "" {
		return buildBinary(t, "slotwatch-norace", false)
	}
	return buildBinary(t, "slotwatch", true)
}

// watchLine is one line of `slotwatch watch --json`: the event names and
// keys of `slotwatch monitor --json` (a token event's token is its path).
type watchLine struct {
	Event      string `json:"event"`
	Token      string `json:"token"`
	Generation uint64 `json:"generation"`
	Label      string `json:"label"`
	Serial     string `json:"serial"`
	Reader     string `json:"reader"`
	Snapshot   any    `json:"snapshot"`
}

// TestWatchCommand runs `slotwatch watch --json` as a user would, against a
// private pcscd, and checks what it prints for insert, remove, reinsert.
func TestWatchCommand(t *testing.T) {
	bin := slotwatchBin(t)
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	cmd := exec.Command(bin, "watch", "--json") // inherits PCSCLITE_CSOCK_NAME and OPENSC_CONF
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			t.Errorf("slotwatch watch did not exit within 5 s of SIGINT")
		}
	})

	lines := make(chan watchLine, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var l watchLine
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Errorf("not JSON: %q", sc.Text())
				continue
			}
			lines <- l
		}
		close(lines)
		exited <- cmd.Wait()
	}()
	expect := func(event string) watchLine {
		t.Helper()
		timeout := time.After(5 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("slotwatch exited before %s; stderr:\n%s", event, stderr.String())
				}
				if l.Event == event {
					return l
				}
			case <-timeout:
				t.Fatalf("no %s within 5 s; stderr:\n%s", event, stderr.String())
			}
		}
	}
	if first := expect("state"); first.Snapshot == nil {
		t.Fatalf("the first line has no snapshot: %+v", first)
	}

	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "CLI Card", Serial: "c11c0001"})
	t.Cleanup(func() { card.Close() })
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	in1 := expect("token_inserted")
	if in1.Label != "CLI Card" || in1.Serial != "c11c0001" || in1.Reader != pcscd.Readers()[0] ||
		in1.Token != fmt.Sprintf("/io/github/slotwatch/Slotwatch1/tokens/%d", in1.Generation) {
		t.Fatalf("token_inserted: %+v", in1)
	}
	card.Remove()
	if out := expect("token_removed"); out.Generation != in1.Generation {
		t.Fatalf("removed generation %d, want %d", out.Generation, in1.Generation)
	}
	card.Insert()
	if in2 := expect("token_inserted"); in2.Generation <= in1.Generation {
		t.Fatalf("reinserted generation %d, want > %d", in2.Generation, in1.Generation)
	}
}
