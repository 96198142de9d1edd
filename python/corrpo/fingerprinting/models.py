"""Loading the model to fingerprint: a Hugging Face directory, a ``.gguf`` file, or a
corrpo-train checkpoint (``sft.pt`` / ``checkpoint.pt``), which is converted into an
equivalent ``transformers.LlamaForCausalLM`` with a character tokenizer for its task.

    from corrpo.fingerprinting.models import load_model
    loaded = load_model("runs/demo/sft.pt")          # Loaded(model, tokenizer, kind, name)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Loaded:
    """A causal LM ready to score, its tokenizer, and where it came from.

    kind: ``hf`` (a directory), ``gguf`` or ``corrpo-train``. name: what summaries call it.
    random_init: True when the weights are a fresh seeded initialisation of the same
    architecture (the control), not the checkpoint's.
    """

    model: Any
    tokenizer: Any
    kind: str
    name: str
    path: str
    random_init: bool = False


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device")
    return device


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    random_init: bool = False,
    seed: int = 0,
) -> Loaded:
    """The model and tokenizer at ``path``: a Hugging Face directory (``config.json``), a
    ``.gguf`` file (dequantized to ``dtype``), or a corrpo-train checkpoint ``.pt``.

    random_init: keep the architecture and the tokenizer, but give the model freshly
    initialised weights (seeded with ``seed``): the control that shows what an untrained
    network of the same shape gives.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model path {str(p)!r} does not exist")
    torch_dtype = _torch_dtype(dtype)
    dev = resolve_device(device)
    if p.is_dir():
        loaded = _load_hf_dir(p, torch_dtype, random_init, seed)
    elif p.suffix == ".gguf":
        loaded = _load_gguf(p, torch_dtype, random_init, seed)
    elif p.suffix in (".pt", ".pth"):
        loaded = _load_train_checkpoint(p, random_init, seed)
        loaded.model = loaded.model.to(torch_dtype)
    else:
        raise ConfigError(
            f"model path {str(p)!r} is neither a Hugging Face directory, a .gguf file nor a corrpo-train checkpoint (.pt)"
        )
    loaded.model = loaded.model.to(dev).eval()
    return loaded


