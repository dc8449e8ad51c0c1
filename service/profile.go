package main

import (
	"log/slog"
	"os"
	"runtime/pprof"
)

// startCPUProfile writes a CPU profile of serve to the file named by
// SLOTWATCH_CPUPROFILE, for developers measuring where the daemon's time
// goes (go tool pprof bin/slotwatch FILE). It returns the function that
// ends the profile, or nil when the variable is not set.
func startCPUProfile(logger *slog.Logger) (stop func()) {
	path := os.Getenv("SLOTWATCH_CPUPROFILE")
	if path == "" {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		logger.Warn("no CPU profile", "err", err)
		return nil
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		logger.Warn("no CPU profile", "err", err)
		return nil
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}
