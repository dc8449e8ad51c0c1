package tests

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/slotwatch/slotwatch/version"
)

// debBuild is a package built by "make deb" into a directory of its own.
type debBuild struct {
	Path     string // the .deb
	BuildDir string // BUILDDIR: the binary, man pages, completions, the staged tree
	Version  string
	Arch     string
}

// debArch is dpkg's architecture of this machine.
func debArch(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("dpkg", "--print-architecture").Output()
	if err != nil {
		t.Fatalf("dpkg --print-architecture: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// repoRoot is the checkout (the tests run in tests/).
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// makeDeb runs "make deb" in src with everything built into buildDir, so
// that nothing is written into src. It returns make's output on failure;
// it never fails t itself (builtDeb calls it inside a sync.Once).
func makeDeb(t testing.TB, src, buildDir string) (*debBuild, error) {
	t.Helper()
	if _, err := exec.LookPath("make"); err != nil {
		return nil, fmt.Errorf("make is not installed: %w", err)
	}
	arch, err := exec.Command("dpkg", "--print-architecture").Output()
	if err != nil {
		return nil, fmt.Errorf("dpkg --print-architecture: %w", err)
	}
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	cmd := exec.Command("make", "--no-print-directory", "-C", src, "deb", "BUILDDIR="+buildDir, "GO="+goBin)
	// Not the jobserver or flags of a make that runs these tests.
	cmd.Env = withoutEnv(os.Environ(), "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("make deb in %s: %v\n%s", src, err, out)
	}
	v, err := os.ReadFile(filepath.Join(src, "version", "VERSION"))
	if err != nil {
		return nil, err
	}
	b := &debBuild{BuildDir: buildDir, Version: strings.TrimSpace(string(v)), Arch: strings.TrimSpace(string(arch))}
	b.Path = filepath.Join(buildDir, fmt.Sprintf("slotwatch_%s_%s.deb", b.Version, b.Arch))
	if _, err := os.Stat(b.Path); err != nil {
		return nil, fmt.Errorf("make deb did not make %s: %v\n%s", b.Path, err, out)
	}
	return b, nil
}

var theDeb struct {
	once sync.Once
	b    *debBuild
	err  error
}

// builtDeb is the checkout's package, built once per test process into
// the process's temp dir.
func builtDeb(t testing.TB) *debBuild {
	t.Helper()
	root := repoRoot(t)
	theDeb.once.Do(func() {
		theDeb.b, theDeb.err = makeDeb(t, root, filepath.Join(testDir, "debbuild"))
	})
	if theDeb.err != nil {
		t.Fatal(theDeb.err)
	}
	return theDeb.b
}

// extractDeb unpacks the package's files (dpkg-deb -x) into a new
// temporary directory.
func extractDeb(t testing.TB, deb string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("dpkg-deb", "-x", deb, dir).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
	}
	return dir
}

// packageFiles are the regular files the package must hold, with their
// modes as "dpkg-deb -c" prints them; the interface XML is added from
// xml/.
var packageFiles = map[string]string{
	"etc/slotwatch/slotwatch.conf":                                     "-rw-r--r--",
	"usr/bin/slotwatch":                                                "-rwxr-xr-x",
	"usr/lib/systemd/user/slotwatch.service":                           "-rw-r--r--",
	"usr/lib/systemd/user/slotwatch-gnome.service":                     "-rw-r--r--",
	"usr/lib/systemd/user/slotwatch-pkcs11.socket":                     "-rw-r--r--",
	"usr/share/dbus-1/services/io.github.slotwatch.Slotwatch1.service": "-rw-r--r--",
	"usr/share/slotwatch/pkcs11/slotwatch.module":                      "-rw-r--r--",
	"usr/share/slotwatch/pkcs11/60-slotwatch-pkcs11.conf":              "-rw-r--r--",
	"usr/share/doc/slotwatch/README.md":                                "-rw-r--r--",
	"usr/share/doc/slotwatch/copyright":                                "-rw-r--r--",
	"usr/share/doc/slotwatch/changelog.gz":                             "-rw-r--r--",
	"usr/share/man/man1/slotwatch.1.gz":                                "-rw-r--r--",
	"usr/share/man/man5/slotwatch.conf.5.gz":                           "-rw-r--r--",
	"usr/share/bash-completion/completions/slotwatch":                  "-rw-r--r--",
	"usr/share/zsh/vendor-completions/_slotwatch":                      "-rw-r--r--",
	"usr/share/fish/vendor_completions.d/slotwatch.fish":               "-rw-r--r--",
}

// expectedEntries is every entry the package must have ("./usr/bin/" for
// directories), with its mode.
func expectedEntries(t *testing.T) map[string]string {
	t.Helper()
	want := map[string]string{"./": "drwxr-xr-x"}
	files := copyModes(packageFiles)
	xmls, err := filepath.Glob(filepath.Join(repoRoot(t), "xml", "*.xml"))
	if err != nil || len(xmls) == 0 {
		t.Fatalf("no xml/*.xml in the checkout (%v)", err)
	}
	for _, x := range xmls {
		files["usr/share/dbus-1/interfaces/"+filepath.Base(x)] = "-rw-r--r--"
	}
	for f, mode := range files {
		want["./"+f] = mode
		for d := filepath.Dir(f); d != "."; d = filepath.Dir(d) {
			want["./"+d+"/"] = "drwxr-xr-x"
		}
	}
	return want
}

func copyModes(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// debEntry is one line of "dpkg-deb -c".
type debEntry struct{ mode, owner, path string }

func debContents(t *testing.T, deb string) []debEntry {
	t.Helper()
	out, err := exec.Command("dpkg-deb", "-c", deb).Output()
	if err != nil {
		t.Fatalf("dpkg-deb -c: %v", err)
	}
	var entries []debEntry
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		// drwxr-xr-x root/root 0 2026-11-30 18:30 ./etc/
		f := strings.Fields(l)
		if len(f) < 6 {
			t.Fatalf("dpkg-deb -c: cannot read %q", l)
		}
		entries = append(entries, debEntry{mode: f[0], owner: f[1], path: strings.Join(f[5:], " ")})
	}
	return entries
}

// controlFields parses a deb822 paragraph (continuation lines joined
// with "\n").
func controlFields(t *testing.T, text string) map[string]string {
	t.Helper()
	fields := map[string]string{}
	var last string
	for _, l := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		if strings.HasPrefix(l, " ") || strings.HasPrefix(l, "\t") {
			if last == "" {
				t.Fatalf("control: continuation line %q before any field", l)
			}
			fields[last] += "\n" + l
			continue
		}
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			t.Fatalf("control: line %q is not a field", l)
		}
		last = k
		fields[k] = strings.TrimSpace(v)
	}
	return fields
}

