package dbusapi

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"

	godbus "github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"

	ifxml "github.com/slotwatch/slotwatch/xml"
)

// objects is the exported object tree: it exports and unexports objects on
// the connection, keeps their property values, and is the ObjectManager at
// the root (GetManagedObjects, InterfacesAdded, InterfacesRemoved). godbus
// has no ObjectManager; this one is small and locked.
//
// The service's event goroutine adds and removes tokens, readers, slots
// and modules; method calls add and remove sessions; D-Bus calls read the
// tree (GetManagedObjects, Introspect) concurrently.
type objects struct {
	conn *godbus.Conn

	// exportMu serializes Export calls: godbus reads its object map
	// without a lock while exporting.
	exportMu sync.Mutex

	mu     sync.RWMutex // guards byPath
	byPath map[godbus.ObjectPath]*object
}

// object is one exported path: its interfaces with their properties and
// method handlers.
type object struct {
	path  godbus.ObjectPath
	props *prop.Properties
	// values mirrors the property values, to tell real changes apart and to
	// answer GetManagedObjects without reflection on prop's pointers.
	values map[string]map[string]any
	ifaces []string // interface names in export order
}

// iface describes one interface of an object being added.
type iface struct {
	name    string
	methods any            // exported with godbus (nil: properties only)
	props   map[string]any // name → value
	// constant lists properties that never change for this object.
	constant []string
}

func newObjects(conn *godbus.Conn) *objects {
	return &objects{conn: conn, byPath: map[godbus.ObjectPath]*object{}}
}

// add exports an object and announces it with InterfacesAdded.
//
// Every interface is exported for the object's subtree too (godbus's
// ExportSubtree): a call to a path below the object then reaches these
// handlers, which answer UnknownObject because the path is not theirs
// (checkCall, propsGuard). Without it godbus would answer UnknownInterface
// for paths that do not exist.
func (o *objects) add(path godbus.ObjectPath, ifaces ...iface) error {
	obj := &object{path: path, values: map[string]map[string]any{}}
	pm := prop.Map{}
	for _, ifc := range ifaces {
		obj.ifaces = append(obj.ifaces, ifc.name)
		vals := map[string]any{}
		props := map[string]*prop.Prop{}
		for name, v := range ifc.props {
			// objects.set emits PropertiesChanged itself, one signal for
			// every property of an interface that changed together.
			props[name] = &prop.Prop{Value: v, Emit: prop.EmitFalse}
			vals[name] = v
		}
		pm[ifc.name] = props
		obj.values[ifc.name] = vals
	}
	o.exportMu.Lock()
	err := func() error {
		for _, ifc := range ifaces {
			if ifc.methods != nil {
				if err := o.conn.ExportSubtree(ifc.methods, path, ifc.name); err != nil {
					return err
				}
			}
		}
		p, err := prop.Export(o.conn, path, pm)
		if err != nil {
			return err
		}
		obj.props = p
		if err := o.conn.ExportSubtree(propsGuard{path: path, p: p}, path, propertiesInterface); err != nil {
			return err
		}
		return o.conn.ExportSubtree(introspector{o}, path, introspectInterface)
	}()
	o.exportMu.Unlock()
	if err != nil {
		return err
	}
	o.mu.Lock()
	o.byPath[path] = obj
	o.mu.Unlock()
	return o.conn.Emit(RootPath, objectManagerInterface+".InterfacesAdded", path, obj.managed())
}

// remove unexports an object and announces it with InterfacesRemoved.
func (o *objects) remove(path godbus.ObjectPath) {
	o.mu.Lock()
	obj, ok := o.byPath[path]
	delete(o.byPath, path)
	o.mu.Unlock()
	if !ok {
		return
	}
	o.exportMu.Lock()
	for _, name := range obj.ifaces {
		o.conn.Export(nil, path, name)
	}
	o.conn.Export(nil, path, propertiesInterface)
	o.conn.Export(nil, path, introspectInterface)
	o.exportMu.Unlock()
	o.conn.Emit(RootPath, objectManagerInterface+".InterfacesRemoved", path, obj.ifaces)
}

