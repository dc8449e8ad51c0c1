package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/slotwatch/slotwatch/dbusapi"
	swversion "github.com/slotwatch/slotwatch/version"
)

// The command line as scripts, units and the tests under tests/ use it:
// exit codes, which stream a message goes to, and the texts they match.

var (
	cliBinOnce sync.Once
	cliBin     string
	cliBinErr  error
)

// slotwatchForCLITest builds this package's binary once per test run
// (without -race: it is only started and parsed here). SLOTWATCH_CLI_BIN
// runs the table against another build instead (an older one, to see what
// changed).
func slotwatchForCLITest(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("SLOTWATCH_CLI_BIN"); bin != "" {
		return bin
	}
	cliBinOnce.Do(func() {
		goTool, err := exec.LookPath("go")
		if err != nil {
			cliBinErr = err
			return
		}
		dir, err := os.MkdirTemp("", "slotwatch-cli-test-")
		if err != nil {
			cliBinErr = err
			return
		}
		cliBin = filepath.Join(dir, "slotwatch")
		out, err := exec.Command(goTool, "build", "-o", cliBin, ".").CombinedOutput()
		if err != nil {
			cliBinErr = errors.New(string(out))
		}
	})
	if cliBinErr != nil {
		t.Skipf("cannot build the slotwatch binary: %v", cliBinErr)
	}
	return cliBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if cliBin != "" {
		os.RemoveAll(filepath.Dir(cliBin))
	}
	os.Exit(code)
}

type cliResult struct {
	code           int
	stdout, stderr string
}

// runSlotwatch runs the binary with args, against buses that do not
// exist: a client that gets past its command line exits 2 (not running).
func runSlotwatch(t *testing.T, args ...string) cliResult {
	t.Helper()
	bin := slotwatchForCLITest(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(),
		"DBUS_SESSION_BUS_ADDRESS=unix:path="+filepath.Join(dir, "no-bus"),
		"DBUS_SYSTEM_BUS_ADDRESS=unix:path="+filepath.Join(dir, "no-system-bus"),
		"XDG_RUNTIME_DIR="+dir,
		"XDG_CONFIG_HOME="+dir,
		"NOTIFY_SOCKET=", "JOURNAL_STREAM=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
	default:
		t.Fatalf("slotwatch %s: %v\nstderr: %s", strings.Join(args, " "), err, stderr.String())
	}
	return cliResult{cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()}
}

