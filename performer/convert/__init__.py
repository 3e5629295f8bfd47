"""Pretrained weights into Performer Zoo models.

    from performer import convert
    model, tokenizer, cfg = convert.import_bert(dir, 'favor_softmax', num_features=256)
    model, tokenizer, cfg = convert.import_llama_gguf(path)            # llama.cpp GGUF
    model, tokenizer, cfg = convert.import_llama_safetensors(dir)      # HF Llama
    pre = convert.open_pretrained('gguf:PATH')    # what train.py's init_from=gguf:/hf: uses

Every importer has an explicit key map (`bert_keymap`, `llama_keymap`) and
fails with one ValueError listing missing keys, unused keys and shape
mismatches by name (`keymap.apply_keymap`). The attention kind is a
parameter: a softmax checkpoint loads unchanged into any Performer kind.
"""

from performer.convert.bert import bert_config, bert_keymap, import_bert
from performer.convert.keymap import Entry, apply_keymap, check_keymap, param_table
from performer.convert.llama import (
  config_from_gguf,
  config_from_hf,
  import_llama_gguf,
  import_llama_safetensors,
  llama_config,
  llama_from_tensors,
  llama_keymap,
  unpermute_rope,
)
from performer.convert.pretrained import (
  Pretrained,
  is_pretrained,
  load_pretrained,
  load_tokenizer,
  open_pretrained,
)
from performer.models import feature_map_params

__all__ = [
  'Entry',
  'Pretrained',
  'bert_config',
  'is_pretrained',
  'llama_config',
  'load_pretrained',
  'load_tokenizer',
  'open_pretrained',
  'apply_keymap',
  'bert_keymap',
  'check_keymap',
  'config_from_gguf',
  'config_from_hf',
  'feature_map_params',
  'import_bert',
  'import_llama_gguf',
  'import_llama_safetensors',
  'llama_from_tensors',
  'llama_keymap',
  'param_table',
  'unpermute_rope',
]
