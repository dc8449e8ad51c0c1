/* faultmod: a PKCS#11 v2.40 module for slotwatch's hardening tests.
 *
 * It stands in for a smart card stack only where no real module misbehaves
 * on demand: handle reuse after a removal, a C_WaitForSlotEvent that spins
 * or hangs, coalesced events, errors and delays on cue, a crash. Tokens are
 * inserted, removed and swapped, and faults are switched on and off, over a
 * line-based control socket (FAULTMOD_CONTROL) served by a thread of the
 * process that loaded the module. Every PKCS#11 call is recorded (function,
 * return value, session handle, slot, serial of the token addressed) so a
 * test can read back what the host did. ../doc.go describes the module and
 * the control protocol; ../control.go is its Go client.
 *
 * Environment, read once, at the first call into the module:
 *   FAULTMOD_SLOTS    number of slots, 1..64 (default 4)
 *   FAULTMOD_CONTROL  path of the control socket (none if unset)
 *   FAULTMOD_TOKENS   tokens present from the start: "SLOT LABEL SERIAL;..."
 *
 * The library is linked with -z nodelete: the control thread runs its code
 * for the life of the process, and the tokens (the "hardware") outlive a
 * C_Finalize and a dlclose, as a card in a reader would.
 *
 * Locking: g_mu guards all module state; g_cv (with g_mu) wakes waiters in
 * C_WaitForSlotEvent; g_rec_mu guards the call record and is only ever
 * taken alone or inside g_mu.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CK_PTR *
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType(*name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType(*name)
#ifndef NULL_PTR
#define NULL_PTR NULL
#endif
#include "pkcs11.h"

#include "cert.h"
#include "ckrnames.h"

#define FM_EXPORT __attribute__((visibility("default")))
#define FM_MAX_SLOTS 64
#define FM_DEFAULT_SLOTS 4
#define FM_DEFAULT_PIN "1234"
#define FM_MAX_PIN 64
#define FM_SIG_LEN 64
#define FM_REC_CAP (1u << 18) /* call records kept; older ones are dropped */
#define FM_LINE_MAX 4096

/* ---- function names ---------------------------------------------------- */

/* All 68 functions of the v2.40 function list, in its order. */
#define FM_FUNCS(X)                                                                                       \
	X(Initialize) X(Finalize) X(GetInfo) X(GetFunctionList) X(GetSlotList) X(GetSlotInfo)             \
	X(GetTokenInfo) X(GetMechanismList) X(GetMechanismInfo) X(InitToken) X(InitPIN) X(SetPIN)         \
	X(OpenSession) X(CloseSession) X(CloseAllSessions) X(GetSessionInfo) X(GetOperationState)         \
	X(SetOperationState) X(Login) X(Logout) X(CreateObject) X(CopyObject) X(DestroyObject)            \
	X(GetObjectSize) X(GetAttributeValue) X(SetAttributeValue) X(FindObjectsInit) X(FindObjects)      \
	X(FindObjectsFinal) X(EncryptInit) X(Encrypt) X(EncryptUpdate) X(EncryptFinal) X(DecryptInit)     \
	X(Decrypt) X(DecryptUpdate) X(DecryptFinal) X(DigestInit) X(Digest) X(DigestUpdate)               \
	X(DigestKey) X(DigestFinal) X(SignInit) X(Sign) X(SignUpdate) X(SignFinal) X(SignRecoverInit)     \
	X(SignRecover) X(VerifyInit) X(Verify) X(VerifyUpdate) X(VerifyFinal) X(VerifyRecoverInit)        \
	X(VerifyRecover) X(DigestEncryptUpdate) X(DecryptDigestUpdate) X(SignEncryptUpdate)               \
	X(DecryptVerifyUpdate) X(GenerateKey) X(GenerateKeyPair) X(WrapKey) X(UnwrapKey) X(DeriveKey)     \
	X(SeedRandom) X(GenerateRandom) X(GetFunctionStatus) X(CancelFunction) X(WaitForSlotEvent)

#define FM_ENUM(n) F_##n,
enum { FM_FUNCS(FM_ENUM) F_COUNT };
#undef FM_ENUM
#define FM_NAME(n) "C_" #n,
static const char *const fn_names[F_COUNT] = {FM_FUNCS(FM_NAME)};
#undef FM_NAME

/* ---- state ------------------------------------------------------------- */

enum { LOGIN_NONE, LOGIN_USER, LOGIN_SO };
enum { WAIT_BLOCK, WAIT_RETURN, WAIT_COALESCE, WAIT_HANG };
enum { OBJ_CERT = 1, OBJ_KEY = 2 };

struct fm_token_slot {
	int present;
	char label[33];  /* without padding */
	char serial[17]; /* without padding */
	char pin[FM_MAX_PIN + 1];
	int login;   /* LOGIN_*: PKCS#11 login state is per token */
	int pending; /* a slot event not yet reported by C_WaitForSlotEvent */
};

struct fm_session {
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	CK_FLAGS flags;
	int find_active, find_n, find_pos;
	CK_OBJECT_HANDLE find_res[2];
	int sign_active;
	CK_MECHANISM_TYPE sign_mech;
	struct fm_session *next;
};

struct fm_fault {
	CK_RV fail_rv;
	unsigned long fail_nth, fail_count, fail_seen; /* fail_nth 0: off; fail_count 0: forever */
	unsigned long abort_nth, abort_seen;           /* abort_nth 0: off */
	unsigned long sleep_ms;
};

struct fm_rec {
	unsigned long seq;
	int fn;
	CK_RV rv;
	CK_ULONG handle; /* 0: none */
	CK_SLOT_ID slot;
	int has_slot;
	char serial[17]; /* "" with has_serial 0: "-" */
	int has_serial;
};

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;

static CK_ULONG g_nslots = FM_DEFAULT_SLOTS;
static struct fm_token_slot g_slots[FM_MAX_SLOTS];
static int g_initialized;
static unsigned long g_epoch; /* bumped by every C_Finalize */
static struct fm_session *g_sessions;
static CK_SESSION_HANDLE g_next_handle = 1;
static CK_SESSION_HANDLE *g_freed; /* handles freed by token removal, ascending */
static size_t g_nfreed, g_capfreed;
static int g_reuse_handles;
static int g_wait_mode = WAIT_BLOCK;
static unsigned long g_coalesce_left;
static struct fm_fault g_faults[F_COUNT];

static pthread_mutex_t g_rec_mu = PTHREAD_MUTEX_INITIALIZER;
static struct fm_rec *g_rec; /* ring of FM_REC_CAP */
static size_t g_rec_start, g_rec_len;
static unsigned long g_rec_seq;

static CK_FUNCTION_LIST g_funcs; /* defined at the end of this file */

/* ---- small helpers ----------------------------------------------------- */

static void pad(CK_UTF8CHAR *dst, size_t n, const char *src) {
	size_t l = strlen(src);
	if (l > n) l = n;
	memset(dst, ' ', n);
	memcpy(dst, src, l);
}

static void sleep_ms(unsigned long ms) {
	struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
	}
}

/* die aborts the process: SIGABRT with its default action, whatever handler
 * the host installed (Go's runtime would turn it into exit status 2). */
static void die(void) {
	struct sigaction sa;
	sigset_t set;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = SIG_DFL;
	sigaction(SIGABRT, &sa, NULL);
	sigemptyset(&set);
	sigaddset(&set, SIGABRT);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	abort();
}

