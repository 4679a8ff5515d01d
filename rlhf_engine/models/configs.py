"""Built-in Llama-style model shapes, built locally (no hub downloads)."""

from __future__ import annotations

from transformers import LlamaConfig

# Shapes of the built-in models. Both tie the lm_head to the input embedding (fewer
# parameters for a small vocabulary, and the tied path gets exercised everywhere).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
}


def llama_config(
    size: str,
    vocab_size: int,
    *,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    max_position_embeddings: int = 256,
) -> LlamaConfig:
    """A ``LlamaConfig`` of one of the :data:`MODEL_SIZES` with tied embeddings.

    Args:
        size: a key of :data:`MODEL_SIZES` (``"tiny"``: hidden 64, 2 layers, 4 heads;
            ``"small"``: hidden 128, 4 layers, 4 heads).
        vocab_size: number of token ids ``V``; the special ids must be in ``[0, V)``.
        max_position_embeddings: longest prompt + response, in tokens.

    Raises:
        ValueError naming the argument (unknown size, non-positive sizes, special ids
        outside the vocabulary).
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"llama_config: unknown size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    for name, value in (("vocab_size", vocab_size), ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"llama_config: {name} must be a positive int, got {value!r}")
    for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise ValueError(f"llama_config: {name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        **MODEL_SIZES[size],
    )
