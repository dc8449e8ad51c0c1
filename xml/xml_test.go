package xml

import (
	"bytes"
	encxml "encoding/xml"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/godbus/dbus/v5/prop"
)

// contract is DESIGN.md's "D-Bus contract" table, in its order. Properties
// are "Name type emits" (emits is the EmitsChangedSignal value), methods
// and signals "Name(direction type name, ...)" (signal arguments have no
// direction).
var contract = []struct {
	name       string
	properties []string
	methods    []string
	signals    []string
}{
	{
		name: Prefix + ".Manager",
		properties: []string{
			"Version s const",
			"InstanceId s const",
			"State u true",
			"StateReason s true",
			"LastGeneration t true",
			"LoginTokenPresent b true",
		},
		methods: []string{"Reload()"},
		signals: []string{
			"TokenInserted(o token, o slot, t generation)",
			"TokenRemoved(o token, o slot, t generation)",
		},
	},
	{
		name: Prefix + ".Module",
		properties: []string{
			"Library s const",
			"Description s true",
			"Manufacturer s true",
			"LibraryVersion s true",
			"WaitMode u true",
			"State u true",
			"Released b true",
		},
	},
	{
		name: Prefix + ".Reader",
		properties: []string{
			"Name s const",
			"State u true",
			"Atr ay true",
			"EventCount u true",
		},
	},
	{
		name: Prefix + ".Slot",
		properties: []string{
			"Module o const",
			"SlotId t const",
			"Description s true",
			"Reader o true",
			"Removable b true",
			"Token o true",
		},
	},
	{
		name: Prefix + ".Token",
		properties: []string{
			"Slot o const",
			"Generation t const",
			"Label s const",
			"Manufacturer s const",
			"Model s const",
			"Serial s const",
			"Flags u true",
			"UsedForLogin b const",
		},
		methods: []string{
			"OpenSession(in b read_write, out o session)",
			"CloseAllSessions()",
			"InitToken(in ay so_pin, in s label, in b force)",
			"ListCertificates(out a(ayssay) certificates)",
		},
	},
	{
		name: Prefix + ".Session",
		properties: []string{
			"Token o true", // moves to the same card's new generation after an outage,
			"Generation t true",
			"Owner s const",
			"OwnerPid u const",
			"ReadWrite b const",
			"State u true",
		},
		methods: []string{
			"Login(in u user_type, in ay pin)",
			"Logout()",
			"Close()",
			"FindObjects(in a{sv} template, out aa{sv} objects)",
			"Sign(in ay key_id, in u mechanism, in ay data, out ay signature)",
		},
	},
}

const (
	errPrefix        = Prefix + ".Error."
	emitsChanged     = "org.freedesktop.DBus.Property.EmitsChangedSignal"
	doctype          = `DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd"`
	errTokenRemoved  = errPrefix + "TokenRemoved"
	errAccessDenied  = "org.freedesktop.DBus.Error.AccessDenied"
	errInvalidArgs   = "org.freedesktop.DBus.Error.InvalidArgs"
	errSessionsExist = errPrefix + "SessionsExist"
	errInvalidConfig = errPrefix + "InvalidConfig"
)

// knownErrors are the error names a method may document: DESIGN.md's list,
// Cancelled (a PIN pad's cancel key), InvalidConfig for Reload's config,
// InvalidArgs and AccessDenied.
var knownErrors = []string{
	errPrefix + "TokenRemoved",
	errPrefix + "SessionsExist",
	errPrefix + "PinIncorrect",
	errPrefix + "PinLocked",
	errPrefix + "PinInvalid",
	errPrefix + "NotLoggedIn",
	errPrefix + "AlreadyLoggedIn",
	errPrefix + "NotSupported",
	errPrefix + "ModuleFailure",
	errPrefix + "Busy",
	errPrefix + "Cancelled",
	errInvalidConfig,
	errInvalidArgs,
	errAccessDenied,
}

