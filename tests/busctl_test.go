package tests

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	"github.com/slotwatch/slotwatch/tests/stack"
	ifxml "github.com/slotwatch/slotwatch/xml"
)

// busctl runs `busctl --address=ADDR --no-pager args...` and returns its
// stdout, stderr and error.
func busctl(t *testing.T, bus *stack.DBus, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command("busctl", append([]string{"--address=" + bus.Address, "--no-pager"}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatalf("busctl %v: %v", args, err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("busctl %v did not finish within 30 s\nstdout: %s\nstderr: %s", args, out.String(), errb.String())
	}
	return out.String(), errb.String(), err
}

// mustBusctl is busctl that fails the test on a non-zero exit.
func mustBusctl(t *testing.T, bus *stack.DBus, args ...string) string {
	t.Helper()
	out, errOut, err := busctl(t, bus, args...)
	if err != nil {
		t.Fatalf("busctl %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// contractInterface returns the parsed xml/ definition of an interface.
func contractInterface(t *testing.T, name string) introspect.Interface {
	t.Helper()
	x, ok := ifxml.Interface(name)
	if !ok {
		t.Fatalf("xml/ has no interface %s", name)
	}
	var in introspect.Interface
	if err := xml.Unmarshal([]byte(x), &in); err != nil {
		t.Fatalf("parsing xml/ %s: %v", name, err)
	}
	return in
}

// busctlEscape quotes a string the way busctl prints it (systemd's
// cescape: C escapes, other control and non-ASCII bytes in octal).
func busctlEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case '\a':
			b.WriteString(`\a`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\v':
			b.WriteString(`\v`)
		case '\\':
			b.WriteString(`\\`)
		case '"':
			b.WriteString(`\"`)
		case '\'':
			b.WriteString(`\'`)
		default:
			if c < ' ' || c >= 127 {
				fmt.Fprintf(&b, `\%03o`, c)
			} else {
				b.WriteByte(c)
			}
		}
	}
	return b.String()
}

// busctlFormat is how `busctl get-property` prints a value (one line),
// for the types slotwatch's properties have; ok is false for others.
func busctlFormat(v godbus.Variant) (string, bool) {
	switch x := v.Value().(type) {
	case string:
		return `s "` + busctlEscape(x) + `"`, true
	case godbus.ObjectPath:
		return `o "` + busctlEscape(string(x)) + `"`, true
	case uint32:
		return fmt.Sprintf("u %d", x), true
	case uint64:
		return fmt.Sprintf("t %d", x), true
	case bool:
		return fmt.Sprintf("b %t", x), true
	case []byte:
		s := fmt.Sprintf("ay %d", len(x))
		for _, c := range x {
			s += fmt.Sprintf(" %d", c)
		}
		return s, true
	}
	return "", false
}

// TestBusctl: slotwatch is usable with busctl, as a user or a script would
// use it: the tree shows every object, introspection shows every interface
// with the contract's members, every property reads back as
// GetManagedObjects says, and methods can be called (and fail per contract).
func TestBusctl(t *testing.T) {
	if _, err := exec.LookPath("busctl"); err != nil {
		t.Skip("busctl (package systemd) is not installed; apt-get install systemd")
	}
	bus, _ := hsmDaemon(t)
	conn := dial(t, bus)
	tok := findToken(t, conn, hsmLabel)
	sess := openSession(t, conn, tok)
	objs := managedObjects(t, conn)
	if _, ok := objs[sess]; !ok {
		t.Fatalf("session %s not in GetManagedObjects", sess)
	}
	// The root is not in GetManagedObjects (it is the ObjectManager);
	// its Manager properties come from GetAll.
	var mgr map[string]godbus.Variant
	if err := conn.Object(busName, rootPath).Call("org.freedesktop.DBus.Properties.GetAll", 0, mgrIface).Store(&mgr); err != nil {
		t.Fatalf("GetAll Manager: %v", err)
	}
	all := map[godbus.ObjectPath]map[string]map[string]godbus.Variant{rootPath: {mgrIface: mgr}}
	for p, ifaces := range objs {
		all[p] = ifaces
	}

	t.Run("tree", func(t *testing.T) {
		list := mustBusctl(t, bus, "tree", "--list", busName)
		listed := map[string]bool{}
		for _, l := range strings.Split(list, "\n") {
			listed[strings.TrimSpace(l)] = true
		}
		tree := mustBusctl(t, bus, "tree", busName)
		for p := range all {
			if !listed[string(p)] {
				t.Errorf("busctl tree --list does not show %s:\n%s", p, list)
			}
			// The tree view prints each path once, after the branch
			// drawing.
			if !strings.Contains(tree, string(p)+"\n") {
				t.Errorf("busctl tree does not show %s:\n%s", p, tree)
			}
		}
		t.Logf("busctl tree:\n%s", tree)
	})

	// One object of every kind.
	kinds := map[string]godbus.ObjectPath{mgrIface: rootPath, tokIface: tok, sesIface: sess}
	for p, ifaces := range objs {
		for name := range ifaces {
			if _, ok := kinds[name]; !ok {
				kinds[name] = p
			}
		}
	}
	for _, want := range []string{busName + ".Module", busName + ".Slot"} {
		if _, ok := kinds[want]; !ok {
			t.Fatalf("no object with %s on the bus: %v", want, objs)
		}
	}

	t.Run("introspect", func(t *testing.T) {
		for _, name := range slices.Sorted(maps.Keys(kinds)) {
			p := kinds[name]
			out := mustBusctl(t, bus, "introspect", "--no-legend", busName, string(p))
			// NAME TYPE SIGNATURE RESULT/VALUE FLAGS; a member line's
			// name starts with "."; members follow their interface.
			type member struct{ typ, sig, result, flags string }
			members := map[string]member{}
			inIface := false
			for _, l := range strings.Split(out, "\n") {
				f := strings.Fields(l)
				if len(f) < 2 {
					continue
				}
				if f[1] == "interface" {
					inIface = f[0] == name
					continue
				}
				if !inIface || !strings.HasPrefix(f[0], ".") || len(f) < 3 {
					continue
				}
				m := member{typ: f[1], sig: f[2]}
				if len(f) >= 4 {
					m.result = f[3]
				}
				if len(f) >= 5 {
					m.flags = strings.Join(f[4:], " ")
				}
				members[f[0][1:]] = m
			}
			if !strings.Contains(out, name+" ") {
				t.Errorf("busctl introspect %s does not list interface %s:\n%s", p, name, out)
				continue
			}
			spec := contractInterface(t, name)
			for _, pr := range spec.Properties {
				m, ok := members[pr.Name]
				switch {
				case !ok:
					t.Errorf("%s: busctl introspect does not list property %s.%s", p, name, pr.Name)
				case m.typ != "property" || m.sig != pr.Type:
					t.Errorf("%s: %s.%s listed as %s %s, want property %s", p, name, pr.Name, m.typ, m.sig, pr.Type)
				case strings.Contains(m.flags, "writable"):
					t.Errorf("%s: %s.%s is writable (%s); the contract has every property read-only", p, name, pr.Name, m.flags)
				}
				emits := "true"
				for _, a := range pr.Annotations {
					if a.Name == "org.freedesktop.DBus.Property.EmitsChangedSignal" {
						emits = a.Value
					}
				}
				wantFlag := map[string]string{"true": "emits-change", "const": "const"}[emits]
				if ok && wantFlag != "" && !strings.Contains(m.flags, wantFlag) {
					t.Errorf("%s: %s.%s flags %q, want %s", p, name, pr.Name, m.flags, wantFlag)
				}
			}
			for _, me := range spec.Methods {
				var in, res string
				for _, a := range me.Args {
					if a.Direction == "out" {
						res += a.Type
					} else {
						in += a.Type
					}
				}
				if in == "" {
					in = "-"
				}
				if res == "" {
					res = "-"
				}
				m, ok := members[me.Name]
				if !ok || m.typ != "method" || m.sig != in || m.result != res {
					t.Errorf("%s: busctl introspect lists method %s.%s as %+v (present %v), want method %s %s", p, name, me.Name, m, ok, in, res)
				}
			}
			for _, s := range spec.Signals {
				var sig string
				for _, a := range s.Args {
					sig += a.Type
				}
				if m, ok := members[s.Name]; !ok || m.typ != "signal" || m.sig != sig {
					t.Errorf("%s: busctl introspect lists signal %s.%s as %+v (present %v), want signal %s", p, name, s.Name, m, ok, sig)
				}
			}
			if n := len(spec.Properties) + len(spec.Methods) + len(spec.Signals); len(members) != n {
				t.Errorf("%s: busctl introspect lists %d members of %s, the contract has %d:\n%s", p, len(members), name, n, out)
			}
		}
	})

	t.Run("get-property", func(t *testing.T) {
		paths := slices.Sorted(maps.Keys(all))
		n := 0
		for _, p := range paths {
			for _, name := range slices.Sorted(maps.Keys(all[p])) {
				spec := contractInterface(t, name)
				props := all[p][name]
				var names []string
				for _, pr := range spec.Properties {
					names = append(names, pr.Name)
					if _, ok := props[pr.Name]; !ok {
						t.Errorf("%s: %s.%s is in the contract but not in GetManagedObjects/GetAll", p, name, pr.Name)
					}
				}
				for k := range props {
					if !slices.Contains(names, k) {
						t.Errorf("%s: %s.%s is on the bus but not in the contract", p, name, k)
					}
				}
				for _, pr := range spec.Properties {
					out := strings.TrimRight(mustBusctl(t, bus, "get-property", busName, string(p), name, pr.Name), "\n")
					n++
					if !strings.HasPrefix(out, pr.Type+" ") {
						t.Errorf("busctl get-property %s %s %s = %q, want type %s", p, name, pr.Name, out, pr.Type)
						continue
					}
					v, ok := props[pr.Name]
					if !ok {
						continue
					}
					if want, ok := busctlFormat(v); ok && out != want {
						t.Errorf("busctl get-property %s %s %s = %q, GetManagedObjects says %q", p, name, pr.Name, out, want)
					}
				}
			}
		}
		t.Logf("%d properties read with busctl get-property", n)
		// busctl prints all of an interface's properties too.
		out := mustBusctl(t, bus, "get-property", busName, string(tok), tokIface, "Label", "Generation")
		gen := objs[tok][tokIface]["Generation"].Value().(uint64)
		if want := fmt.Sprintf("s %q\nt %d\n", hsmLabel, gen); out != want {
			t.Errorf("busctl get-property Label Generation = %q, want %q", out, want)
		}
	})

	t.Run("call", func(t *testing.T) {
		// OpenSession from busctl's own connection: the session belongs
		// to busctl's connection and goes when busctl exits.
		out := strings.TrimSpace(mustBusctl(t, bus, "call", busName, string(tok), tokIface, "OpenSession", "b", "false"))
		var opened string
		if _, err := fmt.Sscanf(out, "o %q", &opened); err != nil || !isUnder(godbus.ObjectPath(opened), "sessions") {
			t.Fatalf("busctl call OpenSession printed %q, want o \"%s/sessions/N\"", out, rootPath)
		}
		deadline := time.Now().Add(time.Second)
		for {
			if _, ok := managedObjects(t, conn)[godbus.ObjectPath(opened)]; !ok {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("session %s opened by busctl is still there 1 s after busctl exited", opened)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		// Our own session is untouched.
		if _, ok := managedObjects(t, conn)[sess]; !ok {
			t.Errorf("the test's session %s went away with busctl's", sess)
		}

		// ListCertificates answers an empty array (SoftHSM has only the
		// key pair).
		out = strings.TrimSpace(mustBusctl(t, bus, "call", busName, string(tok), tokIface, "ListCertificates"))
		if out != "a(ayssay) 0" {
			t.Errorf("busctl call ListCertificates = %q, want \"a(ayssay) 0\"", out)
		}

		// A generation that was never handed out: UnknownObject, and
		// busctl shows the daemon's message and fails.
		bogus := rootPath + "/tokens/999999"
		callFails(t, bus, conn, bogus, "org.freedesktop.DBus.Error.UnknownObject", tokIface, "OpenSession", "b", "false")

		// A removed generation: InitToken with a new label (through
		// busctl, with force: our session is open) makes the token a
		// new generation; the old path answers TokenRemoved.
		args := []string{"call", busName, string(tok), tokIface, "InitToken", "aysb", fmt.Sprint(len(hsmSO))}
		for _, c := range []byte(hsmSO) {
			args = append(args, fmt.Sprint(c))
		}
		args = append(args, "Busctl Renamed", "true")
		if out := strings.TrimSpace(mustBusctl(t, bus, args...)); out != "" {
			t.Errorf("busctl call InitToken printed %q, want nothing", out)
		}
		renamed := findToken(t, conn, "Busctl Renamed")
		if renamed == tok {
			t.Fatalf("InitToken with a new label kept the token path %s", tok)
		}
		if _, ok := managedObjects(t, conn)[tok]; ok {
			t.Fatalf("old token %s is still in GetManagedObjects after the new label", tok)
		}
		callFails(t, bus, conn, tok, errPfx+"TokenRemoved", tokIface, "OpenSession", "b", "false")
		callFails(t, bus, conn, tok, errPfx+"TokenRemoved", tokIface, "ListCertificates")
		// The session InitToken closed is gone.
		if _, ok := managedObjects(t, conn)[sess]; ok {
			t.Errorf("session %s survived InitToken with force", sess)
		}
		// busctl works on the new token.
		out = strings.TrimSpace(mustBusctl(t, bus, "get-property", busName, string(renamed), tokIface, "Label"))
		if out != `s "Busctl Renamed"` {
			t.Errorf("busctl get-property Label of the new token = %q", out)
		}
	})
}

// callFails runs `busctl call PATH IFACE METHOD args...` and checks that it
// fails with the message of the D-Bus error wantName, the error a godbus
// client gets for the same call.
func callFails(t *testing.T, bus *stack.DBus, conn *godbus.Conn, p godbus.ObjectPath, wantName, iface, method string, args ...string) {
	t.Helper()
	// The same call from godbus, for the error name (busctl prints only
	// the message).
	var goArgs []any
	if len(args) > 0 && args[0] == "b" {
		goArgs = append(goArgs, args[1] == "true")
	}
	err := conn.Object(busName, p).Call(iface+"."+method, 0, goArgs...).Err
	if errName(err) != wantName {
		t.Errorf("%s.%s on %s: %v (%s), want %s", iface, method, p, err, errName(err), wantName)
		return
	}
	msg := err.Error()
	out, errOut, berr := busctl(t, bus, append([]string{"call", busName, string(p), iface, method}, args...)...)
	if berr == nil {
		t.Errorf("busctl call %s on %s succeeded (%q), want it to fail with %s", method, p, out, wantName)
		return
	}
	if !strings.Contains(errOut, msg) {
		t.Errorf("busctl call %s on %s: stderr %q does not show the error message %q", method, p, errOut, msg)
	}
	t.Logf("busctl call %s on %s: %s", method, p, strings.TrimSpace(errOut))
}
