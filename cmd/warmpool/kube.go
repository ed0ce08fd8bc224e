package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/go-logr/logr"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/warmpool/warmpool/api"
	"github.com/warmpool/warmpool/kube"
)

// kubeFlags are the flags of `serve --kubernetes`.
type kubeFlags struct {
	enabled           bool
	kubeconfig        string
	node              string
	namespace         string
	watchNamespace    string
	heartbeatInterval time.Duration
	heartbeatTimeout  time.Duration
}

func (k *kubeFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.BoolVar(&k.enabled, "kubernetes", false, "also run the Kubernetes node agent (WarmPools and VMClaims of --node)")
	f.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else in-cluster)")
	f.StringVar(&k.node, "node", "", "this node's name (default $NODE_NAME)")
	f.StringVar(&k.namespace, "kube-namespace", kube.DefaultNamespace, "namespace of the node agents' heartbeat Leases")
	f.StringVar(&k.watchNamespace, "watch-namespace", "", "only the WarmPools and VMClaims of this namespace (default: all)")
	f.DurationVar(&k.heartbeatInterval, "heartbeat-interval", 10*time.Second, "how often the node agent renews its Lease")
	f.DurationVar(&k.heartbeatTimeout, "heartbeat-timeout", 40*time.Second, "how long after the last renewal the controller declares the node lost (whole seconds)")
}

// alongside returns the node agent to run next to the daemon, or nil
// without --kubernetes.
func (k *kubeFlags) alongside(cmd *cobra.Command, log *slog.Logger) (func(context.Context, api.Backend) error, error) {
	if !k.enabled {
		for _, name := range []string{"kubeconfig", "node", "kube-namespace", "watch-namespace", "heartbeat-interval", "heartbeat-timeout"} {
			if cmd.Flags().Changed(name) {
				return nil, usagef("--%s needs --kubernetes", name)
			}
		}
		return nil, nil
	}
	node := k.node
	if node == "" {
		node = os.Getenv("NODE_NAME")
	}
	if node == "" {
		return nil, usagef("--kubernetes needs --node NAME (or $NODE_NAME)")
	}
	cfg, err := kubeConfig(k.kubeconfig)
	if err != nil {
		return nil, err
	}
	setKubeLogger(log)
	return func(ctx context.Context, b api.Backend) error {
		return kube.RunAgent(ctx, kube.AgentOptions{
			Config: cfg, Backend: b, Node: node, Namespace: k.namespace, WatchNamespace: k.watchNamespace,
			HeartbeatInterval: k.heartbeatInterval, HeartbeatTimeout: k.heartbeatTimeout, Logger: log,
			Images: kube.LocalImages("", embeddedAgent()),
		})
	}, nil
}

// kubeConfig loads path, else what kubectl would use, else the pod's
// service account.
func kubeConfig(path string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err == nil {
		return cfg, nil
	}
	if path == "" {
		if in, inErr := rest.InClusterConfig(); inErr == nil {
			return in, nil
		}
	}
	if path != "" {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return nil, fmt.Errorf("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a cluster: %w", err)
}

// setKubeLogger sends controller-runtime's and client-go's logs to log.
func setKubeLogger(log *slog.Logger) {
	l := logr.FromSlogHandler(log.Handler())
	ctrllog.SetLogger(l)
	klog.SetLogger(l)
}

func newControllerCommand(g *globals) *cobra.Command {
	var (
		kubeconfig, namespace, watch, logLevel string
		logJSON                                bool
	)
	cmd := &cobra.Command{
		Use:   "controller [--kubeconfig FILE] [--namespace NS]",
		Short: "Run the Kubernetes controller: bind VMClaims to nodes, split WarmPool replicas, mark lost nodes",
		Long: `controller binds each pending VMClaim to a live node with a ready VM of
its WarmPool (most ready first, ties spread), splits a WarmPool's
cluster-wide replicas into per-node targets, and marks the claims of a node
whose heartbeat Lease expired Lost, never binding there. Several may run:
one leads at a time (leader election through a Lease in --namespace). It
keeps no state of its own beyond the API server.`,
		Args: args(),
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd, logLevel, logJSON)
			if err != nil {
				return err
			}
			cfg, err := kubeConfig(kubeconfig)
			if err != nil {
				return err
			}
			setKubeLogger(log)
			err = kube.RunController(cmd.Context(), kube.ControllerOptions{Config: cfg, Namespace: namespace, WatchNamespace: watch, Logger: log})
			if err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else in-cluster)")
	f.StringVar(&namespace, "namespace", kube.DefaultNamespace, "namespace of the node agents' Leases and the leader election")
	f.StringVar(&watch, "watch-namespace", "", "only the WarmPools and VMClaims of this namespace (default: all)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&logJSON, "log-json", false, "log as JSON lines")
	return cmd
}

func newLogger(cmd *cobra.Command, level string, asJSON bool) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("invalid --log-level %q: want debug, info, warn or error", level)
	}
	hopts := &slog.HandlerOptions{Level: l}
	if asJSON {
		return slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), hopts)), nil
	}
	return slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), hopts)), nil
}
