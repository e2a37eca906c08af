// Load-time lint of mux_event patterns against the event catalog: a
// pattern that can match no known type is most likely a typo
// (ideo.live_stream.active), so say so, and name the closest known type.

package muxwebhook

import (
	"strings"

	"go.uber.org/zap"
)

// lintPatterns logs a warning for each pattern that matches no known
// event type. Such patterns stay valid: Mux adds types over time.
func lintPatterns(logger *zap.Logger, patterns []string) {
	for _, p := range patterns {
		if matchesKnownType(p) {
			continue
		}
		logger.Warn("mux_event pattern matches no known Mux event type; check for a typo",
			zap.String("pattern", p),
			zap.String("closest_known", closestKnown(p)),
		)
	}
}

func matchesKnownType(pattern string) bool {
	for _, e := range catalog {
		if globMatch(pattern, e.Type) {
			return true
		}
	}
	return false
}

// closestKnown returns the known type, or for a pattern with `*` the known
// type or family wildcard (video.asset.*), at the smallest edit distance
// from pattern.
func closestKnown(pattern string) string {
	best, bestDist := "", -1
	consider := func(c string) {
		if d := editDistance(pattern, c); bestDist < 0 || d < bestDist || (d == bestDist && c < best) {
			best, bestDist = c, d
		}
	}
	wild := strings.Contains(pattern, "*")
	for _, e := range catalog {
		consider(e.Type)
		if !wild {
			continue
		}
		for i := range len(e.Type) {
			if e.Type[i] == '.' {
				consider(e.Type[:i+1] + "*")
			}
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
