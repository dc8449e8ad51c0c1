// Package dbusapi is slotwatch on the bus: it owns the D-Bus objects of
// DESIGN.md's contract — the Manager, Module, Reader, Slot, Token and
// Session interfaces — the ObjectManager at the root, properties with
// PropertiesChanged, the TokenInserted/TokenRemoved signals, the brokered
// PKCS#11 sessions and who owns them (caller tracking, login ownership),
// the tombstones of removed generations, the one table that maps every
// internal error to a D-Bus error name, and the GNOME-compatible objects.
//
// It reads monitor snapshots and events only, and applies them in order
// from one goroutine (service.go). Method calls hold their token's
// generation (monitor.Acquire) for the duration of each call into module/.
// The files:
//
//   - service.go: Start/Close, following the monitor, the Manager;
//   - objects.go: the object tree, ObjectManager, introspection;
//   - dispatch.go: the one handler per interface godbus calls, tombstones;
//   - sessions.go: Token and Session methods, the session and login tables;
//   - args.go, errors.go: argument checks against xml/, error mapping;
//   - callers.go: who is calling, and when a caller leaves the bus;
//   - gnome.go: with --gnome-compat, the same view as
//     gnome-settings-daemon's smartcard service
//     (org.gnome.SettingsDaemon.Smartcard), its own object tree fed by the
//     same events, and the bus name's ownership.
package dbusapi
