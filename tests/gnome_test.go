package tests

import (
	"encoding/xml"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	godbus "github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	"github.com/slotwatch/slotwatch/tests/stack"
	"github.com/slotwatch/slotwatch/tests/vcard"
)

// The names of gnome-settings-daemon's smartcard service
// (tests/testdata/gnome/).
const (
	gnomeName       = "org.gnome.SettingsDaemon.Smartcard"
	gnomeRoot       = godbus.ObjectPath("/org/gnome/SettingsDaemon/Smartcard")
	gnomeManager    = gnomeRoot + "/Manager"
	gnomeTokens     = gnomeManager + "/Tokens"
	gnomeLoginToken = gnomeTokens + "/login_token"
	gnomeMgrIface   = gnomeName + ".Manager"
	gnomeTokIface   = gnomeName + ".Token"
	gnomeDrvIface   = gnomeName + ".Driver"
)

// gnomeShell follows org.gnome.SettingsDaemon.Smartcard the way GNOME
// Shell's smartcard manager does: an ObjectManager client that keeps each
// Token object's properties (from GetManagedObjects, InterfacesAdded and
// PropertiesChanged, in order) and reports "inserted NAME" when a token
// arrives already inserted or its IsInserted turns true, "removed NAME"
// when it turns false. NAME is the token's Name at that moment, so a swap
// whose Name came too late shows the old name.
type gnomeShell struct {
	t      *testing.T
	conn   *godbus.Conn
	events chan string

	mu     sync.Mutex
	tokens map[godbus.ObjectPath]map[string]godbus.Variant
}

func followGnome(t *testing.T, bus *stack.DBus) *gnomeShell {
	t.Helper()
	g := &gnomeShell{t: t, conn: dial(t, bus), events: make(chan string, 10000),
		tokens: map[godbus.ObjectPath]map[string]godbus.Variant{}}
	// Subscribe first, then read the current objects: nothing falls in
	// between.
	if err := g.conn.AddMatchSignal(godbus.WithMatchSender(gnomeName), godbus.WithMatchPathNamespace(gnomeRoot)); err != nil {
		t.Fatal(err)
	}
	ch := make(chan *godbus.Signal, 10000)
	g.conn.Signal(ch)
	var objs map[godbus.ObjectPath]map[string]map[string]godbus.Variant
	if err := g.conn.Object(gnomeName, gnomeRoot).Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objs); err != nil {
		t.Fatalf("GetManagedObjects on %s: %v", gnomeName, err)
	}
	for _, p := range slices.Sorted(maps.Keys(objs)) {
		g.added(p, objs[p])
	}
	go func() {
		for sig := range ch {
			switch sig.Name {
			case "org.freedesktop.DBus.ObjectManager.InterfacesAdded":
				g.added(sig.Body[0].(godbus.ObjectPath), sig.Body[1].(map[string]map[string]godbus.Variant))
			case "org.freedesktop.DBus.Properties.PropertiesChanged":
				if sig.Body[0].(string) == gnomeTokIface {
					g.changed(sig.Path, sig.Body[1].(map[string]godbus.Variant))
				}
			}
		}
	}()
	return g
}

func (g *gnomeShell) added(p godbus.ObjectPath, ifaces map[string]map[string]godbus.Variant) {
	props, ok := ifaces[gnomeTokIface]
	if !ok || p == gnomeLoginToken {
		return
	}
	g.mu.Lock()
	g.tokens[p] = props
	g.mu.Unlock()
	if props["IsInserted"].Value() == true {
		g.events <- "inserted " + props["Name"].Value().(string)
	}
}

func (g *gnomeShell) changed(p godbus.ObjectPath, changed map[string]godbus.Variant) {
	g.mu.Lock()
	props, ok := g.tokens[p]
	if !ok {
		g.mu.Unlock()
		if p != gnomeLoginToken {
			g.events <- fmt.Sprintf("PropertiesChanged for %s before its InterfacesAdded", p)
		}
		return
	}
	for k, v := range changed {
		props[k] = v
	}
	name := props["Name"].Value().(string)
	g.mu.Unlock()
	if v, ok := changed["IsInserted"]; ok {
		if v.Value() == true {
			g.events <- "inserted " + name
		} else {
			g.events <- "removed " + name
		}
	}
}

