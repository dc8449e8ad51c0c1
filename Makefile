# slotwatch — see README.md. Targets: deps build test demo bench stress fuzz
# clean install install-gnome uninstall-gnome.

GO      ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN     := bin/slotwatch

# What the build and the real-stack tests need on Debian 12.
DEBS := pcscd libpcsclite-dev vsmartcard-vpcd vsmartcard-vpicc python3-virtualsmartcard \
        opensc-pkcs11 opensc softhsm2 p11-kit p11-kit-modules dbus gcc libc6-dev pkg-config \
        systemd libxml2-utils libglib2.0-bin openssh-client gnutls-bin libnss3-tools gnupg scdaemon \
        bubblewrap

.PHONY: all deps build test demo bench stress fuzz clean install install-gnome uninstall-gnome

all: build

# deps installs only what is missing, so running it again is cheap.
deps:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all installed"; fi
	@# Debian's pcscd unit may start the machine's own pcscd; the tests never use it.

build:
	$(GO) build -o $(BIN) ./service

# The whole suite against the real stack (private pcscd, dbus-daemon,
# SoftHSM2 per test), with the race detector.
test: deps faultmod
	$(GO) vet ./...
	$(MAKE) fuzz FUZZTIME=10s
	$(GO) test -race -count=1 -timeout 20m ./...

# Every fuzz target of client input, for a bounded time each.
FUZZTIME ?= 60s
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeTemplate$$' -fuzztime $(FUZZTIME) ./dbusapi
	$(GO) test -run '^$$' -fuzz '^FuzzGenerationOf$$' -fuzztime $(FUZZTIME) ./dbusapi
	$(GO) test -run '^$$' -fuzz '^FuzzServe$$' -fuzztime $(FUZZTIME) ./pkcs11face/rpc

# A private pcscd, a virtual card inserted, removed and swapped, and
# "slotwatch watch" printing each event with its generation.
demo: deps build
	$(GO) run ./tests/demo -slotwatch $(BIN)

# The full stress figures (make test runs short forms of the same tests):
# 100,000 token changes on the fault module with concurrent clients (the
# daemon built without the race detector so that its memory can be judged),
# 1,000 clients that die holding sessions, 1,000 cycles of a virtual card
# through the real stack, 100 crashes of an isolated module, and 100 pcscd
# restarts with a card in the reader; 1,000 idle-release cycles of OpenSC
# (file descriptors and memory); and 100 open-loop 450/450 ms cycles
# at a GNOME-style subscriber (--gnome-compat).
stress: deps faultmod
	SLOTWATCH_TEST_NORACE=1 SLOTWATCH_STRESS_CYCLES=100000 SLOTWATCH_STRESS_CLIENTS=1000 SLOTWATCH_STRESS_REAL_CYCLES=1000 SLOTWATCH_STRESS_CRASHES=100 $(GO) test -count=1 -timeout 60m -run 'Stress' -v ./tests/
	SLOTWATCH_TEST_NORACE=1 SLOTWATCH_STRESS_RELEASE_CYCLES=1000 $(GO) test -count=1 -timeout 20m -run 'ReleaseCycles' -v ./tests/
	SLOTWATCH_GNOME_CYCLES=100 $(GO) test -count=1 -timeout 10m -run 'GnomeOpenLoop' -v ./tests/
	SLOTWATCH_STRESS_RESTARTS=100 $(GO) test -race -count=1 -timeout 30m -run 'RestartLoop' -v ./monitor/

bench: deps faultmod
	$(GO) test -run '^$$' -bench . -benchtime 20x -count 1 ./...

# The fault-injection PKCS#11 module the hardening tests load (C, see
# tests/faultmod/csrc/faultmod.c). Needs only gcc (and libc6-dev, as cgo
# does). -z nodelete: its control thread outlives a dlclose; -Bsymbolic: its
# function list points at its own C_* even if another module's are global.
.PHONY: faultmod
faultmod:
	mkdir -p tests/faultmod/build
	gcc -shared -fPIC -O2 -Wall -Wextra -pthread -Wl,-z,nodelete -Wl,-Bsymbolic -Itests/faultmod/include \
		-o tests/faultmod/build/libfaultmod.so.tmp tests/faultmod/csrc/faultmod.c
	mv tests/faultmod/build/libfaultmod.so.tmp tests/faultmod/build/libfaultmod.so

clean:
	rm -rf bin

