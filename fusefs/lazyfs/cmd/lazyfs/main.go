// Command lazyfs mounts a lazyfs (a FUSE filesystem that simulates power
// cuts, for tests) over a backing directory:
//
//	lazyfs [-debug] [-trash DIR] BACKING MOUNTPOINT
//
// SIGUSR1 is a power cut: everything not made durable (file data without
// fsync, directory entries without an fsync of their directory) is dropped,
// the mount goes away and lazyfs exits 0 after printing what it dropped.
// SIGUSR2 makes everything durable (sync) and prints "synced". SIGTERM or SIGINT make everything
// durable and unmount. lazyfs prints "ready" once the mount is up.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/standin/standin/fusefs/lazyfs"
)

func main() {
	debug := flag.Bool("debug", false, "log every FUSE request")
	trash := flag.String("trash", "", "directory for removals not yet durable: new, empty or one lazyfs made (default BACKING.lazyfs-trash)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: lazyfs [-debug] [-trash DIR] BACKING MOUNTPOINT\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	f, err := lazyfs.Mount(flag.Arg(0), flag.Arg(1), lazyfs.Options{Trash: *trash, Debug: *debug})
	if err != nil {
		fmt.Fprintln(os.Stderr, "lazyfs:", err)
		os.Exit(1)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() { f.Wait(); close(done) }()
	fmt.Println("ready")
	for {
		select {
		case <-done:
			fmt.Fprintln(os.Stderr, "lazyfs: unmounted")
			return
		case s := <-sigs:
			switch s {
			case syscall.SIGUSR1:
				c := f.PowerCut()
				fmt.Fprintln(os.Stderr, "lazyfs: power cut:", c)
				os.Exit(0)
			case syscall.SIGUSR2:
				if err := f.Sync(); err != nil {
					fmt.Fprintln(os.Stderr, "lazyfs: sync:", err)
				}
				fmt.Println("synced")
			default:
				if err := f.Unmount(); err != nil {
					fmt.Fprintln(os.Stderr, "lazyfs: unmount:", err)
					os.Exit(1)
				}
				return
			}
		}
	}
}