// mustDocument lists errors particular methods must document, beyond the
// rules for every Token and Session method (TokenRemoved; AccessDenied).
var mustDocument = map[string][]string{
	Prefix + ".Token.InitToken": {
		errSessionsExist, errPrefix + "PinIncorrect", errPrefix + "PinLocked",
		errPrefix + "PinInvalid", errInvalidArgs,
	},
	Prefix + ".Session.Login": {
		errPrefix + "PinIncorrect", errPrefix + "PinLocked", errPrefix + "PinInvalid",
		errPrefix + "AlreadyLoggedIn", errInvalidArgs,
	},
	Prefix + ".Session.Logout":      {errPrefix + "NotLoggedIn"},
	Prefix + ".Session.FindObjects": {errInvalidArgs},
	Prefix + ".Session.Sign":        {errPrefix + "NotLoggedIn", errPrefix + "NotSupported", errInvalidArgs},
}

// enumDocs are the enumerations (type u) and what their documentation
// must say about 0: unknown, as the convention wants, or that the value
// comes from PKCS#11 and 0 is real.
var enumDocs = map[string]string{
	Prefix + ".Manager.State":   "0 (unknown)",
	Prefix + ".Module.WaitMode": "0 (unknown)",
	Prefix + ".Module.State":    "0 (unknown)",
	Prefix + ".Reader.State":    "0 (unknown)",
	Prefix + ".Session.State":   "0 is a real value",
}

var (
	errorsSectionRE = regexp.MustCompile(`(?m)^\s*Errors:$`)
	errorNameRE     = regexp.MustCompile(`\b(?:io\.github\.slotwatch\.Slotwatch1|org\.freedesktop\.DBus)\.Error\.[A-Za-z]+`)
	memberRE        = regexp.MustCompile(`^[A-Z][A-Za-z0-9]*$`)
	argRE           = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
)

func parse(t *testing.T, name string) introspect.Interface {
	t.Helper()
	b, ok := File(name)
	if !ok {
		t.Fatalf("File(%q): not found", name)
	}
	var n introspect.Node
	if err := encxml.Unmarshal(b, &n); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if len(n.Interfaces) != 1 || len(n.Children) != 0 || n.Name != "" {
		t.Fatalf("%s: want one unnamed node with exactly one interface, got name %q, %d interfaces, %d children",
			name, n.Name, len(n.Interfaces), len(n.Children))
	}
	if got := n.Interfaces[0].Name; got != name {
		t.Fatalf("%s: interface is named %q", name, got)
	}
	return n.Interfaces[0]
}

func TestNamesAndFiles(t *testing.T) {
	var want []string
	for _, c := range contract {
		want = append(want, c.name)
	}
	slices.Sort(want)
	if got := Names(); !slices.Equal(got, want) {
		t.Fatalf("Names() = %q, want %q", got, want)
	}

	entries, err := files.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	var embedded []string
	for _, e := range entries {
		embedded = append(embedded, e.Name())
	}
	var wantFiles []string
	for _, n := range want {
		wantFiles = append(wantFiles, n+".xml")
	}
	if !slices.Equal(embedded, wantFiles) {
		t.Errorf("embedded files %q, want %q", embedded, wantFiles)
	}

	for _, n := range want {
		b, ok := File(n)
		if !ok {
			t.Fatalf("File(%q) not found", n)
		}
		disk, err := os.ReadFile(n + ".xml")
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, disk) {
			t.Errorf("File(%q) differs from %s.xml", n, n)
		}
		b[0] ^= 0xff // a copy: the next call must not see this
		if again, _ := File(n); !bytes.Equal(again, disk) {
			t.Errorf("File(%q) returned shared memory", n)
		}
	}
	for _, bad := range []string{"", "Error", Prefix, Prefix + ".", Prefix + ".Nope", "io.github.slotwatch.Slotwatch1.Manager.xml", "manager"} {
		if _, ok := File(bad); ok {
			t.Errorf("File(%q) found", bad)
		}
		if _, ok := Interface(bad); ok {
			t.Errorf("Interface(%q) found", bad)
		}
	}
}

