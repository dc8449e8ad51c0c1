package module

import (
	"cmp"
	"slices"
)

// Codes returns every CK_RV this package has a name for (PKCS#11 v2.40),
// in numeric order, CKR_OK included: what a face's error table must cover.
func Codes() []uint {
	out := make([]uint, 0, len(ckrNames))
	for c := range ckrNames {
		out = append(out, c)
	}
	slices.SortFunc(out, cmp.Compare)
	return out
}
