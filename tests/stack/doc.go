// Package stack runs the real smart card stack privately for slotwatch's
// tests and for the `make demo` driver, without hardware and without
// touching the machine's own daemons:
//
//   - pcscd with vsmartcard's vpcd reader driver, on a private socket and
//     private TCP ports (StartPCSCD); cards are inserted with package
//     tests/vcard;
//   - a private D-Bus session bus (StartDBus);
//   - a private OpenSC configuration for OpenSC's PKCS#11 module
//     (WriteOpenSCConf, OpenSCModule);
//   - a SoftHSM2 token store (NewSoftHSM, in softhsm.go);
//   - a raw PC/SC observer that records what pcscd reports (NewObserver).
//
// The core API returns errors and has Stop/Close methods; the ...ForTest
// wrappers take a testing.TB, register cleanups and fail the test with the
// component's log.
//
// libpcsclite (and so OpenSC, and this package's Observer) reads
// PCSCLITE_CSOCK_NAME once per process: a test binary sets it once, in
// TestMain, to a fixed path and passes that path as PCSCDConfig.Socket to
// every pcscd it starts. A daemon under test that runs as a child process
// gets its own value through its environment.
package stack