func TestEveryFileParses(t *testing.T) {
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			ifc := parse(t, name)
			if len(ifc.Annotations) != 0 {
				t.Errorf("interface annotations %v, want none", ifc.Annotations)
			}
			b, _ := File(name)
			if err := checkDoctype(b); err != nil {
				t.Error(err)
			}
		})
	}
}

// checkDoctype wants the D-Bus introspection 1.0 DOCTYPE before <node>.
func checkDoctype(b []byte) error {
	d := encxml.NewDecoder(bytes.NewReader(b))
	for {
		tok, err := d.Token()
		if err != nil {
			return err
		}
		switch t := tok.(type) {
		case encxml.Directive:
			if got := strings.Join(strings.Fields(string(t)), " "); got != doctype {
				return errors.New("DOCTYPE is " + got)
			}
			return nil
		case encxml.StartElement:
			return errors.New("no DOCTYPE before <" + t.Name.Local + ">")
		}
	}
}

func TestContract(t *testing.T) {
	for _, c := range contract {
		t.Run(c.name, func(t *testing.T) {
			ifc := parse(t, c.name)

			var props []string
			for _, p := range ifc.Properties {
				if p.Access != "read" {
					t.Errorf("property %s: access %q, want read", p.Name, p.Access)
				}
				emits, n := "", 0
				for _, a := range p.Annotations {
					if a.Name == emitsChanged {
						emits = a.Value
						n++
					} else {
						t.Errorf("property %s: unexpected annotation %s", p.Name, a.Name)
					}
				}
				if n != 1 || (emits != "const" && emits != "true") {
					t.Errorf("property %s: want one %s annotation, const or true; got %d, %q", p.Name, emitsChanged, n, emits)
				}
				checkMember(t, "property", p.Name)
				checkSignature(t, p.Name, p.Type)
				props = append(props, p.Name+" "+p.Type+" "+emits)
			}
			compare(t, "properties", props, c.properties)

			var methods []string
			for _, m := range ifc.Methods {
				checkMember(t, "method", m.Name)
				if len(m.Annotations) != 0 {
					t.Errorf("method %s: unexpected annotations %v", m.Name, m.Annotations)
				}
				var args []string
				for _, a := range m.Args {
					if a.Direction != "in" && a.Direction != "out" {
						t.Errorf("method %s arg %s: direction %q", m.Name, a.Name, a.Direction)
					}
					checkArg(t, m.Name, a)
					args = append(args, a.Direction+" "+a.Type+" "+a.Name)
				}
				methods = append(methods, m.Name+"("+strings.Join(args, ", ")+")")
			}
			compare(t, "methods", methods, c.methods)

			var signals []string
			for _, s := range ifc.Signals {
				checkMember(t, "signal", s.Name)
				var args []string
				for _, a := range s.Args {
					if a.Direction != "" {
						t.Errorf("signal %s arg %s: direction %q, want none", s.Name, a.Name, a.Direction)
					}
					checkArg(t, s.Name, a)
					args = append(args, a.Type+" "+a.Name)
				}
				signals = append(signals, s.Name+"("+strings.Join(args, ", ")+")")
			}
			compare(t, "signals", signals, c.signals)
		})
	}
}

func checkMember(t *testing.T, what, name string) {
	t.Helper()
	if !memberRE.MatchString(name) {
		t.Errorf("%s %q: not a CamelCase member name", what, name)
	}
}

func checkArg(t *testing.T, member string, a introspect.Arg) {
	t.Helper()
	if !argRE.MatchString(a.Name) {
		t.Errorf("%s: argument %q: want a lower_case name", member, a.Name)
	}
	checkSignature(t, member+"."+a.Name, a.Type)
}

func checkSignature(t *testing.T, what, sig string) {
	t.Helper()
	if _, err := dbus.ParseSignature(sig); err != nil {
		t.Errorf("%s: type %q: %v", what, sig, err)
		return
	}
	// (dbus.Signature.Single answers the opposite in godbus v5.2.4.)
	if n := completeType(sig); n != len(sig) {
		t.Errorf("%s: type %q is not a single complete type", what, sig)
	}
}

