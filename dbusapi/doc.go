// Package dbusapi is slotwatch on the bus: a thin face over the monitor's
// view and the broker's sessions. It owns the D-Bus objects of DESIGN.md's
// contract — the Manager, Module, Reader, Slot, Token and Session
// interfaces — the ObjectManager at the root, properties with
// PropertiesChanged, the TokenInserted/TokenRemoved signals, the tombstones
// of removed generations, who a bus caller is (its identity, decided once
// at this boundary, and when it leaves), the one table that maps every
// internal error to a D-Bus error name, and the GNOME-compatible objects.
//
// Everything about sessions and logins — who owns what, which calls may
// run together, limits — belongs to package broker; this package turns
// D-Bus calls into broker calls and the broker's session changes into
// objects. It applies the monitor's events in order from one goroutine
// (service.go) and never calls a PKCS#11 module itself.
//
// One file per part:
//
//   - service.go: Start/Close, following the monitor;
//   - manager.go: the Manager interface (properties, Reload);
//   - views.go: module, reader, slot and token objects from the view;
//   - token.go, session.go: the Token and Session methods, and the
//     session objects (the broker's observer);
//   - template.go: FindObjects templates and results;
//   - callers.go: who is calling, and when a caller leaves the bus;
//   - objects.go: the object tree, ObjectManager, introspection;
//   - dispatch.go: the one handler per interface godbus calls, tombstones;
//   - args.go, errors.go: argument checks against xml/, error mapping;
//   - names.go, busnames.go: paths and bus names;
//   - gnome.go, gnome_manager.go: with --gnome-compat, the same view as
//     gnome-settings-daemon's smartcard service
//     (org.gnome.SettingsDaemon.Smartcard), its own object tree fed by the
//     same events.
package dbusapi