/* ---- the call record --------------------------------------------------- */

struct call {
	int fn;
	int faulted;
	CK_RV fault_rv;
	CK_ULONG handle;
	CK_SLOT_ID slot;
	int has_slot;
	char serial[17];
	int has_serial;
};

static void note_slot(struct call *c, CK_SLOT_ID id) {
	c->slot = id;
	c->has_slot = 1;
	c->has_serial = 0;
	if (id < g_nslots && g_slots[id].present) {
		strcpy(c->serial, g_slots[id].serial);
		c->has_serial = 1;
	}
}

static struct fm_session *find_session(CK_SESSION_HANDLE h) {
	for (struct fm_session *s = g_sessions; s != NULL; s = s->next)
		if (s->h == h) return s;
	return NULL;
}

/* note_session records h and, if it is a live session, its slot and token.
 * Called with g_mu held. Returns the session or NULL. */
static struct fm_session *note_session(struct call *c, CK_SESSION_HANDLE h) {
	struct fm_session *s = g_initialized ? find_session(h) : NULL;
	c->handle = h;
	if (s != NULL) note_slot(c, s->slot);
	return s;
}

/* call_begin runs the faults set for fn: abort, sleep, fail. It takes g_mu
 * only briefly and returns with it not held. */
static void call_begin(struct call *c, int fn);

/* call_end records the call and releases g_mu (held by the caller). */
static CK_RV call_end(struct call *c, CK_RV rv) {
	pthread_mutex_lock(&g_rec_mu);
	if (g_rec == NULL) g_rec = malloc(sizeof *g_rec * FM_REC_CAP);
	if (g_rec != NULL) {
		struct fm_rec *r;
		if (g_rec_len < FM_REC_CAP) {
			r = &g_rec[(g_rec_start + g_rec_len) % FM_REC_CAP];
			g_rec_len++;
		} else {
			r = &g_rec[g_rec_start];
			g_rec_start = (g_rec_start + 1) % FM_REC_CAP;
		}
		r->seq = ++g_rec_seq;
		r->fn = c->fn;
		r->rv = rv;
		r->handle = c->handle;
		r->slot = c->slot;
		r->has_slot = c->has_slot;
		r->has_serial = c->has_serial;
		memcpy(r->serial, c->serial, sizeof r->serial);
	}
	pthread_mutex_unlock(&g_rec_mu);
	pthread_mutex_unlock(&g_mu);
	return rv;
}

/* ---- setup and the control channel ------------------------------------- */

static void *control_listen(void *arg);
static int command(char *line, char *out, size_t outsz);

/* initial_tokens inserts the tokens of FAULTMOD_TOKENS, "SLOT LABEL SERIAL"
 * entries separated by ";" (words as in the insert command). */
static void initial_tokens(const char *spec) {
	char *dup = strdup(spec), *save = NULL;
	if (dup == NULL) return;
	for (char *e = strtok_r(dup, ";", &save); e != NULL; e = strtok_r(NULL, ";", &save)) {
		char line[FM_LINE_MAX], out[512];
		if (strspn(e, " \t") == strlen(e)) continue;
		snprintf(line, sizeof line, "insert %s", e);
		command(line, out, sizeof out);
		if (strncmp(out, "ok", 2) != 0) fprintf(stderr, "faultmod: FAULTMOD_TOKENS: %s: %s\n", e, out);
	}
	free(dup);
}

static void setup(void) {
	const char *e = getenv("FAULTMOD_SLOTS");
	if (e != NULL && *e != '\0') {
		char *end;
		unsigned long n = strtoul(e, &end, 10);
		if (*end == '\0' && n >= 1 && n <= FM_MAX_SLOTS)
			g_nslots = n;
		else
			fprintf(stderr, "faultmod: FAULTMOD_SLOTS=%s is not 1..%d; using %d\n", e, FM_MAX_SLOTS,
			        FM_DEFAULT_SLOTS);
	}
	for (CK_ULONG i = 0; i < FM_MAX_SLOTS; i++) strcpy(g_slots[i].pin, FM_DEFAULT_PIN);
	e = getenv("FAULTMOD_TOKENS");
	if (e != NULL) initial_tokens(e);

	const char *path = getenv("FAULTMOD_CONTROL");
	if (path == NULL || *path == '\0') return;
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof sa);
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sa.sun_path) {
		fprintf(stderr, "faultmod: FAULTMOD_CONTROL path too long: %s\n", path);
		return;
	}
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fprintf(stderr, "faultmod: socket: %s\n", strerror(errno));
		return;
	}
	int rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
	if (rc != 0 && errno == EADDRINUSE) {
		/* Someone's socket file: take it over only if nobody listens. */
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		int live = probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof sa) == 0;
		if (probe >= 0) close(probe);
		if (live) {
			fprintf(stderr, "faultmod: control socket %s is in use by another process\n", path);
			close(fd);
			return;
		}
		unlink(path);
		rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
	}
	if (rc != 0 || listen(fd, 16) != 0) {
		fprintf(stderr, "faultmod: control socket %s: %s\n", path, strerror(errno));
		close(fd);
		return;
	}
	/* The thread must not take signals meant for the host (Go's runtime
	 * wants them on its own threads): start it with all of them blocked. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t t;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, control_listen, (void *)(intptr_t)fd) != 0) {
		fprintf(stderr, "faultmod: cannot start the control thread\n");
		close(fd);
	}
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void call_begin(struct call *c, int fn) {
	int do_abort = 0;
	unsigned long ms;
	pthread_once(&g_once, setup);
	memset(c, 0, sizeof *c);
	c->fn = fn;
	pthread_mutex_lock(&g_mu);
	struct fm_fault *f = &g_faults[fn];
	if (f->abort_nth != 0 && ++f->abort_seen == f->abort_nth) do_abort = 1;
	ms = f->sleep_ms;
	if (f->fail_nth != 0) {
		unsigned long n = ++f->fail_seen;
		if (n >= f->fail_nth && (f->fail_count == 0 || n < f->fail_nth + f->fail_count)) {
			c->faulted = 1;
			c->fault_rv = f->fail_rv;
		}
		if (f->fail_count != 0 && n + 1 >= f->fail_nth + f->fail_count) f->fail_nth = 0; /* spent */
	}
	pthread_mutex_unlock(&g_mu);
	if (do_abort) die();
	if (ms != 0) sleep_ms(ms);
}

/* Send all of buf; 0 on success. */
static int send_all(int fd, const char *buf, size_t n) {
	while (n > 0) {
		ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR) continue;
			return -1;
		}
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

/* decode_word turns a protocol word into text: "-" is the empty string,
 * %XX a byte. Returns 0 on success, -1 if malformed or longer than max. */
static int decode_word(const char *w, char *out, size_t max) {
	size_t n = 0;
	if (strcmp(w, "-") == 0) {
		out[0] = '\0';
		return 0;
	}
	for (const char *p = w; *p != '\0'; p++) {
		int ch = (unsigned char)*p;
		if (ch == '%') {
			unsigned int v;
			char hex[3] = {0, 0, 0};
			if (p[1] == '\0' || p[2] == '\0') return -1;
			hex[0] = p[1];
			hex[1] = p[2];
			if (sscanf(hex, "%2x", &v) != 1 || strspn(hex, "0123456789abcdefABCDEF") != 2) return -1;
			if (v == 0) return -1;
			ch = (int)v;
			p += 2;
		}
		if (n >= max) return -1;
		out[n++] = (char)ch;
	}
	out[n] = '\0';
	return 0;
}