def _fresh(config: Any, torch_dtype: Any, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


def _load_hf_dir(p: Path, torch_dtype: Any, random_init: bool, seed: int) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (p / "config.json").exists():
        raise ConfigError(f"model directory {str(p)!r} has no config.json (not a Hugging Face model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        if random_init:
            model = _fresh(AutoConfig.from_pretrained(p), torch_dtype, seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"could not load the model in {str(p)!r}: {_first_line(err)}") from err
    return Loaded(model, tokenizer, "hf", p.name, str(p), random_init)


def _load_gguf(p: Path, torch_dtype: Any, random_init: bool, seed: int) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"loading a .gguf file needs the {package!r} package (pip install 'corrpo[gradients]')"
            ) from None
    directory, name = str(p.parent), p.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        if random_init:
            model = _fresh(AutoConfig.from_pretrained(directory, gguf_file=name), torch_dtype, seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"could not load the GGUF model {str(p)!r}: {_first_line(err)}") from err
    return Loaded(model, tokenizer, "gguf", p.stem, str(p), random_init)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---- corrpo-train checkpoints ------------------------------------------------------------


def character_tokenizer(alphabet: str | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` for corrpo-train's character tokenizer: ``<pad>`` 0,
    ``<bos>`` 1, ``<eos>`` 2, then one id per character of the task's alphabet. Encoding
    prepends ``<bos>`` (as the task's prompts do); decoding joins characters without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..train.task import _SPECIALS, ALPHABET, BOS, EOS, PAD

    alphabet = ALPHABET if alphabet is None else alphabet
    specials = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}
    assert len(specials) == _SPECIALS
    vocab = {name: i for i, name in specials.items()}
    vocab.update({c: i + _SPECIALS for i, c in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    # Text outside the alphabet would silently become <pad>; encode_prompt checks this.
    wrapped.corrpo_alphabet = alphabet
    return wrapped


def train_model_config(state: dict[str, Any]) -> Any:
    """The ``corrpo.train.model.ModelConfig`` of a checkpoint: sizes from its settings
    (``model``, ``digits``), checked against the shapes of its weights."""
    from ..train.config import SIZES
    from ..train.model import ModelConfig
    from ..train.task import TASKS

    settings = state.get("config") or {}
    size = settings.get("model")
    if size not in SIZES:
        raise ConfigError(f"checkpoint settings name model size {size!r}; known are {sorted(SIZES)}")
    task_name = settings.get("task", "add")
    if task_name not in TASKS:
        raise ConfigError(f"checkpoint settings name task {task_name!r}; known are {sorted(TASKS)}")
    task = TASKS[task_name](digits=settings.get("digits", 4), eval_size=1)
    d_model, n_layers, n_heads = SIZES[size]
    weights = state["model"]
    vocab_size, width = weights["embed.weight"].shape
    if width != d_model:
        raise ConfigError(f"checkpoint weights have d_model {width}, its settings say {d_model} (model {size!r})")
    return ModelConfig(
        vocab_size=int(vocab_size),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        max_len=task.prompt_len + task.max_response_len,
    )


def llama_config(cfg: Any) -> Any:
    """The ``LlamaConfig`` of the architecture of corrpo-train's ``Transformer``."""
    import torch
    from transformers import LlamaConfig

    from ..train.task import BOS, EOS, PAD

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


def llama_state_dict(transformer: Any) -> dict[str, Any]:
    """The weights of a corrpo-train ``Transformer`` under ``LlamaForCausalLM``'s names: the
    fused ``attn.qkv`` split into q/k/v_proj, ``gate_up`` into gate_proj and up_proj (gate
    first), ``attn.out`` as o_proj and ``down`` as down_proj. Views of the live weights."""
    cfg = transformer.cfg
    src = {k: v.detach() for k, v in transformer.state_dict().items()}
    d, hidden = cfg.d_model, 4 * cfg.d_model * 2 // 3
    dst: dict[str, Any] = {
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


def sync_llama(transformer: Any, llama: Any) -> None:
    """Copies a corrpo-train ``Transformer``'s current weights into its converted Llama."""
    missing, unexpected = llama.load_state_dict(llama_state_dict(transformer), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:  # pragma: no cover - a change in transformers' Llama layout
        raise ConfigError(f"converting the corrpo-train model: missing {missing}, unexpected {unexpected}")


def convert_train_model(transformer: Any) -> Any:
    """An equivalent float32 ``LlamaForCausalLM`` of a corrpo-train ``Transformer`` (same
    logits), on the CPU (see ``llama_state_dict``)."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(llama_config(transformer.cfg)).float()
    sync_llama(transformer, llama)
    return llama.eval()


def load_train_transformer(path: str | Path) -> Any:
    """corrpo-train's ``Transformer`` with the weights of a checkpoint."""
    import torch

    from ..train.model import Transformer

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"could not read {str(path)!r} as a corrpo-train checkpoint: {_first_line(err)}") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{str(path)!r} is not a corrpo-train checkpoint (no 'model' and 'config' entries)")
    cfg = train_model_config(state)
    model = Transformer(cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def _load_train_checkpoint(p: Path, random_init: bool, seed: int) -> Loaded:
    import torch

    from ..train.model import Transformer

    transformer = load_train_transformer(p)
    if random_init:
        # The trainer's own initialisation of the same architecture, seeded.
        torch.manual_seed(seed)
        transformer = Transformer(transformer.cfg).eval()
    name = p.parent.name + "/" + p.stem if p.parent.name else p.stem
    return Loaded(convert_train_model(transformer), character_tokenizer(), "corrpo-train", name, str(p), random_init)


def describe(loaded: Loaded) -> dict[str, Any]:
    """What summary.json records about the model."""
    cfg = loaded.model.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "name": loaded.name,
        "path": loaded.path,
        "kind": loaded.kind,
        "random_init": loaded.random_init,
        "architecture": type(loaded.model).__name__,
        "n_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "n_parameters": int(n_params),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
    }


__all__ = [
    "DTYPES",
    "Loaded",
    "character_tokenizer",
    "convert_train_model",
    "describe",
    "llama_config",
    "llama_state_dict",
    "load_model",
    "load_train_transformer",
    "resolve_device",
    "sync_llama",
    "train_model_config",
]
