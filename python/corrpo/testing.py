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


def build_tiny_gguf(path: str | Path, vocab: int = 16, hidden: int = 32, layers: int = 2, heads: int = 4, kv: int = 2) -> None:
    """A random 2-block Llama as a GGUF file (float32 tensors), with a toy tokenizer: what
    ``corrpo.models`` loads from the model packages, in miniature. Needs ``gguf``."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    width = kv * hidden // heads
    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden))
    for i in range(layers):
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (width, hidden)),
            ("attn_v", (width, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (2 * hidden, hidden)),
            ("ffn_up", (2 * hidden, hidden)),
            ("ffn_down", (hidden, 2 * hidden)),
        ):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