/* encode_word is decode_word's inverse; out needs 3*strlen(in)+4 bytes. */
static void encode_word(const char *in, char *out) {
	if (*in == '\0' || strcmp(in, "-") == 0) {
		strcpy(out, *in == '\0' ? "-" : "%2D");
		return;
	}
	for (const unsigned char *p = (const unsigned char *)in; *p != '\0'; p++) {
		if (*p <= ' ' || *p >= 0x7f || *p == '%')
			out += sprintf(out, "%%%02X", *p);
		else
			*out++ = (char)*p;
	}
	*out = '\0';
}

static int parse_ulong(const char *s, unsigned long *v) {
	char *end;
	if (s == NULL || *s == '\0' || *s == '-') return -1;
	errno = 0;
	*v = strtoul(s, &end, 0);
	return (*end != '\0' || errno != 0) ? -1 : 0;
}

static int parse_func(const char *s) {
	if (s == NULL) return -1;
	if (strncasecmp(s, "C_", 2) == 0) s += 2;
	for (int i = 0; i < F_COUNT; i++)
		if (strcasecmp(s, fn_names[i] + 2) == 0) return i;
	return -1;
}

static int parse_rv(const char *s, CK_RV *rv) {
	unsigned long v;
	if (s == NULL) return -1;
	for (size_t i = 0; i < sizeof ckr_names / sizeof ckr_names[0]; i++)
		if (strcasecmp(s, ckr_names[i].name) == 0) {
			*rv = ckr_names[i].rv;
			return 0;
		}
	if (parse_ulong(s, &v) != 0) return -1;
	*rv = v;
	return 0;
}

/* wake tells blocked waiters that something changed. g_mu held. */
static void wake(void) { pthread_cond_broadcast(&g_cv); }

/* slot_changed raises the event of one change on slot, or swallows it while
 * the wait mode coalesces. g_mu held. */
static void slot_changed(CK_SLOT_ID id) {
	if (g_wait_mode == WAIT_COALESCE) {
		if (g_coalesce_left > 1) {
			g_coalesce_left--;
			return;
		}
		g_wait_mode = WAIT_BLOCK;
		g_coalesce_left = 0;
	}
	g_slots[id].pending = 1;
	wake();
}

static void free_handle(CK_SESSION_HANDLE h) {
	if (g_nfreed == g_capfreed) {
		size_t cap = g_capfreed ? 2 * g_capfreed : 16;
		CK_SESSION_HANDLE *n = realloc(g_freed, cap * sizeof *n);
		if (n == NULL) return; /* the value is simply not reused */
		g_freed = n;
		g_capfreed = cap;
	}
	size_t i = g_nfreed;
	while (i > 0 && g_freed[i - 1] > h) {
		g_freed[i] = g_freed[i - 1];
		i--;
	}
	g_freed[i] = h;
	g_nfreed++;
}

/* drop_sessions frees every session on slot (all slots if slot is -1);
 * freed says whether their handles go to the reuse pool. g_mu held. */
static void drop_sessions(CK_SLOT_ID slot, int all, int freed) {
	struct fm_session **pp = &g_sessions;
	while (*pp != NULL) {
		struct fm_session *s = *pp;
		if (all || s->slot == slot) {
			*pp = s->next;
			if (freed) free_handle(s->h);
			free(s);
		} else {
			pp = &s->next;
		}
	}
}

static int slot_has_sessions(CK_SLOT_ID slot) {
	for (struct fm_session *s = g_sessions; s != NULL; s = s->next)
		if (s->slot == slot) return 1;
	return 0;
}

/* remove_token takes the token out of slot: its sessions die (their handle
 * values go to the reuse pool), its login state goes. g_mu held. */
static void remove_token(CK_SLOT_ID id) {
	drop_sessions(id, 0, 1);
	g_slots[id].present = 0;
	g_slots[id].login = LOGIN_NONE;
	g_slots[id].label[0] = g_slots[id].serial[0] = '\0';
}

static void insert_token(CK_SLOT_ID id, const char *label, const char *serial) {
	struct fm_token_slot *t = &g_slots[id];
	t->present = 1;
	t->login = LOGIN_NONE;
	strcpy(t->label, label);
	strcpy(t->serial, serial);
	strcpy(t->pin, FM_DEFAULT_PIN);
}

/* dump_calls sends "ok N" and N record lines. */
static int dump_calls(int fd) {
	pthread_mutex_lock(&g_rec_mu);
	size_t n = g_rec_len;
	struct fm_rec *copy = n ? malloc(n * sizeof *copy) : NULL;
	if (n != 0 && copy == NULL) {
		pthread_mutex_unlock(&g_rec_mu);
		return send_all(fd, "err out of memory\n", 18);
	}
	for (size_t i = 0; i < n; i++) copy[i] = g_rec[(g_rec_start + i) % FM_REC_CAP];
	pthread_mutex_unlock(&g_rec_mu);

	size_t cap = 64 + n * 256, len = 0; /* a line is at most ~170 bytes */
	char *buf = malloc(cap);
	if (buf == NULL) {
		free(copy);
		return send_all(fd, "err out of memory\n", 18);
	}
	len += (size_t)sprintf(buf, "ok %zu\n", n);
	for (size_t i = 0; i < n; i++) {
		struct fm_rec *r = &copy[i];
		char h[32], s[32], ser[3 * 16 + 4];
		if (r->handle != 0)
			snprintf(h, sizeof h, "%lu", r->handle);
		else
			strcpy(h, "-");
		if (r->has_slot)
			snprintf(s, sizeof s, "%lu", r->slot);
		else
			strcpy(s, "-");
		if (r->has_serial)
			encode_word(r->serial, ser);
		else
			strcpy(ser, "-");
		len += (size_t)snprintf(buf + len, cap - len, "%lu %s 0x%lx %s %s %s\n", r->seq, fn_names[r->fn], r->rv,
		                        h, s, ser);
	}
	int rc = send_all(fd, buf, len);
	free(buf);
	free(copy);
	return rc;
}

#define REPLY(...) snprintf(out, outsz, __VA_ARGS__)

/* command runs one control line; the reply (one line, no newline) goes to
 * out. Returns 1 if the reply is the call dump instead. */
