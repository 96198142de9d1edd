"""The reference GRPO/CorR-PO trainer (in the corrpo checkout: ``pip install '.[train]' ./server``; the command is
``corrpo-train``). A small transformer learns column addition with a scratchpad, first by
SFT, then by RL whose rewards and advantages come from corrpo's reward server.

Modules: ``task`` (problems, tokenizer, verifier), ``model`` (the transformer, KV-cache
sampling), ``loss`` (PPO-clipped surrogate, KL), ``loop`` (SFT and RL steps), ``dist``
(torchrun/DDP), ``state`` (metrics, checkpoints), ``hf`` (the model as a Hugging Face Llama:
its checkpoints, the mirror the paper's measure runs on), ``report`` (tables, plots), ``cli``.
"""
