package dbusapi

import (
	"encoding/xml"

	godbus "github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	ifxml "github.com/slotwatch/slotwatch/xml"
)

// inSignatures maps interface → method → the D-Bus signature of its input
// arguments, as xml/ (the contract, and GNOME's interfaces) documents them.
var inSignatures = func() map[string]map[string]string {
	out := map[string]map[string]string{}
	for _, name := range append(ifxml.Names(), ifxml.GnomeNames()...) {
		x, _ := ifxml.Interface(name)
		var in introspect.Interface
		if err := xml.Unmarshal([]byte(x), &in); err != nil {
			panic("xml/" + name + ": " + err.Error())
		}
		methods := map[string]string{}
		for _, m := range in.Methods {
			sig := ""
			for _, a := range m.Args {
				if a.Direction != "out" {
					sig += a.Type
				}
			}
			methods[m.Name] = sig
		}
		out[name] = methods
	}
	return out
}()

// checkCall validates a call's argument signature against the contract and
// returns the caller's unique name. godbus on its own converts what it can
// (int32 to uint32, a string to ay, a variant to its value); a client that
// sends the wrong types gets InvalidArgs instead of a call made with a
// guess.
//
// Every object's interfaces are exported for its subtree too (see
// objects.add), so a call to a path below an object, or to a path nobody
// exports, reaches a handler; checking the path here makes those
// UnknownObject, as the D-Bus specification wants.
func checkCall(msg godbus.Message, path godbus.ObjectPath, iface, method string) (sender string, err error) {
	if got := msgPath(msg); got != path {
		return "", &apiError{"org.freedesktop.DBus.Error.UnknownObject", "no object at " + string(got)}
	}
	want := inSignatures[iface][method]
	got := ""
	if v, ok := msg.Headers[godbus.FieldSignature]; ok {
		if s, ok := v.Value().(godbus.Signature); ok {
			got = s.String()
		}
	}
	if got != want {
		return "", invalidArgs("%s.%s takes (%s), got (%s)", iface, method, want, got)
	}
	sender, _ = msg.Headers[godbus.FieldSender].Value().(string)
	return sender, nil
}

// msgPath is the object path a call was sent to.
func msgPath(msg godbus.Message) godbus.ObjectPath {
	p, _ := msg.Headers[godbus.FieldPath].Value().(godbus.ObjectPath)
	return p
}

func unknownObject(p godbus.ObjectPath) *godbus.Error {
	return godbus.NewError("org.freedesktop.DBus.Error.UnknownObject", []any{"no object at " + string(p)})
}
