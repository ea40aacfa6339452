// A minimal stargz snapshotter daemon for estargz-opt's end-to-end tests and
// time-to-ready benchmark.
//
// Debian packages stargz-snapshotter 0.12 as a Go library only
// (golang-github-containerd-stargz-snapshotter-dev), not its daemon
// containerd-stargz-grpc, and the library's `service` package needs a CRI
// package Debian lacks. This main wires the pieces the way upstream's daemon
// does: the stargz filesystem (fs.NewFilesystem) with sources from the default
// snapshot labels (the ones `ctr-remote images rpull` sets), the remote
// snapshotter on top of it (snapshot.NewSnapshotter), served as a containerd
// snapshots gRPC service (contrib/snapshotservice) on a unix socket, for a
// containerd `proxy_plugins` entry.
//
// Registries are reached over plain HTTP (the tests' registry listens on
// loopback only). Built in GOPATH mode against /usr/share/gocode:
//
//	GO111MODULE=off GOPATH=$CACHE/gopath:/usr/share/gocode go build -o BIN main.go
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	var (
		root              = flag.String("root", "", "state directory (snapshots under ROOT/snapshotter, FUSE state under ROOT/stargz)")
		address           = flag.String("address", "", "unix socket to serve the snapshots gRPC service on")
		logLevel          = flag.String("log-level", "info", "debug, info, warn or error")
		noBackgroundFetch = flag.Bool("no-background-fetch", false, "do not fetch the rest of each layer in the background")
		noPrefetch        = flag.Bool("no-prefetch", false, "do not prefetch (the prioritized files are then read on demand)")
		requestTimeout    = flag.Duration("request-timeout", 30*time.Second, "timeout of one registry request")
	)
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "usage: stargz-snapshotter -root DIR -address SOCK [flags]")
		os.Exit(2)
	}
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bad -log-level: %v\n", err)
		os.Exit(2)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	ctx := log.WithLogger(context.Background(), log.L)

	if err := run(ctx, *root, *address, *noBackgroundFetch, *noPrefetch, *requestTimeout); err != nil {
		log.G(ctx).WithError(err).Error("stargz snapshotter failed")
		os.Exit(1)
	}
}

// plainHTTPHosts resolves every registry to itself over plain HTTP, with no
// credentials. The library dereferences RegistryHost.Client.Transport (to
// wrap it), so the client must carry an explicit transport.
func plainHTTPHosts(timeout time.Duration) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		client := &http.Client{Transport: tr, Timeout: timeout}
		return []docker.RegistryHost{{
			Client:       client,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
			Host:         ref.Hostname(),
			Scheme:       "http",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		}}, nil
	}
}

func run(ctx context.Context, root, address string, noBackgroundFetch, noPrefetch bool, timeout time.Duration) error {
	root, err := filepath.Abs(root)
	if err != nil {
		return err
	}
	snRoot := filepath.Join(root, "snapshotter")
	fsRoot := filepath.Join(root, "stargz")
	for _, d := range []string{snRoot, fsRoot, filepath.Dir(address)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}

	// As upstream's service does: the overlay opaque xattr the kernel expects.
	opq := layer.OverlayOpaqueTrusted
	if userxattr, err := overlayutils.NeedsUserXAttr(snRoot); err != nil {
		log.G(ctx).WithError(err).Warn("cannot tell whether overlayfs needs userxattr; assuming not")
	} else if userxattr {
		opq = layer.OverlayOpaqueUser
	}

	cfg := config.Config{
		NoPrometheus:      true,
		NoBackgroundFetch: noBackgroundFetch,
		NoPrefetch:        noPrefetch,
	}
	fs, err := stargzfs.NewFilesystem(fsRoot, cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(plainHTTPHosts(timeout))),
		stargzfs.WithOverlayOpaqueType(opq),
	)
	if err != nil {
		return fmt.Errorf("configuring the stargz filesystem: %w", err)
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		return fmt.Errorf("creating the snapshotter: %w", err)
	}

	if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
		return err
	}
	lis, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", address, err)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))

	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(lis) }()
	log.G(ctx).WithField("address", address).WithField("root", root).Info("stargz snapshotter serving")

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	select {
	case sig := <-sigc:
		log.G(ctx).WithField("signal", sig).Info("shutting down")
	case err := <-errc:
		if err != nil {
			log.G(ctx).WithError(err).Error("gRPC server stopped")
		}
	}
	rpc.Stop()
	// Close unmounts the FUSE layers this snapshotter mounted.
	if err := sn.Close(); err != nil {
		return fmt.Errorf("closing the snapshotter: %w", err)
	}
	return nil
}
