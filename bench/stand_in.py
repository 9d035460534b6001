"""A random-weight stand-in of a model folder: the same config and tokenizer, weights drawn at random.

For a machine the real weights cannot reach (a lent GPU takes 64 MiB of files per call; SmolLM2's
weights are 513 MiB). Throughput and memory depend on the shapes, not on the values; quality
numbers from a stand-in mean nothing. Its iterabre_source.json says `stand_in`, and
bench/recovery.py copies that into its result so the docs say it.

    python3 bench/stand_in.py SRC DEST     # SRC: a folder with config.json and the tokenizer files
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(src: str, dest: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iterabre.models import save_model
    from iterabre.paths import SOURCE_FILE
    from iterabre.planner import read_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(read_config(Path(src) / "config.json"), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    note = f"random weights with the shapes of {Path(src).name} (the real weights could not travel here)"
    save_model(model, tokenizer, dest, extra={SOURCE_FILE: {"name": Path(dest).name, "stand_in": note}})
    print(f"wrote {dest}: {note}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: stand_in.py SRC DEST (SRC: config.json and tokenizer files)")
    main(*sys.argv[1:])
