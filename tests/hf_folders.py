"""Small random Hugging Face models of the four families, written by transformers' own save_pretrained, each
with the features its family has (fewer KV heads, a head size that is not hidden / heads, biases and norm scales
that are not 0 and 1, rms_norm_eps not 1e-6) and a BPE tokenizer (tokenizer.json, a chat template); and a
JSONL corpus to fine-tune them on."""
import json
import os

from jaxinfra.data import tokenizer as tok_lib

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    # Llama 3.2-like: GQA, tied embeddings, llama3 rotary scaling; written back in the Hub's older spelling
    "llama": dict(head_dim=24, tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}),
    "mistral": dict(head_dim=24, sliding_window=12),  # a window shorter than the prompts: it matters
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases; sliding_window present but use_sliding_window false
    "qwen3": dict(head_dim=32, rms_norm_eps=1e-6 * 3),  # q/k norms
}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # the {i}th line of a tiny corpus\n" for i in range(400)]


def tokenizer_json() -> str:
    """A byte-level BPE of 280 ids (end-of-text id 0) trained on TEXT."""
    return tok_lib.train_bpe([t.encode() for t in TEXT], 280).json_text


def write_jsonl(path) -> str:
    """TEXT as a JSONL file, a document per row."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXT)
    return str(path)


def old_spelling(config: dict) -> dict:
    """transformers 5's config.json as the Hub's older folders spell it: rope_theta and rope_scaling at the
    top, torch_dtype for dtype."""
    out = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(config["rope_parameters"])
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    out["torch_dtype"] = config["dtype"]
    return out


def make_folder(root, family: str, seed: int = 0) -> str:
    """A small random model of `family` saved by transformers (with a tokenizer), at root/family."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    config = getattr(transformers, f"{name}Config")(**{**COMMON, **FAMILIES[family]})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():  # scales and biases away from 1 and 0, so a dropped one shows in the logits
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.3)
    path = os.path.join(str(root), family)
    model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json()),
                                                eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    if family == "llama":
        file = os.path.join(path, "config.json")
        with open(file) as f:
            config = json.load(f)
        with open(file, "w") as f:
            json.dump(old_spelling(config), f, indent=1)
    return path