// TestCLIExitCodes is the command line's contract, run against the binary.
// stdout/stderr: substrings that must be there; "" means the stream must
// be empty, "*" that anything goes.
func TestCLIExitCodes(t *testing.T) {
	pinFile := filepath.Join(t.TempDir(), "so.pin")
	if err := os.WriteFile(pinFile, []byte("1234\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const notRunning = "the daemon is not running on unix:path="
	for _, tc := range []struct {
		args           []string
		code           int
		stdout, stderr []string
	}{
		// The root command.
		{nil, 2, nil, []string{"serve", "watch", "list", "monitor", "sessions", "init-token"}},
		{[]string{"help"}, 0, []string{"serve", "watch", "list", "monitor", "sessions", "init-token"}, nil},
		{[]string{"--help"}, 0, []string{"serve", "init-token"}, nil},
		{[]string{"-h"}, 0, []string{"serve", "init-token"}, nil},
		{[]string{"bogus"}, 2, nil, []string{`slotwatch: unknown command "bogus"`, "serve", "init-token"}},
		{[]string{"--version"}, 0, []string{"slotwatch " + swversion.Version + "\n"}, nil},
		{[]string{"completion", "bash"}, 0, []string{"bash completion", "slotwatch"}, nil},

		// serve and watch: a bad command line is exit 1, as it always was.
		{[]string{"serve", "--bogus"}, 1, nil, []string{"flag provided but not defined: -bogus"}},
		{[]string{"serve", "-bogus"}, 1, nil, []string{"flag provided but not defined: -bogus"}},
		{[]string{"serve", "--address"}, 1, nil, []string{"flag needs an argument: -address"}},
		{[]string{"serve", "--gnome-compat=bogus"}, 1, nil, []string{"bogus", "gnome-compat"}},
		{[]string{"serve", "extra"}, 1, nil, []string{`slotwatch serve: unexpected argument "extra"`}},
		{[]string{"serve", "--log-level=bogus"}, 1, nil, []string{"slotwatch serve: --log-level: "}},
		{[]string{"serve", "-log-level", "bogus", "-no-pcsc"}, 1, nil, []string{"slotwatch serve: --log-level: "}},
		{[]string{"serve", "-h"}, 0, []string{"--address BUS", "--module PATH", "--gnome-compat", "--pkcs11-socket"}, nil},
		{[]string{"serve", "--help"}, 0, []string{"--address BUS"}, nil},
		{[]string{"serve", "-help"}, 0, []string{"--address BUS"}, nil},
		{[]string{"watch", "--bogus"}, 1, nil, []string{"flag provided but not defined: -bogus"}},
		{[]string{"watch", "-x"}, 1, nil, []string{"flag provided but not defined: -x"}},
		{[]string{"watch", "extra"}, 1, nil, []string{`slotwatch watch: unexpected argument "extra"`}},
		{[]string{"watch", "-h"}, 0, []string{"--module PATH", "-v, --verbose", "--json"}, nil},

		// The clients: a bad command line is exit 64.
		{[]string{"list", "--bogus"}, 64, nil, []string{"slotwatch list: flag provided but not defined: -bogus", `Run "slotwatch list -h" for its options.`}},
		{[]string{"list", "-bogus"}, 64, nil, []string{"flag provided but not defined: -bogus"}},
		{[]string{"list", "extra"}, 64, nil, []string{`slotwatch list: unexpected argument "extra"`, `Run "slotwatch list -h" for its options.`}},
		{[]string{"list", "--", "extra"}, 64, nil, []string{`unexpected argument "extra"`}},
		{[]string{"list", "--", "--json"}, 64, nil, []string{`unexpected argument "--json"`}},
		{[]string{"list", "--address"}, 64, nil, []string{"flag needs an argument: -address"}},
		{[]string{"list", "--json=bogus"}, 64, nil, []string{"bogus", "json"}},
		{[]string{"list", "-h"}, 0, []string{"--address BUS", "--json"}, nil},
		{[]string{"list", "--help"}, 0, []string{"--address BUS"}, nil},
		{[]string{"list", "-address=unix:path=/nonexistent/b"}, 2, nil, []string{notRunning + "/nonexistent/b"}},
		{[]string{"list", "-json", "-address", "unix:path=/nonexistent/b"}, 2, nil, []string{notRunning + "/nonexistent/b"}},
		{[]string{"list", "--json=false", "--address=unix:path=/nonexistent/b"}, 2, nil, []string{notRunning + "/nonexistent/b"}},
		{[]string{"list"}, 2, nil, []string{notRunning}},
		{[]string{"monitor", "--bogus"}, 64, nil, []string{"slotwatch monitor: flag provided but not defined: -bogus"}},
		{[]string{"monitor", "extra"}, 64, nil, []string{`slotwatch monitor: unexpected argument "extra"`, `Run "slotwatch monitor -h" for its options.`}},
		{[]string{"monitor", "-h"}, 0, []string{"--address BUS", "--json"}, nil},
		{[]string{"monitor", "--json", "--address", "unix:path=/nonexistent/m"}, 2, nil, []string{notRunning + "/nonexistent/m"}},
		{[]string{"sessions", "--bogus"}, 64, nil, []string{"slotwatch sessions: flag provided but not defined: -bogus"}},
		{[]string{"sessions", "x"}, 64, nil, []string{`slotwatch sessions: unexpected argument "x"`}},
		{[]string{"sessions", "-h"}, 0, []string{"--address BUS", "--json"}, nil},
		{[]string{"sessions", "-json"}, 2, nil, []string{notRunning}},
		{[]string{"init-token"}, 64, nil, []string{"slotwatch init-token: name the token with exactly one of --token, --serial and --label", `Run "slotwatch init-token -h" for its options.`}},
		{[]string{"init-token", "-h"}, 0, []string{"--label-new", "--so-pin-file FILE", "--so-pin-stdin", "--force"}, nil},
		{[]string{"init-token", "--bogus"}, 64, nil, []string{"flag provided but not defined: -bogus"}},
		{[]string{"init-token", "--label", "a", "--label-new", "b", "--so-pin", "1234"}, 64, nil, []string{"flag provided but not defined: -so-pin"}},
		{[]string{"init-token", "--label", "a", "--label-new", "b", "x"}, 64, nil, []string{`slotwatch init-token: unexpected argument "x"`}},
		{[]string{"init-token", "--label", "a"}, 64, nil, []string{"--label-new is required"}},
		{[]string{"init-token", "-label", "a", "-label-new", "b", "-force", "-so-pin-file", pinFile, "-address", "unix:path=/nonexistent/i"}, 2, nil, []string{notRunning + "/nonexistent/i"}},
		{[]string{"init-token", "--label=a", "--label-new=b", "--force", "--so-pin-file=" + pinFile}, 2, nil, []string{notRunning}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := runSlotwatch(t, tc.args...)
			if r.code != tc.code {
				t.Errorf("exit code %d, want %d", r.code, tc.code)
			}
			for _, s := range []struct {
				name, got string
				want      []string
			}{{"stdout", r.stdout, tc.stdout}, {"stderr", r.stderr, tc.stderr}} {
				if len(s.want) == 0 && s.got != "" {
					t.Errorf("%s is not empty", s.name)
				}
				for _, w := range s.want {
					if !strings.Contains(s.got, w) {
						t.Errorf("%s lacks %q", s.name, w)
					}
				}
			}
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
			}
		})
	}
}