// expect waits for the next events and fails unless they are want, in
// order.
func (g *gnomeShell) expect(timeout time.Duration, want ...string) {
	g.t.Helper()
	for i, w := range want {
		select {
		case got := <-g.events:
			if got != w {
				g.t.Fatalf("GNOME-style subscriber: event %d is %q, want %q (all wanted: %q)", i, got, w, want)
			}
		case <-time.After(timeout):
			g.t.Fatalf("GNOME-style subscriber: no event %d (%q) within %v", i, w, timeout)
		}
	}
}

// expectSettled waits for events until none comes for a second, and fails
// unless they alternate between "removed" and "inserted" (starting with a
// removal) and the last is final.
func (g *gnomeShell) expectSettled(timeout time.Duration, final string) {
	g.t.Helper()
	var got []string
	deadline := time.After(timeout)
	for {
		select {
		case e := <-g.events:
			got = append(got, e)
			continue
		case <-deadline:
			g.t.Fatalf("GNOME-style subscriber: events did not settle within %v: %q", timeout, got)
		case <-time.After(time.Second):
		}
		if len(got) > 0 {
			break
		}
	}
	for i, e := range got {
		if want := []string{"removed ", "inserted "}[i%2]; !strings.HasPrefix(e, want) {
			g.t.Fatalf("GNOME-style subscriber: event %d is %q, want %s... (all: %q)", i, e, want, got)
		}
	}
	if got[len(got)-1] != final {
		g.t.Fatalf("GNOME-style subscriber: settled on %q, want %q (all: %q)", got[len(got)-1], final, got)
	}
}

// quiet fails if an event arrives within d.
func (g *gnomeShell) quiet(d time.Duration) {
	g.t.Helper()
	select {
	case got := <-g.events:
		g.t.Fatalf("GNOME-style subscriber: unexpected event %q", got)
	case <-time.After(d):
	}
}

// inserted is GetInsertedTokens.
func (g *gnomeShell) inserted() []godbus.ObjectPath {
	g.t.Helper()
	var paths []godbus.ObjectPath
	if err := g.conn.Object(gnomeName, gnomeManager).Call(gnomeMgrIface+".GetInsertedTokens", 0).Store(&paths); err != nil {
		g.t.Fatalf("GetInsertedTokens: %v", err)
	}
	return paths
}

// gnomeEscaped is GNOME's path escaping, written out for the test: every
// byte outside [A-Za-z0-9] is _XX_.
func gnomeEscaped(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "_%02x_", c)
		}
	}
	return b.String()
}

