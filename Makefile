# slotwatch — see README.md. Targets: deps build test demo bench stress fuzz
# clean install install-gnome uninstall-gnome man completions deb lintian.

GO      ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Everything built goes under BUILDDIR (the tests point it at a temp dir so
# that a package build never writes into the checkout).
BUILDDIR ?= bin
BIN     := $(BUILDDIR)/slotwatch

# What the build and the real-stack tests need on Debian 12.
DEBS := pcscd libpcsclite-dev vsmartcard-vpcd vsmartcard-vpicc python3-virtualsmartcard \
        opensc-pkcs11 opensc softhsm2 p11-kit p11-kit-modules dbus gcc libc6-dev pkg-config \
        systemd libxml2-utils libglib2.0-bin openssh-client gnutls-bin libnss3-tools gnupg scdaemon \
        bubblewrap dpkg-dev lintian

.PHONY: all deps build test demo bench stress fuzz clean install install-gnome uninstall-gnome \
	man completions deb lintian

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

# GOBUILDFLAGS: extra "go build" flags (make deb sets its own).
GOBUILDFLAGS ?=
build:
	$(GO) build $(GOBUILDFLAGS) -o $(BIN) ./service

# The whole suite against the real stack (private pcscd, dbus-daemon,
# SoftHSM2 per test), with the race detector.
test: deps faultmod
	$(GO) vet ./...
	$(MAKE) fuzz FUZZTIME=100000x
	$(GO) test -race -count=1 -timeout 20m ./...

# Every fuzz target of client input, for a bounded number of inputs each
# (about 5 to 10 s each for make test's 100,000 here). A count, not a
# duration: Go 1.26's fuzz coordinator can fail a duration-bounded run
# with "context deadline exceeded" at the end of -fuzztime when a worker
# is slow to stop (golang/go#75804, fixed in Go 1.27; seen here once in
# CI) — no input was at fault.
FUZZTIME ?= 1000000x
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
	rm -rf $(BUILDDIR)

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
		"$(DESTDIR)$(SYSCONFDIR)/slotwatch" $(BUILDDIR)/packaging
	$(INSTALL) -m 0755 $(BIN) "$(DESTDIR)$(BINDIR)/slotwatch"
	sed -e 's|@bindir@|$(BINDIR)|g' packaging/slotwatch.service > $(BUILDDIR)/packaging/slotwatch.service
	$(INSTALL) -m 0644 $(BUILDDIR)/packaging/slotwatch.service "$(DESTDIR)$(USERUNITDIR)/slotwatch.service"
	sed -e 's|@bindir@|$(BINDIR)|g' packaging/gnome/slotwatch-gnome.service > $(BUILDDIR)/packaging/slotwatch-gnome.service
	$(INSTALL) -m 0644 $(BUILDDIR)/packaging/slotwatch-gnome.service "$(DESTDIR)$(USERUNITDIR)/slotwatch-gnome.service"
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
	sed -e 's|@bindir@|$(BINDIR)|g' packaging/gnome/greeter/slotwatch-gnome.desktop > $(BUILDDIR)/packaging/slotwatch-gnome.desktop
	$(INSTALL) -m 0644 $(BUILDDIR)/packaging/slotwatch-gnome.desktop "$(DESTDIR)$(GDMGREETERAUTOSTARTDIR)/slotwatch-gnome.desktop"
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

# --- man pages, shell completions and the Debian 12 package -----------------

# The man pages, from their go-md2man Markdown sources.
MANPAGES := $(BUILDDIR)/man/slotwatch.1 $(BUILDDIR)/man/slotwatch.conf.5
man: $(MANPAGES)
$(BUILDDIR)/man/%: packaging/man/%.md
	@mkdir -p $(@D)
	$(GO) tool go-md2man -in $< -out $@.tmp
	mv $@.tmp $@

# The shell completions, as the built binary prints them ("slotwatch
# completion bash|zsh|fish"); file names are where each shell looks.
COMPLETIONS := bash:slotwatch zsh:_slotwatch fish:slotwatch.fish
completions: build
	@mkdir -p $(BUILDDIR)/completions
	@set -e; for c in $(COMPLETIONS); do \
		sh=$${c%%:*}; out="$(BUILDDIR)/completions/$${c#*:}"; \
		echo "$(BIN) completion $$sh > $$out"; \
		if ! $(BIN) completion $$sh > "$$out.tmp" 2> "$$out.err" || [ ! -s "$$out.tmp" ]; then \
			echo "completions: \"$(BIN) completion $$sh\" failed: this slotwatch has no working" \
				"completion command (it comes with the cobra CLI). Its output:" >&2; \
			head -n 5 "$$out.err" "$$out.tmp" >&2; rm -f "$$out.tmp" "$$out.err"; exit 1; \
		fi; \
		rm -f "$$out.err"; mv "$$out.tmp" "$$out"; \
	done

# deb builds $(BUILDDIR)/slotwatch_VERSION_ARCH.deb, a binary package for
# Debian 12, with dpkg-deb from a tree that "make install" stages (see
# packaging/debian/README.md for why not a debhelper source package).
# VERSION is version/VERSION, the one the binary reports.
VERSION  := $(shell cat version/VERSION)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)
DEB      := $(BUILDDIR)/slotwatch_$(VERSION)_$(DEB_ARCH).deb
# dpkg-shlibdeps wants debhelper's layout: debian/control, and the package
# staged in debian/PACKAGE.
DEBWORK  := $(BUILDDIR)/deb
DEBROOT  := $(DEBWORK)/debian/slotwatch
# The changelog's date, and the newest mtime in the package: the last
# commit's time, so that the same commit gives the same package.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || stat -c %Y version/VERSION)
DOCDIR   := $(DEBROOT)/usr/share/doc/slotwatch
# The package's binary is built as Debian builds C programs: a PIE, its C
# (cgo) parts with dpkg-buildflags' hardening flags (fortify, stack
# protector, relro, bindnow), no build paths in it; and stripped below,
# as dh_strip strips.
deb: GOBUILDFLAGS = -trimpath -buildmode=pie
deb: export DEB_BUILD_MAINT_OPTIONS = hardening=+all
deb: export CGO_CFLAGS = $(shell DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get CFLAGS) \
	$(shell DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get CPPFLAGS)
