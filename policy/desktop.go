package policy

// The desktop's services the policy calls, and GNOME's setting it reads.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os/exec"
	"strings"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/monitor"
)

// GNOME's smart card settings (gnome-settings-daemon's smartcard plugin).
const (
	gsettingsSchema = "org.gnome.settings-daemon.peripherals.smartcard"
	gsettingsKey    = "removal-action"
)

// The services called.
const (
	gnomeScreenSaver = "org.gnome.ScreenSaver"
	gnomeScreenPath  = "/org/gnome/ScreenSaver"
	fdoScreenSaver   = "org.freedesktop.ScreenSaver"
	fdoScreenPath    = "/org/freedesktop/ScreenSaver"
	sessionManager   = "org.gnome.SessionManager"
	sessionPath      = "/org/gnome/SessionManager"
	notifications    = "org.freedesktop.Notifications"
	notifyPath       = "/org/freedesktop/Notifications"

	// logoutForce is org.gnome.SessionManager.Logout's mode 2: no
	// confirmation, ignoring inhibitors.
	logoutForce uint32 = 2
)

// activeTimeout bounds the GetActive question before a lock (or the
// policy's timeout, if shorter): a screensaver that cannot answer it is
// asked to lock anyway, without first spending a whole call timeout.
const activeTimeout = time.Second

// removalAction carries out the effective action for tok (nil at startup)
// and reports the outcome.
func (p *Policy) removalAction(tok *monitor.Token, reason string) {
	attrs := []any{"reason", reason}
	if tok != nil {
		attrs = append(attrs, "label", tok.Label, "serial", tok.Serial, "generation", tok.Generation)
	}
	action, err := p.effectiveAction()
	if err != nil {
		if p.ctx.Err() != nil {
			return
		}
		problem := "removal action: " + err.Error()
		p.log.Error(problem, attrs...)
		p.report(problem)
		return
	}
	if action == ActionNone {
		p.log.Debug("removal action none", attrs...)
		return
	}
	attrs = append([]any{"action", string(action)}, attrs...)
	switch action {
	case ActionLockScreen:
		if by := p.screenActive(); by != "" {
			// Locked already, on suspend say: a second Lock would
			// only wake the screen.
			p.log.Info("removal action lock-screen: the screen is locked already; not locking again", append(attrs, "screensaver", by)...)
			p.report("")
			return
		}
		err = p.lock()
	case ActionForceLogout:
		err = p.logout()
	}
	if err != nil {
		if p.ctx.Err() != nil {
			p.log.Warn("removal action abandoned: slotwatch is stopping", attrs...)
			return
		}
		problem := fmt.Sprintf("removal action %s failed: %v", action, err)
		p.log.Error(problem, attrs...)
		p.report(problem)
		return
	}
	p.log.Info("removal action", attrs...)
	p.report("")
}

// effectiveAction is Config.Action, or GNOME's setting read now.
func (p *Policy) effectiveAction() (Action, error) {
	if p.cfg.Action != "" {
		return p.cfg.Action, nil
	}
	if !p.cfg.GSettings {
		return ActionNone, nil
	}
	return p.readGSettings()
}

// readGSettings runs "gsettings get" for GNOME's removal-action. Without
// gsettings, or without the schema (or key) installed, the action is none.
func (p *Policy) readGSettings() (Action, error) {
	ctx, cancel := context.WithTimeout(p.ctx, p.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.gsettings, "get", gsettingsSchema, gsettingsKey)
	// English error messages, to tell a missing schema from a failure.
	cmd.Env = append(append([]string(nil), p.environ()...), "LC_ALL=C")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := oneLine(stderr.String())
		if gsettingsMissing(err, msg) {
			p.noteGSettingsGone(err, msg)
			return ActionNone, nil
		}
		if ctx.Err() == context.DeadlineExceeded {
			return "", fmt.Errorf("reading GNOME's %s setting: gsettings gave no answer within %v", gsettingsKey, p.timeout)
		}
		if msg == "" {
			msg = err.Error()
		}
		return "", fmt.Errorf("reading GNOME's %s setting: gsettings: %s", gsettingsKey, msg)
	}
	p.gsettingsGone = false
	v := strings.TrimSpace(string(out))
	v = strings.TrimSuffix(strings.TrimPrefix(v, "'"), "'")
	a := Action(v)
	if !a.valid() {
		return "", fmt.Errorf("GNOME's %s setting has the unknown value %q", gsettingsKey, v)
	}
	return a, nil
}

// gsettingsMissing tells whether a failed gsettings run means that there is
// no such setting here: no gsettings, no schemas at all, or not GNOME's.
func gsettingsMissing(err error, stderr string) bool {
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
		return true
	}
	for _, m := range []string{"No such schema", "No schemas installed", "No such key"} {
		if strings.Contains(stderr, m) {
			return true
		}
	}
	return false
}

func (p *Policy) noteGSettingsGone(err error, msg string) {
	if p.gsettingsGone {
		return
	}
	p.gsettingsGone = true
	if msg == "" {
		msg = err.Error()
	}
	p.log.Info("GNOME's smart card removal-action setting is not available; the removal action is none", "why", msg)
}