// export exports one handler for a path's subtree, serialized with add and
// remove.
func (o *objects) export(v any, path godbus.ObjectPath, iface string) error {
	o.exportMu.Lock()
	defer o.exportMu.Unlock()
	return o.conn.ExportSubtree(v, path, iface)
}

// propsGuard is org.freedesktop.DBus.Properties of one object: godbus's
// prop package keeps the values and emits PropertiesChanged; this answers
// with the contract's errors, as GDBus does: every property is read-only,
// and an unknown interface or property is InvalidArgs.
type propsGuard struct {
	path godbus.ObjectPath
	p    *prop.Properties
}

func (g propsGuard) check(msg godbus.Message, sig string) *godbus.Error {
	if got := msgPath(msg); got != g.path {
		return unknownObject(got)
	}
	got := ""
	if v, ok := msg.Headers[godbus.FieldSignature]; ok {
		if s, ok := v.Value().(godbus.Signature); ok {
			got = s.String()
		}
	}
	if got != sig {
		return godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("takes (%s), got (%s)", sig, got)})
	}
	return nil
}

func (g propsGuard) Get(msg godbus.Message, iface, name string) (godbus.Variant, *godbus.Error) {
	if err := g.check(msg, "ss"); err != nil {
		return godbus.Variant{}, err
	}
	v, err := g.p.Get(iface, name)
	if err != nil {
		return godbus.Variant{}, godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no property %s.%s on %s", iface, name, g.path)})
	}
	return v, nil
}

func (g propsGuard) GetAll(msg godbus.Message, iface string) (map[string]godbus.Variant, *godbus.Error) {
	if err := g.check(msg, "s"); err != nil {
		return nil, err
	}
	v, err := g.p.GetAll(iface)
	if err != nil {
		return nil, godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no interface %s on %s", iface, g.path)})
	}
	return v, nil
}

func (g propsGuard) Set(msg godbus.Message, iface, name string, _ godbus.Variant) *godbus.Error {
	if err := g.check(msg, "ssv"); err != nil {
		return err
	}
	if _, err := g.p.Get(iface, name); err != nil {
		return godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("no property %s.%s on %s", iface, name, g.path)})
	}
	return godbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf("property %s.%s is read-only", iface, name)})
}

// set changes properties of one interface of an object and announces the
// ones that really changed in one PropertiesChanged signal, so a
// subscriber sees a reader's state and event count change together.
func (o *objects) set(path godbus.ObjectPath, ifaceName string, values map[string]any) {
	o.mu.Lock()
	obj, ok := o.byPath[path]
	if !ok {
		o.mu.Unlock()
		return
	}
	changed := map[string]godbus.Variant{}
	for name, v := range values {
		if old, ok := obj.values[ifaceName][name]; !ok || reflect.DeepEqual(old, v) {
			continue
		}
		obj.values[ifaceName][name] = v
		changed[name] = godbus.MakeVariant(v)
	}
	o.mu.Unlock()
	if len(changed) == 0 {
		return
	}
	for name, v := range changed {
		obj.props.SetMust(ifaceName, name, v.Value())
	}
	o.conn.Emit(path, propertiesInterface+".PropertiesChanged", ifaceName, changed, []string{})
}

func (o *objects) has(path godbus.ObjectPath) bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	_, ok := o.byPath[path]
	return ok
}

// managed is the a{sa{sv}} of an object for GetManagedObjects and
// InterfacesAdded.
func (obj *object) managed() map[string]map[string]godbus.Variant {
	out := map[string]map[string]godbus.Variant{}
	for _, name := range obj.ifaces {
		vals := map[string]godbus.Variant{}
		for k, v := range obj.values[name] {
			vals[k] = godbus.MakeVariant(v)
		}
		out[name] = vals
	}
	return out
}

