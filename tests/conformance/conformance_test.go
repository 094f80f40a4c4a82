// Package conformance runs containerd's own snapshotter conformance suite
// (snapshots/testsuite.SnapshotterSuite) against a real thinpoold, through containerd's
// proxy-snapshotter client (snapshots/proxy), as containerd itself would reach it.
//
// Every case gets its own daemon with its own pool root and socket. They live in a
// directory of their own, never inside the one the suite hands out: the suite dumps that
// directory, file contents included, when a case fails. After each case (failed or not)
// the harness unmounts what the case left mounted, stops the daemon with SIGTERM (the
// daemon runs with --teardown-on-exit, so it removes every device, the pool and its loop
// devices), and checks that nothing of the pool is left in the kernel.
//
// Build (see tests/conformance/build): GOPATH=/usr/share/gocode GO111MODULE=off
// CGO_ENABLED=0 go test -c -o thinpool-conformance.test ./tests/conformance
//
// Run as root: thinpool-conformance.test -test.v -thinpoold PATH [-backend reflink|dm]
package conformance

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

var (
	thinpoold = flag.String("thinpoold", os.Getenv("THINPOOL_CONFORMANCE_THINPOOLD"),
		"path of the thinpoold executable (env THINPOOL_CONFORMANCE_THINPOOLD)")
	backend = flag.String("backend", envOr("THINPOOL_TEST_BACKEND", "reflink"),
		"pool backend: reflink or dm (env THINPOOL_TEST_BACKEND)")
	workDir = flag.String("workdir", os.Getenv("THINPOOL_CONFORMANCE_DIR"),
		"directory for the daemons' pool roots and sockets (env THINPOOL_CONFORMANCE_DIR; "+
			"default: a new directory under $TMPDIR)")
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func TestSnapshotterSuite(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("must run as root (loop devices, mounts)")
	}
	if *thinpoold == "" {
		t.Fatal("no thinpoold: pass -thinpoold PATH or set THINPOOL_CONFORMANCE_THINPOOLD")
	}
	base := *workDir
	if base == "" {
		d, err := os.MkdirTemp("", "thinpool-conformance-")
		if err != nil {
			t.Fatal(err)
		}
		// Cleanup, not defer: the suite's cases are parallel subtests, which run after
		// SnapshotterSuite returns.
		t.Cleanup(func() { os.RemoveAll(d) })
		base = d
	} else if err := os.MkdirAll(base, 0o700); err != nil {
		t.Fatal(err)
	}
	testsuite.SnapshotterSuite(t, "thinpool-"+*backend, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startDaemon(t, base, root)
	})
}

// daemon is one thinpoold process serving one case's pool.
type daemon struct {
	cmd    *exec.Cmd
	exited chan error
	log    *os.File
}

// spawn starts thinpoold on the pool under dir, serving on socket, with --teardown-on-exit.
func spawn(dir, socket string) (*daemon, error) {
	logFile, err := os.OpenFile(filepath.Join(dir, "thinpoold.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(*thinpoold,
		"--root", filepath.Join(dir, "pool"),
		"--socket", socket,
		"--backend", *backend,
		"--data-size", "2G",
		"--metadata-size", "64M",
		"--base-size", "64M",
		"--metrics-addr", "",
		"--imagefs-dir", filepath.Join(dir, "imagefs"),
		// The suite fills small pools; the guard's default 10% is not what it tests.
		"--min-free-space", "0",
		"--teardown-on-exit",
	)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), "RUST_LOG="+envOr("THINPOOL_CONFORMANCE_LOG", "info"))
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", *thinpoold, err)
	}
	d := &daemon{cmd: cmd, exited: make(chan error, 1), log: logFile}
	go func() { d.exited <- cmd.Wait() }()
	return d, nil
}

