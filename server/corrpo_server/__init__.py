"""corrpo's gRPC reward server (`corrpo-server serve`): the ``corrpo.v1.RewardService``
over corrpo's native kernels, with health, TLS, token auth, metrics and graceful drain."""
