package dbusapi

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"

	godbus "github.com/godbus/dbus/v5"

	ifxml "github.com/slotwatch/slotwatch/xml"
)

// objects is the object tree: every object's interfaces, method handlers
// and property values, and the ObjectManager at the root
// (GetManagedObjects, InterfacesAdded, InterfacesRemoved). godbus has no
// ObjectManager; this one is small and locked.
//
// godbus never sees the objects one by one: the service exports one
// handler per interface for the whole subtree of the root (dispatch.go),
// which looks the called path up here. Adding or removing an object is
// therefore one map operation, and a call racing a removal finds either
// the live object or its tombstone, never a half-removed export.
//
// The service's event goroutine adds and removes tokens, readers, slots
// and modules; method calls add and remove sessions; D-Bus calls read the
// tree concurrently.
type objects struct {
	out  *emitter
	root godbus.ObjectPath // where the ObjectManager is; objects are below it

	// mu guards byPath and every object's values. A change queues its
	// signal while it holds mu, so InterfacesAdded, PropertiesChanged and
	// InterfacesRemoved leave in the order the changes were made.
	mu     sync.RWMutex
	byPath map[godbus.ObjectPath]*object
}

// object is one path: its interfaces with their properties and method
// handlers.
type object struct {
	path     godbus.ObjectPath
	ifaces   []string                  // interface names, in order
	handlers map[string]any            // interface → methods (none for properties-only ones)
	values   map[string]map[string]any // interface → property → value
}

// iface describes one interface of an object being added.
type iface struct {
	name    string
	methods any            // the interface's method handler (nil: properties only)
	props   map[string]any // name → value (which never change is documented in xml/)
}

func newObjects(out *emitter, root godbus.ObjectPath) *objects {
	return &objects{out: out, root: root, byPath: map[godbus.ObjectPath]*object{}}
}

// add puts an object on the bus and announces it with InterfacesAdded.
// (Signals are queued to the emitter, which sends them in order from its
// own goroutine: no change waits for the bus.)
func (o *objects) add(path godbus.ObjectPath, ifaces ...iface) error {
	obj := &object{path: path, handlers: map[string]any{}, values: map[string]map[string]any{}}
	for _, ifc := range ifaces {
		obj.ifaces = append(obj.ifaces, ifc.name)
		if ifc.methods != nil {
			obj.handlers[ifc.name] = ifc.methods
		}
		vals := map[string]any{}
		for name, v := range ifc.props {
			vals[name] = v
		}
		obj.values[ifc.name] = vals
	}
	o.mu.Lock()
	if _, dup := o.byPath[path]; dup {
		o.mu.Unlock()
		return fmt.Errorf("object %s exists already", path)
	}
	o.byPath[path] = obj
	o.out.emit(o.root, objectManagerInterface+".InterfacesAdded", path, obj.managedLocked())
	o.mu.Unlock()
	return nil
}

// remove takes an object off the bus and announces it with
// InterfacesRemoved.
func (o *objects) remove(path godbus.ObjectPath) {
	o.mu.Lock()
	defer o.mu.Unlock()
	obj, ok := o.byPath[path]
	delete(o.byPath, path)
	if ok {
		o.out.emit(o.root, objectManagerInterface+".InterfacesRemoved", path, obj.ifaces)
	}
}

// handler returns the method handler of interface name at path.
func (o *objects) handler(path godbus.ObjectPath, name string) (any, bool) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	obj, ok := o.byPath[path]
	if !ok {
		return nil, false
	}
	h, ok := obj.handlers[name]
	return h, ok
}

// get returns a copy of the property values of interface name at path;
// exists says whether there is an object at path at all.
func (o *objects) get(path godbus.ObjectPath, name string) (vals map[string]godbus.Variant, exists, ok bool) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	obj, exists := o.byPath[path]
	if !exists {
		return nil, false, false
	}
	props, ok := obj.values[name]
	if !ok {
		return nil, true, false
	}
	vals = map[string]godbus.Variant{}
	for k, v := range props {
		vals[k] = godbus.MakeVariant(v)
	}
	return vals, true, true
}

// getOne returns one property value: exists says whether there is an
// object at path, ok whether it has the interface, found whether the
// interface has the property. (Property Get is the hottest call: no copy
// of the interface's other values.)
func (o *objects) getOne(path godbus.ObjectPath, iface, name string) (v godbus.Variant, exists, ok, found bool) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	obj, exists := o.byPath[path]
	if !exists {
		return v, false, false, false
	}
	props, ok := obj.values[iface]
	if !ok {
		return v, true, false, false
	}
	val, found := props[name]
	if !found {
		return v, true, true, false
	}
	return godbus.MakeVariant(val), true, true, true
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
	if len(changed) > 0 {
		o.out.emit(path, propertiesInterface+".PropertiesChanged", ifaceName, changed, []string{})
	}
	o.mu.Unlock()
}

func (o *objects) has(path godbus.ObjectPath) bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	_, ok := o.byPath[path]
	return ok
}

// managedLocked is the a{sa{sv}} of an object for GetManagedObjects and
// InterfacesAdded; objects.mu must be held.
func (obj *object) managedLocked() map[string]map[string]godbus.Variant {
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
	if got := msgPath(msg); got != m.o.root {
		return nil, unknownObject(got)
	}
	m.o.mu.RLock()
	defer m.o.mu.RUnlock()
	out := map[godbus.ObjectPath]map[string]map[string]godbus.Variant{}
	for path, obj := range m.o.byPath {
		if path == m.o.root {
			continue // the ObjectManager's own object is not one it manages
		}
		out[path] = obj.managedLocked()
	}
	return out, nil
}

// introspector answers Introspect for every path of the trees (the
// native one, and GNOME's with --gnome-compat): the interfaces of the
// object at the path (from xml/, the documented contract), and the
// children from every tree, so that "/" leads to both.
type introspector struct{ trees []*objects }

func (in introspector) Introspect(msg godbus.Message) (string, *godbus.Error) {
	path, _ := msg.Headers[godbus.FieldPath].Value().(godbus.ObjectPath)
	var b strings.Builder
	b.WriteString(introspectHeader)
	b.WriteString("<node>\n")
	children := map[string]bool{}
	for _, o := range in.trees {
		o.introspect(path, &b, children)
	}
	for _, c := range slices.Sorted(maps.Keys(children)) {
		fmt.Fprintf(&b, "<node name=%q/>\n", c)
	}
	b.WriteString("</node>\n")
	return b.String(), nil
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
<method name="GetManagedObjects"><arg name="object_paths_interfaces_and_properties" type="a{oa{sa{sv}}}" direction="out"/></method>
<signal name="InterfacesAdded"><arg name="object_path" type="o"/><arg name="interfaces_and_properties" type="a{sa{sv}}"/></signal>
<signal name="InterfacesRemoved"><arg name="object_path" type="o"/><arg name="interfaces" type="as"/></signal>
</interface>
`

// introspect writes the interfaces of the object at path, if this tree
// has one, and adds the names of its children in this tree to children.
func (o *objects) introspect(path godbus.ObjectPath, b *strings.Builder, children map[string]bool) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if obj, ok := o.byPath[path]; ok {
		b.WriteString(standardInterfaces)
		if path == o.root {
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
	for p := range o.byPath {
		if rest, ok := strings.CutPrefix(string(p), prefix); ok {
			child, _, _ := strings.Cut(rest, "/")
			children[child] = true
		}
	}
}