// completeType returns the length of the first complete type of a valid
// signature.
func completeType(sig string) int {
	switch sig[0] {
	case 'a':
		return 1 + completeType(sig[1:])
	case '(', '{':
		n := 1
		for sig[n] != ')' && sig[n] != '}' {
			n += completeType(sig[n:])
		}
		return n + 1
	}
	return 1
}

func compare(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %q\n want %q", what, got, want)
	}
}

// docItem is one documented element: its kind, name, doc comment, and the
// method or signal it belongs to (for arguments).
type docItem struct {
	kind, name, parent, comment string
}

// docComments walks a file and returns every interface, method, signal,
// property and argument with the doc comment right before it. It fails for
// an element without one, for a comment whose symbol is not the element's
// name, and for a doc comment that documents nothing.
func docComments(b []byte) ([]docItem, error) {
	d := encxml.NewDecoder(bytes.NewReader(b))
	var (
		items   []docItem
		pending *string // doc comment waiting for its element
		parent  string
	)
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		switch t := tok.(type) {
		case encxml.CharData:
			if len(bytes.TrimSpace(t)) != 0 {
				return nil, errors.New("unexpected text " + strings.TrimSpace(string(t)))
			}
		case encxml.Comment:
			if pending != nil {
				return nil, errors.New("two comments in a row: " + firstLine(*pending))
			}
			c := string(t)
			pending = &c
		case encxml.StartElement:
			var name string
			for _, a := range t.Attr {
				if a.Name.Local == "name" {
					name = a.Value
				}
			}
			kind := t.Name.Local
			switch kind {
			case "interface", "method", "signal", "property", "arg":
				if pending == nil {
					return nil, errors.New(kind + " " + name + ": no doc comment right before it")
				}
				switch sym := symbol(*pending); {
				case sym == "":
					return nil, errors.New(kind + " " + name + ": comment before it does not start with \"" + name + ":\"")
				case sym != name:
					return nil, errors.New(kind + " " + name + ": doc comment is for " + sym)
				}
				it := docItem{kind: kind, name: name, comment: *pending}
				if kind == "arg" {
					it.parent = parent
				}
				if kind == "method" || kind == "signal" {
					parent = name
				}
				items = append(items, it)
			default:
				if pending != nil {
					return nil, errors.New("doc comment before <" + kind + ">: " + firstLine(*pending))
				}
			}
			pending = nil
		case encxml.EndElement:
			if pending != nil {
				return nil, errors.New("doc comment documents nothing: " + firstLine(*pending))
			}
		}
	}
	return items, nil
}

// symbol is what gdbus-codegen takes a doc comment to document: the first
// non-blank line up to ": ", or the whole line if it ends in ":".
func symbol(comment string) string {
	line := firstLine(comment)
	if i := strings.Index(line, ": "); i >= 0 {
		return line[:i]
	}
	if s, ok := strings.CutSuffix(line, ":"); ok {
		return s
	}
	return ""
}

func firstLine(comment string) string {
	for line := range strings.Lines(comment) {
		if l := strings.TrimSpace(line); l != "" {
			return l
		}
	}
	return ""
}

// docText is a comment without its symbol and without @param lines.
func docText(comment string) string {
	_, rest, _ := strings.Cut(strings.TrimSpace(comment), ":")
	var out []string
	for line := range strings.Lines(rest) {
		if l := strings.TrimSpace(line); !strings.HasPrefix(l, "@") {
			out = append(out, l)
		}
	}
	return strings.Join(strings.Fields(strings.Join(out, " ")), " ")
}

