package dbusapi

import (
	"errors"
	"time"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/monitor"
)

// reloadWait bounds how long Reload waits for its snapshot to be on the
// bus; the monitor publishes it at once, so this is only a safety net.
const reloadWait = 5 * time.Second

func (s *Service) exportRoot(snap *monitor.Snapshot) error {
	return s.objs.add(RootPath,
		iface{name: objectManagerInterface, methods: objectManager{s.objs}},
		iface{name: ManagerInterface, methods: &manager{s}, props: s.managerProps(snap)},
	)
}

// managerProps are the Manager's properties for a snapshot; s.applied
// must be held (or the service not started).
func (s *Service) managerProps(snap *monitor.Snapshot) map[string]any {
	present := false
	for _, t := range snap.Tokens() {
		if s.usedForLogin(t) {
			present = true
		}
	}
	reason := snap.StateReason
	if s.policyProblem != "" {
		if reason != "" {
			reason += "; "
		}
		reason += s.policyProblem
	}
	return map[string]any{
		"Version":           s.opts.Version,
		"InstanceId":        s.instanceID,
		"State":             uint32(snap.State),
		"StateReason":       reason,
		"LastGeneration":    snap.LastGeneration,
		"LoginTokenPresent": present,
	}
}

func (s *Service) usedForLogin(t *monitor.Token) bool {
	return s.opts.LoginTokenName != "" && t.Label == s.opts.LoginTokenName
}

// manager is the Manager interface's methods.
type manager struct{ s *Service }

// Reload re-reads the configuration and the module list, adds and removes
// modules accordingly (a removed module's tokens are removed, with
// signals), and answers when the new snapshot is on the bus. Reloads run
// one at a time.
func (m *manager) Reload(msg godbus.Message) *godbus.Error {
	s := m.s
	if _, err := checkCall(msg, RootPath, ManagerInterface, "Reload"); err != nil {
		return s.reply(err)
	}
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	target := s.mon.Snapshot().Seq
	if s.opts.Reload != nil {
		snap, err := s.opts.Reload()
		var cfgErr *ConfigError
		if errors.As(err, &cfgErr) {
			return s.reply(namedError(ErrInvalidConfig, "%v", cfgErr.Err))
		}
		if err != nil {
			return s.reply(err)
		}
		target = snap.Seq
	}
	if !s.waitApplied(target, reloadWait) {
		return s.reply(namedError(ErrBusy, "the reloaded view is not on the bus after %v", reloadWait))
	}
	s.out.flush() // its signals too
	return nil
}

// waitApplied waits until the events of snapshot seq, which is published,
// are all on the bus: every event the subscription handed out is applied
// and none is queued (a snapshot that changed nothing has no events).
func (s *Service) waitApplied(seq uint64, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.applied.Lock()
		taken, queued := s.sub.Taken()
		done := s.lastSnap.Seq >= seq || queued == 0 && taken == s.appliedEvents
		ch := s.appliedCh
		s.applied.Unlock()
		if done {
			return true
		}
		select {
		case <-ch:
		case <-s.done:
			return false
		case <-deadline.C:
			return false
		}
	}
}

// SetPolicyProblem shows what went wrong with the removal policy (a lock
// screen or session manager that did not answer) in the Manager's
// StateReason, after the monitor's own reason; "" clears it.
func (s *Service) SetPolicyProblem(problem string) {
	s.applied.Lock()
	defer s.applied.Unlock()
	if s.policyProblem == problem || s.lastSnap == nil {
		s.policyProblem = problem
		return
	}
	s.policyProblem = problem
	s.objs.set(RootPath, ManagerInterface, s.managerProps(s.lastSnap))
}