// TestCLIGNUArgs: the Go flag package's single-dash long options become
// GNU ones, and nothing else changes.
func TestCLIGNUArgs(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{nil, []string{}},
		{[]string{"list", "-address=unix:path=/b"}, []string{"list", "--address=unix:path=/b"}},
		{[]string{"list", "-json", "-address", "unix:path=/b"}, []string{"list", "--json", "--address", "unix:path=/b"}},
		{[]string{"list", "--json", "--address", "-json"}, []string{"list", "--json", "--address", "-json"}}, // a value stays
		{[]string{"list", "extra", "-json"}, []string{"list", "extra", "--json"}},
		{[]string{"list", "-bogus", "-j"}, []string{"list", "-bogus", "-j"}}, // for pflag to refuse
		{[]string{"list", "--", "-json"}, []string{"list", "--", "-json"}},
		{[]string{"list", "-h", "-help"}, []string{"list", "-h", "--help"}},
		{[]string{"init-token", "-label-new", "-force", "-force"}, []string{"init-token", "--label-new", "-force", "--force"}},
		{[]string{"init-token", "-so-pin-file=/f", "-so-pin-stdin"}, []string{"init-token", "--so-pin-file=/f", "--so-pin-stdin"}},
		{[]string{"serve", "-module", "-odd.so", "-module=/b.so"}, []string{"serve", "--module", "-odd.so", "--module=/b.so"}},
		{[]string{"serve", "-gnome-compat", "-no-pcsc"}, []string{"serve", "--gnome-compat", "--no-pcsc"}}, // its value needs "="
		{[]string{"serve", "-gnome-compat=replace", "-pkcs11-socket="}, []string{"serve", "--gnome-compat=replace", "--pkcs11-socket="}},
		{[]string{"serve", "-", "x"}, []string{"serve", "-", "x"}},
		{[]string{"watch", "-v", "-verbose", "-vv"}, []string{"watch", "-v", "--verbose", "-vv"}},
		{[]string{"watch", "--v", "--v=false", "--x"}, []string{"watch", "-v", "-v=false", "--x"}},
		{[]string{"watch", "-address=x"}, []string{"watch", "-address=x"}}, // not watch's
		{[]string{"-version"}, []string{"--version"}},
		{[]string{"-json", "list"}, []string{"-json", "list"}},
		{[]string{"completion", "bash", "-help"}, []string{"completion", "bash", "--help"}},
		{[]string{"bogus", "-json"}, []string{"bogus", "-json"}},
	} {
		if got := gnuArgs(commandTree(), tc.in); got == nil || !slices.Equal(got, tc.want) {
			t.Errorf("gnuArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestCLIOptions: what serve's and watch's command lines set, in both
// spellings.
func TestCLIOptions(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/test")
	const defaultSocket = "/run/user/test/slotwatch/pkcs11"
	serveDefaults := serveOptions{logLevel: "info", pkcs11Socket: defaultSocket}
	with := func(f func(*serveOptions)) serveOptions { o := serveDefaults; f(&o); return o }
	for _, tc := range []struct {
		args []string
		want serveOptions
	}{
		{nil, serveDefaults},
		{[]string{"--address", "unix:path=/b", "--module", "/a.so", "--module=/b,c.so", "--config", "/c", "--log-calls", "--log-level=debug", "--no-pcsc", "--isolate"},
			with(func(o *serveOptions) {
				o.address, o.modules, o.config, o.logCalls, o.logLevel, o.noPCSC, o.isolate = "unix:path=/b", []string{"/a.so", "/b,c.so"}, "/c", true, "debug", true, true
			})},
		{[]string{"-address=unix:path=/b", "-module", "/a.so", "-module=/b.so", "-config", "/c", "-log-calls", "-log-level", "debug", "-no-pcsc", "-isolate"},
			with(func(o *serveOptions) {
				o.address, o.modules, o.config, o.logCalls, o.logLevel, o.noPCSC, o.isolate = "unix:path=/b", []string{"/a.so", "/b.so"}, "/c", true, "debug", true, true
			})},
		{[]string{"--gnome-compat"}, with(func(o *serveOptions) { o.gnome.mode = dbusapi.GnomeQueue })},
		{[]string{"-gnome-compat"}, with(func(o *serveOptions) { o.gnome.mode = dbusapi.GnomeQueue })},
		{[]string{"--gnome-compat=replace"}, with(func(o *serveOptions) { o.gnome.mode = dbusapi.GnomeReplace })},
		{[]string{"--gnome-compat=queue"}, with(func(o *serveOptions) { o.gnome.mode = dbusapi.GnomeQueue })},
		{[]string{"--gnome-compat", "--gnome-compat=false"}, serveDefaults},
		{[]string{"--pkcs11-socket", "/s"}, with(func(o *serveOptions) { o.pkcs11Socket, o.pkcs11SocketGiven = "/s", true })},
		{[]string{"--pkcs11-socket="}, with(func(o *serveOptions) { o.pkcs11Socket, o.pkcs11SocketGiven = "", true })},
		{[]string{"--pkcs11-socket", ""}, with(func(o *serveOptions) { o.pkcs11Socket, o.pkcs11SocketGiven = "", true })},
		{[]string{"-pkcs11-socket="}, with(func(o *serveOptions) { o.pkcs11Socket, o.pkcs11SocketGiven = "", true })},
	} {
		t.Run("serve "+strings.Join(tc.args, " "), func(t *testing.T) {
			var got serveOptions
			if _, err := execute(newServeCmd(func(o *serveOptions) error { got = *o; return nil }), tc.args); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("options %+v, want %+v", got, tc.want)
			}
		})
	}
	// A positional argument (here after "--") is refused before runServe.
	_, err := execute(newServeCmd(func(*serveOptions) error { t.Error("serve ran"); return nil }), []string{"--no-pcsc", "--", "--isolate"})
	if code := writeError(io.Discard, "serve", err); code != exitFailure || !strings.Contains(err.Error(), `unexpected argument "--isolate"`) {
		t.Errorf("serve --no-pcsc -- --isolate: exit code %d (%v), want 1", code, err)
	}
	for _, tc := range []struct {
		args []string
		want watchOptions
	}{
		{nil, watchOptions{}},
		{[]string{"-v", "--module", "/a.so", "--module", "/b.so", "--json", "--no-pcsc", "--log-calls"}, watchOptions{modules: []string{"/a.so", "/b.so"}, noPCSC: true, json: true, verbose: true, logCalls: true}},
		{[]string{"--verbose"}, watchOptions{verbose: true}},
		{[]string{"--v"}, watchOptions{verbose: true}},
		{[]string{"-v", "-v=false"}, watchOptions{}},
		{[]string{"-verbose", "-module", "/a.so", "-json", "-no-pcsc", "-log-calls"}, watchOptions{modules: []string{"/a.so"}, noPCSC: true, json: true, verbose: true, logCalls: true}},
	} {
		t.Run("watch "+strings.Join(tc.args, " "), func(t *testing.T) {
			var got watchOptions
			if _, err := execute(newWatchCmd(func(o *watchOptions) error { got = *o; return nil }), tc.args); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("options %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestCLIVersion: --version prints "slotwatch VERSION" on stdout.
func TestCLIVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-version"}} {
		var stdout, stderr bytes.Buffer
		code := run(args, &stdout, &stderr)
		if want := "slotwatch " + swversion.Version + "\n"; code != 0 || stdout.String() != want || stderr.Len() != 0 {
			t.Errorf("slotwatch %s: exit %d, stdout %q, stderr %q; want 0, %q", args[0], code, stdout.String(), stderr.String(), want)
		}
	}
}

// TestCLICompletion: completion scripts for bash, zsh and fish; bash's
// asks the binary (__complete) for the commands, which knows them all.
func TestCLICompletion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"completion", "bash"}, &stdout, &stderr); code != 0 {
		t.Fatalf("completion bash: exit %d, %s", code, stderr.String())
	}
	for _, want := range []string{"# bash completion V2 for slotwatch", "__start_slotwatch()", "complete -o default -F __start_slotwatch slotwatch", "__complete"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("completion bash lacks %q", want)
		}
	}
	for _, shell := range []string{"zsh", "fish"} {
		stdout.Reset()
		if code := run([]string{"completion", shell}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "slotwatch") {
			t.Errorf("completion %s: exit %d, %d bytes", shell, code, stdout.Len())
		}
	}
	completion, _, err := commandTree().Find([]string{"completion"})
	if err != nil {
		t.Fatal(err)
	}
	var shells []string
	for _, c := range completion.Commands() {
		shells = append(shells, c.Name())
	}
	if want := []string{"bash", "fish", "zsh"}; !slices.Equal(shells, want) {
		t.Errorf("completion for %q, want %q", shells, want)
	}

	// What the bash script gets when completing "slotwatch <TAB>" and
	// "slotwatch list --<TAB>".
	stdout.Reset()
	if code := run([]string{"__complete", ""}, &stdout, io.Discard); code != 0 {
		t.Fatalf("__complete: exit %d", code)
	}
	var names []string
	for line := range strings.Lines(stdout.String()) {
		name, _, _ := strings.Cut(strings.TrimSpace(line), "\t")
		names = append(names, name)
	}
	for _, want := range []string{"serve", "watch", "list", "monitor", "sessions", "init-token", "completion", "help"} {
		if !slices.Contains(names, want) {
			t.Errorf("__complete \"\" lacks %q: %q", want, names)
		}
	}
	stdout.Reset()
	run([]string{"__complete", "list", "--"}, &stdout, io.Discard)
	for _, want := range []string{"--address", "--json"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("__complete list -- lacks %q:\n%s", want, stdout.String())
		}
	}
}

