package main

// The command line: one cobra root command and its subcommands, GNU style
// (--address BUS, -h/--help everywhere), with the exit codes slotwatch
// has always had. Each subcommand's cobra.Command is built next to its
// run function (newServeCmd in serve.go, newListCmd in client_list.go,
// ...), its flags bound to a small options struct the run function
// takes; this file holds what they share: the root, its groups, the
// version, the rewrite of Go-flag-style single-dash options, and the
// mapping of every error to an exit code and a message.
//
// Exit codes (scripts, systemd units and tests/ rely on them):
//
//	slotwatch, no command                 usage on stderr, 2
//	slotwatch BOGUS, slotwatch --bogus    message and usage on stderr, 2
//	serve/watch with a bad command line   message on stderr, 1
//	a client with a bad command line      message on stderr, 64 (exitUsage)
//	-h/--help, help, --version            on stdout, 0
//	anything else                         what the run function says
//	                                      (writeError in client.go)

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Command groups of the root's help.
const (
	groupDaemon  = "daemon"
	groupClients = "clients"
)

// rootName is the root command's name, the binary's.
const rootName = "slotwatch"

// exitNoCommand is the exit code of a command line that names no known
// command (and of one with a bad option before the command).
const exitNoCommand = 2

// commandTree returns slotwatch's whole command tree, made afresh: the
// root with every subcommand, cobra's help and completion commands, and
// the help flag on every command, as the binary runs it. The man page
// test walks it. (The completion commands write to the stdout the tree
// was made with, os.Stdout here; tests that run them use newRootCmd.)
func commandTree() *cobra.Command {
	return newRootCmd(os.Stdout, os.Stderr)
}

// newRootCmd builds the tree, writing help and completion scripts to
// stdout and usage after an error to stderr.
func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   rootName + " COMMAND [OPTIONS]",
		Short: "smart cards and PKCS#11 tokens for the desktop session",
		Long: `slotwatch watches smart card readers and PKCS#11 tokens for the desktop
session. "slotwatch serve" is the daemon: it serves what it sees, and
PKCS#11 sessions under its rules, on D-Bus (and to PKCS#11 programs on a
socket). The client commands talk to a running daemon over D-Bus; "slotwatch
watch" runs a monitor in its own process instead.`,
		Version: version,
		// Our own messages and exit codes (run, writeError), not cobra's
		// "Error: ..." followed by the usage.
		SilenceErrors: true,
		SilenceUsage:  true,
		// The synopsis in Use says it all.
		DisableFlagsInUseLine: true,
		// Runnable, so that no command and an unknown command reach
		// RunE (exit 2) rather than cobra's help (exit 0) or its own
		// error text.
		Args:              cobra.ArbitraryArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return &exitError{code: exitNoCommand, msg: cmd.UsageString()}
			}
			msg := fmt.Sprintf("slotwatch: unknown command %q\n", args[0])
			if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
				msg += fmt.Sprintf("Did you mean %s?\n", strings.Join(s, " or "))
			}
			return &exitError{code: exitNoCommand, msg: msg + "\n" + cmd.UsageString()}
		},
	}
	root.SuggestionsMinimumDistance = 2 // cobra's default, which SuggestionsFor does not apply
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetVersionTemplate("slotwatch {{.Version}}\n")
	// Declared here rather than by cobra, which would give it -v too:
	// "slotwatch watch -v" is --verbose.
	root.Flags().Bool("version", false, "print slotwatch's version and exit")
	root.SetUsageTemplate(usageTemplate)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return &exitError{code: exitNoCommand, err: err,
			msg: fmt.Sprintf("slotwatch: %s\n\n%s", goFlagErrorText(err), cmd.UsageString())}
	})

	root.AddGroup(
		&cobra.Group{ID: groupDaemon, Title: "Daemon:"},
		&cobra.Group{ID: groupClients, Title: "Clients of the daemon:"},
	)
	root.AddCommand(
		newServeCmd(runServe),
		newWatchCmd(runWatch),
		newListCmd(runList),
		newMonitorCmd(runMonitor),
		newSessionsCmd(runSessions),
		newInitTokenCmd(runInitToken),
	)

	// cobra adds help and completion itself when it executes; made here,
	// the tree commandTree returns is the one users see. Completion for
	// bash, zsh and fish (the Linux desktop's shells), not PowerShell.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		if c.Name() != "completion" {
			continue
		}
		for _, sub := range c.Commands() {
			if sub.Name() == "powershell" {
				c.RemoveCommand(sub)
			}
		}
	}
	var addHelpFlags func(*cobra.Command)
	addHelpFlags = func(c *cobra.Command) {
		c.InitDefaultHelpFlag()
		for _, sub := range c.Commands() {
			addHelpFlags(sub)
		}
	}
	addHelpFlags(root)
	return root
}

// usageTemplate is cobra's default usage with GNU wording: "Options:",
// and the commands in their groups.
const usageTemplate = `Usage:
  {{.UseLine}}{{if .HasAvailableSubCommands}}{{$cmds := .Commands}}{{if eq (len .Groups) 0}}

Commands:{{range $cmds}}{{if (or .IsAvailableCommand (eq .Name "help"))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{else}}{{range $group := .Groups}}

{{.Title}}{{range $cmds}}{{if (and (eq .GroupID $group.ID) (or .IsAvailableCommand (eq .Name "help")))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{if not .AllChildCommandsHaveGroup}}

Other commands:{{range $cmds}}{{if (and (eq .GroupID "") (or .IsAvailableCommand (eq .Name "help")))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}{{end}}{{end}}{{end}}{{if .HasAvailableLocalFlags}}

Options:
{{.LocalFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableInheritedFlags}}

Global options:
{{.InheritedFlags.FlagUsages | trimTrailingWhitespaces}}{{end}}{{if .HasAvailableSubCommands}}

Run "{{.CommandPath}} COMMAND -h" for a command's options.{{end}}
`

