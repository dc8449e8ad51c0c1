package dbusapi

import (
	"log/slog"
	"sync"

	godbus "github.com/godbus/dbus/v5"
)

// emitter sends the service's signals from one goroutine, in the order
// they were queued. Every signal of both object trees and the Manager goes
// through it, so InterfacesAdded, PropertiesChanged, InterfacesRemoved,
// TokenInserted and TokenRemoved keep their order; and a method's reply
// does not wait while the signals its change caused are encoded and
// written (for OpenSession and Close that was most of their time).
type emitter struct {
	conn *godbus.Conn
	log  *slog.Logger

	mu      sync.Mutex // guards all following fields
	queue   []queuedSignal
	sending bool       // run holds signals taken from queue
	idle    *sync.Cond // broadcast when queue is empty and nothing is being sent
	closed  bool
	wake    chan struct{} // buffered 1
	done    chan struct{}
}

type queuedSignal struct {
	path godbus.ObjectPath
	name string
	args []any
}

func newEmitter(conn *godbus.Conn, log *slog.Logger) *emitter {
	e := &emitter{conn: conn, log: log, wake: make(chan struct{}, 1), done: make(chan struct{})}
	e.idle = sync.NewCond(&e.mu)
	go e.run()
	return e
}

// emit queues a signal. The arguments must not change afterwards.
func (e *emitter) emit(path godbus.ObjectPath, name string, args ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return
	}
	e.queue = append(e.queue, queuedSignal{path, name, args})
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *emitter) run() {
	defer close(e.done)
	for range e.wake {
		for {
			e.mu.Lock()
			batch := e.queue
			e.queue = nil
			e.sending = len(batch) > 0
			if !e.sending {
				e.idle.Broadcast()
				e.mu.Unlock()
				break
			}
			e.mu.Unlock()
			for _, s := range batch {
				if err := e.conn.Emit(s.path, s.name, s.args...); err != nil {
					e.log.Debug("emitting a signal failed", "signal", s.name, "path", s.path, "err", err)
				}
			}
		}
	}
}

// flush waits until every signal queued so far is sent.
func (e *emitter) flush() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for (len(e.queue) > 0 || e.sending) && !e.closed {
		e.idle.Wait()
	}
}

// close sends what is queued, then stops. Signals emitted afterwards are
// dropped.
func (e *emitter) close() {
	e.flush()
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return
	}
	e.closed = true
	close(e.wake)
	e.idle.Broadcast()
	e.mu.Unlock()
	<-e.done
}
