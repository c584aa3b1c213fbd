#!/usr/bin/env python3
"""Compare two safetensors files tensor by tensor, bit for bit.
    compare_tensors.py A.safetensors B.safetensors
Exits 1 if names, shapes, dtypes or bytes differ; prints a summary line."""
import sys

import numpy as np
from safetensors.numpy import load_file

a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
bad = 0
if sorted(a) != sorted(b):
    print("tensor names differ:", sorted(set(a) ^ set(b))[:10])
    sys.exit(1)
for name in sorted(a):
    x, y = a[name], b[name]
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
        bad += 1
        if bad <= 5:
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if x.shape == y.shape else None
            print(f"DIFF {name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)} max|d|={diff}")
print(f"{len(a)} tensors, {sum(v.size for v in a.values())} elements, {bad} differ")
sys.exit(1 if bad else 0)
