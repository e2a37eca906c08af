//go:build e2e

package muxwebhook

// Differential test against the official verifier: difftest/sdk-verdicts.js
// asks @mux/mux-node for its verdict on 600 valid and mutated deliveries;
// ours must agree, except for the intentional differences below, which the
// page docs/security.md lists ("Intentional differences from Mux's SDK").

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"testing"
	"time"
)

// intentionalDifferences are the case kinds where our verdict is meant to
// differ from the SDK's, with the reason.
var intentionalDifferences = map[string]string{
	"uppercase_hex":       "we accept v1 in either case (hex is case-insensitive); the SDK compares strings and rejects uppercase",
	"non_numeric_t":       "the SDK's parseInt turns t=abc into NaN, computes the MAC over \"NaN.body\" and its age check passes; we reject t that is not 1-19 digits",
	"trailing_garbage_t":  "the SDK's parseInt reads t=123abc as 123; we reject it as malformed",
	"leading_zero_t":      "the SDK MACs parseInt(t), dropping leading zeros; we MAC t exactly as sent, as Mux's documentation says",
	"duplicate_t":         "the SDK keeps the last t; we reject a header with two t items as malformed",
	"whitespace":          "we trim spaces around items (\"t=1, v1=...\"); the SDK then sees a key \" v1\" and finds no signature",
	"tab_whitespace":      "we trim tabs around items too; the SDK does not",
	"item_without_equals": "the SDK ignores an item without '='; we reject the header as malformed",
}

type sdkCase struct {
	Kind     string `json:"kind"`
	Header   string `json:"header"`
	Body     string `json:"body"`
	Secret   string `json:"secret"`
	SDKOK    bool   `json:"sdk_ok"`
	SDKError string `json:"sdk_error"`
}

func TestDifferentialAgainstSDK(t *testing.T) {
	t.Parallel() // its own processes and ports
	node, err := exec.LookPath("node")
	if err == nil {
		_, err = os.Stat("node_modules/@mux/mux-node/package.json")
	}
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("the differential test needs node and `npm ci`: %v", err)
		}
		t.Skipf("node or the Mux SDK is missing (run npm ci): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, node, "difftest/sdk-verdicts.js").Output()
	if err != nil {
		t.Fatalf("sdk-verdicts.js: %v", err)
	}
	var cases []sdkCase
	if err := json.Unmarshal(out, &cases); err != nil {
		t.Fatal(err)
	}
	if len(cases) < 500 {
		t.Fatalf("only %d cases, want at least 500", len(cases))
	}
	now := time.Now()
	agree, intentional := 0, map[string]int{}
	kinds := map[string]bool{}
	for _, c := range cases {
		kinds[c.Kind] = true
		_, verr := Verify(c.Header, []byte(c.Body), [][]byte{[]byte(c.Secret)}, now, DefaultTolerance)
		ours := verr == nil
		_, isIntentional := intentionalDifferences[c.Kind]
		switch {
		case ours == c.SDKOK && !isIntentional:
			agree++
		case ours != c.SDKOK && isIntentional:
			intentional[c.Kind]++
		case isIntentional:
			t.Errorf("%s: we now agree with the SDK (ok=%v); update intentionalDifferences and the README", c.Kind, ours)
		default:
			t.Errorf("%s: SDK ok=%v (%s), ours %v (%v)\n header %q", c.Kind, c.SDKOK, c.SDKError, ours, verr, c.Header)
		}
	}
	for kind := range intentionalDifferences {
		if !kinds[kind] {
			t.Errorf("no case of intentional difference %q was generated", kind)
		}
	}
	t.Logf("%d cases: %d agree, intentional differences %v", len(cases), agree, intentional)
}
