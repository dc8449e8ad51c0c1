package pkcs11face

import (
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
)

// libraryVersion reads "MAJOR.MINOR..." from slotwatch's version string
// (0.0 if it is not one).
func libraryVersion(v string) pkcs11.Version {
	parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
	var out pkcs11.Version
	if len(parts) >= 2 {
		maj, err1 := strconv.ParseUint(parts[0], 10, 8)
		min, err2 := strconv.ParseUint(parts[1], 10, 8)
		if err1 == nil && err2 == nil {
			out.Major, out.Minor = byte(maj), byte(min)
		}
	}
	return out
}
