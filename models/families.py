"""The conformance corpus: small trained decoders of 14 transformers families, in every export form.

Real models differ from the Llama fixture in ways that break graph rewrites: sliding windows,
soft-capping, partial rotary, learned position tables, multi-query attention, q/k norms, fused
qkv, biases, multipliers. Each family here is built from a config in code (no downloads), small
(2 layers, hidden 128, head_dim 32, the fixture's 2,048-token tokenizer) and trained for 200 steps (about a
minute here) on the fixture's training text, so that a broken cache shows as lost perplexity.

    python -m models.families train [FAMILY ...]    # writes models/families/<family>/ (committed)
    python -m models.families export [FAMILY ...] [--forms F ...]   # into the model cache

Trained checkpoints are committed (float16 safetensors, about 1 MB each); exports are built from
them by `models.exporters` into `$KVCOMPILE_MODEL_CACHE/families/<family>/<form>/` (outside git)
and kept. An exporter that refuses a family is recorded in `<form>.refused` with its reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from models.exporters import FORMS, ExportRefused, export_form
from models.real import cache_root

MODELS_DIR = Path(__file__).resolve().parent
FAMILIES_DIR = MODELS_DIR / "families"
FIXTURE_TOKENIZER_DIR = MODELS_DIR / "fixture" / "hf"
VOCAB = 2048
SEQ_LEN = 256
BATCH = 16
SLIDING_WINDOW = 64  # shorter than the 256-token evaluation windows, so windows matter
GPT2_POSITIONS = 256


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    features: str  # what makes it differ, for the README table
    settings: dict


COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
LLAMA_LIKE = dict(COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)

FAMILIES = (
    Family("llama", "LlamaConfig", "RoPE, GQA 4/2, RMSNorm, SwiGLU", dict(LLAMA_LIKE)),
    Family("mistral", "MistralConfig", f"sliding window {SLIDING_WINDOW} on every layer",
           dict(LLAMA_LIKE, sliding_window=SLIDING_WINDOW)),
    Family("qwen2", "Qwen2Config", "q/k/v projection bias", dict(LLAMA_LIKE, use_sliding_window=False)),
    Family("qwen3", "Qwen3Config", "q/k RMSNorm per head", dict(LLAMA_LIKE, use_sliding_window=False)),
    Family("phi3", "Phi3Config", "fused qkv and gate/up projections",
           dict(LLAMA_LIKE, sliding_window=None, original_max_position_embeddings=2048)),
    Family("gemma2", "Gemma2Config",
           f"attention and final logit soft-capping, sliding window {SLIDING_WINDOW} on alternate layers",
           dict(LLAMA_LIKE, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"])),
    Family("gemma3", "Gemma3TextConfig", f"q/k norm, sliding window {SLIDING_WINDOW} on alternate layers",
           dict(LLAMA_LIKE, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
                layer_types=["sliding_attention", "full_attention"])),
    Family("gpt_neox", "GPTNeoXConfig", "partial rotary (25% of head_dim), parallel residual, MHA",
           dict(COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=False)),
    Family("falcon", "FalconConfig", "multi-query attention (one KV head)",
           dict(COMMON, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                new_decoder_architecture=False, alibi=False, parallel_attn=True, bias=False,
                max_position_embeddings=2048)),
    Family("opt", "OPTConfig", "learned positions (offset 2), ReLU, LayerNorm, MHA",
           dict(COMMON, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=128, max_position_embeddings=2048, do_layer_norm_before=True)),
    Family("gpt2", "GPT2Config", f"learned positions, a {GPT2_POSITIONS}-entry table, Conv1D projections",
           dict(COMMON, n_embd=128, n_layer=2, n_head=4, n_positions=GPT2_POSITIONS, n_inner=256)),
    Family("stablelm", "StableLmConfig", "partial rotary (25%), LayerNorm, GQA 4/2",
           dict(LLAMA_LIKE, partial_rotary_factor=0.25, tie_word_embeddings=False)),
    Family("olmo2", "Olmo2Config", "q/k RMSNorm over all heads, post-norm blocks", dict(LLAMA_LIKE)),
    Family("granite", "GraniteConfig", "embedding, attention, residual and logit multipliers",
           dict(LLAMA_LIKE, embedding_multiplier=12.0, attention_multiplier=0.03125, residual_multiplier=0.22,
                logits_scaling=8.0)),
)
BY_NAME = {f.name: f for f in FAMILIES}


def family_dir(name: str) -> Path:
    return FAMILIES_DIR / name


def make_config(family: Family):
    import transformers

    return getattr(transformers, family.config_class)(**family.settings)


def load_float32(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family_dir(name), dtype=torch.float32).eval()


def train(family: Family, steps: int, lr: float, seed: int = 0) -> dict:
    """Train `family` from scratch for `steps` seeded steps on the fixture's training text."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(FIXTURE_TOKENIZER_DIR)
    train_text = (MODELS_DIR / "data" / "train.txt").read_text(encoding="utf-8")[:6_000_000]
    heldout = (MODELS_DIR / "data" / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    held = torch.tensor(tokenizer(heldout, add_special_tokens=False)["input_ids"])
    model = AutoModelForCausalLM.from_config(make_config(family))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)

    def heldout_ppl() -> float:
        model.eval()
        n = 16
        windows = held[: n * SEQ_LEN].view(n, SEQ_LEN)
        with torch.no_grad():
            loss = model(input_ids=windows, labels=windows).loss.item()
        model.train()
        return math.exp(loss)

    untrained = heldout_ppl()
    started, losses = time.time(), []
    model.train()
    for step in range(steps):
        warmup = min(1.0, (step + 1) / 20)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * decay
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            losses.append({"step": step, "loss": round(loss.item(), 3)})
    with torch.no_grad():
        for parameter in model.parameters():  # float16-exact weights: every export computes the same
            parameter.copy_(parameter.half().float())
    trained = heldout_ppl()
    out = family_dir(family.name)
    shutil.rmtree(out, ignore_errors=True)
    model.eval().half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log = {"family": family.name, "config": family.config_class, "features": family.features, "steps": steps,
           "seconds": round(time.time() - started, 1), "batch": BATCH, "seq_len": SEQ_LEN, "lr": lr,
           "parameters": sum(p.numel() for p in model.parameters()),
           "heldout_ppl_untrained": round(untrained, 1), "heldout_ppl_trained": round(trained, 2),
           "loss_log": losses}
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def export_dir(name: str, form: str) -> Path:
    return cache_root() / "families" / name / form


