package queue

import "testing"

// TestIdempotencyKey: an id that is a plain header value is its own key;
// any other is "pct:" and its percent-encoded bytes; distinct ids never
// share a key.
func TestIdempotencyKey(t *testing.T) {
	cases := map[string]string{
		"3f2c-uuid":  "3f2c-uuid",
		"a b":        "a b",
		"50%":        "50%",
		"é":          "é",
		"a\x01b":     "pct:a%01b",
		"a\nb":       "pct:a%0Ab",
		"a\tb":       "pct:a%09b",
		"a\x7fb":     "pct:a%7Fb",
		" x":         "pct:%20x",
		"x ":         "pct:x%20",
		"pct:x":      "pct:pct:x",
		"pct:a%01b":  "pct:pct:a%2501b",
		"é\n":        "pct:%C3%A9%0A",
		"100%\x00":   "pct:100%25%00",
		"":           "",
		"a\r\nb: c":  "pct:a%0D%0Ab:%20c",
		"tab\tinner": "pct:tab%09inner",
	}
	seen := map[string]string{}
	for id, want := range cases {
		got := IdempotencyKey(id)
		if got != want {
			t.Errorf("IdempotencyKey(%q) = %q, want %q", id, got, want)
		}
		for i := 0; i < len(got); i++ {
			if c := got[i]; c < 0x20 && c != '\t' || c == 0x7f {
				t.Errorf("IdempotencyKey(%q) = %q holds a control byte", id, got)
			}
		}
		if other, ok := seen[got]; ok {
			t.Errorf("ids %q and %q share the key %q", id, other, got)
		}
		seen[got] = id
	}
}