static int command(char *line, char *out, size_t outsz) {
	char *argv[8];
	int argc = 0;
	char *save = NULL;
	for (char *w = strtok_r(line, " \t\r", &save); w != NULL; w = strtok_r(NULL, " \t\r", &save)) {
		if (argc == 8) {
			REPLY("err too many words");
			return 0;
		}
		argv[argc++] = w;
	}
	if (argc == 0) {
		REPLY("err empty command");
		return 0;
	}
	const char *cmd = argv[0];
	unsigned long slot = 0;
	char label[33], serial[17], pin[FM_MAX_PIN + 1];

	if (strcmp(cmd, "calls") == 0 && argc == 1) return 1;

	if (strcmp(cmd, "insert") == 0 || strcmp(cmd, "swap") == 0 || strcmp(cmd, "remove") == 0 ||
	    strcmp(cmd, "pin") == 0) {
		int want = strcmp(cmd, "remove") == 0 ? 2 : strcmp(cmd, "pin") == 0 ? 3 : 4;
		if (argc != want) {
			REPLY("err usage: %s", want == 2   ? "remove SLOT"
			                       : want == 3 ? "pin SLOT PIN"
			                                   : "insert|swap SLOT LABEL SERIAL");
			return 0;
		}
		if (parse_ulong(argv[1], &slot) != 0 || slot >= g_nslots) {
			REPLY("err slot %s: not a slot (0..%lu)", argv[1], g_nslots - 1);
			return 0;
		}
		if (want == 4 && decode_word(argv[2], label, 32) != 0) {
			REPLY("err label %s: at most 32 bytes, %%XX escapes, - for empty", argv[2]);
			return 0;
		}
		if (want == 4 && (decode_word(argv[3], serial, 16) != 0 || serial[0] == '\0')) {
			REPLY("err serial %s: 1..16 bytes, %%XX escapes", argv[3]);
			return 0;
		}
		if (want == 3 && (decode_word(argv[2], pin, FM_MAX_PIN) != 0 || pin[0] == '\0')) {
			REPLY("err pin: 1..%d bytes, %%XX escapes", FM_MAX_PIN);
			return 0;
		}
		pthread_mutex_lock(&g_mu);
		struct fm_token_slot *t = &g_slots[slot];
		if (strcmp(cmd, "insert") == 0) {
			if (t->present) {
				REPLY("err slot %lu holds token %s: remove or swap it", slot, t->serial);
			} else {
				insert_token(slot, label, serial);
				slot_changed(slot);
				REPLY("ok");
			}
		} else if (!t->present) {
			REPLY("err slot %lu is empty", slot);
		} else if (strcmp(cmd, "remove") == 0) {
			remove_token(slot);
			slot_changed(slot);
			REPLY("ok");
		} else if (strcmp(cmd, "swap") == 0) {
			remove_token(slot);
			insert_token(slot, label, serial);
			slot_changed(slot);
			REPLY("ok");
		} else {
			strcpy(t->pin, pin);
			REPLY("ok");
		}
		pthread_mutex_unlock(&g_mu);
		return 0;
	}

	if (strcmp(cmd, "wait") == 0) {
		unsigned long n = 0;
		int mode;
		if (argc == 2 && strcmp(argv[1], "block") == 0)
			mode = WAIT_BLOCK;
		else if (argc == 2 && strcmp(argv[1], "return") == 0)
			mode = WAIT_RETURN;
		else if (argc == 2 && strcmp(argv[1], "hang") == 0)
			mode = WAIT_HANG;
		else if (argc == 3 && strcmp(argv[1], "coalesce") == 0 && parse_ulong(argv[2], &n) == 0 && n >= 1)
			mode = WAIT_COALESCE;
		else {
			REPLY("err usage: wait block|return|hang|coalesce N (N >= 1)");
			return 0;
		}
		pthread_mutex_lock(&g_mu);
		g_wait_mode = mode;
		g_coalesce_left = n;
		wake();
		pthread_mutex_unlock(&g_mu);
		REPLY("ok");
		return 0;
	}

	if (strcmp(cmd, "reuse-handles") == 0) {
		if (argc != 2 || (strcmp(argv[1], "on") != 0 && strcmp(argv[1], "off") != 0)) {
			REPLY("err usage: reuse-handles on|off");
			return 0;
		}
		pthread_mutex_lock(&g_mu);
		g_reuse_handles = strcmp(argv[1], "on") == 0;
		pthread_mutex_unlock(&g_mu);
		REPLY("ok");
		return 0;
	}

	if (strcmp(cmd, "fail") == 0 || strcmp(cmd, "sleep") == 0 || strcmp(cmd, "abort") == 0) {
		int fn = argc >= 2 ? parse_func(argv[1]) : -1;
		CK_RV rv = 0;
		unsigned long nth = 0, count = 1, ms = 0;
		int ok;
		if (strcmp(cmd, "fail") == 0)
			ok = (argc == 4 || argc == 5) && parse_rv(argv[2], &rv) == 0 && parse_ulong(argv[3], &nth) == 0 &&
			     nth >= 1 && (argc == 4 || parse_ulong(argv[4], &count) == 0);
		else if (strcmp(cmd, "sleep") == 0)
			ok = argc == 3 && parse_ulong(argv[2], &ms) == 0;
		else
			ok = argc == 3 && parse_ulong(argv[2], &nth) == 0 && nth >= 1;
		if (!ok) {
			REPLY("err usage: fail FUNC CKR_NAME|0xHEX NTH [COUNT] | sleep FUNC MS | abort FUNC NTH");
			return 0;
		}
		if (fn < 0) {
			REPLY("err %s: not a PKCS#11 function (e.g. GetSlotList)", argv[1]);
			return 0;
		}
		pthread_mutex_lock(&g_mu);
		struct fm_fault *f = &g_faults[fn];
		if (strcmp(cmd, "fail") == 0) {
			f->fail_rv = rv;
			f->fail_nth = nth;
			f->fail_count = count;
			f->fail_seen = 0;
		} else if (strcmp(cmd, "sleep") == 0) {
			f->sleep_ms = ms;
		} else {
			f->abort_nth = nth;
			f->abort_seen = 0;
		}
		pthread_mutex_unlock(&g_mu);
		REPLY("ok");
		return 0;
	}

	if (strcmp(cmd, "clear-calls") == 0 && argc == 1) {
		pthread_mutex_lock(&g_rec_mu);
		g_rec_start = g_rec_len = 0;
		pthread_mutex_unlock(&g_rec_mu);
		REPLY("ok");
		return 0;
	}

	if (strcmp(cmd, "reset") == 0 && argc == 1) {
		pthread_mutex_lock(&g_mu);
		memset(g_faults, 0, sizeof g_faults);
		g_reuse_handles = 0;
		g_wait_mode = WAIT_BLOCK;
		g_coalesce_left = 0;
		wake();
		pthread_mutex_unlock(&g_mu);
		REPLY("ok");
		return 0;
	}

	REPLY("err unknown command %s (insert remove swap pin wait reuse-handles fail sleep abort calls "
	      "clear-calls reset)",
	      cmd);
	return 0;
}

static void *control_serve(void *arg) {
	int fd = (int)(intptr_t)arg;
	char buf[FM_LINE_MAX + 1], out[512];
	size_t len = 0;
	for (;;) {
		char *nl = memchr(buf, '\n', len);
		if (nl == NULL) {
			if (len == FM_LINE_MAX) {
				send_all(fd, "err line too long\n", 18);
				break;
			}
			ssize_t r = recv(fd, buf + len, FM_LINE_MAX - len, 0);
			if (r < 0 && errno == EINTR) continue;
			if (r <= 0) break;
			len += (size_t)r;
			continue;
		}
		*nl = '\0';
		int rc;
		if (command(buf, out, sizeof out - 1)) {
			rc = dump_calls(fd);
		} else {
			strcat(out, "\n");
			rc = send_all(fd, out, strlen(out));
		}
		if (rc != 0) break;
		size_t used = (size_t)(nl - buf) + 1;
		memmove(buf, nl + 1, len - used);
		len -= used;
	}
	close(fd);
	return NULL;
}

static void *control_listen(void *arg) {
	int lfd = (int)(intptr_t)arg;
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
				if (errno == EMFILE || errno == ENFILE) sleep_ms(100);
				continue;
			}
			fprintf(stderr, "faultmod: control accept: %s\n", strerror(errno));
			return NULL;
		}
		pthread_t t;
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&t, &attr, control_serve, (void *)(intptr_t)fd) != 0) close(fd);
		pthread_attr_destroy(&attr);
	}
}

