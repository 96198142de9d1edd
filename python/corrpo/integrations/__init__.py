"""Adapters between corrpo and the RL stacks it plugs into. Each submodule imports its stack
only when used (most import none at all), so ``import corrpo`` stays light.

- ``corrpo.integrations.sglang``: SGLang ``/generate`` responses as corrpo payloads.
"""