// cliFlag is one option of one command, as the man page documents it.
type cliFlag struct {
	name, shorthand string
	value           string // "" a switch; "required"; "optional" (--name or --name=VALUE)
	valueName       string // in --help: --address BUS
}

// cliFlags is every option of every command (besides -h/--help). The man
// page relies on it: TestCLIFlags fails on any option missing or added.
var cliFlags = map[string][]cliFlag{
	"": {{name: "version"}},
	"serve": {
		{name: "address", value: "required", valueName: "BUS"},
		{name: "module", value: "required", valueName: "PATH"},
		{name: "config", value: "required", valueName: "FILE"},
		{name: "gnome-compat", value: "optional"},
		{name: "log-calls"},
		{name: "log-level", value: "required", valueName: "LEVEL"},
		{name: "no-pcsc"},
		{name: "isolate"},
		{name: "pkcs11-socket", value: "required", valueName: "PATH"},
	},
	"watch": {
		{name: "module", value: "required", valueName: "PATH"},
		{name: "no-pcsc"},
		{name: "json"},
		{name: "verbose", shorthand: "v"},
		{name: "log-calls"},
	},
	"list":     {{name: "address", value: "required", valueName: "BUS"}, {name: "json"}},
	"monitor":  {{name: "address", value: "required", valueName: "BUS"}, {name: "json"}},
	"sessions": {{name: "address", value: "required", valueName: "BUS"}, {name: "json"}},
	"init-token": {
		{name: "address", value: "required", valueName: "BUS"},
		{name: "token", value: "required", valueName: "PATH"},
		{name: "serial", value: "required", valueName: "S"},
		{name: "label", value: "required", valueName: "L"},
		{name: "label-new", value: "required", valueName: "NEWLABEL"},
		{name: "force"},
		{name: "so-pin-file", value: "required", valueName: "FILE"},
		{name: "so-pin-stdin"},
	},
}