/* ---- objects ----------------------------------------------------------- */

/* Object handles: per slot, (slot+1)*16 + OBJ_CERT or OBJ_KEY. The same
 * values come back after a swap, as with real modules. */
static CK_OBJECT_HANDLE obj_handle(CK_SLOT_ID slot, int kind) { return (CK_OBJECT_HANDLE)(slot + 1) * 16 + kind; }

/* obj_kind is the object's kind if h is visible in session s, else 0.
 * The private key is visible only while the user is logged in. */
static int obj_kind(struct fm_session *s, CK_OBJECT_HANDLE h) {
	if (h == obj_handle(s->slot, OBJ_CERT)) return OBJ_CERT;
	if (h == obj_handle(s->slot, OBJ_KEY) && g_slots[s->slot].login == LOGIN_USER) return OBJ_KEY;
	return 0;
}

enum { ATTR_NONE, ATTR_OK, ATTR_SENSITIVE };

/* obj_attr finds attribute t of an object of kind on the token with
 * serial: *val and *len, with small values built in tmp (ATTR_TMP bytes).
 * The certificate's label names the token's serial, so a test can tell
 * whose objects a session sees. */
#define ATTR_TMP 64
static int obj_attr(int kind, const char *serial, CK_ATTRIBUTE_TYPE t, unsigned char *tmp, const void **val, CK_ULONG *len) {
	static const unsigned char id[] = {0x01};
	static const unsigned char ec_params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
	static const char cert_label[] = "faultmod certificate", key_label[] = "faultmod key";
	CK_ULONG ul;
	CK_BBOOL b;
	switch (t) {
	case CKA_CLASS:
		ul = kind == OBJ_CERT ? CKO_CERTIFICATE : CKO_PRIVATE_KEY;
		goto ulong;
	case CKA_TOKEN:
		b = CK_TRUE;
		goto bbool;
	case CKA_PRIVATE:
		b = kind == OBJ_KEY;
		goto bbool;
	case CKA_MODIFIABLE:
		b = CK_FALSE;
		goto bbool;
	case CKA_ID:
		*val = id;
		*len = sizeof id;
		return ATTR_OK;
	case CKA_LABEL:
		if (kind == OBJ_CERT) {
			*len = (CK_ULONG)snprintf((char *)tmp, ATTR_TMP, "%s %s", cert_label, serial);
			*val = tmp;
		} else {
			*val = key_label;
			*len = strlen(key_label);
		}
		return ATTR_OK;
	}
	if (kind == OBJ_CERT) {
		switch (t) {
		case CKA_CERTIFICATE_TYPE:
			ul = CKC_X_509;
			goto ulong;
		case CKA_VALUE:
			*val = cert_der;
			*len = sizeof cert_der;
			return ATTR_OK;
		case CKA_SUBJECT:
			*val = cert_subject;
			*len = sizeof cert_subject;
			return ATTR_OK;
		case CKA_ISSUER:
			*val = cert_issuer;
			*len = sizeof cert_issuer;
			return ATTR_OK;
		case CKA_SERIAL_NUMBER:
			*val = cert_serial;
			*len = sizeof cert_serial;
			return ATTR_OK;
		}
		return ATTR_NONE;
	}
	switch (t) {
	case CKA_KEY_TYPE:
		ul = CKK_EC;
		goto ulong;
	case CKA_SIGN:
	case CKA_LOCAL:
	case CKA_SENSITIVE:
	case CKA_ALWAYS_SENSITIVE:
	case CKA_NEVER_EXTRACTABLE:
		b = CK_TRUE;
		goto bbool;
	case CKA_EXTRACTABLE:
	case CKA_ALWAYS_AUTHENTICATE:
	case CKA_DECRYPT:
	case CKA_UNWRAP:
	case CKA_DERIVE:
		b = CK_FALSE;
		goto bbool;
	case CKA_EC_PARAMS:
		*val = ec_params;
		*len = sizeof ec_params;
		return ATTR_OK;
	case CKA_VALUE:
		return ATTR_SENSITIVE;
	}
	return ATTR_NONE;
ulong:
	memcpy(tmp, &ul, sizeof ul);
	*val = tmp;
	*len = sizeof ul;
	return ATTR_OK;
bbool:
	memcpy(tmp, &b, sizeof b);
	*val = tmp;
	*len = sizeof b;
	return ATTR_OK;
}

static int obj_matches(int kind, const char *serial, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n) {
	for (CK_ULONG i = 0; i < n; i++) {
		unsigned char tmp[ATTR_TMP];
		const void *v;
		CK_ULONG l;
		if (obj_attr(kind, serial, tmpl[i].type, tmp, &v, &l) != ATTR_OK) return 0;
		if (l != tmpl[i].ulValueLen || (l != 0 && (tmpl[i].pValue == NULL || memcmp(v, tmpl[i].pValue, l) != 0)))
			return 0;
	}
	return 1;
}

/* ---- PKCS#11 ----------------------------------------------------------- */

#define BEGIN(name)                  \
	struct call c;               \
	call_begin(&c, F_##name);    \
	pthread_mutex_lock(&g_mu)
#define END(rv) return call_end(&c, (rv))
#define FAULT_POINT             \
	do {                    \
		if (c.faulted)  \
			END(c.fault_rv); \
	} while (0)
#define NEED_INIT                                       \
	do {                                            \
		if (!g_initialized)                     \
			END(CKR_CRYPTOKI_NOT_INITIALIZED); \
	} while (0)
/* SESSION(h) declares s, the live session h, or ends the call. */
#define SESSION(h)                                     \
	struct fm_session *s = note_session(&c, (h)); \
	FAULT_POINT;                                   \
	NEED_INIT;                                     \
	if (s == NULL) END(CKR_SESSION_HANDLE_INVALID)

FM_EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs) {
	BEGIN(Initialize);
	FAULT_POINT;
	if (pInitArgs != NULL) {
		CK_C_INITIALIZE_ARGS *a = pInitArgs;
		int fns = (a->CreateMutex != NULL) + (a->DestroyMutex != NULL) + (a->LockMutex != NULL) +
		          (a->UnlockMutex != NULL);
		if (a->pReserved != NULL || (fns != 0 && fns != 4)) END(CKR_ARGUMENTS_BAD);
		/* We lock with pthreads. The caller's own mutex functions without
		 * CKF_OS_LOCKING_OK mean "use these and nothing else": we cannot. */
		if (fns == 4 && !(a->flags & CKF_OS_LOCKING_OK)) END(CKR_CANT_LOCK);
	}
	if (g_initialized) END(CKR_CRYPTOKI_ALREADY_INITIALIZED);
	g_initialized = 1;
	g_next_handle = 1; /* a new instance may hand out the old values again */
	g_nfreed = 0;
	for (CK_ULONG i = 0; i < g_nslots; i++) {
		g_slots[i].pending = 0;
		g_slots[i].login = LOGIN_NONE;
	}
	END(CKR_OK);
}

FM_EXPORT CK_RV C_Finalize(CK_VOID_PTR pReserved) {
	BEGIN(Finalize);
	FAULT_POINT;
	if (pReserved != NULL) END(CKR_ARGUMENTS_BAD);
	NEED_INIT;
	drop_sessions(0, 1, 0);
	g_nfreed = 0;
	for (CK_ULONG i = 0; i < g_nslots; i++) g_slots[i].login = LOGIN_NONE;
	g_initialized = 0;
	g_epoch++;
	wake(); /* blocked C_WaitForSlotEvent calls return CKR_CRYPTOKI_NOT_INITIALIZED */
	END(CKR_OK);
}

