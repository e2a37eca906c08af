package main

// The processes the run starts (Caddy gateways, nats-server nodes): each
// supervised like a service manager would (an exit that no fault caused is
// logged and followed by a restart), each stopped by its PID at the end.

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// maxSelfRestarts bounds the restarts after exits no fault caused: a
// process that cannot start keeps failing, the run carries on without it.
const maxSelfRestarts = 30

// proc is one supervised process: the same binary, arguments, environment
// and log file (appended to) at every start.
type proc struct {
	name    string
	bin     string
	args    []string
	env     []string
	logPath string
	lg      *eventLog

	mu         sync.Mutex
	cmd        *exec.Cmd
	done       chan struct{} // closed when cmd has exited
	expectExit bool          // a fault or the end stopped it on purpose
	closing    bool          // the end: never restarted again
	stopped    bool          // held by SIGSTOP
	selfExits  int           // exits no fault caused
}

// start starts the process; its output goes to the log file.
func (p *proc) start() error {
	f, err := os.OpenFile(p.logPath, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(f, "==== chaos: %s started at %s\n", p.name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = f, f
	// The process dies with the run, even if the run is killed before
	// its cleanup.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.done, p.expectExit, p.stopped = cmd, done, false, false
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(f, "==== chaos: %s (pid %d) exited at %s: %v\n", p.name, cmd.Process.Pid, time.Now().Format(time.RFC3339Nano), err)
		f.Close()
		close(done)
		p.mu.Lock()
		unexpected := p.cmd == cmd && !p.expectExit && !p.closing
		if unexpected {
			p.selfExits++
		}
		n := p.selfExits
		p.mu.Unlock()
		if !unexpected {
			return
		}
		if n > maxSelfRestarts {
			p.lg.logf("%s exited by itself (%v), %d times: not restarted again", p.name, err, n)
			return
		}
		p.lg.logf("%s exited by itself (%v); restarting it in 1s, as a service manager would", p.name, err)
		time.Sleep(time.Second)
		p.mu.Lock()
		again := p.cmd == cmd && !p.closing
		p.mu.Unlock()
		if again {
			if err := p.start(); err != nil {
				p.lg.logf("%s: restart failed: %v", p.name, err)
			}
		}
	}()
	return nil
}

// pid is the running process's PID, 0 if none.
func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// kill sends sig to the process on purpose (no restart follows) and waits
// up to 10s for it to exit.
func (p *proc) kill(sig syscall.Signal) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	if cmd == nil {
		p.mu.Unlock()
		return
	}
	p.expectExit = true
	p.mu.Unlock()
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
	}
}

// signal sends sig (SIGSTOP, SIGCONT) without waiting.
func (p *proc) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("%s is not running", p.name)
	}
	p.stopped = sig == syscall.SIGSTOP
	return p.cmd.Process.Signal(sig)
}

// running reports whether the process is up.
func (p *proc) running() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return false
	}
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// stop ends the process for good: SIGCONT if held, SIGTERM, then SIGKILL
// after 10s.
func (p *proc) stop() {
	p.mu.Lock()
	p.closing = true
	stopped := p.stopped
	cmd := p.cmd
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	if stopped {
		_ = cmd.Process.Signal(syscall.SIGCONT)
	}
	p.kill(syscall.SIGTERM)
}