// TestGnomeIntrospectionMatchesGSD: with --gnome-compat, every kind of
// object (root, Manager, Driver, Token) has exactly the interfaces of
// gnome-settings-daemon 43's smartcard service as captured from the real
// daemon (tests/testdata/gnome), interface by interface, with the same
// children, paths and property values for the same card.
func TestGnomeIntrospectionMatchesGSD(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat")
	g := followGnome(t, bus)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Test Token 0", Serial: "0e000001"})
	t.Cleanup(func() { card.Close() })
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	g.expect(10*time.Second, "inserted Test Token 0")

	// The captured tree names the objects of the same module and slot.
	tree, err := os.ReadFile(filepath.Join("testdata", "gnome", "tree-with-card.txt"))
	if err != nil {
		t.Fatal(err)
	}
	var driverPath, tokenPath godbus.ObjectPath
	for _, m := range regexp.MustCompile(`node (\S+) \{`).FindAllStringSubmatch(string(tree), -1) {
		switch p := godbus.ObjectPath(m[1]); {
		case strings.HasPrefix(string(p), string(gnomeManager)+"/Drivers/"):
			driverPath = p
		case strings.HasPrefix(string(p), string(gnomeTokens)+"/"):
			tokenPath = p
		}
	}
	if want := gnomeManager + "/Drivers/" + godbus.ObjectPath(gnomeEscaped(stack.OpenSCModule)); driverPath != want {
		t.Fatalf("captured driver path %s, GNOME's escaping of %s gives %s", driverPath, stack.OpenSCModule, want)
	}

	for _, c := range []struct {
		file string
		path godbus.ObjectPath
	}{
		{"introspect-root.xml", gnomeRoot},
		{"introspect-manager.xml", gnomeManager},
		{"introspect-driver.xml", driverPath},
		{"introspect-token.xml", tokenPath},
	} {
		t.Run(c.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", "gnome", c.file))
			if err != nil {
				t.Fatal(err)
			}
			want := parseNode(t, string(b))
			var x string
			if err := g.conn.Object(gnomeName, c.path).Call("org.freedesktop.DBus.Introspectable.Introspect", 0).Store(&x); err != nil {
				t.Fatalf("Introspect %s: %v", c.path, err)
			}
			got := parseNode(t, x)
			if w, gt := interfaceNames(want), interfaceNames(got); !slices.Equal(w, gt) {
				t.Fatalf("%s: interfaces %q, gsd has %q", c.path, gt, w)
			}
			for _, wi := range want.Interfaces {
				gi := findInterface(got, wi.Name)
				if w, gt := describeInterface(wi), describeInterface(*gi); w != gt {
					t.Errorf("%s: interface %s differs\n gsd:       %s\n slotwatch: %s", c.path, wi.Name, w, gt)
				}
			}
			if w, gt := childNames(want), childNames(got); !slices.Equal(w, gt) {
				t.Errorf("%s: children %q, gsd has %q", c.path, gt, w)
			}
		})
	}

	// busctl tree and d-feet walk from "/": both trees are reachable.
	for path, child := range map[godbus.ObjectPath]string{"/": "org", "/org/gnome/SettingsDaemon": "Smartcard"} {
		var x string
		if err := g.conn.Object(gnomeName, path).Call("org.freedesktop.DBus.Introspectable.Introspect", 0).Store(&x); err != nil {
			t.Fatalf("Introspect %s: %v", path, err)
		}
		if got := childNames(parseNode(t, x)); !slices.Contains(got, child) {
			t.Errorf("Introspect %s: children %q, want %q among them", path, got, child)
		}
	}

	// The values of the captured tree, for the same card.
	var drv, tok map[string]godbus.Variant
	if err := g.conn.Object(gnomeName, driverPath).Call("org.freedesktop.DBus.Properties.GetAll", 0, gnomeDrvIface).Store(&drv); err != nil {
		t.Fatal(err)
	}
	if err := g.conn.Object(gnomeName, tokenPath).Call("org.freedesktop.DBus.Properties.GetAll", 0, gnomeTokIface).Store(&tok); err != nil {
		t.Fatal(err)
	}
	if drv["Library"].Value() != stack.OpenSCModule || drv["Description"].Value() == "" {
		t.Errorf("Driver properties %v", drv)
	}
	if tok["Name"].Value() != "Test Token 0" || tok["Driver"].Value() != driverPath ||
		tok["IsInserted"].Value() != true || tok["UsedToLogin"].Value() != false {
		t.Errorf("Token properties %v", tok)
	}
	if got := g.inserted(); !slices.Equal(got, []godbus.ObjectPath{tokenPath}) {
		t.Errorf("GetInsertedTokens = %v, want [%s]", got, tokenPath)
	}
	// Without PKCS11_LOGIN_TOKEN_NAME: no alias, and GNOME's error.
	err = g.conn.Object(gnomeName, gnomeManager).Call(gnomeMgrIface+".GetLoginToken", 0).Err
	if errName(err) != gnomeMgrIface+".Error.FindingSmartcard" {
		t.Errorf("GetLoginToken without a login token: %v", err)
	}
}

func parseNode(t *testing.T, s string) *introspect.Node {
	t.Helper()
	var n introspect.Node
	if err := xml.Unmarshal([]byte(s), &n); err != nil {
		t.Fatalf("introspection data: %v\n%s", err, s)
	}
	return &n
}

func interfaceNames(n *introspect.Node) []string {
	var out []string
	for _, i := range n.Interfaces {
		out = append(out, i.Name)
	}
	slices.Sort(out)
	return out
}

func childNames(n *introspect.Node) []string {
	var out []string
	for _, c := range n.Children {
		out = append(out, c.Name)
	}
	slices.Sort(out)
	return out
}

