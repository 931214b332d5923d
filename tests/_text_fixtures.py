"""Builds a tiny SD3-layout text-encoder root offline (shared by test_text_encoders.py and test_precompute_text.py).

Layout, as a diffusers SD3/SD3.5 checkpoint: text_encoder/ (CLIP-L-like, quick_gelu, legacy eos_token_id 2),
text_encoder_2/ (CLIP-G-like, gelu, real eos_token_id), text_encoder_3/ (T5 v1.1-like, gated-gelu, inner dim != d_model),
tokenizer/ + tokenizer_2/ (a CLIP BPE from a hand-written vocab.json/merges.txt; tokenizer_2 pads with "!" as SD3's
CLIP-G tokenizer does) and tokenizer_3/ (a T5 tokenizer from a sentencepiece model trained here on a few sentences).
All parameters are random (1-D ones perturbed too so that a wrongly mapped norm or bias cannot pass).
"""
from __future__ import annotations

import json
import os

import numpy as np

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!'")
MERGES = ["t h", "th e</w>", "a r</w>", "c ar</w>", "r o", "ro a", "roa d</w>", "i n", "in g</w>", "o n</w>"]
SENTENCES = [
    "a car drives on the road in the rain.",
    "daytime, sunny, city street with pedestrians.",
    "night, cloudy, highway with trucks and cars.",
    "a bus turns left at the intersection near a parking lot.",
]


def _perturb(model, seed: int) -> None:
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _clip_vocab(folder: str) -> None:
  vocab = {}
  for c in CHARS:
    vocab[c] = len(vocab)
  for c in CHARS:
    vocab[c + "</w>"] = len(vocab)
  for m in MERGES:
    vocab[m.replace(" ", "")] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def build_tiny_sd3_root(root: str, *, t5_d_model: int = 192) -> dict:
  """Writes the tiny root; returns the torch models and transformers tokenizers it saved (for reference runs)."""
  import sentencepiece as spm
  import torch
  from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                            T5Tokenizer)

  src = os.path.join(root, "_src")
  _clip_vocab(os.path.join(src, "clip"))
  tok_l = CLIPTokenizer(vocab=os.path.join(src, "clip", "vocab.json"), merges=os.path.join(src, "clip", "merges.txt"),
                        model_max_length=77)
  tok_g = CLIPTokenizer(vocab=os.path.join(src, "clip", "vocab.json"), merges=os.path.join(src, "clip", "merges.txt"),
                        model_max_length=77, pad_token="!")
  tok_l.save_pretrained(os.path.join(root, "tokenizer"))
  tok_g.save_pretrained(os.path.join(root, "tokenizer_2"))
  eos = tok_l.convert_tokens_to_ids("<|endoftext|>")
  clip_vocab = len(tok_l)

  os.makedirs(os.path.join(src, "t5"), exist_ok=True)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 10), model_prefix=os.path.join(src, "t5", "spiece"),
                                 vocab_size=48, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 minloglevel=2)
  tok_t5 = T5Tokenizer.from_pretrained(os.path.join(src, "t5"), local_files_only=True)
  tok_t5.save_pretrained(os.path.join(root, "tokenizer_3"))

  torch.manual_seed(0)
  clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=clip_vocab, hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
      pad_token_id=1)).eval()
  clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=clip_vocab, hidden_size=96, intermediate_size=192, projection_dim=48, num_hidden_layers=3,
      num_attention_heads=6, max_position_embeddings=77, hidden_act="gelu", bos_token_id=eos - 1, eos_token_id=eos,
      pad_token_id=1)).eval()
  t5 = T5EncoderModel(T5Config(
      vocab_size=len(tok_t5), d_model=t5_d_model, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
      relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
      is_encoder_decoder=False, use_cache=False)).eval()
  for i, m in enumerate((clip_l, clip_g, t5)):
    _perturb(m, i)
  clip_l.save_pretrained(os.path.join(root, "text_encoder"))
  clip_g.save_pretrained(os.path.join(root, "text_encoder_2"))
  t5.save_pretrained(os.path.join(root, "text_encoder_3"))
  return {"clip_l": clip_l, "clip_g": clip_g, "t5": t5, "tokenizer": tok_l, "tokenizer_2": tok_g,
          "tokenizer_3": tok_t5}


def max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
