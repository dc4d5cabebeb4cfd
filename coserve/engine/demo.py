"""`coserve demo-model`: a real Hugging Face checkpoint directory with seeded random weights.

The architecture is a real Llama (`small` has SmolLM-135M's shape); the
tokenizer is a byte-level BPE trained with `tokenizers` on the Python standard
library's own source, which ships with every Python; the chat template is
ChatML. Nothing is downloaded. `transformers` loads the directory as is.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SIZES = {
    # name: (vocab, hidden, layers, heads, kv heads, intermediate, corpus bytes)
    "tiny": (2048, 64, 2, 4, 2, 128, 400_000),
    "small": (49152, 576, 30, 9, 3, 1536, 16_000_000),
}


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Source text of the standard library's top-level modules, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(vocab_size: int, corpus_bytes: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_corpus(corpus_bytes), trainer)
    return tok


def random_llama_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors at the scale of a trained model rather than of a fresh init:
    projections normal(0, 1/sqrt(fan_in)) so signals keep their size through the layers, embedding
    rows of norm ~2 (tied lm_head: logits can be confident), norms at one. A model this well
    conditioned learns a small fine-tuning set in a few dozen steps; at 0.02 it barely could."""
    gen = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads

    def normal(out_f: int, in_f: int, std: float | None = None) -> torch.Tensor:
        std = in_f**-0.5 if std is None else std
        return (torch.randn(out_f, in_f, generator=gen) * std).to(torch.bfloat16)

    weights = {
        "model.embed_tokens.weight": normal(cfg["vocab_size"], h, 2 * h**-0.5),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(heads * d, h),
            p + "self_attn.k_proj.weight": normal(kv * d, h),
            p + "self_attn.v_proj.weight": normal(kv * d, h),
            p + "self_attn.o_proj.weight": normal(h, heads * d),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    return weights


def write_demo_model(size: str, out: str | Path, seed: int = 0) -> Path:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    vocab, hidden, layers, heads, kv_heads, inter, corpus = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab, corpus)
    tok.save(str(out / "tokenizer.json"))
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_llama_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": endoftext,
        "eos_token_id": [im_end, endoftext],
    }, indent=2))
    return out
