// Config values that may hold secrets: {env.*} and {file.*} placeholders
// are resolved here, in one place, when a config loads (and again at each
// NATS reconnection for a password or token), never written back into the
// config, and never quoted in an error: the caller names the option.

package muxwebhook

import (
	"errors"

	"github.com/caddyserver/caddy/v2"
)

// errUnsetPlaceholder is configValue's error: a placeholder in the value
// is unknown, unset or empty. Callers name the option, not the value.
var errUnsetPlaceholder = errors.New("a placeholder in it is unset or empty")

// configValue resolves raw's {env.*} and {file.*} placeholders (and the
// other global ones Caddy knows at load) as Caddy resolves them in its
// own config. A placeholder that is unknown, unset or empty is
// errUnsetPlaceholder; a value without placeholders is returned as it is.
func configValue(raw string) (string, error) {
	v, err := caddy.NewReplacer().ReplaceOrErr(raw, true, true)
	if err != nil {
		return "", errUnsetPlaceholder
	}
	return v, nil
}