# install puts the daemon and its files where systemd and D-Bus look for
# them; see packaging/README.md. Honours DESTDIR (staging root for
# packages) and PREFIX. Run "systemctl --user daemon-reload" afterwards.
PREFIX      ?= /usr/local
SYSCONFDIR  ?= /etc
BINDIR      ?= $(PREFIX)/bin
DATADIR     ?= $(PREFIX)/share
USERUNITDIR ?= $(PREFIX)/lib/systemd/user
INSTALL     ?= install
# The introspection XML is the contract; every file in xml/ is installed.
INTERFACE_XML = $(wildcard xml/*.xml)

install: build
	$(INSTALL) -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(USERUNITDIR)" \
		"$(DESTDIR)$(DATADIR)/dbus-1/services" "$(DESTDIR)$(DATADIR)/dbus-1/interfaces" \
		"$(DESTDIR)$(SYSCONFDIR)/slotwatch" bin/packaging
	$(INSTALL) -m 0755 $(BIN) "$(DESTDIR)$(BINDIR)/slotwatch"
	sed -e 's|@bindir@|$(BINDIR)|g' packaging/slotwatch.service > bin/packaging/slotwatch.service
	$(INSTALL) -m 0644 bin/packaging/slotwatch.service "$(DESTDIR)$(USERUNITDIR)/slotwatch.service"
	sed -e 's|@bindir@|$(BINDIR)|g' packaging/gnome/slotwatch-gnome.service > bin/packaging/slotwatch-gnome.service
	$(INSTALL) -m 0644 bin/packaging/slotwatch-gnome.service "$(DESTDIR)$(USERUNITDIR)/slotwatch-gnome.service"
	$(INSTALL) -m 0644 packaging/slotwatch-pkcs11.socket "$(DESTDIR)$(USERUNITDIR)/slotwatch-pkcs11.socket"
	$(INSTALL) -m 0644 packaging/io.github.slotwatch.Slotwatch1.service \
		"$(DESTDIR)$(DATADIR)/dbus-1/services/io.github.slotwatch.Slotwatch1.service"
	$(if $(INTERFACE_XML),$(INSTALL) -m 0644 $(INTERFACE_XML) "$(DESTDIR)$(DATADIR)/dbus-1/interfaces/")
	@# The PKCS#11 face's p11-kit module file, disabled: see its comments.
	$(INSTALL) -d "$(DESTDIR)$(DATADIR)/slotwatch/pkcs11"
	$(INSTALL) -m 0644 packaging/pkcs11/slotwatch.module packaging/pkcs11/60-slotwatch-pkcs11.conf \
		"$(DESTDIR)$(DATADIR)/slotwatch/pkcs11/"
	@# The config may hold the administrator's edits: never overwrite it.
	@conf="$(DESTDIR)$(SYSCONFDIR)/slotwatch/slotwatch.conf"; \
	if [ -e "$$conf" ]; then \
		echo "keeping existing $$conf"; \
	else \
		echo "$(INSTALL) -m 0644 packaging/slotwatch.conf $$conf"; \
		$(INSTALL) -m 0644 packaging/slotwatch.conf "$$conf"; \
	fi

# install-gnome runs slotwatch in place of gnome-settings-daemon's smartcard
# service for every user and for GDM's login screen (packaging/GNOME.md):
# it masks gsd-smartcard's user unit, enables slotwatch-gnome.service (which
# then stands in for slotwatch.service too), and puts two autostart entries
# where GDM 43's greeter, which runs without systemd, looks first.
# uninstall-gnome undoes exactly that.
GDMGREETERAUTOSTARTDIR ?= /usr/share/gdm/greeter/autostart
USERUNITCONFDIR ?= $(SYSCONFDIR)/systemd/user
GNOME_LINKS = org.gnome.SettingsDaemon.Smartcard.service:/dev/null \
	slotwatch.service:$(USERUNITDIR)/slotwatch-gnome.service \
	org.gnome.SettingsDaemon.Smartcard.target.wants/slotwatch-gnome.service:$(USERUNITDIR)/slotwatch-gnome.service

install-gnome: install
	$(INSTALL) -d "$(DESTDIR)$(GDMGREETERAUTOSTARTDIR)" \
		"$(DESTDIR)$(USERUNITCONFDIR)/org.gnome.SettingsDaemon.Smartcard.target.wants"
	sed -e 's|@bindir@|$(BINDIR)|g' packaging/gnome/greeter/slotwatch-gnome.desktop > bin/packaging/slotwatch-gnome.desktop
	$(INSTALL) -m 0644 bin/packaging/slotwatch-gnome.desktop "$(DESTDIR)$(GDMGREETERAUTOSTARTDIR)/slotwatch-gnome.desktop"
	$(INSTALL) -m 0644 packaging/gnome/greeter/org.gnome.SettingsDaemon.Smartcard.desktop \
		"$(DESTDIR)$(GDMGREETERAUTOSTARTDIR)/org.gnome.SettingsDaemon.Smartcard.desktop"
	@set -e; for l in $(GNOME_LINKS); do \
		link="$(DESTDIR)$(USERUNITCONFDIR)/$${l%%:*}"; target="$${l#*:}"; \
		if [ -e "$$link" ] && [ ! -L "$$link" ]; then echo "$$link is not a symlink; leaving it" >&2; exit 1; fi; \
		echo "ln -sfn $$target $$link"; ln -sfn "$$target" "$$link"; \
	done
	@echo "Now restart GDM (systemctl restart gdm3 ends every session) or reboot; users log out and in."

uninstall-gnome:
	rm -f "$(DESTDIR)$(GDMGREETERAUTOSTARTDIR)/slotwatch-gnome.desktop" \
		"$(DESTDIR)$(GDMGREETERAUTOSTARTDIR)/org.gnome.SettingsDaemon.Smartcard.desktop"
	@for l in $(GNOME_LINKS); do \
		link="$(DESTDIR)$(USERUNITCONFDIR)/$${l%%:*}"; target="$${l#*:}"; \
		if [ -L "$$link" ] && [ "$$(readlink "$$link")" = "$$target" ]; then echo "rm $$link"; rm -f "$$link"; fi; \
	done; rmdir "$(DESTDIR)$(USERUNITCONFDIR)/org.gnome.SettingsDaemon.Smartcard.target.wants" 2>/dev/null || true
