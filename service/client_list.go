package main

import (
	"cmp"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	godbus "github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/slotwatch/slotwatch/dbusapi"
)

// listing is the daemon's whole view as `slotwatch list` shows it. The JSON
// keys are part of the command's interface: add, never rename.
type listing struct {
	Manager  managerInfo   `json:"manager"`
	Modules  []moduleInfo  `json:"modules"`
	Readers  []readerInfo  `json:"readers"`
	Slots    []slotInfo    `json:"slots"`
	Tokens   []tokenInfo   `json:"tokens"`
	Sessions []sessionInfo `json:"sessions"`
}

type managerInfo struct {
	Version           string `json:"version"`
	InstanceID        string `json:"instance_id"`
	State             string `json:"state"`
	StateCode         uint32 `json:"state_code"`
	StateReason       string `json:"state_reason"`
	LastGeneration    uint64 `json:"last_generation"`
	LoginTokenPresent bool   `json:"login_token_present"`
}

type moduleInfo struct {
	Path           string `json:"path"`
	Name           string `json:"name"`
	Library        string `json:"library"`
	Description    string `json:"description"`
	Manufacturer   string `json:"manufacturer"`
	LibraryVersion string `json:"library_version"`
	WaitMode       string `json:"wait_mode"`
	WaitModeCode   uint32 `json:"wait_mode_code"`
	State          string `json:"state"`
	StateCode      uint32 `json:"state_code"`
	Released       bool   `json:"released"` // finalized while idle (idle release)
}

type readerInfo struct {
	Path       string `json:"path"`
	Name       string `json:"name"`
	State      string `json:"state"`
	StateCode  uint32 `json:"state_code"`
	EventCount uint32 `json:"event_count"`
	ATR        string `json:"atr"` // hex, "" without a card
}

type slotInfo struct {
	Path        string `json:"path"`
	Module      string `json:"module"` // module name
	SlotID      uint64 `json:"slot_id"`
	Description string `json:"description"`
	Reader      string `json:"reader"` // reader name, "" if the slot has none
	Removable   bool   `json:"removable"`
	Token       string `json:"token"` // token path, "" if empty
}

type tokenInfo struct {
	Path         string `json:"path"`
	Generation   uint64 `json:"generation"`
	Label        string `json:"label"`
	Serial       string `json:"serial"`
	Manufacturer string `json:"manufacturer"`
	Model        string `json:"model"`
	Flags        uint32 `json:"flags"`
	UsedForLogin bool   `json:"used_for_login"`
	Slot         string `json:"slot"` // slot path
	Module       string `json:"module"`
	SlotID       uint64 `json:"slot_id"`
	Reader       string `json:"reader"` // reader name, "" if none
}

type sessionInfo struct {
	Path       string `json:"path"`
	Token      string `json:"token"` // token path
	TokenLabel string `json:"token_label"`
	Generation uint64 `json:"generation"`
	Owner      string `json:"owner"`
	OwnerPid   uint32 `json:"owner_pid"`
	Command    string `json:"command"` // from /proc/PID/cmdline, "" if unknown
	ReadWrite  bool   `json:"read_write"`
	State      string `json:"state"`
	StateCode  uint32 `json:"state_code"`
}

