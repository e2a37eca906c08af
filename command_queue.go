// `caddy mux-webhook queue`: the delivery queue of a running Caddy,
// through its admin API, the way `caddy reload` talks to it.
//
//	caddy mux-webhook queue [--address A] [--config F [--adapter N]]
//	caddy mux-webhook queue dead <destination>
//	caddy mux-webhook queue redeliver <destination> (<id>... | --all)
//	caddy mux-webhook queue purge <destination> [--yes]
//	caddy mux-webhook queue pause <destination>
//	caddy mux-webhook queue resume <destination>

package muxwebhook

import (
	"bufio"
	"bytes"
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
)

func queueCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "queue [status | dead <destination> | redeliver <destination> (<id>...|--all) | purge <destination> [--yes] | pause <destination> | resume <destination>]",
		Short: "Show the delivery queue of a running Caddy; list, redeliver or purge dead letters; pause or resume a destination",
		Long: `Talks to the admin API of a running Caddy (like 'caddy reload': --address, or
the admin address of --config, else localhost:2019).

  queue                                   per destination: pending, in flight, delivered, dead,
                                          age of the oldest pending event, last error (with
                                          several instances on one NATS cluster: delivered and
                                          last error are this instance's, the rest is shared)
  queue dead <destination>                the destination's dead letters
  queue redeliver <destination> <id>...   dead letters back to the queue, attempts from 1
  queue redeliver <destination> --all
  queue purge <destination> [--yes]       drop the destination's dead letters: lists them, asks
                                          "purge N dead letters of <destination>? [y/N]" and drops
                                          those listed (not those buried since); --yes skips the
                                          question (without it, no answer refuses)
  queue pause <destination>               hold the destination's events, on every gateway sharing
                                          the stream, until it is resumed: they wait, using no
                                          attempt, and none becomes a dead letter by max_age
  queue resume <destination>              deliver them again

A destination no longer configured whose dead letters are kept is shown
"(not configured)"; its dead letters can be listed and purged.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			addr, _ := cmd.Flags().GetString("address")
			cfg, _ := cmd.Flags().GetString("config")
			adapter, _ := cmd.Flags().GetString("adapter")
			admin, err := caddycmd.DetermineAdminAPIAddress(addr, nil, cfg, adapter)
			if err != nil {
				return err
			}
			all, _ := cmd.Flags().GetBool("all")
			out := cmd.OutOrStdout()
			verb := "status"
			if len(args) > 0 {
				verb, args = args[0], args[1:]
			}
			switch {
			case verb == "status" && len(args) == 0:
				var list []QueueStatus
				if err := adminJSON(admin, http.MethodGet, "/mux-webhook/queue", nil, &list); err != nil {
					return err
				}
				if len(list) > 0 {
					// Several instances may share the queue: say which
					// columns are whose.
					fmt.Fprintf(out, "instance %s: pending, in flight, dead and oldest are the shared queue's; delivered and last error are this instance's\n", printable(list[0].Instance))
				}
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "DESTINATION\tPENDING\tIN FLIGHT\tHELD\tDELIVERED\tDEAD\tOLDEST PENDING\tLAST ERROR AT\tLAST ERROR")
				var stalled, paused, tripped []QueueStatus
				for _, q := range list {
					oldest := "-"
					if q.OldestPendingSeconds > 0 {
						oldest = (time.Duration(q.OldestPendingSeconds) * time.Second).String()
					}
					name := printable(q.Name)
					if !q.Configured {
						name += " (not configured)"
					}
					at, lastErr := "-", "-"
					if q.LastError != "" {
						at, lastErr = printable(q.LastErrorAt), printable(q.LastError)
					}
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", name, q.Pending, q.InFlight, q.Held, q.Delivered, q.Dead, oldest, at, lastErr)
					if q.Stalled {
						stalled = append(stalled, q)
					}
					switch q.State {
					case "paused":
						paused = append(paused, q)
					case "tripped":
						tripped = append(tripped, q)
					}
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				for _, q := range paused {
					fmt.Fprintf(out, "PAUSED: %s since %s: its events wait until 'caddy mux-webhook queue resume %s'\n", printable(q.Name), printable(q.StateSince), printable(q.Name))
				}
				for _, q := range tripped {
					fmt.Fprintf(out, "TRIPPED: %s since %s (this instance's breaker): its events wait; next probe %s; 'caddy mux-webhook queue resume %s' resets it\n",
						printable(q.Name), printable(q.StateSince), printable(q.NextProbe), printable(q.Name))
				}
				for _, q := range stalled {
					fmt.Fprintf(out, "STALLED: %s: events wait and none was attempted since %s; see the ERROR lines 'mux webhook delivery stalled'\n", printable(q.Name), printable(q.StalledSince))
				}
				return nil
			case verb == "dead" && len(args) == 1:
				var dead []struct {
					ID        string    `json:"id"`
					Type      string    `json:"type"`
					Attempts  int       `json:"attempts"`
					LastError string    `json:"last_error"`
					DeadAt    time.Time `json:"dead_at"`
				}
				if err := adminJSON(admin, http.MethodGet, "/mux-webhook/queue/dead?destination="+url.QueryEscape(args[0]), nil, &dead); err != nil {
					return err
				}
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tTYPE\tATTEMPTS\tDEAD AT\tLAST ERROR")
				for _, d := range dead {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", printable(d.ID), printable(d.Type), d.Attempts, d.DeadAt.Format(time.RFC3339), printable(d.LastError))
				}
				return tw.Flush()
			case verb == "redeliver" && len(args) >= 1 && (all != (len(args) > 1)):
				body, _ := json.Marshal(map[string]any{"destination": args[0], "ids": args[1:], "all": all})
				var res struct {
					Redelivered int `json:"redelivered"`
				}
				if err := adminJSON(admin, http.MethodPost, "/mux-webhook/queue/redeliver", body, &res); err != nil {
					return err
				}
				_, err := fmt.Fprintf(out, "redelivered %d dead letters of %s\n", res.Redelivered, printable(args[0]))
				return err
			case (verb == "pause" || verb == "resume") && len(args) == 1:
				body, _ := json.Marshal(map[string]string{"destination": args[0]})
				var res struct {
					State string `json:"state"`
				}
				if err := adminJSON(admin, http.MethodPost, "/mux-webhook/queue/"+verb, body, &res); err != nil {
					return err
				}
				_, err := fmt.Fprintf(out, "%s is %s (on every gateway sharing the stream within seconds)\n", printable(args[0]), printable(res.State))
				return err
			case verb == "purge" && len(args) == 1:
				yes, _ := cmd.Flags().GetBool("yes")
				return purgeDead(admin, args[0], yes, cmd.InOrStdin(), out)
			}
			return errors.New("usage: queue | queue dead <destination> | queue redeliver <destination> (<id>...|--all) | queue purge <destination> | queue pause <destination> | queue resume <destination>")
		},
	}
	c.Flags().String("address", "", "the admin API's address (default: from --config, else localhost:2019)")
	c.Flags().String("config", "", "the config file whose admin address to use")
	c.Flags().String("adapter", "", "the adapter of --config")
	c.Flags().Bool("all", false, "with redeliver: every dead letter of the destination")
	c.Flags().Bool("yes", false, "with purge: do not ask")
	return c
}

// adminJSON makes one admin API request; a JSON body is sent as such, and
// a JSON answer decoded into out (if not nil).
func adminJSON(admin, method, uri string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	resp, err := caddycmd.AdminAPIRequest(admin, method, uri, http.Header{"Content-Type": {"application/json"}}, rd)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s %s: %s", method, uri, printable(string(b)))
		}
	}
	return nil
}

// purgeDead lists destination's dead letters, asks on in whether to purge
// them (unless yes), and purges those listed: up to the listing's last
// seq, so that a dead letter buried meanwhile is kept. No answer (no
// terminal, end of input) refuses.
func purgeDead(admin, destination string, yes bool, in io.Reader, out io.Writer) error {
	q := "/mux-webhook/queue/dead?destination=" + url.QueryEscape(destination)
	var dead []struct {
		Seq uint64 `json:"seq"`
	}
	if err := adminJSON(admin, http.MethodGet, q, nil, &dead); err != nil {
		return err
	}
	if len(dead) == 0 {
		_, err := fmt.Fprintf(out, "no dead letters of %s\n", printable(destination))
		return err
	}
	if !yes {
		fmt.Fprintf(out, "purge %d dead letters of %s? [y/N] ", len(dead), printable(destination))
		answer, err := bufio.NewReader(io.LimitReader(in, 1024)).ReadString('\n')
		if err != nil && answer == "" {
			fmt.Fprintln(out)
			return errors.New("not purged: no answer (pass --yes to purge without asking)")
		}
		if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
			return errors.New("not purged")
		}
	}
	upTo := dead[len(dead)-1].Seq
	if err := adminJSON(admin, http.MethodDelete, q+"&up_to="+strconv.FormatUint(upTo, 10), []byte("{}"), nil); err != nil {
		return err
	}
	_, err := fmt.Fprintf(out, "purged %d dead letters of %s\n", len(dead), printable(destination))
	return err
}
