package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// manPage is slotwatch(1)'s source (go-md2man Markdown, built by make man).
const manPage = "../packaging/man/slotwatch.1.md"

// manSections splits the page at its headings: "## slotwatch serve" and
// "# EXIT STATUS" become keys "slotwatch serve" and "EXIT STATUS".
func manSections(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(manPage)
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string]string{}
	name := ""
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "#") {
			name = strings.TrimSpace(strings.TrimLeft(line, "#"))
			continue
		}
		sections[name] += line + "\n"
	}
	return sections
}

// TestManPageHasEveryCommandAndFlag: slotwatch(1) has a section for every
// command the binary has, and that section names every one of its
// options (and their one-letter forms); the global options are in GLOBAL
// OPTIONS. A flag added to the code without a word in the page fails here.
func TestManPageHasEveryCommandAndFlag(t *testing.T) {
	sections := manSections(t)
	root := commandTree()
	for _, cmd := range root.Commands() {
		if cmd.Hidden || cmd.Name() == "help" {
			continue
		}
		sec, ok := sections["slotwatch "+cmd.Name()]
		if !ok {
			t.Errorf("slotwatch(1) has no section \"## slotwatch %s\"", cmd.Name())
			continue
		}
		if len(cmd.Commands()) > 0 { // completion: its shells
			for _, sub := range cmd.Commands() {
				if !sub.Hidden && sub.Name() != "help" && !strings.Contains(sec, "**"+sub.Name()+"**") {
					t.Errorf("slotwatch(1)'s %s section does not name %s", cmd.Name(), sub.Name())
				}
			}
		}
		cmd.NonInheritedFlags().VisitAll(func(f *pflag.Flag) {
			if f.Hidden || f.Name == "help" {
				return
			}
			if !strings.Contains(sec, "**--"+f.Name+"**") {
				t.Errorf("slotwatch(1)'s %s section does not document --%s", cmd.Name(), f.Name)
			}
			if f.Shorthand != "" && !strings.Contains(sec, "**-"+f.Shorthand+"**") {
				t.Errorf("slotwatch(1)'s %s section does not give -%s for --%s", cmd.Name(), f.Shorthand, f.Name)
			}
		})
	}
	global := sections["GLOBAL OPTIONS"]
	root.Flags().VisitAll(func(f *pflag.Flag) {
		if !f.Hidden && !strings.Contains(global, "**--"+f.Name+"**") {
			t.Errorf("slotwatch(1)'s GLOBAL OPTIONS do not document --%s", f.Name)
		}
	})
}

// TestManPageHasEveryExitStatus: every exit status the commands use is in
// EXIT STATUS.
func TestManPageHasEveryExitStatus(t *testing.T) {
	sec := manSections(t)["EXIT STATUS"]
	for _, code := range []int{exitOK, exitFailure, exitNotRunning, exitSessionsExist, exitUsage} {
		if !regexp.MustCompile(`(?m)^\*\*` + strconv.Itoa(code) + `\*\*$`).MatchString(sec) {
			t.Errorf("slotwatch(1)'s EXIT STATUS has no entry for %d", code)
		}
	}
}

// TestManPageHasEveryEnvironmentVariable: every environment variable the
// daemon's code reads by name (os.Getenv / os.LookupEnv with a literal,
// outside tests) is in ENVIRONMENT.
func TestManPageHasEveryEnvironmentVariable(t *testing.T) {
	sec := manSections(t)["ENVIRONMENT"]
	read := regexp.MustCompile(`os\.(?:Getenv|LookupEnv)\("([A-Z0-9_]+)"\)`)
	var files []string
	for _, d := range []string{".", "../config", "../dbusapi", "../monitor", "../module", "../pkcs11face", "../broker", "../policy", "../internal"} {
		filepath.WalkDir(d, func(path string, e os.DirEntry, err error) error {
			if err == nil && !e.IsDir() && strings.HasSuffix(path, ".go") && !strings.HasSuffix(path, "_test.go") {
				files = append(files, path)
			}
			return nil
		})
	}
	var missing []string
	seen := map[string]bool{}
	for _, path := range files {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range read.FindAllSubmatch(b, -1) {
			name := string(m[1])
			if !strings.Contains(sec, "**"+name+"**") && !seen[name] {
				seen[name] = true
				missing = append(missing, name+" ("+path+")")
			}
		}
	}
	if len(missing) > 0 {
		t.Errorf("slotwatch(1)'s ENVIRONMENT does not document: %s", strings.Join(missing, ", "))
	}
}
