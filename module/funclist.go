package module

// The few PKCS#11 calls that do not go through miekg/pkcs11, and why:
//
//   - C_WaitForSlotEvent: miekg's WaitForSlotEvent throws the CK_RV away (and
//     with SoftHSM delivers slot 0 at once, so a loop on it spins). The
//     monitor needs the code: CKR_NO_EVENT, CKR_FUNCTION_NOT_SUPPORTED,
//     CKR_CRYPTOKI_NOT_INITIALIZED after our own C_Finalize.
//   - C_Login, C_InitToken, C_InitPIN and C_SetPIN: miekg takes PINs as Go strings and copies them
//     into C.CString buffers it frees without wiping, so every login would
//     leave copies of the PIN in the Go and C heaps. Here the module reads
//     the caller's own byte slice directly; nothing is copied.
//
// All of them use the module's own function list, obtained from the library
// miekg already loaded: dlopen(path, RTLD_NOW|RTLD_NOLOAD) returns a new
// reference to that same instance (never a second copy, never a load) and
// dlsym finds its C_GetFunctionList. The reference also pins the code in
// memory for as long as we hold it, which is what makes the wait safe: a
// wait blocked inside the module keeps its own reference, so the last
// Finalize can unload (miekg's dlclose) while the waiting thread is still on
// its way out of the library's code.

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

// PKCS#11 types as the standard defines them on LP64 Unix (CK_ULONG is an
// unsigned long). Only the function list's layout matters here; its order is
// fixed by the standard (v2.x; v3.0 lists extend it at the end).
typedef unsigned long sw_ulong;
typedef sw_ulong sw_rv;
typedef struct sw_funcs sw_funcs;
typedef void *sw_unused;

struct sw_funcs {
	struct { unsigned char major, minor; } version;
	sw_unused C_Initialize, C_Finalize, C_GetInfo;
	sw_rv (*C_GetFunctionList)(sw_funcs **list);
	sw_unused C_GetSlotList, C_GetSlotInfo, C_GetTokenInfo, C_GetMechanismList, C_GetMechanismInfo;
	sw_rv (*C_InitToken)(sw_ulong slot, unsigned char *so_pin, sw_ulong so_pin_len, unsigned char *label32);
	sw_rv (*C_InitPIN)(sw_ulong session, unsigned char *pin, sw_ulong pin_len);
	sw_rv (*C_SetPIN)(sw_ulong session, unsigned char *old_pin, sw_ulong old_len, unsigned char *new_pin, sw_ulong new_len);
	sw_unused C_OpenSession, C_CloseSession, C_CloseAllSessions,
		C_GetSessionInfo, C_GetOperationState, C_SetOperationState;
	sw_rv (*C_Login)(sw_ulong session, sw_ulong user_type, unsigned char *pin, sw_ulong pin_len);
	sw_unused C_Logout, C_CreateObject, C_CopyObject, C_DestroyObject, C_GetObjectSize,
		C_GetAttributeValue, C_SetAttributeValue, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal,
		C_EncryptInit, C_Encrypt, C_EncryptUpdate, C_EncryptFinal,
		C_DecryptInit, C_Decrypt, C_DecryptUpdate, C_DecryptFinal,
		C_DigestInit, C_Digest, C_DigestUpdate, C_DigestKey, C_DigestFinal,
		C_SignInit, C_Sign, C_SignUpdate, C_SignFinal, C_SignRecoverInit, C_SignRecover,
		C_VerifyInit, C_Verify, C_VerifyUpdate, C_VerifyFinal, C_VerifyRecoverInit, C_VerifyRecover,
		C_DigestEncryptUpdate, C_DecryptDigestUpdate, C_SignEncryptUpdate, C_DecryptVerifyUpdate,
		C_GenerateKey, C_GenerateKeyPair, C_WrapKey, C_UnwrapKey, C_DeriveKey,
		C_SeedRandom, C_GenerateRandom, C_GetFunctionStatus, C_CancelFunction;
	sw_rv (*C_WaitForSlotEvent)(sw_ulong flags, sw_ulong *slot, void *reserved);
};

#define SW_CKR_FUNCTION_NOT_SUPPORTED 0x54UL

// sw_ref takes a reference to the already loaded library and its function
// list. NULL when the library is not loaded (RTLD_NOLOAD never loads) or
// has no usable function list.
static void *sw_ref(const char *path, sw_funcs **list) {
	void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
	if (h == NULL) {
		return NULL;
	}
	sw_rv (*get)(sw_funcs **) = (sw_rv (*)(sw_funcs **))dlsym(h, "C_GetFunctionList");
	*list = NULL;
	if (get == NULL || get(list) != 0 || *list == NULL) {
		dlclose(h);
		return NULL;
	}
	return h;
}

static void sw_unref(void *h) { dlclose(h); }

// sw_pin takes a reference to an already loaded library without asking it
// for a function list (p11-kit-client.so would make a new instance).
static void *sw_pin(const char *path) { return dlopen(path, RTLD_NOW | RTLD_NOLOAD); }

// sw_load_error says why dlopen fails for path (miekg only says "nil").
static char *sw_load_error(const char *path) {
	void *h = dlopen(path, RTLD_LAZY);
	if (h == NULL) {
		const char *e = dlerror();
		return strdup(e ? e : "dlopen failed");
	}
	void *get = dlsym(h, "C_GetFunctionList");
	dlclose(h);
	return get ? NULL : strdup("no C_GetFunctionList symbol");
}

static sw_rv sw_wait(sw_funcs *f, sw_ulong flags, sw_ulong *slot) {
	if (f->C_WaitForSlotEvent == NULL) return SW_CKR_FUNCTION_NOT_SUPPORTED;
	return f->C_WaitForSlotEvent(flags, slot, NULL);
}