func TestDocComments(t *testing.T) {
	documented := map[string]bool{}
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			b, _ := File(name)
			items, err := docComments(b)
			if err != nil {
				t.Fatal(err)
			}
			ifc := parse(t, name)
			want := 1 + len(ifc.Methods) + len(ifc.Signals) + len(ifc.Properties)
			for _, m := range ifc.Methods {
				want += len(m.Args)
			}
			for _, s := range ifc.Signals {
				want += len(s.Args)
			}
			if len(items) != want {
				t.Errorf("%d documented elements, want %d", len(items), want)
			}
			for _, it := range items {
				what := it.kind + " " + it.name
				text := docText(it.comment)
				if len(strings.Fields(text)) < 4 {
					t.Errorf("%s: doc comment too short: %q", what, text)
				}
				// gdbus-codegen copies the text into DocBook.
				if strings.ContainsAny(it.comment, "<&") {
					t.Errorf("%s: doc comment contains < or &", what)
				}
				if it.kind == "interface" && !strings.Contains(it.comment, "@short_description: ") {
					t.Errorf("%s: no @short_description", what)
				}
				if it.kind == "property" {
					if must, ok := enumDocs[name+"."+it.name]; ok && !strings.Contains(text, must) {
						t.Errorf("%s: an enumeration must say %q", what, must)
					}
				}
				for _, e := range errorNameRE.FindAllString(it.comment, -1) {
					if !slices.Contains(knownErrors, e) {
						t.Errorf("%s: documents unknown error %s", what, e)
					}
					documented[e] = true
				}
				if it.kind == "method" {
					checkMethodErrors(t, name, it)
				}
			}
		})
	}
	for _, e := range knownErrors {
		if !documented[e] {
			t.Errorf("error %s is documented nowhere", e)
		}
	}
}

func checkMethodErrors(t *testing.T, iface string, it docItem) {
	t.Helper()
	full := iface + "." + it.name
	if !errorsSectionRE.MatchString(it.comment) {
		t.Errorf("%s: no Errors: section", full)
	}
	want := slices.Clone(mustDocument[full])
	switch iface {
	case Prefix + ".Token":
		want = append(want, errTokenRemoved)
	case Prefix + ".Session":
		want = append(want, errTokenRemoved, errAccessDenied)
	}
	_, errs, _ := strings.Cut(it.comment, "Errors:")
	for _, e := range want {
		if !strings.Contains(errs, e+": ") {
			t.Errorf("%s: does not document %s in its Errors: section", full, e)
		}
	}
}

func TestInterface(t *testing.T) {
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			x, ok := Interface(name)
			if !ok {
				t.Fatal("not found")
			}
			short := strings.TrimPrefix(name, Prefix+".")
			if y, ok := Interface(short); !ok || y != x {
				t.Errorf("Interface(%q) differs from Interface(%q)", short, name)
			}
			if fb, ok := File(short); !ok || !bytes.Contains(fb, []byte(x)) {
				t.Errorf("File(%q) does not hold Interface(%q)", short, name)
			}
			if !strings.HasPrefix(x, `<interface name="`+name+`">`) || !strings.HasSuffix(x, "</interface>") {
				t.Errorf("not one interface element: %.60q ... %q", x, x[max(0, len(x)-20):])
			}
			var ifc introspect.Interface
			if err := encxml.Unmarshal([]byte(x), &ifc); err != nil {
				t.Fatal(err)
			}
			if ifc.Name != name || !slices.EqualFunc(ifc.Properties, parse(t, name).Properties, func(a, b introspect.Property) bool {
				return a.Name == b.Name && a.Type == b.Type
			}) {
				t.Errorf("Interface(%q) does not parse to the file's interface", name)
			}

			// What an Introspect reply built with godbus's pieces holds.
			reply := introspect.Introspectable(strings.TrimSpace(introspect.IntrospectDeclarationString) +
				"<node>" + introspect.IntrospectDataString + prop.IntrospectDataString + x + "</node>")
			s, derr := reply.Introspect()
			if derr != nil {
				t.Fatal(derr)
			}
			var n introspect.Node
			if err := encxml.Unmarshal([]byte(s), &n); err != nil {
				t.Fatalf("introspection reply does not parse: %v", err)
			}
			var names []string
			for _, i := range n.Interfaces {
				names = append(names, i.Name)
			}
			if want := []string{"org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties", name}; !slices.Equal(names, want) {
				t.Errorf("reply interfaces %q, want %q", names, want)
			}
		})
	}
}

