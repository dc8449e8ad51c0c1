package version

import (
	"regexp"
	"testing"
)

// The version is what Debian and the PKCS#11 face (major.minor bytes)
// can take: digits and dots, three parts.
func TestVersionIsPlain(t *testing.T) {
	if !regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+$`).MatchString(Version) {
		t.Fatalf("VERSION is %q, want MAJOR.MINOR.PATCH", Version)
	}
}
