"""Train the fixture tokenizer and the fixture Llama decoder on `models/data/train.txt`.

The model is a real Llama-architecture decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention
with 4 query / 2 KV heads, head_dim 64), small enough to train on 2 CPU cores in about ten
minutes. Training is seeded and runs a fixed number of steps, so a rerun gives the same model on
the same machine.

Writes an HF model folder (config, safetensors weights, tokenizer.json) to models/fixture/hf and
a training log with the held-out perplexity of the untrained and trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MODELS_DIR = Path(__file__).resolve().parent
DATA_DIR = MODELS_DIR / "data"
HF_DIR = MODELS_DIR / "fixture" / "hf"
EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
SEQ_LEN = 256
BATCH = 16


def fixture_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def train_tokenizer(train_text: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = train_text.split("\n\n")
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_perplexity(model: LlamaForCausalLM, ids: torch.Tensor, max_windows: int = 64) -> float:
    """Perplexity over non-overlapping SEQ_LEN windows (a full forward, for the training log)."""
    model.eval()
    n = min(max_windows, len(ids) // SEQ_LEN)
    windows = ids[: n * SEQ_LEN].view(n, SEQ_LEN)
    nll = 0.0
    for start in range(0, n, BATCH):
        batch = windows[start : start + BATCH]
        loss = model(input_ids=batch, labels=batch).loss
        nll += loss.item() * batch.shape[0]
    model.train()
    return math.exp(nll / n)


def train(steps: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    train_text = (DATA_DIR / "train.txt").read_text(encoding="utf-8")
    heldout_text = (DATA_DIR / "heldout.txt").read_text(encoding="utf-8")

    t0 = time.time()
    tokenizer = train_tokenizer(train_text)
    train_ids = encode(tokenizer, train_text)
    heldout_ids = encode(tokenizer, heldout_text)
    print(f"tokenizer: {len(tokenizer)} tokens, train {len(train_ids):,} tokens "
          f"({time.time() - t0:.0f}s)")

    model = LlamaForCausalLM(fixture_config())
    untrained_ppl = heldout_perplexity(model, heldout_ids)
    print(f"untrained held-out perplexity {untrained_ppl:.1f}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(seed)
    log = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (BATCH,), generator=generator)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
            print(f"step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0

    round_to_float16(model)
    trained_ppl = heldout_perplexity(model, heldout_ids)
    print(f"trained held-out perplexity {trained_ppl:.1f} after {train_seconds:.0f}s")
    summary = {
        "steps": steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "train_tokens_seen": steps * BATCH * SEQ_LEN,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "untrained_heldout_ppl_full_forward": round(untrained_ppl, 2),
        "trained_heldout_ppl_full_forward": round(trained_ppl, 2),
        "weights": "rounded to float16 after training, stored as float16 (exact in float32)",
        "loss_log": log,
    }
    save_checkpoint(model, tokenizer, summary)
    return summary


@torch.no_grad()
def round_to_float16(model: LlamaForCausalLM) -> None:
    """Round every weight to a float16-representable value (kept in float32).

    The checkpoint is then stored in float16 at half the size, and every export made from the
    float32 model computes with exactly the weights the checkpoint holds.
    """
    for parameter in model.parameters():
        parameter.copy_(parameter.half().float())


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, summary: dict) -> None:
    HF_DIR.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(HF_DIR, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(HF_DIR)
    (HF_DIR / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.steps, args.lr, args.seed)


if __name__ == "__main__":
    main()
