"""Loading models from disk: the embedded pair, any Hugging Face checkpoint, GGUF files.

Nothing is downloaded: paths must exist locally (``local_files_only``), and a path that does not
is an error, never a Hub repository id. Every failure is a :class:`ModelLoadError` naming the role
(drafter, verifier, tokenizer), the path and what is wrong with it: a missing path, an empty
folder, no or a broken ``config.json``, missing, truncated or garbage weights, weights that do not
cover the model (they would be left random), no tokenizer files. Devices are checked first
(:func:`check_device`): ``cuda`` on a machine without one is a :class:`DeviceError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checks import as_int
from ..errors import DeviceError, ModelLoadError, SpecCascadeError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"tiny": ASSETS / "models" / "tiny"}
#: The tokenizer shared by every Bible translation model (the embedded pairs carry no copy of it).
TOKENIZER_DIR = ASSETS / "tokenizer"

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def embedded_pair_dirs(name: str = "tiny") -> tuple[Path, Path]:
    if name not in EMBEDDED:
        raise SpecCascadeError(f"unknown embedded pair {name!r}; choose one of {sorted(EMBEDDED)}")
    return EMBEDDED[name] / "drafter", EMBEDDED[name] / "verifier"


def check_device(device, role: str = "model") -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a :class:`DeviceError`."""
    if isinstance(device, torch.device):
        dev = device
    else:
        if not isinstance(device, str):
            raise DeviceError(f"the {role}'s device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise DeviceError(f"unknown device {device!r} for the {role}; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in DEVICE_TYPES:
        raise DeviceError(f"device {str(dev)!r} for the {role} is not supported; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(dev)!r} for the {role}: this machine has no CUDA GPU that torch can use "
                              f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(dev)!r} for the {role}: this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s), numbered from 0")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(
            f"device 'mps' for the {role}: Apple's MPS is not available on this machine; use --device cpu")
    return dev


def set_threads(threads) -> None:
    """``torch.set_num_threads(threads)``; 0 keeps torch's default, a negative count is an error."""
    n = as_int("--threads", threads, minimum=0, hint=" (0: torch's default)")
    if n:
        torch.set_num_threads(n)


def _check_dtype(dtype, role: str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16", "float64") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SpecCascadeError(f"the {role}'s dtype must be a floating torch dtype (float32, bfloat16, float16), "
                               f"got {dtype!r}")
    return dtype


def _listing(path: Path, n: int = 6) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")


def _check_checkpoint_dir(path: Path, role: str) -> None:
    """A local Hugging Face checkpoint folder: config.json (valid JSON with a model_type) + weights."""
    if not any(path.iterdir()):
        raise ModelLoadError(f"the {role} folder {str(path)!r} is empty; it should hold a Hugging Face checkpoint "
                             f"(config.json and model.safetensors)")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"the {role} folder {str(path)!r} has no config.json (it holds: {_listing(path)}); "
                             f"give a Hugging Face checkpoint folder or a .gguf file")
    try:
        cfg = json.loads(config.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"the {role}'s {str(config)!r} is not a text file (not UTF-8); "
                             f"re-save the checkpoint") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"the {role}'s {str(config)!r} is not valid JSON (line {e.lineno}, column {e.colno}: "
                             f"{e.msg}); re-save the checkpoint") from None
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        raise ModelLoadError(f"the {role}'s {str(config)!r} has no 'model_type' (e.g. \"llama\"), so transformers "
                             f"cannot tell which model it describes; re-save the checkpoint")
    if not any((path / w).is_file() for w in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"the {role} folder {str(path)!r} has config.json but no weights "
                             f"({' or '.join(WEIGHT_FILES[::2])}); it holds: {_listing(path)}")


def check_model_path(path: str | Path, role: str = "model", gguf_file: str | None = None) -> tuple[Path, str | None]:
    """What :func:`load_causal_lm` checks before loading anything (cheap: no weights are read):
    the path exists, is a .gguf file or a checkpoint folder with a valid config.json and weights.
    Returns (folder, gguf file name or None)."""
    if not isinstance(path, (str, Path)):
        raise ModelLoadError(f"the {role} path must be a str or Path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and gguf_file is None:
        if path.is_dir():
            raise ModelLoadError(f"the {role} path {str(path)!r} is a folder, not a .gguf file")
        path, gguf_file = path.parent, path.name
    where = str(path / gguf_file) if gguf_file else str(path)
    if not path.exists():
        raise ModelLoadError(f"the {role} path {where!r} does not exist (local paths only: nothing is downloaded "
                             f"from the Hugging Face Hub)")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"the {role} GGUF file {where!r} does not exist")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError(f"loading the {role} from {where!r} needs the 'gguf' extra: "
                                 f"pip install 'speccascade[gguf]'") from None
    elif path.is_file():
        raise ModelLoadError(f"the {role} path {where!r} is a file, not a checkpoint folder; give the folder that "
                             f"holds config.json and the weights, or a .gguf file")
    else:
        _check_checkpoint_dir(path, role)
    return path, gguf_file


