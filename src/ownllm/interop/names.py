"""What reading and writing a foreign format share, written once: which tensor of a Hugging Face or GGUF file is
which ownllm parameter, llama.cpp's order of the RoPE rows, its pooling types, and the chat-template section of a
run config.

    from ownllm.interop.names import GGUF_GLOBAL, HF_GPT2_CONV1D, interleave_rope_rows
    GGUF_GLOBAL["token_embd.weight"]          # "tok_emb.weight"

Every table maps the foreign name to ownllm's (a reader looks a file's names up; a writer walks the items). Block
tensors are named per layer: Hugging Face `h.N.` (GPT-2) or `layers.N.` (Llama, Qwen2) under its prefix, GGUF
`blk.N.`, ownllm `blocks.N.`; a per-layer entry names the module, `.weight` / `.bias` follow. Where ownllm fuses
what the format keeps apart (q|k|v, gate|up), the entry lists the parts in the order they are stacked.
"""

from __future__ import annotations

from torch import Tensor

from ownllm.chat_templates import speaks_chatml
from ownllm.tokenizer import Tokenizer

# ---- Hugging Face -------------------------------------------------------------------------------------------------

HF_LM_HEAD = "lm_head.weight"  # the same name in both, outside the prefix
GENERATION_CONFIG_FILE = "generation_config.json"  # eos/bos ids for generation
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # eos/bos tokens, add_bos_token, the chat template

# GPT-2: everything under "transformer."; attention and MLP weights are Conv1D, stored [in, out] (transposed).
HF_GPT2_PREFIX = "transformer."
HF_GPT2_GLOBAL = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "norm.weight",
                  "ln_f.bias": "norm.bias"}
HF_GPT2_NORMS = {"ln_1": "norm1", "ln_2": "norm2"}  # block h.N.: weight and bias
HF_GPT2_CONV1D = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc",
                  "mlp.c_proj": "mlp.proj"}

# Llama and Qwen2: everything under "model."; q/k/v and gate/up are separate matrices, fused in ownllm.
HF_LLAMA_PREFIX = "model."
HF_LLAMA_GLOBAL = {"embed_tokens.weight": "tok_emb.weight", "norm.weight": "norm.weight"}
HF_LLAMA_NORMS = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2"}  # block layers.N.: weight
HF_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # ownllm's attn.qkv
HF_LLAMA_ATTN_OUT = "self_attn.o_proj"  # ownllm's attn.proj
HF_LLAMA_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")  # ownllm's mlp.fc
HF_LLAMA_DOWN = "mlp.down_proj"  # ownllm's mlp.proj
HF_QK_NORMS = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}  # Qwen3, Gemma 3: weight
# Gemma 3 names its four norms differently: its post_attention_layernorm is the norm on the attention's output.
HF_GEMMA_NORMS = {"input_layernorm": "norm1", "post_attention_layernorm": "post_attn_norm",
                  "pre_feedforward_layernorm": "norm2", "post_feedforward_layernorm": "post_mlp_norm"}
# A Gemma 3 image-text checkpoint (model_type gemma3) keeps the language model under one of these prefixes
# (transformers v5, v4) beside the vision tower, which ownllm leaves out.
HF_GEMMA3_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
HF_GEMMA3_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                             "multi_modal_projector.")

# ---- GGUF (llama.cpp) ---------------------------------------------------------------------------------------------

GGUF_GLOBAL = {"token_embd.weight": "tok_emb.weight", "position_embd.weight": "pos_emb.weight",
               "output_norm.weight": "norm.weight", "output_norm.bias": "norm.bias",
               "output.weight": "lm_head.weight"}
GGUF_GPT2_LAYER = {"attn_norm": "norm1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj", "ffn_norm": "norm2",
                   "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
GGUF_LLAMA_LAYER = {"attn_norm": "norm1", "ffn_norm": "norm2", "attn_output": "attn.proj", "ffn_down": "mlp.proj"}
GGUF_LLAMA_FUSED = {"attn.qkv": ["attn_q", "attn_k", "attn_v"], "mlp.fc": ["ffn_gate", "ffn_up"]}
GGUF_QK_NORMS = {"attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}  # qwen3, gemma3
GGUF_GEMMA_NORMS = {"attn_norm": "norm1", "post_attention_norm": "post_attn_norm", "ffn_norm": "norm2",
                    "post_ffw_norm": "post_mlp_norm"}  # gemma3: llama.cpp stores these gains whole (1 + weight)
GGUF_ROPE_FREQS = "rope_freqs.weight"  # llama 3.x: each RoPE pair's frequency divisor (llama3 scaling)

POOLING_TYPES = {"mean": "MEAN", "last": "LAST"}  # ownllm pooling -> gguf.PoolingType member ({arch}.pooling_type)


def interleave_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder each head's rows from the rotate-half layout (HF, ownllm) to llama.cpp's adjacent-pairs layout:
    [x0..x(h/2-1), y0..] -> [x0, y0, x1, y1..]."""
    head_size = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_size // 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def deinterleave_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of `interleave_rope_rows`: llama.cpp's adjacent-pairs rows back to the rotate-half layout."""
    head_size = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_size // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


# ---- run config ---------------------------------------------------------------------------------------------------

def template_section(tokenizer: Tokenizer) -> dict[str, str]:
    """{"template": "chatml"} when the model's own chat template is ChatML (so `ownllm chat` renders prompts the way
    the model was trained to read them), else nothing."""
    return {"template": "chatml"} if speaks_chatml(tokenizer.chat_template) else {}


__all__ = ["HF_LM_HEAD", "GENERATION_CONFIG_FILE", "TOKENIZER_CONFIG_FILE", "HF_GPT2_PREFIX", "HF_GPT2_GLOBAL",
           "HF_GPT2_NORMS", "HF_GPT2_CONV1D", "HF_LLAMA_PREFIX", "HF_LLAMA_GLOBAL", "HF_LLAMA_NORMS", "HF_LLAMA_QKV",
           "HF_LLAMA_ATTN_OUT", "HF_LLAMA_GATE_UP", "HF_LLAMA_DOWN", "HF_QK_NORMS", "HF_GEMMA_NORMS",
           "HF_GEMMA3_TEXT_PREFIXES", "HF_GEMMA3_VISION_PREFIXES", "GGUF_QK_NORMS", "GGUF_GEMMA_NORMS",
           "GGUF_ROPE_FREQS", "GGUF_GLOBAL", "GGUF_GPT2_LAYER",
           "GGUF_LLAMA_LAYER", "GGUF_LLAMA_FUSED", "POOLING_TYPES", "interleave_rope_rows", "deinterleave_rope_rows",
           "template_section"]
