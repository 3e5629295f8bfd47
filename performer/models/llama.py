"""The Llama family (SmolLM2, Llama 2/3, ...): our `Transformer` with RMSNorm,
SwiGLU, rotary positions with the checkpoint's base, no biases and grouped-query
attention, whatever attention kind the config names.

Because the family is a configuration of the same class, an imported Llama
trains, evaluates, distils and decodes (KV cache of its kv heads for softmax,
constant-size recurrent state for linear kinds) through the zoo's own paths.
The importer (HF safetensors or llama.cpp GGUF) is `performer.convert.llama`.
"""

from performer.models.transformer import Transformer

# What makes a model a Llama, whatever the config says; sizes come from the config.
FIXED = dict(
  task='causal_lm', norm='rms', mlp='swiglu', use_bias=False, positions='rotary',
  embed_init_std=0.02,
)  # fmt: skip
DEFAULTS = dict(norm_eps=1e-5)
Model = Transformer
