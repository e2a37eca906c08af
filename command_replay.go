// `caddy mux-webhook replay`: delivers the events mux_store kept, oldest
// first, re-signed with the current time, and moves each delivered file to
// DIR/delivered/, so that running it again continues where it stopped. It
// signs only bytes that the signature mux_store kept beside them (the .sig
// sidecar) still proves authentic.

package muxwebhook

import (
	"errors"
	"fmt"
	"io"
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

// maxMetaLen bounds the type and id replay keeps (and prints) per file.
const maxMetaLen = 256

// maxRefusedNamed bounds the file names repeated in replay's final error;
// every refused file is named on its own line before it.
const maxRefusedNamed = 5

// Why replay refuses a file: it has no proof that Mux signed its bytes.
var (
	errNoProof       = errors.New("no signature kept beside it (" + sigSuffix + " file missing), so nothing proves Mux sent these bytes")
	errProofMismatch = errors.New("the signature kept beside it does not match its bytes under any --secret (edited on disk, or stored under another secret)")
)

// storedEvent is what replay keeps of one file of the spool while it
// works: small metadata only; the body is read again just before it is
// sent.
type storedEvent struct {
	path      string // absolute
	rel       string // relative to the spool
	typ, id   string // cloned, at most maxMetaLen bytes
	createdAt time.Time
}

// refusal is a file replay will not deliver, and why.
type refusal struct {
	rel    string
	reason error
}

func replayCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "replay --from DIR --to URL [--secret S]... [--type GLOB] [--dry-run]",
		Short: "Deliver the events mux_store kept, oldest first",
		Long: `Reads every event file under DIR (as mux_store wrote them; DIR/delivered,
.sig files and temporary files are skipped), oldest created_at first. Just
before sending a file it reads it again and checks its exact bytes against
the Mux-Signature mux_store kept beside it (FILE.sig), with the secrets given
(the signature's time window is ignored on purpose: the event was verified
when it arrived). A file without that proof, or whose bytes it does not
match, is refused: named, never delivered, and the command exits non-zero at
the end. Each proven file is signed with the first secret and the current
time, and its bytes POSTed unchanged to URL, with a Mux-Webhook-Replay
header (which mux_store answers 503, so that a replay through a gateway
whose backend is still down stops instead of storing the event again).
Redirects are not followed. Each delivered file (2xx) is moved, with its
.sig, to DIR/delivered/ under the same relative path. It stops at the first
failed delivery with a non-zero exit; running it again continues where it
stopped.

--secret may be given several times: the first signs the deliveries; all
are accepted for the stored signatures (events stored before a secret
rotation).`,
		Args: cobra.NoArgs,
		RunE: runReplay,
	}
	c.Flags().String("from", "", "the spool directory mux_store writes to")
	c.Flags().String("to", "", "URL of the gateway (or application), e.g. http://localhost:8080/mux")
	c.Flags().StringArray("secret", nil, "signing secret; repeat for older secrets that stored events may carry (default: $"+SecretEnv+")")
	c.Flags().String("type", "", "only events whose type matches this mux_event pattern")
	c.Flags().Bool("dry-run", false, "list what would be delivered (and, with a secret, what would be refused), deliver nothing")
	return c
}

func runReplay(cmd *cobra.Command, _ []string) error {
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
	secrets, err := secretsFlag(cmd)
	if err != nil && (!dryRun || cmd.Flags().Changed("secret")) {
		return err
	}
	var verifier *Verifier
	if len(secrets) > 0 {
		keys := make([][]byte, len(secrets))
		for i, s := range secrets {
			keys[i] = []byte(s)
		}
		verifier = NewVerifier(keys)
	}
	events, refused, err := readSpool(from, pattern, verifier)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	refuse := "refused"
	if dryRun {
		refuse = "would refuse"
	}
	for _, r := range refused {
		fmt.Fprintf(out, "%s %s: %s\n", refuse, printable(r.rel), printable(r.reason.Error()))
	}
	if len(events) == 0 && len(refused) == 0 {
		fmt.Fprintf(out, "nothing to replay in %s\n", printable(from))
		return nil
	}
	client := newHTTPClient()
	delivered := 0
	for i, ev := range events {
		label := fmt.Sprintf("%s %s (%s) from %s", printable(ev.typ), printable(ev.id), ev.createdAt.Format(time.RFC3339), printable(ev.rel))
		if dryRun && verifier == nil {
			fmt.Fprintf(out, "would deliver %s (signature not checked: no secret given)\n", label)
			continue
		}
		// Read the bytes again and check exactly those: the file may have
		// changed since the spool was listed.
		body, err := readStored(ev.path)
		if err == nil {
			err = checkProof(ev.path, body, verifier)
		}
		if err != nil {
			refused = append(refused, refusal{ev.rel, err})
			fmt.Fprintf(out, "%s %s: %s\n", refuse, printable(ev.rel), printable(err.Error()))
			continue
		}
		if dryRun {
			fmt.Fprintf(out, "would deliver %s\n", label)
			continue
		}
		ok, err := sendOne(out, client, target, secrets[0], ev.typ, body, ReplayHeader, printable(ev.rel))
		if err == nil && !ok {
			err = errors.New("no 2xx response")
		}
		if err != nil {
			return fmt.Errorf("stopped at %s: %s; %d delivered, %d refused, %d left; run replay again to continue",
				printable(ev.rel), printable(err.Error()), delivered, len(refused), len(events)-i)
		}
		if err := moveDelivered(from, ev); err != nil {
			return fmt.Errorf("delivered %s but could not move it to %s/: %s; it would be sent again", printable(ev.rel), deliveredDir, printable(err.Error()))
		}
		delivered++
	}
	if !dryRun {
		fmt.Fprintf(out, "replayed %d events\n", delivered)
	}
	if len(refused) > 0 {
		return refusedError(refused, dryRun)
	}
	return nil
}

