"""Tiny random Hugging Face models with a tokenizer trained here (no downloads): what corrpo's
tests and its CPU examples (examples/integrations) run on. Needs transformers and tokenizers
(``corrpo[gradients]``).

    from corrpo.testing import build_tiny_model
    build_tiny_model("tiny")            # then AutoModelForCausalLM.from_pretrained("tiny")
"""

from __future__ import annotations

from pathlib import Path

TEXTS = [
    "the cat sat on the mat",
    "two plus three is five",
    "a dog ran in the park",
    "one and one make two",
    "what is four plus four ?",
]


def build_tiny_model(path: str | Path, seed: int = 0, vocab_extra: int = 0) -> None:
    """A 2-block random Llama (weights scaled up so that entropies and strengths vary) and a
    WordLevel tokenizer trained on a few strings, with a chat template. ``seed`` draws the
    weights; ``vocab_extra`` adds unused rows to the vocabulary (another model's shape)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_extra,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