func findInterface(n *introspect.Node, name string) *introspect.Interface {
	for i := range n.Interfaces {
		if n.Interfaces[i].Name == name {
			return &n.Interfaces[i]
		}
	}
	return nil
}

// describeInterface renders everything a client can depend on, sorted:
// methods with their arguments (name, type, direction), signals with
// theirs, properties with type and access.
func describeInterface(i introspect.Interface) string {
	var parts []string
	for _, m := range i.Methods {
		var args []string
		for _, a := range m.Args {
			dir := a.Direction
			if dir == "" {
				dir = "in"
			}
			args = append(args, dir+" "+a.Type+" "+a.Name)
		}
		parts = append(parts, "method "+m.Name+"("+strings.Join(args, ", ")+")")
	}
	for _, s := range i.Signals {
		var args []string
		for _, a := range s.Args {
			args = append(args, a.Type+" "+a.Name)
		}
		parts = append(parts, "signal "+s.Name+"("+strings.Join(args, ", ")+")")
	}
	for _, p := range i.Properties {
		parts = append(parts, "property "+p.Access+" "+p.Type+" "+p.Name)
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}

// TestGnomeSubscriberSeesEveryTransition: a GNOME-Shell-style subscriber
// sees every insertion and removal in order on the real stack: a swap to
// another card and a replug of the same card while the daemon is stopped
// (SIGSTOP/SIGCONT, so both happen inside one event gap) are each
// "removed" then "inserted" with the new card's name, and pcscd going
// away leaves no stale inserted token.
func TestGnomeSubscriberSeesEveryTransition(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	d := startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat")
	t.Cleanup(func() { d.cmd.Process.Signal(syscall.SIGCONT) }) // before the daemon's own cleanup
	g := followGnome(t, bus)
	reader := pcscd.Readers()[0]
	obs := stack.NewObserverForTest(t, pcscd)
	alice := vcard.Profile{Label: "Alice", Serial: "a11ce001"}
	bob := vcard.Profile{Label: "Bob", Serial: "b0b00001"}
	card := vcard.New(pcscd.Addr(0), alice)
	t.Cleanup(func() { card.Close() })
	waitPresent := func(present bool) {
		t.Helper()
		if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return c.Present == present }, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	g.expect(10*time.Second, "inserted Alice")
	if err := card.Remove(); err != nil {
		t.Fatal(err)
	}
	g.expect(5*time.Second, "removed Alice")
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	g.expect(10*time.Second, "inserted Alice")
	first := g.inserted()

	// swapWhileStopped changes the card while the daemon cannot see it.
	swapWhileStopped := func(next vcard.Profile) {
		t.Helper()
		if err := d.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		if err := card.Remove(); err != nil {
			t.Fatal(err)
		}
		waitPresent(false)
		card.SetProfile(next)
		if err := card.Insert(); err != nil {
			t.Fatal(err)
		}
		waitPresent(true)
		if err := d.cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	}
	swapWhileStopped(bob)
	g.expect(10*time.Second, "removed Alice", "inserted Bob")
	swapWhileStopped(bob)
	g.expect(10*time.Second, "removed Bob", "inserted Bob")
	if got := g.inserted(); !slices.Equal(got, first) {
		t.Fatalf("GetInsertedTokens = %v, want the same slot's object %v", got, first)
	}

	// pcscd goes away: the slot goes, and so does the inserted state; it
	// comes back with pcscd.
	if err := pcscd.Kill(); err != nil {
		t.Fatal(err)
	}
	// pcscd's last answer, as it dies, may count one more replug of the
	// virtual reader (seen: its event counter 5 → 7, card present);
	// slotwatch reports that as removed + inserted like any other. What
	// must hold: the transitions alternate and end in "removed".
	g.expectSettled(10*time.Second, "removed Bob")
	if got := g.inserted(); len(got) != 0 {
		t.Fatalf("GetInsertedTokens with pcscd gone = %v", got)
	}
	card.Remove() // its connection died with pcscd
	if err := pcscd.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := card.Insert(); err != nil {
		t.Fatal(err)
	}
	g.expect(15*time.Second, "inserted Bob")
	g.quiet(500 * time.Millisecond)
}

// TestGnomeLoginToken: with PKCS11_LOGIN_TOKEN_NAME the login_token alias
// exists from the start (IsInserted false, UsedToLogin true) and
// GetLoginToken returns it; once the login card is in, GetLoginToken
// returns the card's object, whose UsedToLogin is true, and the alias
// follows its IsInserted. Another card is not the login token.
func TestGnomeLoginToken(t *testing.T) {
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, []string{"PKCS11_LOGIN_TOKEN_NAME=Login Card"}, "--module", stack.OpenSCModule, "--gnome-compat")
	g := followGnome(t, bus)
	mgr := g.conn.Object(gnomeName, gnomeManager)
	loginToken := func() godbus.ObjectPath {
		t.Helper()
		var p godbus.ObjectPath
		if err := mgr.Call(gnomeMgrIface+".GetLoginToken", 0).Store(&p); err != nil {
			t.Fatalf("GetLoginToken: %v", err)
		}
		return p
	}
	props := func(p godbus.ObjectPath) map[string]godbus.Variant {
		t.Helper()
		var v map[string]godbus.Variant
		if err := g.conn.Object(gnomeName, p).Call("org.freedesktop.DBus.Properties.GetAll", 0, gnomeTokIface).Store(&v); err != nil {
			t.Fatalf("GetAll %s: %v", p, err)
		}
		return v
	}
	// The native Manager says the same: LoginTokenPresent, and
	// UsedForLogin on the token.
	loginPresent := func() bool {
		t.Helper()
		v, err := g.conn.Object(busName, rootPath).GetProperty(mgrIface + ".LoginTokenPresent")
		if err != nil {
			t.Fatalf("Get LoginTokenPresent: %v", err)
		}
		return v.Value().(bool)
	}
	usedForLogin := func(label string) bool {
		t.Helper()
		v, err := g.conn.Object(busName, findToken(t, g.conn, label)).GetProperty(tokIface + ".UsedForLogin")
		if err != nil {
			t.Fatalf("Get UsedForLogin of %q: %v", label, err)
		}
		return v.Value().(bool)
	}
	if p := loginToken(); p != gnomeLoginToken {
		t.Fatalf("GetLoginToken with the card out = %s, want the alias", p)
	}
	if loginPresent() {
		t.Fatal("LoginTokenPresent with no card in")
	}
	if v := props(gnomeLoginToken); v["Name"].Value() != "Login Card" || v["IsInserted"].Value() != false || v["UsedToLogin"].Value() != true {
		t.Fatalf("alias properties %v", v)
	}

	other := vcard.New(pcscd.Addr(1), vcard.Profile{Label: "Other Card", Serial: "07e00001"})
	t.Cleanup(func() { other.Close() })
	if err := other.Insert(); err != nil {
		t.Fatal(err)
	}
	g.expect(10*time.Second, "inserted Other Card")
	if p := loginToken(); p != gnomeLoginToken {
		t.Fatalf("GetLoginToken with only another card in = %s", p)
	}
	if loginPresent() || usedForLogin("Other Card") {
		t.Fatal("another card counts as the login token")
	}

	login := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Login Card", Serial: "10e00001"})
	t.Cleanup(func() { login.Close() })
	if err := login.Insert(); err != nil {
		t.Fatal(err)
	}
	g.expect(10*time.Second, "inserted Login Card")
	if !loginPresent() || !usedForLogin("Login Card") {
		t.Fatalf("with the login card in: LoginTokenPresent %v, its UsedForLogin %v", loginPresent(), usedForLogin("Login Card"))
	}
	p := loginToken()
	if p == gnomeLoginToken || !strings.HasPrefix(string(p), string(gnomeTokens)+"/token_from_") {
		t.Fatalf("GetLoginToken with the login card in = %s", p)
	}
	if v := props(p); v["Name"].Value() != "Login Card" || v["UsedToLogin"].Value() != true || v["IsInserted"].Value() != true {
		t.Fatalf("login token properties %v", v)
	}
	if v := props(gnomeLoginToken); v["IsInserted"].Value() != true || v["Driver"].Value() != props(p)["Driver"].Value() {
		t.Fatalf("alias properties with the login card in: %v", v)
	}
	if err := login.Remove(); err != nil {
		t.Fatal(err)
	}
	g.expect(5*time.Second, "removed Login Card")
	if loginPresent() {
		t.Fatal("LoginTokenPresent after the login card's removal")
	}
	if v := props(gnomeLoginToken); v["IsInserted"].Value() != false {
		t.Fatalf("alias properties with the login card out: %v", v)
	}
	if got := loginToken(); got != gnomeLoginToken {
		t.Fatalf("GetLoginToken after removal = %s", got)
	}
}

