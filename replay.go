// `caddy mux-webhook replay`: delivers the events mux_store kept, oldest
// first, re-signed with the current time, and moves each delivered file to
// DIR/delivered/, so that running it again continues where it stopped.

package muxwebhook

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// deliveredDir is where replay moves delivered files, under --from.
const deliveredDir = "delivered"

// storedEvent is one file of the spool.
type storedEvent struct {
	path      string // absolute
	rel       string // relative to the spool
	body      []byte
	typ, id   string
	createdAt time.Time
}

func replayCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "replay --from DIR --to URL [--secret S] [--type GLOB] [--dry-run]",
		Short: "Deliver the events mux_store kept, oldest first",
		Long: `Reads every event file under DIR (as mux_store wrote them; DIR/delivered is
skipped), oldest created_at first, signs each with the current time and
POSTs its bytes unchanged to URL, with a Mux-Webhook-Replay header (which
mux_store answers 503, so that a replay through a gateway whose backend is
still down stops instead of storing the event again). Redirects are not
followed. Each delivered file
(2xx) is moved to DIR/delivered/ under the same relative path. It stops at
the first failure with a non-zero exit; running it again continues where
it stopped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			from, _ := cmd.Flags().GetString("from")
			to, _ := cmd.Flags().GetString("to")
			if from == "" || to == "" {
				return errors.New("--from DIR and --to URL are required, e.g. --from /var/spool/mux --to http://localhost:8080/mux")
			}
			target, err := parseTarget(to)
			if err != nil {
				return err
			}
			pattern, _ := cmd.Flags().GetString("type")
			if pattern != "" {
				if err := checkPattern(pattern); err != nil {
					return err
				}
			}
			dryRun, _ := cmd.Flags().GetBool("dry-run")
			secret := ""
			if !dryRun {
				if secret, err = secretFlag(cmd); err != nil {
					return err
				}
			}
			events, err := readSpool(from, pattern)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if len(events) == 0 {
				fmt.Fprintf(out, "nothing to replay in %s\n", from)
				return nil
			}
			client := newHTTPClient()
			for i, ev := range events {
				if dryRun {
					fmt.Fprintf(out, "would deliver %s %s (%s) from %s\n", printable(ev.typ), printable(ev.id), ev.createdAt.Format(time.RFC3339), printable(ev.rel))
					continue
				}
				ok, err := sendOne(out, client, target, secret, ev.typ, ev.body, ReplayHeader, printable(ev.rel))
				if err == nil && !ok {
					err = errors.New("no 2xx response")
				}
				if err != nil {
					return fmt.Errorf("stopped at %s: %s; %d delivered, %d left; run replay again to continue", printable(ev.rel), printable(err.Error()), i, len(events)-i)
				}
				if err := moveDelivered(from, ev); err != nil {
					return fmt.Errorf("delivered %s but could not move it to %s/: %s; it would be sent again", printable(ev.rel), deliveredDir, printable(err.Error()))
				}
			}
			if !dryRun {
				fmt.Fprintf(out, "replayed %d events\n", len(events))
			}
			return nil
		},
	}
	c.Flags().String("from", "", "the spool directory mux_store writes to")
	c.Flags().String("to", "", "URL of the gateway (or application), e.g. http://localhost:8080/mux")
	c.Flags().String("secret", "", "signing secret (default: $"+SecretEnv+")")
	c.Flags().String("type", "", "only events whose type matches this mux_event pattern")
	c.Flags().Bool("dry-run", false, "list what would be delivered, deliver nothing")
	return c
}

// readSpool reads the pending events under dir, oldest first.
func readSpool(dir, pattern string) ([]storedEvent, error) {
	root, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	var events []storedEvent
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() {
			if rel == deliveredDir {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() || strings.HasPrefix(d.Name(), storeTempPrefix) {
			return nil
		}
		body, err := readStored(path)
		if err != nil {
			return err
		}
		ev, err := DecodeEvent(body)
		if err != nil {
			return fmt.Errorf("%s: not a stored Mux event: %v", rel, err)
		}
		if pattern != "" && !globMatch(pattern, ev.Type) {
			return nil
		}
		created, _ := time.Parse(time.RFC3339Nano, ev.CreatedAt)
		events = append(events, storedEvent{path: path, rel: rel, body: body, typ: ev.Type, id: ev.ID, createdAt: created})
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.SliceStable(events, func(i, j int) bool {
		if !events[i].createdAt.Equal(events[j].createdAt) {
			return events[i].createdAt.Before(events[j].createdAt)
		}
		return events[i].rel < events[j].rel
	})
	return events, nil
}

// readStored reads a file of at most maxInput bytes.
func readStored(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readAllBounded(f, path)
}

// moveDelivered moves a delivered file to dir/delivered/<its relative path>.
func moveDelivered(dir string, ev storedEvent) error {
	root, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	target := filepath.Join(root, deliveredDir, ev.rel)
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return err
	}
	if _, err := os.Stat(target); err == nil {
		target = withSuffix(target, int(time.Now().UnixNano()%1_000_000))
	}
	return os.Rename(ev.path, target)
}