// objectManager is org.freedesktop.DBus.ObjectManager at the root.
type objectManager struct{ o *objects }

// GetManagedObjects returns every object below the root in one round trip.
func (m objectManager) GetManagedObjects(msg godbus.Message) (map[godbus.ObjectPath]map[string]map[string]godbus.Variant, *godbus.Error) {
	if got := msgPath(msg); got != RootPath {
		return nil, unknownObject(got)
	}
	m.o.mu.RLock()
	defer m.o.mu.RUnlock()
	out := map[godbus.ObjectPath]map[string]map[string]godbus.Variant{}
	for path, obj := range m.o.byPath {
		if path == RootPath {
			continue // the ObjectManager's own object is not one it manages
		}
		out[path] = obj.managed()
	}
	return out, nil
}

// introspector answers Introspect for every path of the tree: the
// object's interfaces (from xml/, the documented contract) and its
// children.
type introspector struct{ o *objects }

func (in introspector) Introspect(msg godbus.Message) (string, *godbus.Error) {
	path, _ := msg.Headers[godbus.FieldPath].Value().(godbus.ObjectPath)
	return in.o.introspect(path), nil
}

const introspectHeader = `<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
`

// standardInterfaces is the introspection of the interfaces every object
// has.
const standardInterfaces = `<interface name="org.freedesktop.DBus.Introspectable">
<method name="Introspect"><arg name="xml_data" type="s" direction="out"/></method>
</interface>
<interface name="org.freedesktop.DBus.Peer">
<method name="Ping"/>
<method name="GetMachineId"><arg name="machine_uuid" type="s" direction="out"/></method>
</interface>
<interface name="org.freedesktop.DBus.Properties">
<method name="Get"><arg name="interface_name" type="s" direction="in"/><arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="out"/></method>
<method name="GetAll"><arg name="interface_name" type="s" direction="in"/><arg name="properties" type="a{sv}" direction="out"/></method>
<method name="Set"><arg name="interface_name" type="s" direction="in"/><arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="in"/></method>
<signal name="PropertiesChanged"><arg name="interface_name" type="s"/><arg name="changed_properties" type="a{sv}"/><arg name="invalidated_properties" type="as"/></signal>
</interface>
`

const objectManagerIntrospection = `<interface name="org.freedesktop.DBus.ObjectManager">
<method name="GetManagedObjects"><arg name="objects" type="a{oa{sa{sv}}}" direction="out"/></method>
<signal name="InterfacesAdded"><arg name="object" type="o"/><arg name="interfaces" type="a{sa{sv}}"/></signal>
<signal name="InterfacesRemoved"><arg name="object" type="o"/><arg name="interfaces" type="as"/></signal>
</interface>
`

func (o *objects) introspect(path godbus.ObjectPath) string {
	o.mu.RLock()
	defer o.mu.RUnlock()
	var b strings.Builder
	b.WriteString(introspectHeader)
	b.WriteString("<node>\n")
	if obj, ok := o.byPath[path]; ok {
		b.WriteString(standardInterfaces)
		if path == RootPath {
			b.WriteString(objectManagerIntrospection)
		}
		for _, name := range obj.ifaces {
			if x, ok := ifxml.Interface(name); ok {
				b.WriteString(x)
				b.WriteString("\n")
			}
		}
	}
	prefix := string(path) + "/"
	if path == "/" {
		prefix = "/"
	}
	children := map[string]bool{}
	for p := range o.byPath {
		if rest, ok := strings.CutPrefix(string(p), prefix); ok {
			child, _, _ := strings.Cut(rest, "/")
			children[child] = true
		}
	}
	for _, c := range slices.Sorted(maps.Keys(children)) {
		fmt.Fprintf(&b, "<node name=%q/>\n", c)
	}
	b.WriteString("</node>\n")
	return b.String()
}