// TestGnomeBadInput: GNOME's objects answer bad calls with the standard
// errors, and the daemon stays up.
func TestGnomeBadInput(t *testing.T) {
	stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat")
	conn := dial(t, bus)
	for _, c := range []struct {
		path   godbus.ObjectPath
		method string
		args   []any
		want   string
	}{
		{gnomeManager, gnomeMgrIface + ".GetLoginToken", []any{"x"}, "org.freedesktop.DBus.Error.InvalidArgs"},
		{gnomeManager, gnomeMgrIface + ".GetInsertedTokens", []any{uint32(1)}, "org.freedesktop.DBus.Error.InvalidArgs"},
		{gnomeRoot, gnomeMgrIface + ".GetInsertedTokens", nil, "org.freedesktop.DBus.Error.UnknownInterface"},
		{gnomeTokens + "/nothing", gnomeMgrIface + ".GetInsertedTokens", nil, "org.freedesktop.DBus.Error.UnknownObject"},
		{gnomeManager, "org.freedesktop.DBus.Properties.Get", []any{gnomeMgrIface, "Nope"}, "org.freedesktop.DBus.Error.InvalidArgs"},
		{gnomeManager, "org.freedesktop.DBus.Properties.GetAll", []any{"no.such.Interface"}, "org.freedesktop.DBus.Error.InvalidArgs"},
		{gnomeTokens + "/nothing", "org.freedesktop.DBus.Properties.GetAll", []any{gnomeTokIface}, "org.freedesktop.DBus.Error.UnknownObject"},
		{gnomeRoot, "org.freedesktop.DBus.ObjectManager.GetManagedObjects", []any{"x"}, "org.freedesktop.DBus.Error.InvalidArgs"},
		{gnomeManager, "org.freedesktop.DBus.ObjectManager.GetManagedObjects", nil, "org.freedesktop.DBus.Error.UnknownObject"},
	} {
		err := conn.Object(busName, c.path).Call(c.method, 0, c.args...).Err
		if got := errName(err); got != c.want {
			t.Errorf("%s %s%v: %v, want %s", c.path, c.method, c.args, err, c.want)
		}
	}
	var objs map[godbus.ObjectPath]map[string]map[string]godbus.Variant
	if err := conn.Object(gnomeName, gnomeRoot).Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objs); err != nil {
		t.Fatalf("the daemon after bad calls: %v", err)
	}
}

