package main

import (
	"log/slog"
	"sync"

	"github.com/slotwatch/slotwatch/config"
	"github.com/slotwatch/slotwatch/module"
	"github.com/slotwatch/slotwatch/monitor"
)

// loadedModules is the daemon's one set of modules: it opens what the
// config resolves to, keeps the modules a reload leaves alone (by path, so
// their state survives), and holds the module.Set that both the monitor
// (through apply's result) and the broker see.
type loadedModules struct {
	set         *module.Set
	isolateFlag bool // serve --isolate: the --module modules run isolated
	logCalls    bool
	log         *slog.Logger

	mu      sync.Mutex // guards byPath and release; reloads may race
	byPath  map[string]*module.Module
	release map[string]monitor.IdleRelease // by module name, from the last apply
}

func newLoadedModules(isolateFlag, logCalls bool, log *slog.Logger) *loadedModules {
	return &loadedModules{set: module.NewSet(), isolateFlag: isolateFlag, logCalls: logCalls, log: log, byPath: map[string]*module.Module{}, release: map[string]monitor.IdleRelease{}}
}

// idleRelease is the monitor's Config.IdleRelease: each module's policy as
// the config resolved it at the last start or reload.
func (l *loadedModules) idleRelease(name string) monitor.IdleRelease {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r, ok := l.release[name]; ok {
		return r
	}
	return monitor.DefaultIdleRelease
}

// apply makes mods the set's contents and returns them for the monitor.
func (l *loadedModules) apply(mods []config.Module) []monitor.Module {
	l.mu.Lock()
	defer l.mu.Unlock()
	var list []*module.Module
	var watched []monitor.Module
	l.release = map[string]monitor.IdleRelease{}
	for _, mc := range mods {
		l.release[mc.Name] = mc.IdleRelease
		m, ok := l.byPath[mc.Path]
		if !ok || m.Name() != mc.Name {
			isolate := mc.Isolate || (l.isolateFlag && mc.From == config.FromFlag)
			opts := module.Options{Name: mc.Name, Isolate: isolate}
			if l.logCalls {
				opts.CallLog = l.log.With("module", mc.Name)
			}
			m = module.Open(mc.Path, opts)
			l.byPath[mc.Path] = m
			l.log.Info("watching module", "module", mc.Name, "path", mc.Path, "from", mc.From, "isolated", isolate, "critical", mc.Critical)
		}
		list = append(list, m)
		watched = append(watched, m)
	}
	l.set.Replace(list)
	return watched
}

// reportCritical says, as an error, which modules the p11-kit registry
// marks critical ("critical: yes") failed to load or initialize in snap:
// p11-kit itself gives up on such a failure; slotwatch goes on with the
// other modules, and says so louder than for the rest.
func reportCritical(log *slog.Logger, mods []config.Module, snap *monitor.Snapshot) {
	for _, mc := range mods {
		if !mc.Critical {
			continue
		}
		for _, mv := range snap.Modules {
			if mv.Name == mc.Name && mv.State == monitor.ModuleFailed {
				log.Error("a module the p11-kit registry marks critical failed; slotwatch goes on with the others",
					"module", mc.Name, "path", mc.Path, "source", mc.Source, "reason", mv.StateReason)
			}
		}
	}
}
