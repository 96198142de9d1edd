"""corrpo's gRPC reward server (`corrpo-server serve`): the ``corrpo.v1.RewardService``
over corrpo's native kernels, with health, TLS, token auth, metrics and graceful drain.

The package's Python API is one class: ``ServerProcess``, a server in a child process for
the length of a script, test or training run (``corrpo-train`` starts its local server with
it). It lives here rather than in ``corrpo``, which does not depend on this distribution:
it launches this package's own ``serve`` with flags of this version (``--port-file``,
``--parent-pid``), so launcher and server cannot disagree.
"""

from .process import ServerProcess

__all__ = ["ServerProcess"]
