package stack

import (
	"path/filepath"

	"github.com/slotwatch/slotwatch/internal/p11kitpath"
)

// P11KitClientModule is p11-kit's RPC client module (Debian:
// p11-kit-modules), which a PKCS#11 program loads to reach slotwatch's
// PKCS#11 face: P11_KIT_SERVER_ADDRESS=unix:path=SOCKET tells it where.
var P11KitClientModule = filepath.Join(p11kitpath.ModuleDir(), "p11-kit-client.so")

// P11KitServerEnv is the environment that points p11-kit-client.so at a
// socket.
func P11KitServerEnv(socket string) string {
	return "P11_KIT_SERVER_ADDRESS=unix:path=" + socket
}