func TestLoadRejects(t *testing.T) {
	const head = `<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
`
	for _, tc := range []struct{ desc, file, body string }{
		{"two interfaces", "a.b.xml", head + `<node><interface name="a.b"/><interface name="a.c"/></node>`},
		{"no interface", "a.b.xml", head + `<node/>`},
		{"misnamed", "a.b.xml", head + `<node><interface name="a.c"/></node>`},
		{"broken", "a.b.xml", head + `<node><interface name="a.b"></node>`},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			if _, err := load(fstest.MapFS{tc.file: {Data: []byte(tc.body)}}); err == nil {
				t.Error("loaded")
			}
		})
	}
	m, err := load(fstest.MapFS{"a.b.xml": {Data: []byte(head + "<node>\n  <!-- a.b: x -->\n  <interface name=\"a.b\"><method name=\"M\"/></interface>\n</node>\n")}})
	if err != nil {
		t.Fatal(err)
	}
	if got := m["a.b"].iface; got != `<interface name="a.b"><method name="M"/></interface>` {
		t.Errorf("element %q", got)
	}
}

// introspectDTD is the grammar of the D-Bus introspection format 1.0 (the
// D-Bus specification, "Introspection Data Format"). An XML catalog maps the
// files' DOCTYPE public id to it, so xmllint validates without the network.
const introspectDTD = `<!ELEMENT node (node|interface)*>
<!ATTLIST node name CDATA #IMPLIED>
<!ELEMENT interface (method|signal|property|annotation)*>
<!ATTLIST interface name CDATA #REQUIRED>
<!ELEMENT method (arg|annotation)*>
<!ATTLIST method name CDATA #REQUIRED>
<!ELEMENT signal (arg|annotation)*>
<!ATTLIST signal name CDATA #REQUIRED>
<!ELEMENT arg (annotation)*>
<!ATTLIST arg
	name CDATA #IMPLIED
	type CDATA #REQUIRED
	direction (in|out) #IMPLIED>
<!ELEMENT property (annotation)*>
<!ATTLIST property
	name CDATA #REQUIRED
	type CDATA #REQUIRED
	access (read|write|readwrite) #REQUIRED>
<!ELEMENT annotation EMPTY>
<!ATTLIST annotation
	name CDATA #REQUIRED
	value CDATA #REQUIRED>
`

func TestXmllint(t *testing.T) {
	xmllint, err := exec.LookPath("xmllint")
	if err != nil {
		t.Skip("xmllint not installed (Debian: apt-get install libxml2-utils); skipping validation")
	}
	dir := t.TempDir()
	dtd := filepath.Join(dir, "introspect.dtd")
	catalog := filepath.Join(dir, "catalog.xml")
	if err := os.WriteFile(dtd, []byte(introspectDTD), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(catalog, []byte(`<?xml version="1.0"?>
<catalog xmlns="urn:oasis:names:tc:entity:xmlns:xml:catalog">
  <public publicId="-//freedesktop//DTD D-BUS Object Introspection 1.0//EN" uri="file://`+dtd+`"/>
</catalog>
`), 0o644); err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, n := range Names() {
		paths = append(paths, n+".xml")
	}
	run := func(args ...string) ([]byte, error) {
		cmd := exec.Command(xmllint, append([]string{"--noout", "--nonet"}, args...)...)
		cmd.Env = append(os.Environ(), "XML_CATALOG_FILES="+catalog)
		return cmd.CombinedOutput()
	}
	// Well-formed, and valid against the DTD its DOCTYPE names.
	if out, err := run(append([]string{"--valid"}, paths...)...); err != nil || len(out) != 0 {
		t.Errorf("xmllint --valid: %v\n%s", err, out)
	}
	// The check bites: a property with a bad access value is invalid.
	b, _ := File("Slot")
	bad := filepath.Join(dir, "bad.xml")
	if err := os.WriteFile(bad, bytes.Replace(b, []byte(`access="read"`), []byte(`access="r"`), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run("--valid", bad); err == nil {
		t.Errorf("xmllint accepted an invalid file:\n%s", out)
	}
}