// refusedError summarises the refused files for the exit status.
func refusedError(refused []refusal, dryRun bool) error {
	names := make([]string, 0, maxRefusedNamed)
	for _, r := range refused[:min(len(refused), maxRefusedNamed)] {
		names = append(names, printable(r.rel))
	}
	more := ""
	if len(refused) > maxRefusedNamed {
		more = fmt.Sprintf(" and %d more", len(refused)-maxRefusedNamed)
	}
	verb := "refused"
	if dryRun {
		verb = "would refuse"
	}
	return fmt.Errorf("%s %d file(s) without a valid stored signature, never delivered: %s%s (listed above; they stay in the spool)",
		verb, len(refused), strings.Join(names, ", "), more)
}

// secretsFlag returns the --secret values, or $MUX_WEBHOOK_SECRET.
func secretsFlag(cmd *cobra.Command) ([]string, error) {
	list, _ := cmd.Flags().GetStringArray("secret")
	for _, s := range list {
		if s == "" {
			return nil, errors.New("--secret must not be empty")
		}
	}
	if len(list) == 0 {
		if s := os.Getenv(SecretEnv); s != "" {
			list = []string{s}
		}
	}
	if len(list) == 0 {
		return nil, fmt.Errorf("no signing secret: pass --secret or set %s", SecretEnv)
	}
	return list, nil
}

// readSpool lists the pending events under dir, oldest first, keeping
// only their metadata, and the files that cannot be events.
func readSpool(dir, pattern string, v *Verifier) ([]storedEvent, []refusal, error) {
	root, err := filepath.Abs(dir)
	if err != nil {
		return nil, nil, err
	}
	var events []storedEvent
	var refused []refusal
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
		if strings.HasPrefix(d.Name(), storeTempPrefix) || strings.HasSuffix(d.Name(), sigSuffix) {
			return nil // temporary files and signature sidecars are never events
		}
		if !d.Type().IsRegular() {
			refused = append(refused, refusal{rel, errors.New("not a regular file")})
			return nil
		}
		ev, err := readMeta(path, v)
		if err != nil {
			refused = append(refused, refusal{rel, err})
			return nil
		}
		if pattern != "" && !globMatch(pattern, ev.typ) {
			return nil
		}
		ev.path, ev.rel = path, rel
		events = append(events, ev)
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	sort.SliceStable(events, func(i, j int) bool {
		if !events[i].createdAt.Equal(events[j].createdAt) {
			return events[i].createdAt.Before(events[j].createdAt)
		}
		return events[i].rel < events[j].rel
	})
	return events, refused, nil
}

// readMeta reads the file at path and returns its type, id and created_at,
// copied out of the body so that the body can be freed.
//
// Bytes are parsed only once their proof is checked: without a verifier
// (a dry run without a secret) only the file is listed.
func readMeta(path string, v *Verifier) (storedEvent, error) {
	if v == nil {
		return storedEvent{typ: "(unverified)", id: "-"}, nil
	}
	body, err := readStored(path)
	if err != nil {
		return storedEvent{}, err
	}
	if err := checkProof(path, body, v); err != nil {
		return storedEvent{}, err
	}
	ev, err := DecodeEvent(body)
	if err != nil {
		return storedEvent{}, fmt.Errorf("not a stored Mux event: %v", err)
	}
	created, _ := time.Parse(time.RFC3339Nano, ev.CreatedAt)
	return storedEvent{typ: clipClone(ev.Type), id: clipClone(ev.ID), createdAt: created}, nil
}

// clipClone returns a copy of at most maxMetaLen bytes of s, so that it
// keeps no reference to the body it was decoded from.
func clipClone(s string) string {
	if len(s) > maxMetaLen {
		s = s[:maxMetaLen]
	}
	return strings.Clone(s)
}

// checkProof checks body, the bytes about to be signed, against the
// Mux-Signature header value mux_store kept in path.sig: some v1 value of
// it must be the MAC of body under one of v's secrets. The signature's
// time window is ignored on purpose: the event was within it when the
// gateway verified it, and it is replayed later by design.
func checkProof(path string, body []byte, v *Verifier) error {
	f, err := os.Open(path + sigSuffix)
	if errors.Is(err, fs.ErrNotExist) {
		return errNoProof
	}
	if err != nil {
		return err
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, maxSigFile+1))
	if err != nil {
		return err
	}
	if len(raw) > maxSigFile {
		return fmt.Errorf("its %s file is larger than %d bytes; not a stored signature", sigSuffix, maxSigFile)
	}
	sig, err := ParseSignature(strings.TrimRight(string(raw), "\r\n"))
	if err != nil {
		return fmt.Errorf("its %s file holds no usable signature: %v", sigSuffix, err)
	}
	if v == nil || !v.matches(sig, body) {
		return errProofMismatch
	}
	return nil
}

// moveDelivered moves a delivered file, and its .sig, to
// dir/delivered/<its relative path>.
func moveDelivered(dir string, ev storedEvent) error {
	root, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	target := filepath.Join(root, deliveredDir, ev.rel)
	if err := mkdirDurable(filepath.Dir(target)); err != nil {
		return err
	}
	if _, err := os.Lstat(target); err == nil {
		target = withSuffix(target, int(time.Now().UnixNano()%1_000_000))
	}
	if err := os.Rename(ev.path, target); err != nil {
		return err
	}
	if err := os.Rename(ev.path+sigSuffix, target+sigSuffix); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
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
