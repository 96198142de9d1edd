"""Adapters between corrpo and the RL stacks it plugs into (docs/integrations.md). Each
submodule imports its stack only when used, so ``import corrpo`` stays light.

- ``corrpo.integrations.trl``: a ``GRPOTrainer`` reward function with the CorR-PO term, and
  ``FingerprintCallback`` (``corrpo.integrations.monitor``: the fingerprint followed through
  training by any transformers or TRL trainer).
- ``corrpo.integrations.verl``: reward managers and the ``corrpo_grpo`` advantage estimator,
  registered with verl's own decorators (imports verl).
- ``corrpo.integrations.openrlhf``: OpenRLHF's remote reward model (HTTP) and its
  ``reward_func`` file form.
- ``corrpo.integrations.slime``: slime's ``--custom-rm-path`` and
  ``--custom-reward-post-process-path`` functions (imports nothing of slime).
- ``corrpo.integrations.sglang``: SGLang ``/generate`` responses as corrpo payloads.
- ``corrpo.integrations.sglang_plugin``: an SGLang server plugin (``CORRPO_SGLANG_STATS=1``)
  that returns exact per-token H and G in ``meta_info``.
- ``corrpo.integrations.sglang_server``: a local SGLang server in a child process (tests,
  examples).
"""