FM_EXPORT CK_RV C_GetInfo(CK_INFO_PTR pInfo) {
	BEGIN(GetInfo);
	FAULT_POINT;
	NEED_INIT;
	if (pInfo == NULL) END(CKR_ARGUMENTS_BAD);
	memset(pInfo, 0, sizeof *pInfo);
	pInfo->cryptokiVersion.major = 2;
	pInfo->cryptokiVersion.minor = 40;
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "slotwatch");
	pad(pInfo->libraryDescription, sizeof pInfo->libraryDescription, "faultmod fault injection");
	pInfo->libraryVersion.major = 1;
	pInfo->libraryVersion.minor = 0;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) {
	BEGIN(GetFunctionList);
	FAULT_POINT;
	if (ppFunctionList == NULL) END(CKR_ARGUMENTS_BAD);
	*ppFunctionList = &g_funcs;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount) {
	BEGIN(GetSlotList);
	FAULT_POINT;
	NEED_INIT;
	if (pulCount == NULL) END(CKR_ARGUMENTS_BAD);
	CK_ULONG n = 0;
	for (CK_ULONG i = 0; i < g_nslots; i++)
		if (!tokenPresent || g_slots[i].present) n++;
	if (pSlotList == NULL) {
		*pulCount = n;
		END(CKR_OK);
	}
	if (*pulCount < n) {
		*pulCount = n;
		END(CKR_BUFFER_TOO_SMALL);
	}
	n = 0;
	for (CK_ULONG i = 0; i < g_nslots; i++)
		if (!tokenPresent || g_slots[i].present) pSlotList[n++] = i;
	*pulCount = n;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo) {
	BEGIN(GetSlotInfo);
	note_slot(&c, slotID);
	FAULT_POINT;
	NEED_INIT;
	if (slotID >= g_nslots) END(CKR_SLOT_ID_INVALID);
	if (pInfo == NULL) END(CKR_ARGUMENTS_BAD);
	char desc[48];
	memset(pInfo, 0, sizeof *pInfo);
	snprintf(desc, sizeof desc, "faultmod slot %lu", slotID);
	pad(pInfo->slotDescription, sizeof pInfo->slotDescription, desc);
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "slotwatch");
	pInfo->flags = CKF_REMOVABLE_DEVICE | CKF_HW_SLOT | (g_slots[slotID].present ? CKF_TOKEN_PRESENT : 0);
	pInfo->hardwareVersion.major = 1;
	pInfo->firmwareVersion.major = 1;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo) {
	BEGIN(GetTokenInfo);
	note_slot(&c, slotID);
	FAULT_POINT;
	NEED_INIT;
	if (slotID >= g_nslots) END(CKR_SLOT_ID_INVALID);
	if (!g_slots[slotID].present) END(CKR_TOKEN_NOT_PRESENT);
	if (pInfo == NULL) END(CKR_ARGUMENTS_BAD);
	struct fm_token_slot *t = &g_slots[slotID];
	CK_ULONG all = 0, rw = 0;
	for (struct fm_session *s = g_sessions; s != NULL; s = s->next)
		if (s->slot == slotID) {
			all++;
			if (s->flags & CKF_RW_SESSION) rw++;
		}
	memset(pInfo, 0, sizeof *pInfo);
	pad(pInfo->label, sizeof pInfo->label, t->label);
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "slotwatch");
	pad(pInfo->model, sizeof pInfo->model, "faultmod");
	pad(pInfo->serialNumber, sizeof pInfo->serialNumber, t->serial);
	pInfo->flags = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED | CKF_LOGIN_REQUIRED;
	pInfo->ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
	pInfo->ulSessionCount = all;
	pInfo->ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
	pInfo->ulRwSessionCount = rw;
	pInfo->ulMaxPinLen = FM_MAX_PIN;
	pInfo->ulMinPinLen = 1;
	pInfo->ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->hardwareVersion.major = 1;
	pInfo->firmwareVersion.major = 1;
	pad(pInfo->utcTime, sizeof pInfo->utcTime, "");
	END(CKR_OK);
}

static int pin_ok(struct fm_token_slot *t, CK_UTF8CHAR_PTR pin, CK_ULONG len) {
	return pin != NULL && len == strlen(t->pin) && memcmp(pin, t->pin, len) == 0;
}

FM_EXPORT CK_RV C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pLabel) {
	BEGIN(InitToken);
	note_slot(&c, slotID);
	FAULT_POINT;
	NEED_INIT;
	if (slotID >= g_nslots) END(CKR_SLOT_ID_INVALID);
	struct fm_token_slot *t = &g_slots[slotID];
	if (!t->present) END(CKR_TOKEN_NOT_PRESENT);
	if (pLabel == NULL || (pPin == NULL && ulPinLen != 0)) END(CKR_ARGUMENTS_BAD);
	if (slot_has_sessions(slotID)) END(CKR_SESSION_EXISTS);
	if (!pin_ok(t, pPin, ulPinLen)) END(CKR_PIN_INCORRECT);
	size_t n = 32;
	while (n > 0 && (pLabel[n - 1] == ' ' || pLabel[n - 1] == '\0')) n--;
	memcpy(t->label, pLabel, n);
	t->label[n] = '\0';
	END(CKR_OK);
}

FM_EXPORT CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify,
                              CK_SESSION_HANDLE_PTR phSession) {
	(void)pApplication;
	(void)Notify;
	BEGIN(OpenSession);
	note_slot(&c, slotID);
	FAULT_POINT;
	NEED_INIT;
	if (slotID >= g_nslots) END(CKR_SLOT_ID_INVALID);
	if (!g_slots[slotID].present) END(CKR_TOKEN_NOT_PRESENT);
	if (!(flags & CKF_SERIAL_SESSION)) END(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
	if (phSession == NULL) END(CKR_ARGUMENTS_BAD);
	if (!(flags & CKF_RW_SESSION) && g_slots[slotID].login == LOGIN_SO) END(CKR_SESSION_READ_WRITE_SO_EXISTS);
	struct fm_session *s = calloc(1, sizeof *s);
	if (s == NULL) END(CKR_HOST_MEMORY);
	if (g_reuse_handles && g_nfreed > 0) {
		s->h = g_freed[0];
		memmove(g_freed, g_freed + 1, --g_nfreed * sizeof *g_freed);
	} else {
		s->h = g_next_handle++;
	}
	s->slot = slotID;
	s->flags = flags & (CKF_SERIAL_SESSION | CKF_RW_SESSION);
	s->next = g_sessions;
	g_sessions = s;
	*phSession = s->h;
	c.handle = s->h;
	END(CKR_OK);
}

/* close_session frees s; the last session on a token logs it out. */
static void close_session(struct fm_session *s) {
	for (struct fm_session **pp = &g_sessions; *pp != NULL; pp = &(*pp)->next)
		if (*pp == s) {
			*pp = s->next;
			break;
		}
	if (!slot_has_sessions(s->slot)) g_slots[s->slot].login = LOGIN_NONE;
	free(s);
}

FM_EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE hSession) {
	BEGIN(CloseSession);
	SESSION(hSession);
	close_session(s);
	END(CKR_OK);
}

