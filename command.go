// The `caddy mux-webhook` subcommand: list the event catalog, sign and
// verify bodies offline, and send realistic signed events, so that nobody
// has to hand-craft a signature to test a route.

package muxwebhook

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// SecretEnv is the environment variable the commands take the signing
// secret from when --secret is not given, as Mux's SDKs do.
const SecretEnv = "MUX_WEBHOOK_SECRET"

// maxInput bounds what sign and verify read from a file or stdin.
const maxInput = 64 << 20

// maxSendCount bounds --count.
const maxSendCount = 10000

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "mux-webhook",
		Usage: "<events|sign|verify|send|replay|queue|history> [flags]",
		Short: "Lists Mux event types and signs, verifies or sends test webhooks",
		Long: `
Tools for testing a mux_webhook gateway without Mux:

  events [--json] [<pattern>]        list the known Mux event types
  sign   [--secret S] [--timestamp T] [FILE|-]
                                     print the Mux-Signature header for a body
  verify --header H [--secret S] [--tolerance D] [FILE|-]
                                     check a signature offline, saying why it fails
  send   --to URL --type T [--secret S] [--data FILE] [--passthrough X]
         [--id ID] [--count N]       sign and POST a realistic event
  replay --from DIR --to URL [--secret S]... [--type GLOB] [--dry-run]
                                     deliver what mux_store kept, oldest first,
                                     if its stored signature still proves it
  queue  [dead|redeliver|purge] …     the delivery queue of a running Caddy (admin API)
  history [replay --to D] [filters]  search the history of events and attempts, replay
                                     what a filter finds (admin API)

The secret defaults to the MUX_WEBHOOK_SECRET environment variable.
Run 'caddy mux-webhook <command> --help' for each command's flags.
`,
		CobraFunc: func(cmd *cobra.Command) {
			addSubcommands(cmd)
		},
	})
}

// newCommand returns the mux-webhook command tree on its own, for tests.
func newCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "mux-webhook", SilenceUsage: true}
	addSubcommands(cmd)
	return cmd
}

func addSubcommands(cmd *cobra.Command) {
	cmd.AddCommand(eventsCommand(), signCommand(), verifyCommand(), sendCommand(), replayCommand(), queueCommand(), historyCommand())
}

func eventsCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "events [--json] [<pattern>]",
		Short: "List the known Mux event types, optionally filtered by a mux_event pattern",
		Long: `Lists the Mux event types this release knows, with the kind of object each is
about and when Mux sends it. <pattern> filters them like the mux_event
matcher: '*' matches any run of characters, dots included
(e.g. 'video.asset.*', '*.errored').`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pattern := "*"
			if len(args) == 1 {
				pattern = args[0]
				if err := checkPattern(pattern); err != nil {
					return err
				}
			}
			var list []EventType
			for _, e := range Catalog() {
				if globMatch(pattern, e.Type) {
					list = append(list, e)
				}
			}
			if len(list) == 0 {
				return fmt.Errorf("no known event type matches %q; closest known: %s", pattern, closestKnown(pattern))
			}
			out := cmd.OutOrStdout()
			if asJSON, _ := cmd.Flags().GetBool("json"); asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(list)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TYPE\tOBJECT\tDESCRIPTION")
			for _, e := range list {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", e.Type, e.Object, e.Description)
			}
			return tw.Flush()
		},
	}
	c.Flags().Bool("json", false, "print a JSON array of {type, object, description}")
	return c
}

func signCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "sign [--secret S] [--timestamp T] [FILE|-]",
		Short: "Print the Mux-Signature header value for a body",
		Long: `Reads a body from FILE, or from standard input when FILE is '-' or absent,
and prints the Mux-Signature header value Mux would send with it:
t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			secret, err := secretFlag(cmd)
			if err != nil {
				return err
			}
			at := time.Now()
			if ts, _ := cmd.Flags().GetString("timestamp"); ts != "" {
				n, err := strconv.ParseInt(ts, 10, 64)
				if err != nil || n < 0 {
					return fmt.Errorf("--timestamp %q: want Unix seconds, e.g. %d", ts, time.Now().Unix())
				}
				at = time.Unix(n, 0)
			}
			body, err := readInput(cmd, args)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), Sign([]byte(secret), body, at))
			return err
		},
	}
	c.Flags().String("secret", "", "signing secret (default: $"+SecretEnv+")")
	c.Flags().String("timestamp", "", "Unix seconds to sign at (default: now)")
	return c
}

func verifyCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "verify --header H [--secret S] [--tolerance D] [FILE|-]",
		Short: "Check a Mux-Signature offline and say exactly why it fails",
		Long: `Checks a body (FILE, or standard input when FILE is '-' or absent) against a
