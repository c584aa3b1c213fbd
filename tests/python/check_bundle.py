#!/usr/bin/env python3
"""An external client for mcompress bundles: Python's safetensors + numpy, nothing of ours.

    check_bundle.py BUNDLE_DIR ORIGINAL.safetensors DEQUANTIZED.safetensors

Reads config.json's quantization_config, unpacks every quantized matrix per
docs/quantized-layout.md, dequantizes it with numpy, and checks that:
  1. the result equals mcompress's own dequantization (DEQUANTIZED, from `mcompress dequantize`)
     bit for bit;
  2. its relative RMSE against the ORIGINAL weights matches report.json's figure;
  3. every other tensor of the bundle matches DEQUANTIZED exactly.
Exits 1 on any mismatch and prints one line per matrix.
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def unpack_stream(words, bits, n):
    """Codes 0..n-1 of each row of int32 words packed densely (compressed-tensors' pack_to_int32:
    code c at bits c*bits.. of the row's little-endian bit stream), unsigned."""
    u = words.astype("<i4").view(np.uint8)  # [rows, 4 * words], little-endian bytes
    bitsarr = np.unpackbits(u, axis=1, bitorder="little")[:, : n * bits].reshape(u.shape[0], n, bits)
    weights = (1 << np.arange(bits, dtype=np.int64))[None, None, :]
    return (bitsarr.astype(np.int64) * weights).sum(axis=2).astype(np.int32)


def unpack_rows(packed, bits, cols):
    """int32 [rows, ceil(cols*bits/32)] -> signed codes [rows, cols]."""
    return unpack_stream(packed, bits, cols) - (1 << (bits - 1))


def unpack_zero_point(zp, bits, rows):
    """int32 [ceil(rows*bits/32), groups], packed along dim 0 -> signed [rows, groups]."""
    return unpack_stream(np.ascontiguousarray(zp.T), bits, rows).T - (1 << (bits - 1))


def main(bundle, original, dequantized):
    tensors = load_file(os.path.join(bundle, "model.safetensors"))
    orig = load_file(original)
    ours = load_file(dequantized)
    config = json.load(open(os.path.join(bundle, "config.json")))
    report = json.load(open(os.path.join(bundle, "report.json")))
    reported = {t["name"]: t["rel_rmse"] for p in report["passes"] if p["type"].startswith("quantize") for t in p["tensors"]}
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors", qc["quant_method"]
    failures, seen = 0, set()
    for group in qc["config_groups"].values():
        w = group["weights"]
        bits, gs, sym = w["num_bits"], w["group_size"], w["symmetric"]
        for module in group["targets"]:
            name = module + ".weight"
            shape = [int(d) for d in tensors[name + "_shape"]]
            rows, cols = shape[0], int(np.prod(shape[1:]))
            codes = unpack_rows(tensors[name + "_packed"], bits, cols)
            scale = tensors[name + "_scale"].astype(np.float32)
            groups = scale.shape[1]
            glen = cols if gs is None else gs
            gidx = np.arange(cols) // glen
            assert gidx.max() == groups - 1, (name, groups)
            zp = np.zeros((rows, groups), np.int32) if sym else unpack_zero_point(tensors[name + "_zero_point"], bits, rows)
            deq = ((codes - zp[:, gidx]).astype(np.float32) * scale[:, gidx]).reshape(shape)
            same = np.array_equal(deq.view(np.uint32), ours[name].astype(np.float32).view(np.uint32))
            ref = orig[name].astype(np.float64)
            rel = float(np.sqrt(((ref - deq) ** 2).sum() / (ref**2).sum()))
            rel_ok = abs(rel - reported[name]) <= 1e-4 * max(reported[name], 1e-6) + 1e-9
            ok = same and rel_ok
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {name} int{bits} g{gs} {'sym' if sym else 'asym'} rel_rmse {rel:.6g} (report {reported[name]:.6g}) identical={same}")
            seen.update(name + s for s in ("_packed", "_scale", "_zero_point", "_shape"))
    for name, t in tensors.items():
        if name in seen:
            continue
        if not np.array_equal(t, ours[name]):
            failures += 1
            print(f"BAD {name}: differs from the dequantized file")
    print(f"{len(reported)} quantized matrices, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