deb: export CGO_LDFLAGS = $(shell DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get LDFLAGS)

deb: build man completions
	@test -n "$(BUILDDIR)" || { echo "deb: BUILDDIR is empty" >&2; exit 1; }
	@test -n "$(DEB_ARCH)" || { echo "deb: dpkg --print-architecture failed (not Debian?)" >&2; exit 1; }
	@grep -qxE '[0-9]+\.[0-9]+\.[0-9]+' version/VERSION || { echo "deb: version/VERSION is not MAJOR.MINOR.PATCH" >&2; exit 1; }
	rm -rf "$(DEBWORK)" "$(DEB)"
	$(MAKE) --no-print-directory install DESTDIR="$(abspath $(DEBROOT))" PREFIX=/usr SYSCONFDIR=/etc \
		BUILDDIR="$(BUILDDIR)" GOBUILDFLAGS="$(GOBUILDFLAGS)"
	strip --remove-section=.comment --remove-section=.note "$(DEBROOT)/usr/bin/slotwatch"
	$(INSTALL) -d "$(DEBROOT)/usr/share/man/man1" "$(DEBROOT)/usr/share/man/man5" "$(DOCDIR)" \
		"$(DEBROOT)/usr/share/bash-completion/completions" "$(DEBROOT)/usr/share/zsh/vendor-completions" \
		"$(DEBROOT)/usr/share/fish/vendor_completions.d" "$(DEBROOT)/DEBIAN"
	gzip -9n < $(BUILDDIR)/man/slotwatch.1 > "$(DEBROOT)/usr/share/man/man1/slotwatch.1.gz"
	gzip -9n < $(BUILDDIR)/man/slotwatch.conf.5 > "$(DEBROOT)/usr/share/man/man5/slotwatch.conf.5.gz"
	$(INSTALL) -m 0644 $(BUILDDIR)/completions/slotwatch "$(DEBROOT)/usr/share/bash-completion/completions/slotwatch"
	$(INSTALL) -m 0644 $(BUILDDIR)/completions/_slotwatch "$(DEBROOT)/usr/share/zsh/vendor-completions/_slotwatch"
	$(INSTALL) -m 0644 $(BUILDDIR)/completions/slotwatch.fish "$(DEBROOT)/usr/share/fish/vendor_completions.d/slotwatch.fish"
	$(INSTALL) -m 0644 README.md packaging/debian/copyright "$(DOCDIR)/"
	sed -e 's|@VERSION@|$(VERSION)|g' -e "s|@DATE@|$$(date -u -R -d @$(SOURCE_DATE_EPOCH))|g" \
		packaging/debian/changelog.in | gzip -9n > "$(DOCDIR)/changelog.gz"
	@if [ -s packaging/debian/lintian-overrides ]; then \
		echo "$(INSTALL) -D -m 0644 packaging/debian/lintian-overrides $(DEBROOT)/usr/share/lintian/overrides/slotwatch"; \
		$(INSTALL) -D -m 0644 packaging/debian/lintian-overrides "$(DEBROOT)/usr/share/lintian/overrides/slotwatch"; \
	fi
	@# Modes do not depend on the umask: directories 0755, files 0644, the binary 0755.
	find "$(DEBROOT)" -type d -exec chmod 0755 {} +
	find "$(DEBROOT)" -type f -exec chmod 0644 {} +
	chmod 0755 "$(DEBROOT)/usr/bin/slotwatch"
	@# The control area: control (libraries from dpkg-shlibdeps, size
	@# counted as dpkg-gencontrol counts it), conffiles, md5sums (without
	@# the conffiles, which dpkg checksums itself).
	printf 'Source: slotwatch\n\nPackage: slotwatch\nArchitecture: any\n' > "$(DEBWORK)/debian/control"
	cd "$(DEBWORK)" && dpkg-shlibdeps -O -edebian/slotwatch/usr/bin/slotwatch > shlibs.substvars
	@set -e; \
	shlibs=$$(sed -n 's/^shlibs:Depends=//p' "$(DEBWORK)/shlibs.substvars"); \
	test -n "$$shlibs" || { echo "deb: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }; \
	size=$$(find "$(DEBROOT)" -path "$(DEBROOT)/DEBIAN" -prune -o -printf '%y %s\n' | \
		awk '$$1 == "f" { n += int(($$2 + 1023) / 1024); next } { n += 1 } END { print n }'); \
	echo "Depends on libraries: $$shlibs; Installed-Size: $$size"; \
	sed -e 's|@VERSION@|$(VERSION)|' -e 's|@ARCH@|$(DEB_ARCH)|' -e "s|@SHLIBS_DEPENDS@|$$shlibs|" \
		-e "s|@INSTALLED_SIZE@|$$size|" packaging/debian/control > "$(DEBROOT)/DEBIAN/control"
	! grep -n '@[A-Z_]*@' "$(DEBROOT)/DEBIAN/control"
	$(INSTALL) -m 0644 packaging/debian/conffiles "$(DEBROOT)/DEBIAN/conffiles"
	sed 's|^/||' packaging/debian/conffiles > "$(DEBWORK)/conffiles.relative"
	cd "$(DEBROOT)" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort | \
		grep -vxF -f ../../conffiles.relative | xargs -d '\n' md5sum > DEBIAN/md5sums
	chmod 0644 "$(DEBROOT)/DEBIAN/control" "$(DEBROOT)/DEBIAN/md5sums"
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) dpkg-deb --build --root-owner-group -Zxz "$(DEBROOT)" "$(DEB)"

# lintian checks the package (make deps installs it). Its own overrides
# (packaging/debian/lintian-overrides, installed in the package) apply.
lintian: deb
	lintian --fail-on error,warning --info "$(DEB)"
