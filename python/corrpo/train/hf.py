"""The trainer's model as a Hugging Face ``LlamaForCausalLM``: the same logits, under Llama's
names, so a run's checkpoints are Hugging Face directories that every corrpo tool
(``corrpo.models.load_model``: the fingerprint tool, a model-backed server) loads without
knowing the trainer, and the paper's measure runs on a Llama mirror of the policy.

A directory written by ``save_pretrained`` holds config.json, model.safetensors, the task's
character tokenizer (tokenizer.json), and corrpo-train.json: the run's settings and, in a
checkpoint to resume from, its phase, step and metrics lines (the optimizer's state beside
it in optimizer.pt).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .model import ModelConfig, Transformer
from .task import _SPECIALS, ALPHABET, BOS, EOS, PAD

TRAINER_FILE = "corrpo-train.json"
OPTIMIZER_FILE = "optimizer.pt"


def character_tokenizer(alphabet: str = ALPHABET) -> Any:
    """A ``PreTrainedTokenizerFast`` of the task's character tokenizer: ``<pad>`` 0,
    ``<bos>`` 1, ``<eos>`` 2, then one id per character of the alphabet. Encoding prepends
    ``<bos>`` (as the task's prompts do); decoding joins characters without spaces. A
    character outside the alphabet encodes as the unknown token, ``<pad>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}
    assert len(specials) == _SPECIALS
    vocab = {name: i for i, name in specials.items()}
    vocab.update({c: i + _SPECIALS for i, c in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def llama_config(cfg: ModelConfig) -> Any:
    """The ``LlamaConfig`` of the architecture of the trainer's ``Transformer``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=4 * cfg.d_model * 2 // 3,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_len,
        # nn.RMSNorm(eps=None) uses the dtype's machine epsilon (the trainer runs in float32).
        rms_norm_eps=float(torch.finfo(torch.float32).eps),
        rope_theta=float(cfg.rope_base),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.02,
    )


def model_config(llama: Any) -> ModelConfig:
    """The trainer's ``ModelConfig`` of a ``LlamaConfig`` that ``llama_config`` wrote."""
    rope = getattr(llama, "rope_parameters", None) or {}
    return ModelConfig(
        vocab_size=llama.vocab_size,
        d_model=llama.hidden_size,
        n_layers=llama.num_hidden_layers,
        n_heads=llama.num_attention_heads,
        max_len=llama.max_position_embeddings,
        rope_base=float(rope.get("rope_theta", getattr(llama, "rope_theta", 10000.0))),
    )


def llama_state_dict(transformer: Transformer) -> dict[str, torch.Tensor]:
    """The weights of a ``Transformer`` under ``LlamaForCausalLM``'s names: the fused
    ``attn.qkv`` split into q/k/v_proj, ``gate_up`` into gate_proj and up_proj (gate first),
    ``attn.out`` as o_proj and ``down`` as down_proj. Views of the live weights."""
    cfg = transformer.cfg
    src = {k: v.detach() for k, v in transformer.state_dict().items()}
    d, hidden = cfg.d_model, 4 * cfg.d_model * 2 // 3
    dst = {
        "model.embed_tokens.weight": src["embed.weight"],
        "model.norm.weight": src["norm.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        b, o = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = src[b + "attn.qkv.weight"].split(d, dim=0)
        gate, up = src[b + "gate_up.weight"].split(hidden, dim=0)
        dst.update(
            {
                o + "input_layernorm.weight": src[b + "attn_norm.weight"],
                o + "self_attn.q_proj.weight": q,
                o + "self_attn.k_proj.weight": k,
                o + "self_attn.v_proj.weight": v,
                o + "self_attn.o_proj.weight": src[b + "attn.out.weight"],
                o + "post_attention_layernorm.weight": src[b + "mlp_norm.weight"],
                o + "mlp.gate_proj.weight": gate,
                o + "mlp.up_proj.weight": up,
                o + "mlp.down_proj.weight": src[b + "down.weight"],
            }
        )
    return dst


def transformer_state_dict(llama: Mapping[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of ``llama_state_dict``: a Llama's weights under the ``Transformer``'s
    names, q/k/v and gate/up fused back."""
    dst = {
        "embed.weight": llama["model.embed_tokens.weight"],
        "norm.weight": llama["model.norm.weight"],
        "lm_head.weight": llama["lm_head.weight"],
    }
    for i in range(n_layers):
        b, o = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = o + "self_attn.", o + "mlp."
        dst.update(
            {
                b + "attn_norm.weight": llama[o + "input_layernorm.weight"],
                b + "attn.qkv.weight": torch.cat([llama[attn + f"{n}_proj.weight"] for n in "qkv"]),
                b + "attn.out.weight": llama[attn + "o_proj.weight"],
                b + "mlp_norm.weight": llama[o + "post_attention_layernorm.weight"],
                b + "gate_up.weight": torch.cat([llama[mlp + "gate_proj.weight"], llama[mlp + "up_proj.weight"]]),
                b + "down.weight": llama[mlp + "down_proj.weight"],
            }
        )
    return dst


def sync_llama(transformer: Transformer, llama: Any) -> None:
    """Copies a ``Transformer``'s current weights into its Llama mirror."""
    missing, unexpected = llama.load_state_dict(llama_state_dict(transformer), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:  # pragma: no cover - a change in transformers' Llama layout
        raise RuntimeError(f"mirroring the trainer's model as a Llama: missing {missing}, unexpected {unexpected}")


def to_llama(transformer: Transformer) -> Any:
    """An equivalent float32 ``LlamaForCausalLM`` of a ``Transformer`` (same logits), on the CPU."""
    from transformers import LlamaForCausalLM

    # Its initial weights are overwritten at once: they draw nothing from the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        llama = LlamaForCausalLM(llama_config(transformer.cfg)).float()
    sync_llama(transformer, llama)
    return llama.eval()


def save_pretrained(
    transformer: Transformer,
    directory: Path,
    settings: dict[str, Any],
    *,
    resume: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
) -> None:
    """Writes the model as a Hugging Face directory (into an existing, empty ``directory``):
    the Llama weights, the character tokenizer, and corrpo-train.json with the run's
    ``settings`` (and ``resume``: phase, step, metrics lines). ``optimizer``: a state dict
    to resume from, in optimizer.pt."""
    from corrpo.models import transformers_progress

    with transformers_progress(False):  # a bar per checkpoint would fill the run's log
        to_llama(transformer).save_pretrained(directory)
    character_tokenizer().save_pretrained(directory)
    (directory / TRAINER_FILE).write_text(json.dumps({"settings": settings, **(resume or {})}, indent=2) + "\n")
    if optimizer is not None:
        torch.save(optimizer, directory / OPTIMIZER_FILE)


def read_trainer_file(directory: Path) -> dict[str, Any]:
    """corrpo-train.json of a directory ``save_pretrained`` wrote."""
    path = directory / TRAINER_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a corrpo-train model directory (no {TRAINER_FILE})")
    return json.loads(path.read_text())


def pretrained_weights(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ``ModelConfig`` and ``Transformer`` weights (float32, on the CPU) of a directory
    ``save_pretrained`` wrote, loaded through ``corrpo.models`` as any other Hugging Face model."""
    from corrpo.models import load_model

    llama = load_model(directory, dtype="float32").model
    cfg = model_config(llama.config)
    return cfg, transformer_state_dict(llama.state_dict(), cfg.n_layers)


def load_pretrained(directory: Path) -> Transformer:
    """The ``Transformer`` of a directory ``save_pretrained`` wrote (float32, on the CPU)."""
    cfg, weights = pretrained_weights(directory)
    # Building the module draws its initial weights: the caller's torch RNG stays untouched.
    with torch.random.fork_rng(devices=[]):
        transformer = Transformer(cfg)
    transformer.load_state_dict(weights)
    return transformer.eval()