// screenActive asks the screensavers, in the order lock tries them,
// whether the screen is locked (active) already, and returns the name of
// the one that says so. The first that answers decides; "" when it says
// no or none answers.
func (p *Policy) screenActive() string {
	timeout := min(p.timeout, activeTimeout)
	for _, s := range []struct {
		name string
		path godbus.ObjectPath
	}{{gnomeScreenSaver, gnomeScreenPath}, {fdoScreenSaver, fdoScreenPath}} {
		var active bool
		err := p.callWithin(timeout, s.name, s.path, s.name+".GetActive", []any{&active})
		if err == nil {
			if active {
				return s.name
			}
			return ""
		}
		if p.ctx.Err() != nil {
			return ""
		}
		p.log.Debug("no answer to GetActive", "screensaver", s.name, "err", err.Error())
	}
	return ""
}

// lock locks the screen through GNOME's screensaver, else the
// freedesktop.org one.
func (p *Policy) lock() error {
	gnomeErr := p.call(gnomeScreenSaver, gnomeScreenPath, gnomeScreenSaver+".Lock", nil)
	if gnomeErr == nil || p.ctx.Err() != nil {
		return gnomeErr
	}
	fdoErr := p.call(fdoScreenSaver, fdoScreenPath, fdoScreenSaver+".Lock", nil)
	if fdoErr == nil {
		p.log.Debug("locked through "+fdoScreenSaver, "gnome_err", gnomeErr.Error())
		return nil
	}
	if absent(gnomeErr) && absent(fdoErr) {
		return fmt.Errorf("no screensaver on the bus (neither %s nor %s)", gnomeScreenSaver, fdoScreenSaver)
	}
	return fmt.Errorf("neither %s nor %s answered: %s: %v; %s: %v",
		gnomeScreenSaver, fdoScreenSaver, gnomeScreenSaver, gnomeErr, fdoScreenSaver, fdoErr)
}

// absent tells whether a call failed because nobody owns the name (and
// nothing can be activated for it).
func absent(err error) bool {
	var e godbus.Error
	if !errors.As(err, &e) {
		return false
	}
	return e.Name == "org.freedesktop.DBus.Error.ServiceUnknown" || e.Name == "org.freedesktop.DBus.Error.NameHasNoOwner"
}

// logout ends the session at once.
func (p *Policy) logout() error {
	return p.call(sessionManager, sessionPath, sessionManager+".Logout", nil, logoutForce)
}

// notify shows that tok was inserted or removed, replacing the previous
// notification. A failure is logged once per outage.
func (p *Policy) notify(tok *monitor.Token, inserted bool) {
	summary, category := "Smart card removed", "device.removed"
	if inserted {
		summary, category = "Smart card inserted", "device.added"
	}
	label := tok.Label
	if label == "" {
		label = "A token without a label"
	}
	body := label
	if tok.Reader != "" {
		body += " in " + tok.Reader
	}
	hints := map[string]godbus.Variant{
		"category":  godbus.MakeVariant(category),
		"transient": godbus.MakeVariant(true),
	}
	var id uint32
	err := p.call(notifications, notifyPath, notifications+".Notify", []any{&id},
		"slotwatch", p.notifyID, "auth-smartcard", summary, escapeMarkup(body), []string{}, hints, int32(-1))
	if err != nil {
		if p.ctx.Err() != nil {
			return
		}
		// A new notification server numbers anew: do not replace
		// someone else's notification with an old id.
		p.notifyID = 0
		if !p.notifyFailing {
			p.notifyFailing = true
			p.log.Warn("desktop notification failed; trying again at the next token event", "err", err.Error())
		}
		return
	}
	if p.notifyFailing {
		p.notifyFailing = false
		p.log.Info("desktop notifications work again")
	}
	p.notifyID = id
	p.log.Debug("notified", "summary", summary, "generation", tok.Generation, "id", id)
}

// call calls method on dest's object path with a timeout; the reply is
// stored into out (pointers) if not nil. The error is one line.
func (p *Policy) call(dest string, path godbus.ObjectPath, method string, out []any, args ...any) error {
	return p.callWithin(p.timeout, dest, path, method, out, args...)
}

// callWithin is call with another timeout.
func (p *Policy) callWithin(timeout time.Duration, dest string, path godbus.ObjectPath, method string, out []any, args ...any) error {
	ctx, cancel := context.WithTimeout(p.ctx, timeout)
	defer cancel()
	c := p.conn.Object(dest, path).CallWithContext(ctx, method, 0, args...)
	err := c.Err
	if err == nil && len(out) > 0 {
		err = c.Store(out...)
	}
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) || ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("%s: no answer within %v", method, timeout)
	}
	return &callError{method: method, err: err}
}

// callError is a failed call; it keeps the D-Bus error for errors.As.
type callError struct {
	method string
	err    error
}

func (e *callError) Error() string { return e.method + ": " + describe(e.err) }
func (e *callError) Unwrap() error { return e.err }

// describe renders a D-Bus error with its name.
func describe(err error) string {
	var de godbus.Error
	if errors.As(err, &de) {
		msg := ""
		if len(de.Body) > 0 {
			if s, ok := de.Body[0].(string); ok {
				msg = s
			}
		}
		if msg == "" {
			return de.Name
		}
		return oneLine(de.Name + ": " + msg)
	}
	return oneLine(err.Error())
}

// oneLine joins the lines of s with spaces.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// escapeMarkup escapes the characters notification servers read as
// markup in a body.
var markupEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;")

func escapeMarkup(s string) string { return markupEscaper.Replace(s) }
