package monitor

import (
	"errors"
	"runtime"
	"time"

	"github.com/slotwatch/slotwatch/module"
)

// The module source: one blocking C_WaitForSlotEvent per module, on its own
// OS thread. Like every source it only wakes the loop.

// startWaiter runs one blocking C_WaitForSlotEvent loop on its own locked
// OS thread (PKCS#11 modules may keep per-thread state). It only wakes the
// monitor.
func (l *loop) startWaiter(mt *moduleTrack) {
	stop := make(chan struct{})
	done := make(chan struct{})
	mt.waiterStop, mt.waiterDone = stop, done
	m := l.m
	mod, name := mt.mod, mt.name
	b := backoff{Min: l.cfg.RetryMin, Max: l.cfg.RetryMax}
	minGap := l.cfg.MinWakeGap
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(done)
		var lastWake time.Time
		for {
			_, err := mod.WaitForSlotEvent(false)
			select {
			case <-stop:
				return
			default:
			}
			switch {
			case err == nil:
				b.Reset()
				if gap := time.Since(lastWake); gap < minGap && !sleep(minGap-gap, stop) {
					return
				}
				lastWake = time.Now()
				m.markModuleDirty(name)
				continue
			case errors.Is(err, module.ErrFunctionNotSupported):
				m.inbox.mu.Lock()
				m.inbox.waitUnsupported[name] = true
				m.inbox.mu.Unlock()
				m.wake()
				return
			case errors.Is(err, module.ErrNotInitialized):
				// Finalized by someone other than the monitor: the module
				// has to be initialized again.
				m.inbox.mu.Lock()
				m.inbox.waitFailed[name] = err
				m.inbox.mu.Unlock()
				m.wake()
				return
			}
			// Other errors (OpenSC answers CKR_GENERAL_ERROR while pcscd is
			// gone): let the loop re-read, and do not spin.
			m.markModuleDirty(name)
			if !sleep(b.Next(), stop) {
				return
			}
		}
	}()
}