// depNames splits a relationship field into OR groups of package names
// (version constraints and architecture qualifiers dropped).
func depNames(field string) [][]string {
	var groups [][]string
	for _, g := range strings.Split(field, ",") {
		var alts []string
		for _, a := range strings.Split(g, "|") {
			name := strings.Fields(strings.TrimSpace(a))
			if len(name) > 0 {
				alts = append(alts, strings.SplitN(name[0], ":", 2)[0])
			}
		}
		if len(alts) > 0 {
			groups = append(groups, alts)
		}
	}
	return groups
}

func hasGroupWith(groups [][]string, names ...string) bool {
	return slices.ContainsFunc(groups, func(g []string) bool {
		return slices.ContainsFunc(names, func(n string) bool { return slices.Contains(g, n) })
	})
}

// installedSize counts a tree as dpkg-gencontrol does: each regular
// file's size in KiB rounded up, 1 for anything else.
func installedSize(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += (fi.Size() + 1023) / 1024
		} else {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func gunzip(t *testing.T, path string) (string, *gzip.Header) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return string(b), &zr.Header
}

func readText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestDebPackage builds the package with "make deb" and checks it as a
// Debian 12 machine would take it: the file list, modes and owners, the
// control area (fields, Version from version/VERSION, Depends covering
// the libraries the binary needs and resolvable by this machine's apt,
// conffiles, md5sums, no maintainer scripts), the files' contents, and
// lintian.
func TestDebPackage(t *testing.T) {
	b := builtDeb(t)
	arch := debArch(t)
	if want := fmt.Sprintf("slotwatch_%s_%s.deb", version.Version, arch); filepath.Base(b.Path) != want {
		t.Errorf("package file %s, want %s", filepath.Base(b.Path), want)
	}

	// The file list: exactly the expected entries, root:root, modes.
	want := expectedEntries(t)
	seen := map[string]bool{}
	for _, e := range debContents(t, b.Path) {
		if seen[e.path] {
			t.Errorf("%s is in the package twice", e.path)
		}
		seen[e.path] = true
		mode, ok := want[e.path]
		switch {
		case !ok:
			t.Errorf("unexpected entry in the package: %s %s %s", e.mode, e.owner, e.path)
		case e.mode != mode:
			t.Errorf("%s has mode %s, want %s", e.path, e.mode, mode)
		}
		if e.owner != "root/root" {
			t.Errorf("%s is owned by %s, want root/root", e.path, e.owner)
		}
	}
	for p := range want {
		if !seen[p] {
			t.Errorf("the package lacks %s", p)
		}
	}

	// The control area: control, conffiles, md5sums and nothing else (no
	// maintainer scripts: packaging/debian/README.md says why).
	ctrl := t.TempDir()
	if out, err := exec.Command("dpkg-deb", "-e", b.Path, ctrl).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -e: %v\n%s", err, out)
	}
	ents, err := os.ReadDir(ctrl)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"conffiles", "control", "md5sums"}) {
		t.Errorf("control area holds %q, want conffiles, control, md5sums", names)
	}

	fields := controlFields(t, readText(t, filepath.Join(ctrl, "control")))
	for k, v := range map[string]string{
		"Package":      "slotwatch",
		"Version":      version.Version,
		"Architecture": arch,
		"Maintainer":   "slotwatch developers <slotwatch@users.noreply.github.com>",
		"Section":      "utils",
		"Priority":     "optional",
	} {
		if fields[k] != v {
			t.Errorf("control: %s is %q, want %q", k, fields[k], v)
		}
	}
	if d := fields["Description"]; !strings.Contains(d, "\n") || len(strings.SplitN(d, "\n", 2)[0]) > 80 {
		t.Errorf("control: Description needs a synopsis (at most 80 characters) and a long description:\n%s", d)
	}
	depends := depNames(fields["Depends"])
	for _, need := range [][]string{{"libc6"}, {"libpcsclite1"}, {"p11-kit"}, {"default-dbus-session-bus", "dbus-user-session", "dbus-session-bus"}} {
		if !hasGroupWith(depends, need...) {
			t.Errorf("control: Depends %q has none of %q", fields["Depends"], need)
		}
	}
	recommends := depNames(fields["Recommends"])
	for _, need := range []string{"pcscd", "opensc-pkcs11", "p11-kit-modules"} {
		if !hasGroupWith(recommends, need) {
			t.Errorf("control: Recommends %q lacks %s", fields["Recommends"], need)
		}
	}
	if !hasGroupWith(depNames(fields["Suggests"]), "softhsm2") {
		t.Errorf("control: Suggests %q lacks softhsm2", fields["Suggests"])
	}

	data := extractDeb(t, b.Path)
	if size, err := strconv.ParseInt(fields["Installed-Size"], 10, 64); err != nil {
		t.Errorf("control: Installed-Size %q: %v", fields["Installed-Size"], err)
	} else if want := installedSize(t, data); size != want {
		t.Errorf("control: Installed-Size is %d, the files take %d", size, want)
	}

	// Every library the binary links is in Depends, through the package
	// that ships it on this machine.
	bin := filepath.Join(data, "usr/bin/slotwatch")
	ef, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	libs, err := ef.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	if ef.Type != elf.ET_DYN {
		t.Errorf("usr/bin/slotwatch is ELF type %v, want a position-independent executable (ET_DYN)", ef.Type)
	}
	for _, s := range []string{".symtab", ".debug_info", ".comment"} {
		if ef.Section(s) != nil {
			t.Errorf("usr/bin/slotwatch has a %s section: not stripped", s)
		}
	}
	ef.Close()
	if !slices.Contains(libs, "libpcsclite.so.1") || !slices.Contains(libs, "libc.so.6") {
		t.Errorf("usr/bin/slotwatch links %q; expected libpcsclite.so.1 and libc.so.6 (cgo)", libs)
	}
	for _, lib := range libs {
		out, err := exec.Command("dpkg", "-S", "*/"+lib).Output()
		if err != nil {
			t.Errorf("no package on this machine ships %s (dpkg -S): %v", lib, err)
			continue
		}
		var pkgs []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			p, _, _ := strings.Cut(l, ": ")
			for _, q := range strings.Split(p, ", ") {
				pkgs = append(pkgs, strings.SplitN(q, ":", 2)[0])
			}
		}
		if !hasGroupWith(depends, pkgs...) {
			t.Errorf("usr/bin/slotwatch needs %s, shipped by %q, which Depends %q does not name", lib, pkgs, fields["Depends"])
		}
	}

	// The binary reports the package's version.
	if out, err := exec.Command(bin, "--version").CombinedOutput(); err != nil || !strings.Contains(string(out), version.Version) {
		t.Errorf("usr/bin/slotwatch --version: %q, %v; want it to name %s", out, err, version.Version)
	}

	// conffiles: the config, which is every file under /etc.
	if got := readText(t, filepath.Join(ctrl, "conffiles")); got != "/etc/slotwatch/slotwatch.conf\n" {
		t.Errorf("conffiles is %q, want /etc/slotwatch/slotwatch.conf", got)
	}
	filepath.WalkDir(filepath.Join(data, "etc"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && p != filepath.Join(data, "etc/slotwatch/slotwatch.conf") {
			t.Errorf("%s is under /etc but not a conffile", strings.TrimPrefix(p, data))
		}
		return nil
	})

	// md5sums: every regular file but the conffile, with its sum.
	sums := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(readText(t, filepath.Join(ctrl, "md5sums"))), "\n") {
		sum, path, ok := strings.Cut(l, "  ")
		if !ok {
			t.Fatalf("md5sums: line %q", l)
		}
		sums[path] = sum
	}
	filepath.WalkDir(data, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel := strings.TrimPrefix(p, data+"/")
		sum, listed := sums[rel]
		delete(sums, rel)
		if rel == "etc/slotwatch/slotwatch.conf" {
			if listed {
				t.Errorf("md5sums lists the conffile %s (dpkg sums conffiles itself)", rel)
			}
			return nil
		}
		out, err := exec.Command("md5sum", p).Output()
		if err != nil {
			return err
		}
		if got := strings.Fields(string(out))[0]; !listed || got != sum {
			t.Errorf("md5sums has %q for %s, the file's sum is %s", sum, rel, got)
		}
		return nil
	})
	for p := range sums {
		t.Errorf("md5sums lists %s, which is not in the package", p)
	}

	// Contents.
	root := repoRoot(t)
	same := func(pkgPath, srcPath string) {
		t.Helper()
		if readText(t, filepath.Join(data, pkgPath)) != readText(t, filepath.Join(root, srcPath)) {
			t.Errorf("%s differs from %s", pkgPath, srcPath)
		}
	}
	same("etc/slotwatch/slotwatch.conf", "packaging/slotwatch.conf")
	same("usr/share/dbus-1/services/io.github.slotwatch.Slotwatch1.service", "packaging/io.github.slotwatch.Slotwatch1.service")
	same("usr/share/doc/slotwatch/README.md", "README.md")
	same("usr/share/doc/slotwatch/copyright", "packaging/debian/copyright")
	if unit := readText(t, filepath.Join(data, "usr/lib/systemd/user/slotwatch.service")); !regexp.MustCompile(`(?m)^ExecStart=/usr/bin/slotwatch serve$`).MatchString(unit) {
		t.Errorf("slotwatch.service does not run /usr/bin/slotwatch serve")
	}
	if c := readText(t, filepath.Join(data, "usr/share/doc/slotwatch/copyright")); !strings.HasPrefix(c, "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n") || !strings.Contains(c, "License: Expat") {
		t.Errorf("copyright is not a DEP-5 file naming the project's license (Expat)")
	}
	gz := func(rel string) string {
		t.Helper()
		text, hdr := gunzip(t, filepath.Join(data, rel))
		if !hdr.ModTime.IsZero() || hdr.Name != "" {
			t.Errorf("%s has a time stamp or name in its gzip header (gzip -n makes it reproducible)", rel)
		}
		return text
	}
	if cl := gz("usr/share/doc/slotwatch/changelog.gz"); !strings.HasPrefix(cl, fmt.Sprintf("slotwatch (%s) unstable; urgency=medium\n", version.Version)) ||
		!regexp.MustCompile(`(?m)^ -- slotwatch developers <slotwatch@users\.noreply\.github\.com>  \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000$`).MatchString(cl) {
		t.Errorf("changelog.gz is not a Debian changelog entry for %s:\n%s", version.Version, cl)
	}
	for rel, th := range map[string]string{"usr/share/man/man1/slotwatch.1.gz": "SLOTWATCH 1 ", "usr/share/man/man5/slotwatch.conf.5.gz": "SLOTWATCH.CONF 5 "} {
		if m := gz(rel); !strings.Contains(m, ".TH "+th) || !strings.Contains(m, ".SH NAME") {
			t.Errorf("%s is not a man page (.TH %s, .SH NAME):\n%.300s", rel, th, m)
		}
	}
	for rel, marker := range map[string]string{
		"usr/share/bash-completion/completions/slotwatch":    "complete -o default -F __start_slotwatch slotwatch",
		"usr/share/zsh/vendor-completions/_slotwatch":        "#compdef slotwatch",
		"usr/share/fish/vendor_completions.d/slotwatch.fish": "complete -c slotwatch ",
	} {
		if !strings.Contains(readText(t, filepath.Join(data, rel)), marker) {
			t.Errorf("%s lacks %q: not slotwatch's completion", rel, marker)
		}
	}

	// lintian: no error and no warning. Overrides (shipped in the package)
	// are shown as O: and logged; an override that matches nothing is a
	// finding too.
	if _, err := exec.LookPath("lintian"); err != nil {
		t.Fatal("lintian is not installed (make deps installs it)")
	}
	lint := exec.Command("lintian", "--pedantic", "--display-info", "--show-overrides", b.Path)
	lint.Dir = t.TempDir()
	lint.Env = append(os.Environ(), "LC_ALL=C.UTF-8")
	out, err := lint.CombinedOutput()
	var findings []string
	for _, l := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(l, "E: "), strings.HasPrefix(l, "W: "),
			strings.Contains(l, "unused-override"), strings.Contains(l, "mismatched-override"):
			findings = append(findings, l)
		case strings.HasPrefix(l, "O: "), strings.HasPrefix(l, "I: "), strings.HasPrefix(l, "P: "), strings.HasPrefix(l, "X: "):
			t.Logf("lintian: %s", l)
		}
	}
	if len(findings) > 0 || err != nil {
		t.Errorf("lintian (%v):\n%s\n--- its whole output ---\n%s", err, strings.Join(findings, "\n"), out)
	}

	// Its dependencies exist in this machine's Debian: apt would install
	// it (simulated; nothing is installed or locked).
	sim := exec.Command("apt-get", "--simulate", "--no-install-recommends", "install", b.Path)
	sim.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	if out, err := sim.CombinedOutput(); err != nil || !regexp.MustCompile(`(?m)^Inst slotwatch \(`+regexp.QuoteMeta(version.Version)+` `).Match(out) {
		t.Errorf("apt-get --simulate install %s: %v\n%s", b.Path, err, out)
	}
}