def build_export(name: str, form: str) -> Path:
    """`form` of family `name` (built into the cache once); raises ExportRefused as recorded."""
    if not (family_dir(name) / "config.json").is_file():
        raise FileNotFoundError(f"{family_dir(name)} has no trained checkpoint: run python -m models.families train {name}")
    out = export_dir(name, form)
    refused = out.with_suffix(".refused")
    if (out / "model.onnx").is_file():
        return out / "model.onnx"
    if refused.is_file():
        raise ExportRefused(refused.read_text().strip())
    # a stage of this process's own: two test workers may build the same export at once, and the
    # first finished one is kept (a folder is renamed into place whole, never overwritten)
    stage = out.with_name(f".{form}.building.{os.getpid()}")
    try:
        export_form(form, lambda: load_float32(name), family_dir(name), stage)
    except ExportRefused as exc:
        refused.parent.mkdir(parents=True, exist_ok=True)
        refused.write_text(str(exc) + "\n")
        raise
    if out.is_dir() and not (out / "model.onnx").is_file():
        shutil.rmtree(out, ignore_errors=True)  # not an export: nothing renamed it there
    try:
        stage.rename(out)
    except OSError:  # another process's export is in place
        shutil.rmtree(stage, ignore_errors=True)
    return out / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("train", "export"))
    parser.add_argument("families", nargs="*", default=[f.name for f in FAMILIES])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS)
    args = parser.parse_args()
    for name in args.families:
        family = BY_NAME[name]
        if args.action == "train":
            log = train(family, args.steps, args.lr)
            print(f"{name}: {log['steps']} steps in {log['seconds']} s, held-out ppl "
                  f"{log['heldout_ppl_untrained']} -> {log['heldout_ppl_trained']}", flush=True)
            continue
        for form in args.forms:
            started = time.time()
            try:
                path = build_export(name, form)
                print(f"{name}/{form}: {path} ({time.time() - started:.1f} s)", flush=True)
            except ExportRefused as exc:
                print(f"{name}/{form}: refused: {exc}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