// TestGnomeNameOwned: while another connection (a running gsd-smartcard)
// owns the GNOME name, slotwatch says so, serves its own name, and takes
// the GNOME name when the owner leaves; --gnome-compat=replace takes it
// over at once where the owner allows replacement, and says so where it
// does not.
func TestGnomeNameOwned(t *testing.T) {
	stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	owner := func(c *godbus.Conn) string {
		t.Helper()
		var o string
		c.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, gnomeName).Store(&o)
		return o
	}
	daemonOwner := func(c *godbus.Conn) string {
		var o string
		c.BusObject().Call("org.freedesktop.DBus.GetNameOwner", 0, busName).Store(&o)
		return o
	}
	waitOwner := func(c *godbus.Conn, want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for owner(c) != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s owned by %q, want %q", gnomeName, owner(c), want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitLog := func(d *daemon, what string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(d.stderr.String(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("no %q in the daemon's log:\n%s", what, d.stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	fakeGSD := func(flags godbus.RequestNameFlags) *godbus.Conn {
		t.Helper()
		c, err := godbus.Connect(bus.Address)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if r, err := c.RequestName(gnomeName, flags|godbus.NameFlagDoNotQueue); err != nil || r != godbus.RequestNameReplyPrimaryOwner {
			t.Fatalf("the stand-in gsd-smartcard could not own %s: %v %v", gnomeName, r, err)
		}
		return c
	}
	check := dial(t, bus)

	t.Run("queue", func(t *testing.T) {
		gsd := fakeGSD(0)
		d := startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat")
		waitLog(d, gnomeName+" is owned by "+gsd.Names()[0])
		waitLog(d, "serving "+busName+" only")
		if owner(check) != gsd.Names()[0] {
			t.Fatalf("slotwatch took the name from an owner that does not allow it")
		}
		gsd.Close()
		waitOwner(check, daemonOwner(check))
		waitLog(d, "now serving the GNOME smartcard name")
	})
	t.Run("replace-allowed", func(t *testing.T) {
		gsd := fakeGSD(godbus.NameFlagAllowReplacement)
		d := startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat=replace")
		waitOwner(check, daemonOwner(check))
		waitLog(d, "took over the GNOME smartcard name")
		waitLog(d, gsd.Names()[0])
	})
	t.Run("replace-refused", func(t *testing.T) {
		gsd := fakeGSD(0)
		d := startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat=replace")
		waitLog(d, "does not allow replacement")
		if owner(check) != gsd.Names()[0] {
			t.Fatalf("slotwatch took the name from an owner that does not allow it")
		}
	})
}

