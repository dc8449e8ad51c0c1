package monitor

// PCSCRecoveredPending tells whether the PC/SC watcher reported a
// reconnection to pcscd that the loop has not taken yet (tests that hold
// the loop across a pcscd restart wait for it).
func (m *Monitor) PCSCRecoveredPending() bool {
	m.inbox.mu.Lock()
	defer m.inbox.mu.Unlock()
	return m.inbox.pcscRecovered
}
