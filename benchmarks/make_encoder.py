"""Write a randomly initialised BERT encoder of a given size, with MiniLM's tokenizer, to a folder.

The GPU benchmark uses it to find the largest encoder each ZeRO stage can train on one GPU without
a model hub: speed and memory depend on the shape, not on the weights.

    .venv/bin/python benchmarks/make_encoder.py OUT --hidden 1024 --layers 24
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_encoder(out: Path, hidden: int, layers: int) -> int:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from launcher.recipe.schema import resolve_encoder

    source = resolve_encoder("packaged:all-MiniLM-L6-v2")
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden)
    model = BertModel(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args()
    print(make_encoder(args.out, args.hidden, args.layers))
