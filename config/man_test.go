package config

import (
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// manPage is slotwatch.conf(5)'s source.
const manPage = "../packaging/man/slotwatch.conf.5.md"

// manEntries returns the definition-list entries of the page: the text of
// each entry (its term line and its paragraph), by every key its term
// line names ("**key** = ..."), the first entry for a key named twice.
func manEntries(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(manPage)
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]string{}
	term := regexp.MustCompile(`\*\*([a-z-]+)\*\* =`)
	for _, block := range strings.Split(string(b), "\n\n") {
		lines := strings.SplitN(block, "\n", 2)
		for _, m := range term.FindAllStringSubmatch(lines[0], -1) {
			if _, seen := entries[m[1]]; !seen { // a top-level key's own entry comes first
				entries[m[1]] = block
			}
		}
	}
	return entries
}

// TestManPageHasEveryKey: every key Parse knows has an entry in
// slotwatch.conf(5), and each top-level key's entry states its default —
// checked by parsing "key = DEFAULT" and comparing with Default(), so the
// page cannot drift from the code.
func TestManPageHasEveryKey(t *testing.T) {
	entries := manEntries(t)
	def := regexp.MustCompile(`Default: \*\*([^*]+)\*\*\.`)
	for _, key := range topKeys {
		entry, ok := entries[key]
		if !ok {
			t.Errorf("slotwatch.conf(5) has no entry for %s", key)
			continue
		}
		m := def.FindStringSubmatch(entry)
		if m == nil {
			t.Errorf("slotwatch.conf(5)'s entry for %s states no default (\"Default: **VALUE**.\")", key)
			continue
		}
		got, err := Parse(strings.NewReader(key+" = "+m[1]+"\n"), "man")
		if err != nil {
			t.Errorf("%s = %s, the page's default, does not parse: %v", key, m[1], err)
			continue
		}
		want := Default()
		got.Source, want.Source = "", ""
		got.RemovalActionSet = false
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s = %s, the page's default, is not the default:\n got %+v\nwant %+v", key, m[1], got, want)
		}
	}
	for _, key := range moduleKeys {
		if _, ok := entries[key]; !ok {
			t.Errorf("slotwatch.conf(5) has no entry for the module key %s", key)
		}
	}
	// And no entry for a key the code does not know.
	known := map[string]bool{}
	for _, k := range append(append([]string{}, topKeys...), moduleKeys...) {
		known[k] = true
	}
	for k := range entries {
		if !known[k] {
			t.Errorf("slotwatch.conf(5) documents %s, which Parse does not know", k)
		}
	}
}