def _config_value(path: Path, key: str):
    """``key`` of the checkpoint's config (None where it has none, or the config cannot be read:
    the loader then reports why)."""
    try:
        from transformers import AutoConfig

        with _quiet_transformers():
            return getattr(AutoConfig.from_pretrained(str(path), local_files_only=True), key, None)
    except Exception:  # an unknown model_type etc.: let the loader report it
        return None


def _is_encoder_decoder(path: Path) -> bool:
    """The checkpoint's config.json declares an encoder-decoder (T5, BART, Marian, ...)."""
    return bool(_config_value(path, "is_encoder_decoder"))


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   gguf_file: str | None = None, role: str = "model"):
    """A ``transformers`` causal LM from a local directory (or a ``.gguf`` file, which needs the
    ``gguf`` extra: its weights are dequantised to ``dtype``). ``role`` ("drafter", "verifier")
    names the model in error messages. A checkpoint whose config declares an encoder-decoder
    (``is_encoder_decoder``: T5, BART, Marian, ...) is loaded with ``AutoModelForSeq2SeqLM``."""
    dev = check_device(device, role)
    dtype = _check_dtype(dtype, role)
    path, gguf_file = check_model_path(path, role, gguf_file)
    where = str(path / gguf_file) if gguf_file else str(path)
    kwargs = {"dtype": dtype, "local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["output_loading_info"] = True
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if gguf_file is None and _is_encoder_decoder(path) else AutoModelForCausalLM
    if gguf_file is None and _config_value(path, "feature_size") is not None:   # a feature drafter (models.features)
        from .features import LlamaFeatureDrafter as auto
    try:
        with _quiet_transformers():
            loaded = auto.from_pretrained(str(path), **kwargs)
    except Exception as e:  # transformers / safetensors / gguf raise many kinds
        what = "GGUF file" if gguf_file else "checkpoint"
        if "mismatched_sizes" in str(e) or "size mismatch" in str(e):
            raise ModelLoadError(f"the {role} weights in {where!r} do not fit its config.json (tensor shapes differ: "
                                 f"another model's weights?)") from None
        raise ModelLoadError(f"could not load the {role} from {where!r}: {type(e).__name__}: {_first_line(e)} "
                             f"(a truncated or damaged {what}? re-copy or re-save it)") from None
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"the {role} weights in {where!r} lack {len(missing)} of the model's tensors "
                             f"(e.g. {missing[0]!r}): they would be left random; the weights do not match "
                             f"config.json")
    return model.to(dev).eval()


class _quiet_transformers:
    """transformers' logging at error level while loading (its load report and warnings would
    bury our own message), restored afterwards."""

    def __enter__(self):
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # pragma: no cover
            self.hf = None
            return self
        self.hf, self.level = hf_logging, hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        if self.hf is not None:
            self.hf.set_verbosity(self.level)
        return False


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def load_tokenizer(path: str | Path, gguf_file: str | None = None, role: str = "tokenizer"):
    """A ``transformers`` tokenizer from a local folder (or a ``.gguf`` file). ``role`` names it in
    error messages (e.g. "--tokenizer", "verifier's tokenizer")."""
    if not isinstance(path, (str, Path)):
        raise ModelLoadError(f"the {role} path must be a str or Path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and gguf_file is None and not path.is_dir():
        path, gguf_file = path.parent, path.name
    where = str(path / gguf_file) if gguf_file else str(path)
    if not (path / gguf_file if gguf_file else path).exists():
        raise ModelLoadError(f"the {role} path {where!r} does not exist (local paths only: nothing is downloaded "
                             f"from the Hugging Face Hub)")
    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    elif path.is_file():
        raise ModelLoadError(f"the {role} path {where!r} is a file; give the folder that holds tokenizer.json "
                             f"(or a .gguf file)")
    elif not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"the {role} folder {where!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                             f"...); it holds: {_listing(path) if any(path.iterdir()) else 'nothing'}. "
                             f"Pass --tokenizer DIR (or load_tokenizer(DIR)) with the folder that holds them")
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise ModelLoadError(
            f"could not load the {role} from {where!r}: {type(e).__name__}: {_first_line(e)}") from None