// run is main: it executes the command line args (without the program
// name) and returns the exit code, having printed any error to stderr.
func run(args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	cmd, err := execute(root, args)
	return writeError(stderr, commandName(cmd), err)
}

// execute runs cmd, the root of a tree (in tests, a lone subcommand),
// on args after gnuArgs, and returns the command that ran and its error.
func execute(cmd *cobra.Command, args []string) (*cobra.Command, error) {
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	// Never nil: cobra reads os.Args for nil.
	cmd.SetArgs(gnuArgs(cmd, args))
	return cmd.ExecuteC()
}

// commandName is a command's path without "slotwatch", as messages name
// it ("init-token", "completion bash"); "" for the root.
func commandName(cmd *cobra.Command) string {
	if cmd == nil {
		return ""
	}
	path := cmd.CommandPath()
	if path == rootName {
		return ""
	}
	return strings.TrimPrefix(path, rootName+" ")
}

// gnuArgs rewrites the Go flag package's single-dash long options into
// GNU double-dash ones, so that command lines written for slotwatch before
// it used cobra keep working: "-address=unix:path=/b", "-force",
// "-module PATH", "-json" become "--address=...", "--force", "--module
// PATH", "--json". pflag would read "-address" as the shorthands -a -d
// -d ... instead.
//
// Only an argument naming a long option of the command it is given to is
// rewritten (args[0] selects a subcommand, as the command always came
// first), and never:
//   - the value of an option that takes one ("--label -force" keeps the
//     label "-force", as both flag packages read it);
//   - anything after "--";
//   - a single letter ("-h", "-v": shorthands) or an unknown name (left
//     for pflag to refuse).
//
// Go's flag package took "--v" for "-v" too: a double-dash single letter
// that is no long option but a shorthand loses a dash.
func gnuArgs(cmd *cobra.Command, args []string) []string {
	out := make([]string, 0, len(args))
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		for _, sub := range cmd.Commands() {
			if sub.Name() == args[0] || sub.HasAlias(args[0]) {
				return append(append(out, args[0]), gnuArgs(sub, args[1:])...)
			}
		}
	}
	cmd.InitDefaultHelpFlag() // "-help" too, as Go's flag package knew it
	flags := cmd.Flags()
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(out, args[i:]...)
		}
		if len(a) < 2 || a[0] != '-' {
			out = append(out, a)
			continue
		}
		var f *pflag.Flag
		name, _, hasValue := strings.Cut(strings.TrimPrefix(a[1:], "-"), "=")
		switch {
		case strings.HasPrefix(a, "--"):
			if f = flags.Lookup(name); f == nil && len(name) == 1 {
				if f = flags.ShorthandLookup(name); f != nil {
					a = a[1:]
				}
			}
		case len(name) > 1:
			if f = flags.Lookup(name); f != nil {
				a = "-" + a
			}
		default: // -X or -X=value: a shorthand
			f = flags.ShorthandLookup(name)
		}
		out = append(out, a)
		if f != nil && !hasValue && f.NoOptDefVal == "" && i+1 < len(args) {
			i++ // its value, whatever it looks like
			out = append(out, args[i])
		}
	}
	return out
}

// flagErrorFunc is a subcommand's answer to a bad option: its message
// and a pointer to -h, exit code code (exitUsage for the clients,
// exitFailure for serve and watch, as before cobra).
func flagErrorFunc(code int) func(*cobra.Command, error) error {
	return func(cmd *cobra.Command, err error) error {
		return commandLineError(cmd, code, err, "%s", goFlagErrorText(err))
	}
}

// noArgs refuses positional arguments with exit code code.
func noArgs(code int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return commandLineError(cmd, code, nil, "unexpected argument %q", args[0])
		}
		return nil
	}
}

// commandLineError is usageError (client.go) with another exit code:
// "slotwatch CMD: message" and `Run "slotwatch CMD -h" for its options.`
func commandLineError(cmd *cobra.Command, code int, cause error, format string, args ...any) error {
	var ee *exitError
	errors.As(usageError(commandName(cmd), format, args...), &ee)
	ee.code, ee.err = code, cause
	return ee
}

// goFlagErrorText says what pflag's err says in the words of Go's flag
// package, which slotwatch used before cobra: scripts and tests match
// "flag provided but not defined: -so-pin". Go's flag package names an
// option with one dash, however it was given.
func goFlagErrorText(err error) string {
	var notExist *pflag.NotExistError
	var needsValue *pflag.ValueRequiredError
	var invalid *pflag.InvalidValueError
	switch {
	case errors.As(err, &notExist):
		name := notExist.GetSpecifiedName()
		if s := notExist.GetSpecifiedShortnames(); s != "" {
			name = s
		}
		return "flag provided but not defined: -" + name
	case errors.As(err, &needsValue):
		name := needsValue.GetSpecifiedName()
		if s := needsValue.GetSpecifiedShortnames(); s != "" {
			name = s
		}
		return "flag needs an argument: -" + name
	case errors.As(err, &invalid):
		return fmt.Sprintf("invalid value %q for flag -%s: %v", invalid.GetValue(), invalid.GetFlag().Name, errors.Unwrap(invalid))
	}
	return err.Error()
}