Mux-Signature header value the way the mux_webhook handler does, in the same
order: header syntax, MAC, timestamp window, JSON. It prints the reason of
the first failure (missing, malformed, no_v1, mismatch, expired, future,
bad_json, no_type) and exits 1, or prints the event and exits 0.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			header, _ := cmd.Flags().GetString("header")
			if !cmd.Flags().Changed("header") {
				return errors.New("--header is required: the Mux-Signature value to check")
			}
			secret, err := secretFlag(cmd)
			if err != nil {
				return err
			}
			tolerance, _ := cmd.Flags().GetDuration("tolerance")
			if tolerance <= 0 {
				return fmt.Errorf("--tolerance must be greater than 0")
			}
			body, err := readInput(cmd, args)
			if err != nil {
				return err
			}
			now := time.Now()
			sig, err := Verify(header, body, [][]byte{[]byte(secret)}, now, tolerance)
			if err != nil {
				if errors.Is(err, ErrExpired) || errors.Is(err, ErrFuture) {
					return fmt.Errorf("%s: %v (t=%s is %s, tolerance %s)", Reason(err), err, sig.Timestamp, signedAge(sig, now), tolerance)
				}
				return fmt.Errorf("%s: %v", Reason(err), err)
			}
			ev, err := DecodeEvent(body)
			if err != nil {
				return fmt.Errorf("%s: signature valid, but %v", Reason(err), err)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "valid: %s event %s, signed at t=%s (%s)\n", ev.Type, ev.ID, sig.Timestamp, signedAge(sig, now))
			return err
		},
	}
	c.Flags().String("header", "", "the Mux-Signature header value")
	c.Flags().String("secret", "", "signing secret (default: $"+SecretEnv+")")
	c.Flags().Duration("tolerance", DefaultTolerance, "accepted distance between t and now, either way")
	return c
}

func sendCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "send --to URL --type T [--secret S] [--data FILE] [--passthrough X] [--id ID] [--count N]",
		Short: "Sign and POST a realistic Mux event to a gateway",
		Long: `Builds a realistic event of type T (any catalog type; others get a generic
body): a fresh id and created_at, an object and a sample data object shaped
like the object's kind, an empty attempts array. It signs it as Mux does and
POSTs it to URL, printing the status and response of each request. It exits
1 if any response is not 2xx.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			to, _ := cmd.Flags().GetString("to")
			typ, _ := cmd.Flags().GetString("type")
			if to == "" || typ == "" {
				return errors.New("--to URL and --type T are required, e.g. --to http://localhost:8080/mux --type video.asset.ready")
			}
			target, err := parseTarget(to)
			if err != nil {
				return err
			}
			secret, err := secretFlag(cmd)
			if err != nil {
				return err
			}
			count, _ := cmd.Flags().GetInt("count")
			if count < 1 || count > maxSendCount {
				return fmt.Errorf("--count must be between 1 and %d", maxSendCount)
			}
			opt := SampleOptions{}
			opt.ID, _ = cmd.Flags().GetString("id")
			opt.Passthrough, _ = cmd.Flags().GetString("passthrough")
			if file, _ := cmd.Flags().GetString("data"); file != "" {
				b, err := readFile(cmd, file)
				if err != nil {
					return err
				}
				opt.Data = b
			}
			client := newHTTPClient()
			failed := 0
			for range count {
				body, err := SampleEvent(typ, opt)
				if err != nil {
					return err
				}
				ok, err := sendOne(cmd.OutOrStdout(), client, target, secret, typ, body)
				if err != nil {
					return err
				}
				if !ok {
					failed++
				}
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d deliveries got a non-2xx response", failed, count)
			}
			return nil
		},
	}
	c.Flags().String("to", "", "URL of the gateway, e.g. http://localhost:8080/mux")
	c.Flags().String("type", "", "event type, e.g. video.asset.ready (see 'caddy mux-webhook events')")
	c.Flags().String("secret", "", "signing secret (default: $"+SecretEnv+")")
	c.Flags().String("data", "", "file (or - for stdin) whose JSON replaces the sample data object")
	c.Flags().String("passthrough", "", "value for data.passthrough")
	c.Flags().String("id", "", "event id (default: a fresh UUID per event)")
	c.Flags().Int("count", 1, "number of events to send")
	return c
}

// sendOne signs and POSTs body, prints the outcome and reports whether the
// response was 2xx. A redirect is not followed, and counts as a failure.
// What it prints never shows the URL's password or a raw control
// character of the response.
func sendOne(out io.Writer, client *http.Client, target *url.URL, secret, typ string, body []byte, extra ...string) (bool, error) {
	req, err := http.NewRequest(http.MethodPost, target.String(), bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("POST %s: %v", target.Redacted(), unwrapURLError(err))
	}
	for i := 0; i+1 < len(extra); i += 2 {
		req.Header.Set(extra[i], extra[i+1])
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "caddy-mux-webhook send")
	req.Header.Set(SignatureHeader, Sign([]byte(secret), body, time.Now()))
	resp, err := client.Do(req)
	if err != nil {
		return false, fmt.Errorf("POST %s: %v", target.Redacted(), unwrapURLError(err))
	}
	defer resp.Body.Close()
	reply, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var ev struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(body, &ev)
	note := ""
	if resp.StatusCode >= 300 && resp.StatusCode < 400 {
		note = " (a redirect" + redirectTarget(resp) + ": not followed, so the signed event was not delivered; point --to at the final URL)"
	}
	fmt.Fprintf(out, "%s %s -> %s %s%s\n", printable(typ), printable(ev.ID), printable(resp.Status), printable(strings.TrimSpace(string(reply))), note)
	return resp.StatusCode >= 200 && resp.StatusCode < 300, nil
}

// redirectTarget describes a redirect's Location for a message, password
// redacted and control characters escaped.
func redirectTarget(resp *http.Response) string {
	loc := resp.Header.Get("Location")
	if loc == "" {
		return ""
	}
	u, err := url.Parse(loc)
	if err != nil {
		return " to an unparsable Location"
	}
	return " to " + printable(u.Redacted())
}

// newHTTPClient returns the client send and replay deliver with. It never
// follows a redirect: that would carry the Mux-Signature (and the event)
// to wherever the Location points.
func newHTTPClient() *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// parseTarget parses --to. Its errors never show the URL's password.
func parseTarget(to string) (*url.URL, error) {
	u, err := url.Parse(to)
	if err != nil {
		return nil, fmt.Errorf("--to: not a valid URL (%v); want e.g. http://localhost:8080/mux", unwrapURLError(err))
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--to %q: want an http:// or https:// URL, e.g. http://localhost:8080/mux", u.Redacted())
	}
	return u, nil
}

// unwrapURLError drops the URL a *url.Error repeats (with its password,
// for a parse error), keeping the cause.
func unwrapURLError(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		return uerr.Err
	}
	return err
}

// printable escapes what a terminal would interpret in text from outside
// (a response body, a file name): C0 and C1 control characters, DEL,
// other non-printable runes and invalid UTF-8 become Go escapes (\x1b,
// \n, \u009b, \xff); everything else is kept as it is, to stay readable.
func printable(s string) string {
	clean := true
	for _, r := range s {
		if r != ' ' && (r == utf8.RuneError || !unicode.IsPrint(r)) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == ' ' || unicode.IsPrint(r):
			b.WriteString(s[i : i+size])
		default:
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		}
		i += size
	}
	return b.String()
}

// secretFlag returns --secret, or $MUX_WEBHOOK_SECRET.
func secretFlag(cmd *cobra.Command) (string, error) {
	s, _ := cmd.Flags().GetString("secret")
	if s == "" {
		s = os.Getenv(SecretEnv)
	}
	if s == "" {
		return "", fmt.Errorf("no signing secret: pass --secret or set %s", SecretEnv)
	}
	return s, nil
}

// readInput reads the body from args[0], or stdin for "-" or no argument.
func readInput(cmd *cobra.Command, args []string) ([]byte, error) {
	name := "-"
	if len(args) == 1 {
		name = args[0]
	}
	return readFile(cmd, name)
}

func readFile(cmd *cobra.Command, name string) ([]byte, error) {
	if name == "-" {
		return readAllBounded(cmd.InOrStdin(), "standard input")
	}
	return readStored(name)
}

// readAllBounded reads r, refusing more than maxInput bytes.
func readAllBounded(r io.Reader, name string) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxInput+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxInput {
		return nil, fmt.Errorf("%s: larger than %d MiB", name, maxInput>>20)
	}
	return b, nil
}

// signedAge describes t relative to now, e.g. "3s ago" or "2m0s ahead".
func signedAge(sig Signature, now time.Time) string {
	diff := now.Unix() - sig.Unix
	if diff >= 0 {
		return (time.Duration(diff) * time.Second).String() + " ago"
	}
	if -diff > int64(1<<62)/int64(time.Second) {
		return "far ahead"
	}
	return (time.Duration(-diff) * time.Second).String() + " ahead"
}