// buildListing turns GetManagedObjects and the Manager's properties into a
// listing, sorted (modules, readers by name; slots by module and id;
// tokens by generation; sessions by number). cmdline looks up a pid's
// command line (nil: none).
func buildListing(objs managedObjects, mgr map[string]godbus.Variant, cmdline func(uint32) string) *listing {
	l := &listing{
		Manager: managerInfo{
			Version:           propString(mgr, "Version"),
			InstanceID:        propString(mgr, "InstanceId"),
			StateCode:         propUint32(mgr, "State"),
			State:             managerStateName(propUint32(mgr, "State")),
			StateReason:       propString(mgr, "StateReason"),
			LastGeneration:    propUint64(mgr, "LastGeneration"),
			LoginTokenPresent: propBool(mgr, "LoginTokenPresent"),
		},
		Modules: []moduleInfo{}, Readers: []readerInfo{}, Slots: []slotInfo{}, Tokens: []tokenInfo{}, Sessions: []sessionInfo{},
	}
	for path, ifaces := range objs {
		if p, ok := ifaces[dbusapi.ModuleInterface]; ok {
			l.Modules = append(l.Modules, moduleFrom(path, p))
		}
		if p, ok := ifaces[dbusapi.ReaderInterface]; ok {
			l.Readers = append(l.Readers, readerFrom(path, p))
		}
		if p, ok := ifaces[dbusapi.SlotInterface]; ok {
			l.Slots = append(l.Slots, slotFrom(objs, path, p))
		}
		if p, ok := ifaces[dbusapi.TokenInterface]; ok {
			l.Tokens = append(l.Tokens, tokenFrom(objs, path, p))
		}
		if p, ok := ifaces[dbusapi.SessionInterface]; ok {
			l.Sessions = append(l.Sessions, sessionFrom(objs, path, p, cmdline))
		}
	}
	slices.SortFunc(l.Modules, func(a, b moduleInfo) int { return cmp.Compare(a.Name, b.Name) })
	slices.SortFunc(l.Readers, func(a, b readerInfo) int { return cmp.Compare(a.Name, b.Name) })
	slices.SortFunc(l.Slots, func(a, b slotInfo) int {
		return cmp.Or(cmp.Compare(a.Module, b.Module), cmp.Compare(a.SlotID, b.SlotID))
	})
	slices.SortFunc(l.Tokens, func(a, b tokenInfo) int { return cmp.Compare(a.Generation, b.Generation) })
	slices.SortFunc(l.Sessions, func(a, b sessionInfo) int {
		return cmp.Or(cmp.Compare(pathNumber(a.Path), pathNumber(b.Path)), cmp.Compare(a.Path, b.Path))
	})
	return l
}

// pathNumber is the number at the end of a token or session path (0 if
// none).
func pathNumber(p string) uint64 {
	n, _ := strconv.ParseUint(lastElement(godbus.ObjectPath(p)), 10, 64)
	return n
}

func moduleFrom(path godbus.ObjectPath, p map[string]godbus.Variant) moduleInfo {
	return moduleInfo{
		Path:           string(path),
		Name:           unescapePathElement(lastElement(path)),
		Library:        propString(p, "Library"),
		Description:    propString(p, "Description"),
		Manufacturer:   propString(p, "Manufacturer"),
		LibraryVersion: propString(p, "LibraryVersion"),
		WaitModeCode:   propUint32(p, "WaitMode"),
		WaitMode:       waitModeName(propUint32(p, "WaitMode")),
		StateCode:      propUint32(p, "State"),
		State:          moduleStateName(propUint32(p, "State")),
		Released:       propBool(p, "Released"),
	}
}

func readerFrom(path godbus.ObjectPath, p map[string]godbus.Variant) readerInfo {
	name := propString(p, "Name")
	if name == "" {
		name = unescapePathElement(lastElement(path))
	}
	return readerInfo{
		Path:       string(path),
		Name:       name,
		StateCode:  propUint32(p, "State"),
		State:      readerStateName(propUint32(p, "State")),
		EventCount: propUint32(p, "EventCount"),
		ATR:        hex.EncodeToString(propBytes(p, "Atr")),
	}
}

// readerName is the name of the reader at path: its Name property if the
// object is known, else the unescaped path element; "" for "/".
func readerName(objs managedObjects, path godbus.ObjectPath) string {
	if path == "" || path == "/" {
		return ""
	}
	if p, ok := objs[path][dbusapi.ReaderInterface]; ok && propString(p, "Name") != "" {
		return propString(p, "Name")
	}
	return unescapePathElement(lastElement(path))
}

func slotFrom(objs managedObjects, path godbus.ObjectPath, p map[string]godbus.Variant) slotInfo {
	return slotInfo{
		Path:        string(path),
		Module:      unescapePathElement(lastElement(propPath(p, "Module"))),
		SlotID:      propUint64(p, "SlotId"),
		Description: propString(p, "Description"),
		Reader:      readerName(objs, propPath(p, "Reader")),
		Removable:   propBool(p, "Removable"),
		Token:       pathOrEmpty(propPath(p, "Token")),
	}
}

