package stack

import (
	"github.com/slotwatch/slotwatch/internal/p11kitpath"
	"os"
	"path/filepath"
)

// OpenSCModule is OpenSC's PKCS#11 module (Debian package opensc-pkcs11),
// in p11-kit's module directory of this machine's architecture.
var OpenSCModule = filepath.Join(p11kitpath.ModuleDir(), "opensc-pkcs11.so")

// OpenSCConfEnv is the variable OpenSC reads its configuration file from.
const OpenSCConfEnv = "OPENSC_CONF"

// openSCConf makes OpenSC fast and predictable with vcard cards:
//   - card_drivers = myeid, default: the MyEID driver, which binds a vcard
//     by its ATR (historical bytes ending in "OsEID") without sending a
//     command to find out, reads its PKCS#15 structure, and knows its EC
//     algorithms, so that the card's key can sign (the generic "default"
//     driver registers no algorithm); and the generic ISO 7816 driver for
//     any other card. The stock list probes every driver with its own
//     APDUs first (about 2.4 s a card).
//   - enable_default_driver: the generic driver may bind unknown ATRs.
//   - use_file_caching = no: no cache in $HOME; a swapped card with the
//     same serial must not show the previous card's files.
const openSCConf = `app default {
	card_drivers = myeid, default;
	enable_default_driver = true;
	framework pkcs15 {
		use_file_caching = no;
	}
}
`

// WriteOpenSCConf writes dir/opensc.conf and returns its path, the value
// for OPENSC_CONF.
func WriteOpenSCConf(dir string) (string, error) {
	path := filepath.Join(dir, "opensc.conf")
	if err := os.WriteFile(path, []byte(openSCConf), 0o644); err != nil {
		return "", err
	}
	return path, nil
}