// TestGnomeOpenLoopReplug: a card goes in and out on a fixed 450/450 ms
// rhythm that does not wait for anybody (open loop, the rhythm at which
// gsd-smartcard showed 1–15 of 200 transitions). Every transition pcscd
// counted (its per-reader event counter) reaches the GNOME-style
// subscriber, alternating inserted/removed, and nothing else does. make
// test runs 20 cycles; SLOTWATCH_GNOME_CYCLES=100 is the figure in the
// README.
func TestGnomeOpenLoopReplug(t *testing.T) {
	cycles := stressCount("SLOTWATCH_GNOME_CYCLES", 20)
	pcscd := stack.StartPCSCDForTest(t, stack.PCSCDConfig{Socket: pcscSocket, Dir: t.TempDir()})
	bus := stack.StartDBusForTest(t, "")
	startDaemon(t, bus, nil, "--module", stack.OpenSCModule, "--gnome-compat", "--log-level", "info")
	g := followGnome(t, bus)
	reader := pcscd.Readers()[0]
	obs := stack.NewObserverForTest(t, pcscd)
	card := vcard.New(pcscd.Addr(0), vcard.Profile{Label: "Rhythm", Serial: "450450"})
	t.Cleanup(func() { card.Close() })

	const half = 450 * time.Millisecond
	next := time.Now()
	for range cycles {
		if err := card.Insert(); err != nil {
			t.Fatal(err)
		}
		next = next.Add(half)
		time.Sleep(time.Until(next))
		if err := card.Remove(); err != nil {
			t.Fatal(err)
		}
		next = next.Add(half)
		time.Sleep(time.Until(next))
	}
	if _, err := obs.WaitFor(reader, func(c stack.ObservedChange) bool { return !c.Present }, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	pcscdTransitions := int(obs.Current(reader).EventCount) // the reader attached at 0 and stayed

	var events []string
	for len(events) < pcscdTransitions {
		select {
		case e := <-g.events:
			events = append(events, e)
		case <-time.After(5 * time.Second):
			t.Fatalf("pcscd counted %d transitions; the GNOME-style subscriber saw %d: %q", pcscdTransitions, len(events), events)
		}
	}
	g.quiet(time.Second)
	for i, e := range events {
		want := "inserted Rhythm"
		if i%2 == 1 {
			want = "removed Rhythm"
		}
		if e != want {
			t.Fatalf("event %d is %q, want %q (all: %q)", i, e, want, events)
		}
	}
	t.Logf("%d cycles at 450/450 ms: pcscd counted %d transitions, the GNOME-style subscriber saw %d (%d inserted, %d removed)",
		cycles, pcscdTransitions, len(events), (len(events)+1)/2, len(events)/2)
}