func tokenFrom(objs managedObjects, path godbus.ObjectPath, p map[string]godbus.Variant) tokenInfo {
	t := tokenInfo{
		Path:         string(path),
		Generation:   propUint64(p, "Generation"),
		Label:        propString(p, "Label"),
		Serial:       propString(p, "Serial"),
		Manufacturer: propString(p, "Manufacturer"),
		Model:        propString(p, "Model"),
		Flags:        propUint32(p, "Flags"),
		UsedForLogin: propBool(p, "UsedForLogin"),
		Slot:         pathOrEmpty(propPath(p, "Slot")),
	}
	if sp, ok := objs[propPath(p, "Slot")][dbusapi.SlotInterface]; ok {
		t.Module = unescapePathElement(lastElement(propPath(sp, "Module")))
		t.SlotID = propUint64(sp, "SlotId")
		t.Reader = readerName(objs, propPath(sp, "Reader"))
	}
	return t
}

func sessionFrom(objs managedObjects, path godbus.ObjectPath, p map[string]godbus.Variant, cmdline func(uint32) string) sessionInfo {
	s := sessionInfo{
		Path:       string(path),
		Token:      pathOrEmpty(propPath(p, "Token")),
		Generation: propUint64(p, "Generation"),
		Owner:      propString(p, "Owner"),
		OwnerPid:   propUint32(p, "OwnerPid"),
		ReadWrite:  propBool(p, "ReadWrite"),
		StateCode:  propUint32(p, "State"),
		State:      sessionStateName(propUint32(p, "State")),
	}
	if tp, ok := objs[propPath(p, "Token")][dbusapi.TokenInterface]; ok {
		s.TokenLabel = propString(tp, "Label")
	}
	if cmdline != nil {
		s.Command = cmdline(s.OwnerPid)
	}
	return s
}

// writeJSON writes v as one indented JSON document.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// orDash shows an empty value as "-" in tables.
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// quoted shows a label or name in tables: quoted if it has blanks or is
// empty, so columns stay readable.
func quoted(s string) string {
	if s == "" || strings.ContainsAny(s, " \t") || strconv.Quote(s) != `"`+s+`"` {
		return strconv.Quote(s)
	}
	return s
}

func slotName(module string, id uint64) string {
	return fmt.Sprintf("%s/%d", module, id)
}

