// Package xml holds slotwatch's D-Bus contract: the introspection XML of
// its six interfaces (Manager, Module, Reader, Slot, Token and Session
// under Prefix), one documented file per interface, embedded into the
// binary. The same files are installed to /usr/share/dbus-1/interfaces/.
// gnome/ holds the three interfaces of gnome-settings-daemon's smartcard
// service (GnomePrefix), which "slotwatch serve --gnome-compat" also
// serves; GnomeNames lists them.
//
// Interface returns one interface's <interface> element, to be placed
// inside the <node> of an Introspect reply; File returns a whole file.
// Both take the full interface name, for example
// "io.github.slotwatch.Slotwatch1.Token", or the part after Prefix and a
// dot ("Token").
//
// The documentation is written as comments the gdbus-codegen way: a
// comment starting "Name:" right before every interface, method, signal,
// property and argument. Interface keeps the comments; they are valid
// introspection data.
package xml

import (
	"bytes"
	"embed"
	encxml "encoding/xml"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"slices"
)

// Prefix is the common prefix of slotwatch's interface names and its
// well-known bus name.
const Prefix = "io.github.slotwatch.Slotwatch1"

//go:embed *.xml
var files embed.FS

// gnomeFiles are the interfaces of gnome-settings-daemon's smartcard
// plugin (org.gnome.SettingsDaemon.Smartcard.*), which slotwatch serves
// with --gnome-compat. They are GNOME's contract, not slotwatch's: they
// are served, not installed.
//
//go:embed gnome/*.xml
var gnomeFiles embed.FS

// GnomePrefix is the common prefix of the GNOME interfaces in gnome/ and
// the bus name slotwatch owns with --gnome-compat.
const GnomePrefix = "org.gnome.SettingsDaemon.Smartcard"

// doc is one embedded file.
type doc struct {
	file  string // the whole file
	iface string // its <interface>…</interface> element, verbatim
}

// docs maps full interface names to their files. The files are part of the
// binary and checked by the tests, so a broken one is a programming error.
var docs = mustLoad(files)

// gnomeDocs maps the full names of the GNOME interfaces to their files.
var gnomeDocs = func() map[string]doc {
	sub, err := fs.Sub(gnomeFiles, "gnome")
	if err != nil {
		panic("slotwatch/xml: " + err.Error())
	}
	return mustLoad(sub)
}()

func mustLoad(fsys fs.FS) map[string]doc {
	m, err := load(fsys)
	if err != nil {
		panic("slotwatch/xml: " + err.Error())
	}
	return m
}

// load reads every *.xml file of fsys. Each must hold exactly one
// interface, named like the file.
func load(fsys fs.FS) (map[string]doc, error) {
	names, err := fs.Glob(fsys, "*.xml")
	if err != nil {
		return nil, err
	}
	m := make(map[string]doc, len(names))
	for _, fn := range names {
		b, err := fs.ReadFile(fsys, fn)
		if err != nil {
			return nil, err
		}
		name, elem, err := interfaceElement(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", fn, err)
		}
		if name+".xml" != fn {
			return nil, fmt.Errorf("%s: holds interface %q", fn, name)
		}
		m[name] = doc{file: string(b), iface: elem}
	}
	return m, nil
}

// interfaceElement returns the name and the verbatim text of the one
// <interface> element of an introspection document.
func interfaceElement(b []byte) (name, elem string, err error) {
	d := encxml.NewDecoder(bytes.NewReader(b))
	start, count := int64(-1), 0
	for {
		off := d.InputOffset()
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return "", "", err
		}
		switch t := tok.(type) {
		case encxml.StartElement:
			if t.Name.Local != "interface" {
				continue
			}
			count++
			start = off
			for _, a := range t.Attr {
				if a.Name.Local == "name" {
					name = a.Value
				}
			}
		case encxml.EndElement:
			if t.Name.Local == "interface" && start >= 0 {
				elem = string(b[start:d.InputOffset()])
				start = -1
			}
		}
	}
	switch {
	case count != 1:
		return "", "", fmt.Errorf("%d interface elements, want 1", count)
	case name == "":
		return "", "", errors.New("interface without a name")
	}
	return name, elem, nil
}

func lookup(name string) (doc, bool) {
	if d, ok := docs[name]; ok {
		return d, true
	}
	if d, ok := docs[Prefix+"."+name]; ok {
		return d, true
	}
	d, ok := gnomeDocs[name]
	return d, ok
}

// Interface returns the <interface name="…">…</interface> element of the
// named interface (one of slotwatch's, or one of GNOME's in gnome/), documentation comments included, as it appears in its
// file: what an Introspect reply puts inside its <node> for an object that
// implements the interface. It reports false for an unknown name.
func Interface(name string) (string, bool) {
	d, ok := lookup(name)
	return d.iface, ok
}

// File returns the whole introspection document of the named interface
// (a fresh copy), as installed to /usr/share/dbus-1/interfaces/NAME.xml.
// It reports false for an unknown name.
func File(name string) ([]byte, bool) {
	d, ok := lookup(name)
	if !ok {
		return nil, false
	}
	return []byte(d.file), true
}

// Names returns the full names of all of slotwatch's interfaces, sorted.
func Names() []string {
	return slices.Sorted(maps.Keys(docs))
}

// GnomeNames returns the full names of the GNOME interfaces slotwatch
// serves with --gnome-compat, sorted.
func GnomeNames() []string {
	return slices.Sorted(maps.Keys(gnomeDocs))
}
