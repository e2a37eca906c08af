// `caddy mux-webhook history`: search a running Caddy's history, and
// replay what it finds, through the admin API.
//
//	caddy mux-webhook history [--type G] [--object ID] [--id ID] [--outcome O] [--since T] [--until T] [--limit N]
//	caddy mux-webhook history replay --to <destination> [filters] [--dry-run]
//	caddy mux-webhook history cancel <job>

package muxwebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

func historyCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "history [replay --to <destination> | cancel <job>] [--type G] [--object ID] [--id ID] [--outcome O] [--since T] [--until T] [--limit N]",
		Short: "Search a running Caddy's history of events and attempts; replay what a filter finds",
		Long: `Talks to the admin API of a running Caddy (like 'caddy reload': --address, or
the admin address of --config, else localhost:2019).

  history [filters]                        the matching events, newest first: time, outcome,
                                           type, id, object, the route's status, attempts
  history replay --to <destination> [filters] [--dry-run]
                                           queue a fresh copy of each matching event id (its
                                           latest record) for the destination, oldest first,
                                           as a background job; shows its progress until done
                                           (Ctrl-C stops watching, not the job)
  history cancel <job>                     stop a replay job (what it queued stays queued)

Filters: --type (a mux_event pattern, '*' spans dots), --object, --id,
--outcome (verified or duplicate), --since and --until (RFC 3339, or a
duration back from now: 2h, 7d; a search's since defaults to 24h),
--limit (a search's, default 100, at most 1000).`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			addr, _ := cmd.Flags().GetString("address")
			cfg, _ := cmd.Flags().GetString("config")
			adapter, _ := cmd.Flags().GetString("adapter")
			admin, err := caddycmd.DetermineAdminAPIAddress(addr, nil, cfg, adapter)
			if err != nil {
				return err
			}
			flag := func(name string) string { v, _ := cmd.Flags().GetString(name); return v }
			out := cmd.OutOrStdout()
			switch {
			case len(args) == 0:
				q := url.Values{}
				for _, name := range []string{"type", "object", "id", "outcome", "since", "until"} {
					if v := flag(name); v != "" {
						q.Set(name, v)
					}
				}
				if cmd.Flags().Changed("limit") { // the server says what it accepts
					n, _ := cmd.Flags().GetInt("limit")
					q.Set("limit", strconv.Itoa(n))
				}
				var found struct {
					Events     []queue.HistoryEvent `json:"events"`
					NextBefore *uint64              `json:"next_before"`
				}
				if err := adminJSON(admin, http.MethodGet, "/mux-webhook/history?"+q.Encode(), nil, &found); err != nil {
					return err
				}
				return printHistory(out, found.Events, found.NextBefore)
			case len(args) == 1 && args[0] == "replay":
				if cmd.Flags().Changed("limit") {
					return errors.New("history replay: --limit is a search's; a replay queues every event its filters match (check the count with --dry-run)")
				}
				to := flag("to")
				if to == "" {
					return errors.New("history replay: name the destination with --to")
				}
				dry, _ := cmd.Flags().GetBool("dry-run")
				req := map[string]any{"destination": to, "dry_run": dry}
				for _, name := range []string{"type", "object", "id", "outcome", "since", "until"} {
					if v := flag(name); v != "" {
						req[name] = v
					}
				}
				body, _ := json.Marshal(req)
				var job queue.ReplayJob
				if err := adminJSON(admin, http.MethodPost, "/mux-webhook/history/replay", body, &job); err != nil {
					return err
				}
				if dry {
					_, err := fmt.Fprintf(out, "%d events would be queued to %s (dry run: nothing queued)\n", job.Matched, printable(to))
					return err
				}
				fmt.Fprintf(out, "replay job %s: %d events to %s\n", job.Job, job.Matched, printable(to))
				return watchReplay(admin, job, out, time.Second)
			case len(args) == 2 && args[0] == "cancel":
				var job queue.ReplayJob
				if err := adminJSON(admin, http.MethodDelete, "/mux-webhook/history/replay/"+url.PathEscape(args[1]), nil, &job); err != nil {
					return err
				}
				_, err := fmt.Fprintf(out, "replay job %s: %s; %d of %d queued\n", printable(job.Job), job.State, job.Queued, job.Matched)
				return err
			case len(args) == 1 && args[0] == "cancel":
				return errors.New("history cancel: name the job, e.g. caddy mux-webhook history cancel r0b484ccd5701")
			default:
				return fmt.Errorf("history: unknown arguments %q; see caddy mux-webhook history --help", strings.Join(args, " "))
			}
		},
	}
	c.Flags().String("address", "", "the admin API's address (default: from --config, else localhost:2019)")
	c.Flags().String("config", "", "the config file whose admin address to use")
	c.Flags().String("adapter", "", "the adapter of --config")
	c.Flags().String("type", "", "a mux_event pattern, e.g. 'video.asset.*'")
	c.Flags().String("object", "", "an object id (object.id)")
	c.Flags().String("id", "", "an event id")
	c.Flags().String("outcome", "", "verified or duplicate")
	c.Flags().String("since", "", "RFC 3339, or a duration back from now (2h, 7d); a search's default: 24h")
	c.Flags().String("until", "", "RFC 3339, or a duration back from now")
	c.Flags().Int("limit", 0, "a search's most events (default 100, at most 1000)")
	c.Flags().String("to", "", "with replay: the destination")
	c.Flags().Bool("dry-run", false, "with replay: count, queue nothing")
	return c
}

// printHistory writes a search's events as a table.
func printHistory(out io.Writer, events []queue.HistoryEvent, next *uint64) error {
	if len(events) == 0 {
		_, err := fmt.Fprintln(out, "no events in history match")
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tOUTCOME\tTYPE\tID\tOBJECT\tSTATUS\tATTEMPTS")
	for _, e := range events {
		attempts := "-"
		if n := len(e.Attempts); n > 0 {
			last := e.Attempts[n-1]
			attempts = fmt.Sprintf("%d (last: %s %s)", n, printable(last.Destination), last.Result)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", e.Seq, e.Time.Local().Format("2006-01-02 15:04:05"), e.Outcome,
			printable(e.Type), printable(e.ID), printable(e.ObjectID), e.Status, attempts)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if next != nil {
		_, err := fmt.Fprintf(out, "(more: the API's before=%d pages on)\n", *next)
		return err
	}
	return nil
}

// watchReplay polls a job until it is done, drawing a progress bar.
func watchReplay(admin string, job queue.ReplayJob, out io.Writer, every time.Duration) error {
	for {
		if job.Done {
			bar(out, job, true)
			if job.State == "failed" {
				return fmt.Errorf("replay job %s failed: %s", job.Job, job.Error)
			}
			return nil
		}
		bar(out, job, false)
		time.Sleep(every)
		if err := adminJSON(admin, http.MethodGet, "/mux-webhook/history/replay/"+url.PathEscape(job.Job), nil, &job); err != nil {
			return err
		}
	}
}

// bar draws a job's progress on one line.
func bar(out io.Writer, job queue.ReplayJob, last bool) {
	const width = 30
	done := job.Queued + job.Expired
	filled := width
	if job.Matched > 0 {
		filled = int(min(done, job.Matched) * width / job.Matched)
	}
	end := "\r"
	if last {
		end = "\n"
	}
	fmt.Fprintf(out, "[%s%s] %d/%d queued, %d expired, %s%s", strings.Repeat("#", filled), strings.Repeat(".", width-filled),
		job.Queued, job.Matched, job.Expired, job.State, end)
}