// treeEntry is what a snapshot of a file tree keeps of one entry.
type treeEntry struct {
	mode  fs.FileMode
	sum   string // regular files: sha256; symlinks: target
	mtime int64  // regular files only
}

// snapshotTree records every entry under dir but those under skip
// (relative paths).
func snapshotTree(t *testing.T, dir string, skip ...string) map[string]treeEntry {
	t.Helper()
	snap := map[string]treeEntry{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if slices.Contains(skip, rel) {
			return filepath.SkipDir
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		e := treeEntry{mode: fi.Mode()}
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h := sha256.Sum256(b)
			e.sum, e.mtime = hex.EncodeToString(h[:]), fi.ModTime().UnixNano()
		case fi.Mode()&fs.ModeSymlink != 0:
			e.sum, _ = os.Readlink(p)
		}
		snap[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// processesUnder returns the processes whose executable lies under dir.
func processesUnder(dir string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.HasPrefix(exe, dir+"/") {
			out = append(out, e.Name()+" "+exe)
		}
	}
	return out
}

// copyTree copies the checkout's files (not .git, not build output) to
// dst, for a build of another version.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	skip := []string{".git", "bin", "tests/faultmod/build"}
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if slices.Contains(skip, rel) {
			return filepath.SkipDir
		}
		target := filepath.Join(dst, rel)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		switch {
		case fi.IsDir():
			return os.MkdirAll(target, 0o755)
		case fi.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(l, target)
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(target, b, fi.Mode().Perm())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// bumpPatch returns version v with its last part one higher.
func bumpPatch(t *testing.T, v string) string {
	t.Helper()
	parts := strings.Split(v, ".")
	n, err := strconv.Atoi(parts[len(parts)-1])
	if err != nil {
		t.Fatalf("version %q: %v", v, err)
	}
	parts[len(parts)-1] = strconv.Itoa(n + 1)
	return strings.Join(parts, ".")
}

// hostDpkgState is what this test must leave alone on the machine:
// dpkg's own log and database.
type hostDpkgState struct{ logSize, statusSize int64 }

func readHostDpkgState(t *testing.T) hostDpkgState {
	t.Helper()
	var s hostDpkgState
	if fi, err := os.Stat("/var/log/dpkg.log"); err == nil {
		s.logSize = fi.Size()
	}
	if fi, err := os.Stat("/var/lib/dpkg/status"); err == nil {
		s.statusSize = fi.Size()
	}
	return s
}

// TestDebInstallUpgradePurge installs the package into a throwaway root
// with dpkg --root, as dpkg installs it on a machine: install, edit the
// config, install the same package again, upgrade to a package of the
// next version (built from a copy of the checkout, its config changed
// too), purge. The administrator's edit survives every step (dpkg keeps
// the new packaged config as .dpkg-dist), nothing is started, the purge
// removes /etc/slotwatch and every file of the package and leaves
// everything else of the root as it was, and the machine's own dpkg log
// and database are not touched.
func TestDebInstallUpgradePurge(t *testing.T) {
	a := builtDeb(t)
	root := t.TempDir()
	if strings.ContainsAny(root, " \t\n") {
		t.Fatalf("temp dir %q has white space", root)
	}
	admin := filepath.Join(root, "var/lib/dpkg")
	for _, d := range []string{"info", "updates", "triggers"} {
		if err := os.MkdirAll(filepath.Join(admin, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"status", "available"} {
		if err := os.WriteFile(filepath.Join(admin, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "var/log"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Other packages' files, next to where slotwatch's go.
	for p, text := range map[string]string{
		"etc/other.conf":                          "other=1\n",
		"usr/bin/other-tool":                      "#!/bin/sh\n",
		"usr/share/doc/other/README":              "other\n",
		"usr/lib/systemd/user/other.service":      "[Service]\nExecStart=/usr/bin/other-tool\n",
		"usr/share/dbus-1/services/other.service": "[D-BUS Service]\nName=org.example.Other\n",
		"usr/share/man/man1/other.1.gz":           "not really gzip\n",
	} {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dpkgAdmin := []string{"var/lib/dpkg", "var/log"}
	before := snapshotTree(t, root, dpkgAdmin...)
	host := readHostDpkgState(t)

	// dpkg --root installs into root with root/var/lib/dpkg as its
	// database; its log goes there too (else it is the machine's). The
	// root has no libc6 and the other dependencies, hence --force-depends
	// (TestDebPackage checks them against this machine's apt);
	// --path-include=* undoes any path-exclude of the machine's dpkg.cfg.d
	// (Docker images drop docs and man pages).
	dpkg := func(args ...string) string {
		t.Helper()
		full := append([]string{"--root=" + root, "--log=" + filepath.Join(root, "var/log/dpkg.log"),
			"--force-not-root", "--force-script-chrootless", "--force-depends", "--path-include=*"}, args...)
		cmd := exec.Command("dpkg", full...)
		cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdin = nil // /dev/null: a conffile prompt would fail, not wait
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("dpkg %s: %v\n%s", strings.Join(full, " "), err, out)
		}
		return string(out)
	}
	status := func() map[string]string {
		t.Helper()
		cmd := exec.Command("dpkg-query", "--admindir="+admin, "-W", "-f=${Status}|${Version}", "slotwatch")
		out, err := cmd.Output()
		if err != nil {
			return map[string]string{"Status": "not known"}
		}
		s, v, _ := strings.Cut(string(out), "|")
		return map[string]string{"Status": s, "Version": v}
	}
	nothingStarted := func(step string) {
		t.Helper()
		if ps := processesUnder(root); len(ps) > 0 {
			t.Errorf("after %s, processes run from the root: %q", step, ps)
		}
		infos, _ := filepath.Glob(filepath.Join(admin, "info", "slotwatch.*"))
		for _, p := range infos {
			switch filepath.Ext(p) {
			case ".list", ".md5sums", ".conffiles":
			default:
				t.Errorf("after %s, dpkg holds a maintainer script or trigger of slotwatch: %s", step, filepath.Base(p))
			}
		}
	}
	data := extractDeb(t, a.Path)
	pkgFiles := snapshotTree(t, data)
	delete(pkgFiles, ".")
	checkInstalled := func(step, version string) {
		t.Helper()
		if st := status(); st["Status"] != "install ok installed" || st["Version"] != version {
			t.Fatalf("after %s, dpkg says slotwatch is %q %q, want installed %s", step, st["Status"], st["Version"], version)
		}
		out, err := exec.Command(filepath.Join(root, "usr/bin/slotwatch"), "--version").CombinedOutput()
		if err != nil || !strings.Contains(string(out), version) {
			t.Errorf("after %s, the root's /usr/bin/slotwatch --version says %q (%v), want %s", step, out, err, version)
		}
		nothingStarted(step)
	}
	conf := filepath.Join(root, "etc/slotwatch/slotwatch.conf")

	// Install.
	t.Logf("install %s:\n%s", filepath.Base(a.Path), dpkg("--install", a.Path))
	checkInstalled("install", a.Version)
	after := snapshotTree(t, root, dpkgAdmin...)
	for rel, e := range pkgFiles {
		got, ok := after[rel]
		switch {
		case !ok:
			t.Errorf("after install, the root lacks %s", rel)
		case got.mode != e.mode || got.sum != e.sum:
			t.Errorf("after install, the root's %s is %v %s, the package's %v %s", rel, got.mode, got.sum, e.mode, e.sum)
		}
	}
	for rel, e := range before {
		if got := after[rel]; got != e {
			t.Errorf("install changed %s, which is not slotwatch's: %+v, was %+v", rel, got, e)
		}
	}
	for rel := range after {
		if _, ours := pkgFiles[rel]; !ours {
			if _, was := before[rel]; !was {
				t.Errorf("install made %s, which is not in the package", rel)
			}
		}
	}

	// The administrator edits the config; the same package again keeps
	// the edit without asking (the packaged file did not change).
	edited := readText(t, conf) + "notify = true\n"
	if err := os.WriteFile(conf, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("reinstall:\n%s", dpkg("--install", a.Path))
	checkInstalled("reinstall", a.Version)
	if got := readText(t, conf); got != edited {
		t.Errorf("reinstalling the package replaced the edited config")
	}

	// The next version, whose packaged config changed as well: dpkg would
	// ask; --force-confold (what apt passes for "keep mine") keeps the
	// edit and puts the new file next to it.
	src := filepath.Join(t.TempDir(), "src")
	copyTree(t, repoRoot(t), src)
	next := bumpPatch(t, a.Version)
	if err := os.WriteFile(filepath.Join(src, "version/VERSION"), []byte(next+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	newConf := readText(t, filepath.Join(src, "packaging/slotwatch.conf")) + "# (a line new in " + next + ")\n"
	if err := os.WriteFile(filepath.Join(src, "packaging/slotwatch.conf"), []byte(newConf), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := makeDeb(t, src, filepath.Join(t.TempDir(), "build"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("upgrade to %s:\n%s", filepath.Base(b.Path), dpkg("--force-confold", "--install", b.Path))
	checkInstalled("upgrade", next)
	if got := readText(t, conf); got != edited {
		t.Errorf("the upgrade replaced the edited config")
	}
	if got, err := os.ReadFile(conf + ".dpkg-dist"); err != nil || string(got) != newConf {
		t.Errorf("the upgrade did not leave the new packaged config as slotwatch.conf.dpkg-dist (%v)", err)
	}

	// Purge: the config and its directory go, with every file of the
	// package; everything else of the root is as before.
	t.Logf("purge:\n%s", dpkg("--purge", "slotwatch"))
	if st := status(); st["Status"] != "not known" && !strings.Contains(st["Status"], "not-installed") {
		t.Errorf("after purge, dpkg says slotwatch is %q", st["Status"])
	}
	if _, err := os.Lstat(filepath.Join(root, "etc/slotwatch")); !os.IsNotExist(err) {
		t.Errorf("after purge, /etc/slotwatch is still there (%v)", err)
	}
	nothingStarted("purge")
	final := snapshotTree(t, root, dpkgAdmin...)
	for rel, e := range before {
		if got, ok := final[rel]; !ok || got != e {
			t.Errorf("after purge, %s is %+v (present: %v), was %+v", rel, got, ok, e)
		}
	}
	for rel := range final {
		if _, was := before[rel]; !was {
			t.Errorf("after purge, %s is left", rel)
		}
	}

	// The machine's dpkg: neither its log nor its database changed.
	if now := readHostDpkgState(t); now != host {
		if log, err := os.ReadFile("/var/log/dpkg.log"); err == nil && int64(len(log)) > host.logSize && bytes.Contains(log[host.logSize:], []byte(" slotwatch")) {
			t.Errorf("the machine's /var/log/dpkg.log got lines about slotwatch:\n%s", log[host.logSize:])
		} else {
			t.Logf("the machine's dpkg state changed meanwhile (%+v, was %+v), not through slotwatch", now, host)
		}
	}
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "slotwatch").CombinedOutput(); err == nil && strings.Contains(string(out), "installed") {
		t.Logf("note: slotwatch is installed on this machine itself (%s)", out)
	}
}
