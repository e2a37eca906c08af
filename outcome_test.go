package muxwebhook

// The outcomes table (outcome.go).

import (
	"errors"
	"fmt"
	"testing"
)

func TestOutcomeTable(t *testing.T) {
	seen := map[string]bool{}
	for _, o := range refusals {
		if o.Name == "" || seen[o.Name] || o.err == nil || o.Status < 400 || o.Status > 499 || !o.Refused() {
			t.Errorf("refusal row %+v: want a unique name, an error and a 4xx status", o)
		}
		seen[o.Name] = true
		if got := Reason(fmt.Errorf("wrapped: %w", o.err)); got != o.Name {
			t.Errorf("Reason(%v) = %q, want %q", o.err, got, o.Name)
		}
		if !outcomes[o.Name] {
			t.Errorf("%s is not a metrics/live log outcome", o.Name)
		}
	}
	if OutcomeVerified.Refused() || OutcomeDuplicate.Refused() || !outcomes["verified"] || !outcomes["duplicate"] {
		t.Error("success outcomes")
	}
	if len(OutcomeNames()) != len(refusals)+2 || len(outcomes) != len(refusals)+2 {
		t.Errorf("OutcomeNames %v", OutcomeNames())
	}
	if Reason(errors.New("other")) != "" {
		t.Error("Reason of an unrelated error")
	}
}
