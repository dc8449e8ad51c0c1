package module

import (
	"errors"
	"fmt"
	"github.com/slotwatch/slotwatch/internal/p11kitpath"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// Isolation: a module with Options.Isolate runs in a process of its own,
// through p11-kit's remoting. slotwatch loads p11-kit-client.so, which
// starts `p11-kit remote MODULE` as its child and forwards every PKCS#11
// call to it over a pipe; a module that crashes takes down only that
// helper, and its calls fail (the monitor then initializes it again, which
// starts a new helper).
//
// p11-kit-client.so reads P11_KIT_SERVER_ADDRESS each time its
// C_GetFunctionList is called and returns a new, independent instance; an
// address starting with "|" is a command to run. The variable is process
// wide, so loading an isolated module holds isolateMu from setting it to
// getting the function list.
//
// One instance sends its calls down one pipe in turn: a blocked
// C_WaitForSlotEvent would hold up every other call. An isolated module
// therefore does not wait (WaitForSlotEvent answers
// ErrFunctionNotSupported, so the monitor polls it); a PC/SC-backed one is
// still re-read at once on every reader event.

// P11KitClient and P11KitRemote are p11-kit's client module and command:
// the client module in p11-kit's module directory for this machine's
// architecture (p11kitpath.ModuleDir; /usr/lib/x86_64-linux-gnu/pkcs11 on
// Debian amd64).
var (
	P11KitClient = filepath.Join(p11kitpath.ModuleDir(), "p11-kit-client.so")
	P11KitRemote = "/usr/bin/p11-kit"
)

var isolateMu sync.Mutex

// newIsolatedCtx loads path behind p11-kit remoting. The returned context
// is an instance of p11-kit-client.so connected to a new helper process.
func newIsolatedCtx(path string) (*pkcs11.Ctx, libRef, error) {
	if strings.ContainsAny(path, " \t\n\"'\\") {
		return nil, libRef{}, fmt.Errorf("%w %s: isolation needs a module path without blanks or quotes", ErrLoad, path)
	}
	if _, err := os.Stat(P11KitRemote); err != nil {
		return nil, libRef{}, fmt.Errorf("%w %s: isolation needs p11-kit: %v", ErrLoad, path, err)
	}
	isolateMu.Lock()
	defer isolateMu.Unlock()
	const env = "P11_KIT_SERVER_ADDRESS"
	old, had := os.LookupEnv(env)
	os.Setenv(env, "|"+P11KitRemote+" remote "+path)
	ctx := pkcs11.New(P11KitClient)
	if had {
		os.Setenv(env, old)
	} else {
		os.Unsetenv(env)
	}
	if ctx == nil {
		return nil, libRef{}, loadError(P11KitClient)
	}
	lib, ok := pinWithList(P11KitClient, ctxFunctionList(ctx))
	if !ok {
		ctx.Destroy()
		return nil, libRef{}, errors.Join(ErrLoad, fmt.Errorf("%s: no function list", P11KitClient))
	}
	return ctx, lib, nil
}

// ctxFunctionList is the function list miekg's context calls through. It
// reads miekg/pkcs11 v1.1.2's private layout (type Ctx struct{ ctx
// *C.struct_ctx }, struct ctx { void *handle; CK_FUNCTION_LIST_PTR sym; });
// TestFunctionListOfCtx checks it against the library's own list.
func ctxFunctionList(ctx *pkcs11.Ctx) unsafe.Pointer {
	type cctx struct {
		handle unsafe.Pointer
		sym    unsafe.Pointer
	}
	inner := *(**cctx)(unsafe.Pointer(ctx))
	if inner == nil {
		return nil
	}
	return inner.sym
}
