"""The "longer RM input wins" rule on each seed's cached pairs, by mutant kind.

    PYTHONPATH=$PWD python notes/length_rule.py   # reads runs/data_s<seed>/data
"""

from collections import defaultdict
from pathlib import Path

import numpy as np

from codescaler_jax.data.pairs import read_pairs
from codescaler_jax.data.tokenizer import encode_rm_inputs, load_tokenizer

tok = load_tokenizer("qwen3")
for seed in (0, 1, 2):
    for split in ("validation", "eval"):
        path = Path(f"runs/data_s{seed}/data/{split}_pairs.jsonl")
        ps = read_pairs(path, max_record_bytes=1 << 40)[0]
        c = encode_rm_inputs(tok, [p.problem for p in ps], [p.chosen for p in ps], 512)
        r = encode_rm_inputs(tok, [p.problem for p in ps], [p.rejected for p in ps], 512)
        by, every = defaultdict(list), []
        for p, a, b in zip(ps, c, r):
            if a == b:
                continue  # identical after truncation: excluded, as the trainer does
            v = 1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
            by[p.kind].append(v)
            every.append(v)
        kinds = " ".join(f"{k[:6]}={np.mean(v):.2f}" for k, v in sorted(by.items()))
        print(seed, split, f"longer wins {np.mean(every):.3f} ({len(every)} pairs)", kinds)