// TestCLIFlags: every command and option slotwatch has, and nothing else;
// commandTree is fresh each call.
func TestCLIFlags(t *testing.T) {
	root := commandTree()
	if root == commandTree() {
		t.Fatal("commandTree returns the same tree twice")
	}
	groups := map[string]string{
		"serve": groupDaemon, "watch": groupDaemon,
		"list": groupClients, "monitor": groupClients, "sessions": groupClients, "init-token": groupClients,
		"completion": "", "help": "",
	}
	var names []string
	for _, c := range root.Commands() {
		if !c.IsAvailableCommand() && c.Name() != "help" {
			continue
		}
		names = append(names, c.Name())
		if g, ok := groups[c.Name()]; ok && c.GroupID != g {
			t.Errorf("%s is in group %q, want %q", c.Name(), c.GroupID, g)
		}
	}
	if want := slices.Sorted(maps.Keys(groups)); !slices.Equal(names, want) {
		t.Errorf("commands %q, want %q", names, want)
	}

	for cmdName, flags := range cliFlags {
		cmd := root
		if cmdName != "" {
			var err error
			if cmd, _, err = root.Find([]string{cmdName}); err != nil || cmd.Name() != cmdName {
				t.Errorf("no command %s", cmdName)
				continue
			}
		}
		want := []string{"help"}
		for _, f := range flags {
			want = append(want, f.name)
			pf := cmd.Flags().Lookup(f.name)
			if pf == nil {
				t.Errorf("%s has no --%s", cmdName, f.name)
				continue
			}
			value := "required"
			switch {
			case fmt.Sprintf("%T", pf.Value) == "*pflag.boolValue":
				value = ""
			case pf.NoOptDefVal != "":
				value = "optional"
			}
			valueName, _ := pflag.UnquoteUsage(pf)
			if pf.Shorthand != f.shorthand || value != f.value || valueName != f.valueName {
				t.Errorf("%s --%s: shorthand %q, value %q, value name %q; want %q, %q, %q", cmdName, f.name, pf.Shorthand, value, valueName, f.shorthand, f.value, f.valueName)
			}
			if pf.Usage == "" {
				t.Errorf("%s --%s has no usage text", cmdName, f.name)
			}
		}
		var got []string
		cmd.Flags().VisitAll(func(f *pflag.Flag) { got = append(got, f.Name) })
		if slices.Sort(got); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
			t.Errorf("%s has options %q, want %q", cmdName, got, slices.Sorted(slices.Values(want)))
		}
	}
}

