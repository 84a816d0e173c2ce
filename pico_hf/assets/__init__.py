"""Offline assets shipped inside the pico-hf package.

Everything here lets a machine without Hub access tokenize and train:

- `TOKENIZER_DIR`: the OLMo GPT-NeoX tokenizer (`allenai/OLMo-7B-0724-hf`, 50,280 tokens, eos
  `<|endoftext|>` = 50279, pad `<|padding|>` = 1) as a transformers tokenizer directory.
- `CORPUS_DIR`: a small real-English pretokenized corpus in the layouts of `pico-lm/pretokenized-dolma`
  (`train/`, rows of exactly 2049 token ids) and `pico-lm/pretokenized-paloma` (`validation/`, one
  document per row with `input_ids`, `text`, `source`).

Sources, licences and token counts are in `corpus/NOTICE` and `tokenizer/NOTICE`; both folders are
rebuilt by `tools/build_embedded_corpus.py`.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
CORPUS_DIR = ASSETS_DIR / "corpus"