FM_EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slotID) {
	BEGIN(CloseAllSessions);
	note_slot(&c, slotID);
	FAULT_POINT;
	NEED_INIT;
	if (slotID >= g_nslots) END(CKR_SLOT_ID_INVALID);
	drop_sessions(slotID, 0, 0);
	g_slots[slotID].login = LOGIN_NONE;
	END(CKR_OK);
}

static CK_STATE session_state(struct fm_session *s) {
	int rw = (s->flags & CKF_RW_SESSION) != 0;
	switch (g_slots[s->slot].login) {
	case LOGIN_SO:
		return CKS_RW_SO_FUNCTIONS;
	case LOGIN_USER:
		return rw ? CKS_RW_USER_FUNCTIONS : CKS_RO_USER_FUNCTIONS;
	}
	return rw ? CKS_RW_PUBLIC_SESSION : CKS_RO_PUBLIC_SESSION;
}

FM_EXPORT CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo) {
	BEGIN(GetSessionInfo);
	SESSION(hSession);
	if (pInfo == NULL) END(CKR_ARGUMENTS_BAD);
	memset(pInfo, 0, sizeof *pInfo);
	pInfo->slotID = s->slot;
	pInfo->state = session_state(s);
	pInfo->flags = s->flags;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen) {
	BEGIN(Login);
	SESSION(hSession);
	struct fm_token_slot *t = &g_slots[s->slot];
	if (pPin == NULL && ulPinLen != 0) END(CKR_ARGUMENTS_BAD);
	switch (userType) {
	case CKU_CONTEXT_SPECIFIC:
		if (t->login != LOGIN_USER) END(CKR_USER_NOT_LOGGED_IN);
		END(pin_ok(t, pPin, ulPinLen) ? CKR_OK : CKR_PIN_INCORRECT);
	case CKU_USER:
	case CKU_SO:
		break;
	default:
		END(CKR_USER_TYPE_INVALID);
	}
	int want = userType == CKU_SO ? LOGIN_SO : LOGIN_USER;
	if (t->login == want) END(CKR_USER_ALREADY_LOGGED_IN);
	if (t->login != LOGIN_NONE) END(CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
	if (want == LOGIN_SO)
		for (struct fm_session *o = g_sessions; o != NULL; o = o->next)
			if (o->slot == s->slot && !(o->flags & CKF_RW_SESSION)) END(CKR_SESSION_READ_ONLY_EXISTS);
	if (!pin_ok(t, pPin, ulPinLen)) END(CKR_PIN_INCORRECT);
	t->login = want;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_Logout(CK_SESSION_HANDLE hSession) {
	BEGIN(Logout);
	SESSION(hSession);
	if (g_slots[s->slot].login == LOGIN_NONE) END(CKR_USER_NOT_LOGGED_IN);
	g_slots[s->slot].login = LOGIN_NONE;
	for (struct fm_session *o = g_sessions; o != NULL; o = o->next)
		if (o->slot == s->slot) o->sign_active = 0;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate,
                                    CK_ULONG ulCount) {
	BEGIN(GetAttributeValue);
	SESSION(hSession);
	int kind = obj_kind(s, hObject);
	if (kind == 0) END(CKR_OBJECT_HANDLE_INVALID);
	if (pTemplate == NULL && ulCount != 0) END(CKR_ARGUMENTS_BAD);
	CK_RV rv = CKR_OK;
	for (CK_ULONG i = 0; i < ulCount; i++) {
		unsigned char tmp[ATTR_TMP];
		const void *v;
		CK_ULONG l;
		switch (obj_attr(kind, g_slots[s->slot].serial, pTemplate[i].type, tmp, &v, &l)) {
		case ATTR_NONE:
			pTemplate[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_ATTRIBUTE_TYPE_INVALID;
			continue;
		case ATTR_SENSITIVE:
			pTemplate[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_ATTRIBUTE_SENSITIVE;
			continue;
		}
		if (pTemplate[i].pValue == NULL) {
			pTemplate[i].ulValueLen = l;
		} else if (pTemplate[i].ulValueLen < l) {
			pTemplate[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_BUFFER_TOO_SMALL;
		} else {
			memcpy(pTemplate[i].pValue, v, l);
			pTemplate[i].ulValueLen = l;
		}
	}
	END(rv);
}

FM_EXPORT CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) {
	BEGIN(FindObjectsInit);
	SESSION(hSession);
	if (pTemplate == NULL && ulCount != 0) END(CKR_ARGUMENTS_BAD);
	if (s->find_active) END(CKR_OPERATION_ACTIVE);
	s->find_n = s->find_pos = 0;
	for (int kind = OBJ_CERT; kind <= OBJ_KEY; kind++) {
		CK_OBJECT_HANDLE h = obj_handle(s->slot, kind);
		if (obj_kind(s, h) == kind && obj_matches(kind, g_slots[s->slot].serial, pTemplate, ulCount)) s->find_res[s->find_n++] = h;
	}
	s->find_active = 1;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, CK_ULONG ulMaxObjectCount,
                              CK_ULONG_PTR pulObjectCount) {
	BEGIN(FindObjects);
	SESSION(hSession);
	if (!s->find_active) END(CKR_OPERATION_NOT_INITIALIZED);
	if (phObject == NULL || pulObjectCount == NULL) END(CKR_ARGUMENTS_BAD);
	CK_ULONG n = 0;
	while (n < ulMaxObjectCount && s->find_pos < s->find_n) phObject[n++] = s->find_res[s->find_pos++];
	*pulObjectCount = n;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession) {
	BEGIN(FindObjectsFinal);
	SESSION(hSession);
	if (!s->find_active) END(CKR_OPERATION_NOT_INITIALIZED);
	s->find_active = 0;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey) {
	BEGIN(SignInit);
	SESSION(hSession);
	if (pMechanism == NULL) END(CKR_ARGUMENTS_BAD);
	if (s->sign_active) END(CKR_OPERATION_ACTIVE);
	if (g_slots[s->slot].login != LOGIN_USER) END(CKR_USER_NOT_LOGGED_IN);
	if (obj_kind(s, hKey) != OBJ_KEY) END(CKR_KEY_HANDLE_INVALID);
	s->sign_active = 1;
	s->sign_mech = pMechanism->mechanism;
	END(CKR_OK);
}

/* FNV-1a, 64 bits. */
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

FM_EXPORT CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature,
                       CK_ULONG_PTR pulSignatureLen) {
	BEGIN(Sign);
	SESSION(hSession);
	if (!s->sign_active) END(CKR_OPERATION_NOT_INITIALIZED);
	if (pulSignatureLen == NULL || (pData == NULL && ulDataLen != 0)) {
		s->sign_active = 0;
		END(CKR_ARGUMENTS_BAD);
	}
	if (pSignature == NULL) {
		*pulSignatureLen = FM_SIG_LEN;
		END(CKR_OK);
	}
	if (*pulSignatureLen < FM_SIG_LEN) {
		*pulSignatureLen = FM_SIG_LEN;
		END(CKR_BUFFER_TOO_SMALL);
	}
	/* Deterministic in (mechanism, token serial, data). */
	uint64_t h = fnv(0xcbf29ce484222325ULL, &s->sign_mech, sizeof s->sign_mech);
	h = fnv(h, g_slots[s->slot].serial, strlen(g_slots[s->slot].serial));
	h = fnv(h, pData, ulDataLen);
	for (int i = 0; i < FM_SIG_LEN; i += 8) {
		h = fnv(h, &i, sizeof i);
		memcpy(pSignature + i, &h, 8);
	}
	*pulSignatureLen = FM_SIG_LEN;
	s->sign_active = 0;
	END(CKR_OK);
}

FM_EXPORT CK_RV C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved) {
	BEGIN(WaitForSlotEvent);
	FAULT_POINT;
	NEED_INIT;
	if (pSlot == NULL || pReserved != NULL) END(CKR_ARGUMENTS_BAD);
	unsigned long epoch = g_epoch;
	for (;;) {
		if (g_wait_mode == WAIT_HANG) { /* not even C_Finalize ends this */
			pthread_cond_wait(&g_cv, &g_mu);
			continue;
		}
		if (g_epoch != epoch) END(CKR_CRYPTOKI_NOT_INITIALIZED);
		if (g_wait_mode == WAIT_RETURN) {
			*pSlot = 0;
			note_slot(&c, 0);
			END(CKR_OK);
		}
		for (CK_ULONG i = 0; i < g_nslots; i++)
			if (g_slots[i].pending) {
				g_slots[i].pending = 0;
				*pSlot = i;
				note_slot(&c, i);
				END(CKR_OK);
			}
		if (flags & CKF_DONT_BLOCK) END(CKR_NO_EVENT);
		pthread_cond_wait(&g_cv, &g_mu);
	}
}

/* ---- everything else: CKR_FUNCTION_NOT_SUPPORTED, recorded --------------- */

#define UNSUPPORTED(name, args, ...)                    \
	FM_EXPORT CK_RV C_##name args {                 \
		BEGIN(name);                            \
		__VA_ARGS__;                            \
		FAULT_POINT;                            \
		NEED_INIT;                              \
		END(CKR_FUNCTION_NOT_SUPPORTED);        \
	}
#define U(x) (void)(x)
#define H(h) note_session(&c, (h))
#define SL(id) note_slot(&c, (id))

UNSUPPORTED(GetMechanismList, (CK_SLOT_ID a, CK_MECHANISM_TYPE_PTR b, CK_ULONG_PTR d), SL(a), U(b), U(d))
UNSUPPORTED(GetMechanismInfo, (CK_SLOT_ID a, CK_MECHANISM_TYPE b, CK_MECHANISM_INFO_PTR d), SL(a), U(b), U(d))
UNSUPPORTED(InitPIN, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(SetPIN, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG d, CK_UTF8CHAR_PTR e, CK_ULONG f), H(a), U(b),
            U(d), U(e), U(f))
UNSUPPORTED(GetOperationState, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR d), H(a), U(b), U(d))
UNSUPPORTED(SetOperationState, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_OBJECT_HANDLE e, CK_OBJECT_HANDLE f),
            H(a), U(b), U(d), U(e), U(f))