// writeListText writes the listing for people: a status line, then one
// aligned table per kind of object.
func writeListText(w io.Writer, l *listing, address string) error {
	ew := &errWriter{w: w}
	m := l.Manager
	fmt.Fprintf(ew, "slotwatch %s on %s: %s", orDash(m.Version), address, m.State)
	if m.StateReason != "" {
		fmt.Fprintf(ew, " (%s)", m.StateReason)
	}
	fmt.Fprintf(ew, ", last generation %d", m.LastGeneration)
	if m.LoginTokenPresent {
		fmt.Fprint(ew, ", login token present")
	}
	fmt.Fprintln(ew)

	section := func(title string, n int, header string, rows func(tw *tabwriter.Writer)) {
		fmt.Fprintf(ew, "\n%s (%d)\n", title, n)
		if n == 0 {
			fmt.Fprintln(ew, "  none")
			return
		}
		tw := tabwriter.NewWriter(ew, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  "+header)
		rows(tw)
		tw.Flush()
	}
	section("Readers", len(l.Readers), "NAME\tSTATE\tEVENTS\tATR", func(tw *tabwriter.Writer) {
		for _, r := range l.Readers {
			fmt.Fprintf(tw, "  %s\t%s\t%d\t%s\n", quoted(r.Name), r.State, r.EventCount, orDash(r.ATR))
		}
	})
	section("Slots", len(l.Slots), "SLOT\tDESCRIPTION\tREADER\tTOKEN", func(tw *tabwriter.Writer) {
		for _, s := range l.Slots {
			tok := "-"
			if s.Token != "" {
				tok = "generation " + lastElement(godbus.ObjectPath(s.Token))
			}
			reader := "-"
			if s.Reader != "" {
				reader = quoted(s.Reader)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", slotName(s.Module, s.SlotID), quoted(s.Description), reader, tok)
		}
	})
	section("Tokens", len(l.Tokens), "GENERATION\tLABEL\tSERIAL\tMANUFACTURER\tMODEL\tSLOT\tREADER", func(tw *tabwriter.Writer) {
		for _, t := range l.Tokens {
			reader := "-"
			if t.Reader != "" {
				reader = quoted(t.Reader)
			}
			fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%s\n", t.Generation, quoted(t.Label), orDash(t.Serial), quoted(t.Manufacturer), quoted(t.Model), slotName(t.Module, t.SlotID), reader)
		}
	})
	section("Modules", len(l.Modules), "NAME\tSTATE\tWAIT\tVERSION\tLIBRARY", func(tw *tabwriter.Writer) {
		for _, m := range l.Modules {
			state := m.State
			if m.Released {
				state += " (released)"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", m.Name, state, m.WaitMode, orDash(m.LibraryVersion), m.Library)
		}
	})
	if n := len(l.Sessions); n > 0 {
		fmt.Fprintf(ew, "\n%d session(s) open; see \"slotwatch sessions\"\n", n)
	}
	return ew.err
}

// writeSessionsText writes who holds which session, aligned.
func writeSessionsText(w io.Writer, sessions []sessionInfo) error {
	ew := &errWriter{w: w}
	if len(sessions) == 0 {
		fmt.Fprintln(ew, "no sessions open")
		return ew.err
	}
	tw := tabwriter.NewWriter(ew, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SESSION\tTOKEN\tGENERATION\tMODE\tSTATE\tOWNER\tPID\tCOMMAND")
	for _, s := range sessions {
		mode := "read-only"
		if s.ReadWrite {
			mode = "read-write"
		}
		pid := "-"
		if s.OwnerPid != 0 {
			pid = strconv.FormatUint(uint64(s.OwnerPid), 10)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", lastElement(godbus.ObjectPath(s.Path)), quoted(s.TokenLabel), s.Generation, mode, s.State, s.Owner, pid, orDash(s.Command))
	}
	tw.Flush()
	return ew.err
}

// errWriter remembers the first write error (a closed pipe), so output
// code can print freely and check once.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	if err != nil {
		e.err = err
	}
	return n, err
}

// fetchListing reads the daemon's objects: what list and sessions share.
func fetchListing(cmd string, cf clientFlags) (*listing, string, error) {
	c, err := dialDaemon(cmd, cf.address)
	if err != nil {
		return nil, "", err
	}
	defer c.close()
	objs, mgr, err := c.fetch()
	if err != nil {
		return nil, "", err
	}
	return buildListing(objs, mgr, commandLine), c.address, nil
}

// newListCmd is `slotwatch list`; run is runList (a test's own in tests).
func newListCmd(run func(clientFlags) error) *cobra.Command {
	var cf clientFlags
	cmd := newClientCmd("list [--address BUS] [--json]", "show the daemon's readers, slots, tokens and modules", &cf, true)
	cmd.RunE = func(*cobra.Command, []string) error { return run(cf) }
	return cmd
}

// newSessionsCmd is `slotwatch sessions`; run is runSessions.
func newSessionsCmd(run func(clientFlags) error) *cobra.Command {
	var cf clientFlags
	cmd := newClientCmd("sessions [--address BUS] [--json]", "show who holds which PKCS#11 session", &cf, true)
	cmd.RunE = func(*cobra.Command, []string) error { return run(cf) }
	return cmd
}

func runList(cf clientFlags) error {
	l, address, err := fetchListing("list", cf)
	if err != nil {
		return err
	}
	if cf.json {
		err = writeJSON(os.Stdout, l)
	} else {
		err = writeListText(os.Stdout, l, address)
	}
	if err != nil {
		return failure("list", "writing the output: %v", err)
	}
	return nil
}

func runSessions(cf clientFlags) error {
	l, _, err := fetchListing("sessions", cf)
	if err != nil {
		return err
	}
	if cf.json {
		err = writeJSON(os.Stdout, struct {
			Sessions []sessionInfo `json:"sessions"`
		}{l.Sessions})
	} else {
		err = writeSessionsText(os.Stdout, l.Sessions)
	}
	if err != nil {
		return failure("sessions", "writing the output: %v", err)
	}
	return nil
}