static sw_rv sw_login(sw_funcs *f, sw_ulong session, sw_ulong user, unsigned char *pin, sw_ulong len) {
	if (f->C_Login == NULL) return SW_CKR_FUNCTION_NOT_SUPPORTED;
	return f->C_Login(session, user, pin, len);
}

static sw_rv sw_init_token(sw_funcs *f, sw_ulong slot, unsigned char *pin, sw_ulong len, unsigned char *label32) {
	if (f->C_InitToken == NULL) return SW_CKR_FUNCTION_NOT_SUPPORTED;
	return f->C_InitToken(slot, pin, len, label32);
}

static sw_rv sw_init_pin(sw_funcs *f, sw_ulong session, unsigned char *pin, sw_ulong len) {
	if (f->C_InitPIN == NULL) return SW_CKR_FUNCTION_NOT_SUPPORTED;
	return f->C_InitPIN(session, pin, len);
}

static sw_rv sw_set_pin(sw_funcs *f, sw_ulong session, unsigned char *old_pin, sw_ulong old_len, unsigned char *new_pin, sw_ulong new_len) {
	if (f->C_SetPIN == NULL) return SW_CKR_FUNCTION_NOT_SUPPORTED;
	return f->C_SetPIN(session, old_pin, old_len, new_pin, new_len);
}

// sw_layout_ok cross-checks our struct against the symbols the library
// exports, for the tests: same address at each position we call.
static int sw_layout_ok(void *h, sw_funcs *f) {
	return dlsym(h, "C_GetFunctionList") == (void *)f->C_GetFunctionList &&
		dlsym(h, "C_InitToken") == (void *)f->C_InitToken &&
		dlsym(h, "C_Login") == (void *)f->C_Login &&
		dlsym(h, "C_InitPIN") == (void *)f->C_InitPIN &&
		dlsym(h, "C_SetPIN") == (void *)f->C_SetPIN &&
		dlsym(h, "C_WaitForSlotEvent") == (void *)f->C_WaitForSlotEvent;
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// libRef is one dlopen reference to the loaded library plus its function list.
type libRef struct {
	h  unsafe.Pointer
	fl *C.sw_funcs
}

// refLoaded returns a new reference to the library at path if (and only if)
// it is loaded in this process; ok is false otherwise.
func refLoaded(path string) (libRef, bool) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var fl *C.sw_funcs
	h := C.sw_ref(cpath, &fl)
	if h == nil {
		return libRef{}, false
	}
	return libRef{h: h, fl: fl}, true
}

// pinWithList returns a reference to the loaded library at path that uses
// the function list fl (an instance already made), for isolated modules.
func pinWithList(path string, fl unsafe.Pointer) (libRef, bool) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	h := C.sw_pin(cpath)
	if h == nil || fl == nil {
		if h != nil {
			C.sw_unref(h)
		}
		return libRef{}, false
	}
	return libRef{h: h, fl: (*C.sw_funcs)(fl)}, true
}

func (r libRef) release() {
	if r.h != nil {
		C.sw_unref(r.h)
	}
}

// loadError explains why the library at path cannot be loaded.
func loadError(path string) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	msg := C.sw_load_error(cpath)
	if msg == nil {
		return fmt.Errorf("%w %s", ErrLoad, path)
	}
	defer C.free(unsafe.Pointer(msg))
	return fmt.Errorf("%w %s: %s", ErrLoad, path, C.GoString(msg))
}

// bytesPtr points C at a Go byte slice without copying it (NULL for an
// empty slice, which is what a protected authentication path expects).
// cgo allows this: the memory holds no Go pointers, and the module may not
// keep the pointer after the call returns.
func bytesPtr(b []byte) *C.uchar {
	if len(b) == 0 {
		return nil
	}
	return (*C.uchar)(unsafe.Pointer(unsafe.SliceData(b)))
}

func (r libRef) waitForSlotEvent(flags uint) (slot uint, rv uint) {
	var s C.sw_ulong
	rv = uint(C.sw_wait(r.fl, C.sw_ulong(flags), &s))
	return uint(s), rv
}

func (r libRef) login(h pkcs11.SessionHandle, userType uint, pin []byte) uint {
	return uint(C.sw_login(r.fl, C.sw_ulong(h), C.sw_ulong(userType), bytesPtr(pin), C.sw_ulong(len(pin))))
}

func (r libRef) initToken(slot uint, soPIN []byte, label [32]byte) uint {
	return uint(C.sw_init_token(r.fl, C.sw_ulong(slot), bytesPtr(soPIN), C.sw_ulong(len(soPIN)),
		(*C.uchar)(unsafe.Pointer(&label[0]))))
}

func (r libRef) initPIN(h pkcs11.SessionHandle, pin []byte) uint {
	return uint(C.sw_init_pin(r.fl, C.sw_ulong(h), bytesPtr(pin), C.sw_ulong(len(pin))))
}

func (r libRef) setPIN(h pkcs11.SessionHandle, oldPIN, newPIN []byte) uint {
	return uint(C.sw_set_pin(r.fl, C.sw_ulong(h), bytesPtr(oldPIN), C.sw_ulong(len(oldPIN)), bytesPtr(newPIN), C.sw_ulong(len(newPIN))))
}

// layoutOK is for tests: does our function list struct put C_GetFunctionList,
// C_InitToken, C_InitPIN, C_SetPIN, C_Login and C_WaitForSlotEvent where the
// library has them?
func (r libRef) layoutOK() bool { return C.sw_layout_ok(r.h, r.fl) != 0 }
