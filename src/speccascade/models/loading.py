"""Loading models from disk: the embedded pair, any Hugging Face checkpoint, GGUF files.

Nothing is downloaded: paths must exist locally (``local_files_only``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecCascadeError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = {"tiny": ASSETS / "models" / "tiny"}
#: The tokenizer shared by every Bible translation model (the embedded pairs carry no copy of it).
TOKENIZER_DIR = ASSETS / "tokenizer"


def embedded_pair_dirs(name: str = "tiny") -> tuple[Path, Path]:
    if name not in EMBEDDED:
        raise SpecCascadeError(f"unknown embedded pair {name!r}; choose one of {sorted(EMBEDDED)}")
    return EMBEDDED[name] / "drafter", EMBEDDED[name] / "verifier"


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   gguf_file: str | None = None):
    """A ``transformers`` causal LM from a local directory (or a ``.gguf`` file, which needs the
    ``gguf`` extra: its weights are dequantised to ``dtype``)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise SpecCascadeError(f"model path {str(path)!r} does not exist (nothing is downloaded from a hub)")
    kwargs = {"dtype": dtype, "local_files_only": True}
    if gguf_file is not None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise SpecCascadeError("loading GGUF files needs the 'gguf' extra: pip install 'speccascade[gguf]'") from None
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