UNSUPPORTED(CreateObject, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG d, CK_OBJECT_HANDLE_PTR e), H(a), U(b),
            U(d), U(e))
UNSUPPORTED(CopyObject,
            (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR d, CK_ULONG e, CK_OBJECT_HANDLE_PTR f), H(a),
            U(b), U(d), U(e), U(f))
UNSUPPORTED(DestroyObject, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), H(a), U(b))
UNSUPPORTED(GetObjectSize, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ULONG_PTR d), H(a), U(b), U(d))
UNSUPPORTED(SetAttributeValue, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR d, CK_ULONG e), H(a), U(b),
            U(d), U(e))
UNSUPPORTED(EncryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d), H(a), U(b), U(d))
UNSUPPORTED(Encrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b), U(d),
            U(e), U(f))
UNSUPPORTED(EncryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b),
            U(d), U(e), U(f))
UNSUPPORTED(EncryptFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR d), H(a), U(b), U(d))
UNSUPPORTED(DecryptInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d), H(a), U(b), U(d))
UNSUPPORTED(Decrypt, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b), U(d),
            U(e), U(f))
UNSUPPORTED(DecryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b),
            U(d), U(e), U(f))
UNSUPPORTED(DecryptFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR d), H(a), U(b), U(d))
UNSUPPORTED(DigestInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b), H(a), U(b))
UNSUPPORTED(Digest, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b), U(d),
            U(e), U(f))
UNSUPPORTED(DigestUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(DigestKey, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), H(a), U(b))
UNSUPPORTED(DigestFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR d), H(a), U(b), U(d))
UNSUPPORTED(SignUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(SignFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR d), H(a), U(b), U(d))
UNSUPPORTED(SignRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d), H(a), U(b), U(d))
UNSUPPORTED(SignRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b),
            U(d), U(e), U(f))
UNSUPPORTED(VerifyInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d), H(a), U(b), U(d))
UNSUPPORTED(Verify, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG f), H(a), U(b), U(d), U(e),
            U(f))
UNSUPPORTED(VerifyUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(VerifyFinal, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(VerifyRecoverInit, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d), H(a), U(b), U(d))
UNSUPPORTED(VerifyRecover, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a), U(b),
            U(d), U(e), U(f))
UNSUPPORTED(DigestEncryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a),
            U(b), U(d), U(e), U(f))
UNSUPPORTED(DecryptDigestUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a),
            U(b), U(d), U(e), U(f))
UNSUPPORTED(SignEncryptUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a),
            U(b), U(d), U(e), U(f))
UNSUPPORTED(DecryptVerifyUpdate, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d, CK_BYTE_PTR e, CK_ULONG_PTR f), H(a),
            U(b), U(d), U(e), U(f))
UNSUPPORTED(GenerateKey, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR d, CK_ULONG e, CK_OBJECT_HANDLE_PTR f),
            H(a), U(b), U(d), U(e), U(f))
UNSUPPORTED(GenerateKeyPair,
            (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR d, CK_ULONG e, CK_ATTRIBUTE_PTR f, CK_ULONG g,
             CK_OBJECT_HANDLE_PTR i, CK_OBJECT_HANDLE_PTR j),
            H(a), U(b), U(d), U(e), U(f), U(g), U(i), U(j))
UNSUPPORTED(WrapKey,
            (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d, CK_OBJECT_HANDLE e, CK_BYTE_PTR f,
             CK_ULONG_PTR g),
            H(a), U(b), U(d), U(e), U(f), U(g))
UNSUPPORTED(UnwrapKey,
            (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d, CK_BYTE_PTR e, CK_ULONG f, CK_ATTRIBUTE_PTR g,
             CK_ULONG i, CK_OBJECT_HANDLE_PTR j),
            H(a), U(b), U(d), U(e), U(f), U(g), U(i), U(j))
UNSUPPORTED(DeriveKey,
            (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE d, CK_ATTRIBUTE_PTR e, CK_ULONG f,
             CK_OBJECT_HANDLE_PTR g),
            H(a), U(b), U(d), U(e), U(f), U(g))
UNSUPPORTED(SeedRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(GenerateRandom, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG d), H(a), U(b), U(d))
UNSUPPORTED(GetFunctionStatus, (CK_SESSION_HANDLE a), H(a))
UNSUPPORTED(CancelFunction, (CK_SESSION_HANDLE a), H(a))

/* The function list, filled in by name so its order is the header's. */
static CK_FUNCTION_LIST g_funcs = {
    .version = {2, 40},
#define FM_ENTRY(n) .C_##n = C_##n,
    FM_FUNCS(FM_ENTRY)
#undef FM_ENTRY
};
