package dbusapi

import (
	"maps"
	"slices"

	godbus "github.com/godbus/dbus/v5"

	"github.com/slotwatch/slotwatch/broker"
)

// FindObjects templates and results are a{sv} with the contract's keys:
// class (u, CKO_*), id (ay), label (s), key_type (u, CKK_*), and in results
// also value (ay, certificates only).

// Limits on a template's values.
const (
	maxKeyID         = 256
	maxTemplateLabel = 256
)

// decodeTemplate turns a client template into the broker's. Only the
// contract's keys with their exact types are accepted; a variant inside the
// variant is refused (godbus would unwrap it silently).
func decodeTemplate(t map[string]godbus.Variant) (broker.Template, error) {
	var out broker.Template
	for _, k := range slices.Sorted(maps.Keys(t)) {
		v := t[k].Value()
		if _, nested := v.(godbus.Variant); nested {
			return out, invalidArgs("template key %q holds a variant in a variant", k)
		}
		switch k {
		case "class", "key_type":
			u, ok := v.(uint32)
			if !ok {
				return out, invalidArgs("template key %q wants type u, got %s", k, t[k].Signature())
			}
			val := uint(u)
			if k == "class" {
				out.Class = &val
			} else {
				out.KeyType = &val
			}
		case "id":
			b, ok := v.([]byte)
			if !ok || len(b) > maxKeyID {
				return out, invalidArgs("template key \"id\" wants ay of at most %d bytes, got %s", maxKeyID, t[k].Signature())
			}
			out.ID = append([]byte{}, b...)
		case "label":
			s, ok := v.(string)
			if !ok || len(s) > maxTemplateLabel {
				return out, invalidArgs("template key \"label\" wants s of at most %d bytes, got %s", maxTemplateLabel, t[k].Signature())
			}
			out.Label = &s
		default:
			return out, invalidArgs("unknown template key %q (known: class, id, label, key_type)", k)
		}
	}
	return out, nil
}

// encodeObject is one FindObjects result as a{sv}.
func encodeObject(o broker.Object) map[string]godbus.Variant {
	res := map[string]godbus.Variant{"class": godbus.MakeVariant(uint32(o.Class))}
	if o.ID != nil {
		res["id"] = godbus.MakeVariant(o.ID)
	}
	if o.Label != nil {
		res["label"] = godbus.MakeVariant(*o.Label)
	}
	if o.KeyType != nil {
		res["key_type"] = godbus.MakeVariant(uint32(*o.KeyType))
	}
	if o.Value != nil {
		res["value"] = godbus.MakeVariant(o.Value)
	}
	return res
}