// TestCLIHelp: help on stdout, GNU style, the commands in their groups.
func TestCLIHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--help"}, &stdout, &stderr); code != 0 || stderr.Len() != 0 {
		t.Fatalf("--help: exit %d, stderr %q", code, stderr.String())
	}
	help := stdout.String()
	daemon, clients, other := strings.Index(help, "\nDaemon:\n"), strings.Index(help, "\nClients of the daemon:\n"), strings.Index(help, "\nOther commands:\n")
	if daemon < 0 || clients < daemon || other < clients {
		t.Fatalf("groups missing or out of order:\n%s", help)
	}
	for _, c := range []struct {
		name      string
		from, end int
	}{{"serve", daemon, clients}, {"watch", daemon, clients}, {"list", clients, other}, {"init-token", clients, other}, {"completion", other, len(help)}} {
		if i := strings.Index(help, "\n  "+c.name+" "); i < c.from || i > c.end {
			t.Errorf("%s is not in its group:\n%s", c.name, help)
		}
	}
	stdout.Reset()
	if code := run([]string{"init-token", "-h"}, &stdout, &stderr); code != 0 || stderr.Len() != 0 {
		t.Fatalf("init-token -h: exit %d, stderr %q", code, stderr.String())
	}
	for _, want := range []string{"Usage:\n  slotwatch init-token [--address BUS]", "--address BUS", "--label-new NEWLABEL", "--so-pin-file FILE", "64 bad arguments"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("init-token -h lacks %q:\n%s", want, stdout.String())
		}
	}
}
