"""``corrpo fingerprint``: the entropy-gradient fingerprint of a model on its own responses.

    import corrpo.fingerprinting as fp
    result = fp.run("path/to/model", "out/", prompts="prompts.jsonl", generate=2)
    fp.compare(["out/base", "out/reasoning"], "out/compare")

Steps, each usable alone: ``corrpo.models.load_model`` (a Hugging Face directory, a .gguf
file or an installed model package), ``generate.generate_responses`` / ``generate.read_responses``,
``score.score_responses`` (``corrpo.gradients.token_strengths`` per response),
``analysis.analyze`` (correlations with bootstrap CIs over responses) and ``plots``.

Needs torch and transformers (``pip install '.[gradients]' in the corrpo checkout``).
"""

from __future__ import annotations

from .pipeline import RunResult, compare, read_tokens_csv, run

__all__ = ["RunResult", "compare", "read_tokens_csv", "run"]

