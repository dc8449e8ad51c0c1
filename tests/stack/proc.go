package stack

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

// proc is a daemon child process (pcscd, dbus-daemon) of the harness.
//
// Its goroutine starts the process, reaps it and then closes done; so
// after Stop or Kill returns no goroutine of it is left.
//
// Every child is started with Setpgid (its own process group: a ^C in the
// terminal goes to the test binary's group, not to the daemons, which the
// harness stops itself, by pid) and Pdeathsig SIGKILL (if the test binary
// dies without cleaning up, e.g. on a test timeout, the kernel kills the
// daemons instead of leaving them behind). Linux ties Pdeathsig to the OS
// thread that forked, not to the process, and Go may end an OS thread
// whose goroutine exits while locked to it; so the goroutine that starts
// the child stays locked to its thread until the child is gone.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been reaped
	err  error         // Wait's result; read only after done is closed
}

// startProc starts cmd (with the SysProcAttr fields above added to any it
// already has) and returns once it runs.
func startProc(cmd *exec.Cmd) (*proc, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL

	p := &proc{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits up to d for the process to exit and reports whether it did.
func (p *proc) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// signal sends sig to the process (only to it, never to its group).
// os.Process signals through a pidfd, so a reaped pid that the kernel
// reused is never hit. Signalling an exited process is not an error.
func (p *proc) signal(sig os.Signal) error {
	err := p.cmd.Process.Signal(sig)
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

// kill sends SIGKILL and waits until the process is reaped.
func (p *proc) kill() error {
	if err := p.signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-p.done
	return nil
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs; it returns once
// the process is reaped.
func (p *proc) stop(grace time.Duration) error {
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if p.wait(grace) {
		return nil
	}
	return p.kill()
}