// waitServing waits until the daemon accepts connections on its socket (the first start
// creates the pool: mkfs and, on dm, a kernel pool). The socket file alone is not enough:
// it exists between the daemon's bind and listen, when a connect is refused.
func (d *daemon) waitServing(socket string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-d.exited:
			d.exited <- err
			return fmt.Errorf("thinpoold exited before serving (%v)", err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("thinpoold did not create %s within %v", socket, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM (the daemon then tears the pool down) and waits; after the timeout it
// kills the daemon and says so.
func (d *daemon) stop(timeout time.Duration) error {
	defer d.log.Close()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.exited:
		if err != nil {
			return fmt.Errorf("thinpoold exited with %v", err)
		}
		return nil
	case <-time.After(timeout):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("thinpoold did not stop within %v of SIGTERM; killed", timeout)
	}
}

// rescue takes down a pool whose daemon had to be killed: a second daemon opens it (and
// reconciles it) and tears it down at SIGTERM.
func rescue(dir string) error {
	socket := filepath.Join(dir, "rescue.sock")
	d, err := spawn(dir, socket)
	if err != nil {
		return err
	}
	if err := d.waitServing(socket, 120*time.Second); err != nil {
		d.stop(time.Second)
		return err
	}
	return d.stop(60 * time.Second)
}

// startDaemon starts one thinpoold for one case and returns the proxy snapshotter on its
// socket and the cleanup the suite calls after the case. `suiteRoot` is the directory the
// suite made for the snapshotter (<tmp>/root); its parent holds the case's mount points.
func startDaemon(t *testing.T, base, suiteRoot string) (snapshots.Snapshotter, func() error, error) {
	dir, err := os.MkdirTemp(base, "case-")
	if err != nil {
		return nil, nil, err
	}
	socket := filepath.Join(dir, "thinpool.sock")
	logPath := filepath.Join(dir, "thinpoold.log")
	d, err := spawn(dir, socket)
	if err != nil {
		return nil, nil, err
	}
	var conn *grpc.ClientConn
	stop := func() error {
		if conn != nil {
			conn.Close()
		}
		var errs []string
		// The case's own defers unmount what it mounted; a failed case may not have.
		if n, err := unmountUnder(filepath.Dir(suiteRoot)); err != nil {
			errs = append(errs, err.Error())
		} else if n > 0 {
			t.Logf("unmounted %d mount(s) the case left behind", n)
		}
		if err := d.stop(60 * time.Second); err != nil {
			errs = append(errs, err.Error())
			if left := leftovers(dir); len(left) > 0 {
				if err := rescue(dir); err != nil {
					errs = append(errs, "rescue: "+err.Error())
				}
			}
		}
		if left := leftovers(dir); len(left) > 0 {
			errs = append(errs, "left behind: "+strings.Join(left, "; "))
		}
		if len(errs) > 0 {
			if b, err := os.ReadFile(logPath); err == nil {
				t.Logf("thinpoold log (%s):\n%s", logPath, tail(string(b), 60))
			}
			return fmt.Errorf("%s", strings.Join(errs, "; "))
		}
		return os.RemoveAll(dir)
	}

	if err := d.waitServing(socket, 120*time.Second); err != nil {
		b, _ := os.ReadFile(logPath)
		stop()
		return nil, nil, fmt.Errorf("%v:\n%s", err, tail(string(b), 40))
	}
	conn, err = grpc.Dial("unix://"+socket,
		grpc.WithInsecure(), //nolint:staticcheck // Debian's grpc-go predates credentials/insecure
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinpool")
	return sn, stop, nil
}

// unmountUnder detaches every mount below dir, deepest first, and returns how many.
func unmountUnder(dir string) (int, error) {
	var targets []string
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	prefix := filepath.Clean(dir) + "/"
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		target := unescape(fields[4])
		if strings.HasPrefix(target, prefix) {
			targets = append(targets, target)
		}
	}
	n := 0
	for i := len(targets) - 1; i >= 0; i-- {
		if err := unix.Unmount(targets[i], unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
			return n, fmt.Errorf("unmount %s: %w", targets[i], err)
		}
		n++
	}
	return n, nil
}

// leftovers lists what of the case's pool is still in the kernel: mounts and loop devices
// on its files (reflink, and dm's data and metadata loops) and dm devices named after its
// pool tag.
func leftovers(dir string) []string {
	var out []string
	prefix := filepath.Clean(dir) + "/"
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			fields := strings.Fields(l)
			if len(fields) >= 5 && strings.HasPrefix(unescape(fields[4]), prefix) {
				out = append(out, "mount "+unescape(fields[4]))
			}
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range loops {
		b, err := os.ReadFile(p)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), prefix) {
			out = append(out, fmt.Sprintf("loop %s -> %s", filepath.Base(filepath.Dir(filepath.Dir(p))), strings.TrimSpace(string(b))))
		}
	}
	if tag, err := poolTag(dir); err == nil && tag != "" {
		names, _ := filepath.Glob("/sys/block/dm-*/dm/name")
		for _, p := range names {
			b, err := os.ReadFile(p)
			if err == nil && strings.HasPrefix(string(b), tag) {
				out = append(out, "dm device "+strings.TrimSpace(string(b)))
			}
		}
	}
	return out
}

// poolTag finds the prefix of the pool's dm devices (thinpool-<tag>-) in the daemon's log,
// where the dm backend logs its pool's name; "" if there is none (reflink).
func poolTag(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "thinpoold.log"))
	if err != nil {
		return "", err
	}
	return poolTagRE.FindString(string(b)), nil
}

var poolTagRE = regexp.MustCompile(`thinpool-[0-9a-f]{8}-`)

func unescape(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
