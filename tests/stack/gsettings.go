package stack

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// SmartcardSchema stands in for gnome-settings-daemon's smart card
// GSettings schema (org.gnome.settings-daemon.peripherals.smartcard), with
// only the key slotwatch reads: removal-action.
const SmartcardSchema = `<schemalist>
  <schema id="org.gnome.settings-daemon.peripherals.smartcard" path="/org/gnome/settings-daemon/peripherals/smartcard/">
    <key name="removal-action" type="s">
      <default>'none'</default>
    </key>
  </schema>
</schemalist>
`

// GSettingsForTest makes a private GSettings world in t.TempDir():
// schemaXML ("" for none) compiled into its own schema directory, the
// keyfile backend under a private XDG_CONFIG_HOME, and no system schemas.
// It returns the environment entries that select it, to append to a
// process's environment (later entries win).
func GSettingsForTest(t testing.TB, schemaXML string) []string {
	t.Helper()
	for _, tool := range []string{"gsettings", "glib-compile-schemas"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed (Debian's libglib2.0-bin): run make deps", tool)
		}
	}
	dir := t.TempDir()
	schemas := filepath.Join(dir, "schemas")
	data := filepath.Join(dir, "data") // XDG_DATA_DIRS: keeps the system's schemas out
	for _, d := range []string{schemas, data} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if schemaXML != "" {
		if err := os.WriteFile(filepath.Join(schemas, "test.gschema.xml"), []byte(schemaXML), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("glib-compile-schemas", schemas).CombinedOutput(); err != nil {
			t.Fatalf("glib-compile-schemas: %v\n%s", err, out)
		}
	}
	return []string{
		"HOME=" + dir,
		"GSETTINGS_SCHEMA_DIR=" + schemas,
		"GSETTINGS_BACKEND=keyfile",
		"XDG_CONFIG_HOME=" + filepath.Join(dir, "config"),
		"XDG_DATA_DIRS=" + data,
	}
}

// SetGSetting runs "gsettings set schema key value" in the world env
// selects (from GSettingsForTest).
func SetGSetting(t testing.TB, env []string, schema, key, value string) {
	t.Helper()
	cmd := exec.Command("gsettings", "set", schema, key, value)
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gsettings set %s %s %s: %v\n%s", schema, key, value, err, out)
	}
}
