// Package monitor turns what PKCS#11 modules and PC/SC report into one
// ordered, generation-tagged view of readers, slots and tokens.
//
// It owns the event sources (one blocking C_WaitForSlotEvent waiter per
// module on its own OS thread, a polling timer for modules that cannot wait,
// one SCardGetStatusChange watcher including the PnP pseudo reader, which is
// the only source of modules whose slots stand for readers) and the
// single goroutine that owns the state. Sources only wake that goroutine; on
// every wake-up it re-reads the slots, tokens and reader states and diffs
// them against the current snapshot (events are wake-ups, not facts), so a
// lost, duplicated or coalesced event can never leave the view wrong.
//
// What it publishes:
//   - an immutable Snapshot, readable at any time without waiting on a module;
//   - an ordered stream of Events per subscriber (removals before insertions);
//   - generations: every token insertion gets a new number that is never
//     reused, also when a card is removed and inserted again inside one event
//     gap (seen through PC/SC's event counter);
//   - generation leases: an operation holds its token's generation, and a
//     removed token's sessions are reclaimed only when the last holder
//     returned.
//
// Modules whose slots stand for PC/SC readers (OpenSC) hold the cards they
// see; the monitor finalizes them while idle and initializes them again on
// demand (IdleRelease), so that other programs can have a card
// exclusively, and keeps the view meanwhile.
//
// Failures are states, not log lines: pcscd going away, or a module that
// keeps failing, makes the monitor Degraded; it recovers by itself with a
// capped backoff, forever. Close unblocks every wait and returns promptly.
//
// One event, top to bottom, file by file:
//
//   - source_pcsc.go, source_waiter.go: the sources. Each only wakes the
//     loop (Monitor.wake, markModuleDirty) and says nothing else it knows;
//   - monitor.go: the Monitor (the public API, Config) and the inbox the
//     sources write to;
//   - loop.go: the loop, the one goroutine that owns the state: what to
//     read when (refresh: events, polls, safety re-reads, settling cards,
//     retries), and its timer;
//   - modules.go: modules' initialization, failure, recovery and
//     replacement;
//   - release.go: the idle release of modules whose slots stand for
//     readers, and when PC/SC is read without an event (exclusive use);
//   - read_pcsc.go, read_slots.go: reading PC/SC and the modules (all
//     slots, or only those of changed readers), and the identity of a
//     token (same insertion or a new generation);
//   - diff.go: the pure diff of two snapshots into ordered events;
//   - publish.go: commit — the snapshot, the diff's side effects on
//     generations (leases.go: holds and deferred reclamation), publishing;
//   - snapshot.go, events.go: what subscribers get.
package monitor
