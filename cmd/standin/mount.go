package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/exitcode"
)

func mountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "serve the store's images at MOUNTPOINT with write tracking (the primary daemon)",
		ArgsUsage: "MOUNTPOINT",
		Description: `Runs in the foreground until SIGTERM/SIGINT or 'standin unmount'. Images are the
files under STORE/images/ (created if missing); create new ones through the mount
(e.g. qemu-img create). Every write, discard, zeroing and truncation is recorded
before it reaches the disk; 'standin cycle cut' turns the changes into cycle files.`,
		Flags: []cli.Flag{
			storeFlag,
			&cli.BoolFlag{Name: "background", Usage: "detach and return once the mount is ready (log in STORE/daemon.log)"},
			&cli.BoolFlag{Name: "compress", Value: true, Usage: "zstd-compress staged cycle data"},
			&cli.BoolFlag{Name: "deny-others", Usage: "serve only the mounting user (default: allow_other + default_permissions, for QEMU run by libvirt)"},
			&cli.BoolFlag{Name: "debug", Usage: "log every FUSE request"},
			&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics on `ADDR` (e.g. 127.0.0.1:9442)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
		},
		OnUsageError: onUsageError,
		Action:       runMount,
	}
}

func runMount(c *cli.Context) error {
	if c.NArg() != 1 {
		return usageErr("mount: want exactly one MOUNTPOINT, got %d arguments", c.NArg())
	}
	store, mnt := c.String("store"), c.Args().First()
	if c.Bool("background") {
		return background(c, store, mnt)
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return usageErr("--log-level %q: %v", c.String("log-level"), err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	slog.SetDefault(log)
	if err := os.MkdirAll(store, 0o700); err != nil {
		return err
	}
	return daemon.Run(context.Background(), daemon.Options{
		Store: store, Mountpoint: mnt, Version: version, Compress: c.Bool("compress"),
		DenyOthers: c.Bool("deny-others"), Debug: c.Bool("debug"), Metrics: c.String("metrics"), Logger: log,
	}, func() { fmt.Fprintf(os.Stdout, "standin: serving %s at %s (pid %d)\n", store, mnt, os.Getpid()) })
}

// background re-executes the daemon detached and waits until it answers.
func background(c *cli.Context, store, mnt string) error {
	if err := os.MkdirAll(store, 0o700); err != nil {
		return err
	}
	var args []string
	for _, a := range os.Args[1:] {
		if a != "--background" && a != "-background" && a != "--background=true" {
			args = append(args, a)
		}
	}
	logPath := filepath.Join(store, "daemon.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ready := make(chan error, 1)
	go func() { ready <- daemon.NewClient(store).WaitReady(ctx, 30*time.Second) }()
	select {
	case err := <-exited:
		tail, _ := os.ReadFile(logPath)
		if i := bytes.LastIndex(tail[:max(0, len(tail)-1)], []byte("\n")); i > 0 && len(tail)-i < 2000 {
			tail = tail[i+1:]
		}
		return fmt.Errorf("daemon exited during start-up (%v): %s", err, bytes.TrimSpace(tail))
	case err := <-ready:
		if err != nil {
			cmd.Process.Kill()
			return fmt.Errorf("daemon did not become ready within 30 s (log: %s): %w", logPath, err)
		}
	}
	fmt.Printf("standin: serving %s at %s (pid %d, log %s)\n", store, mnt, cmd.Process.Pid, logPath)
	return nil
}

func unmountCommand() *cli.Command {
	return &cli.Command{
		Name:      "unmount",
		Aliases:   []string{"umount"},
		Usage:     "unmount a standin mount; its daemon then shuts down cleanly",
		ArgsUsage: "MOUNTPOINT",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "lazy", Usage: "detach even if files are open (the daemon exits after they are closed)"},
		},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return usageErr("unmount: want exactly one MOUNTPOINT")
			}
			mnt, err := filepath.Abs(c.Args().First())
			if err != nil {
				return err
			}
			flags := 0
			if c.Bool("lazy") {
				flags = unix.MNT_DETACH
			}
			if err := unix.Unmount(mnt, flags); err != nil {
				switch err {
				case unix.EBUSY:
					return exitcode.With(exitcode.Busy, fmt.Errorf("unmount %s: files are still open (close them, or use --lazy)", mnt))
				case unix.EINVAL:
					return exitcode.With(exitcode.NotFound, fmt.Errorf("unmount %s: not a mountpoint", mnt))
				case unix.ENOENT:
					return exitcode.With(exitcode.NotFound, fmt.Errorf("unmount %s: no such directory", mnt))
				}
				return fmt.Errorf("unmount %s: %w", mnt, err)
			}
			return nil
		},
	}
}
