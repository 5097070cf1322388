"""Writes test models with Python's safetensors (the reference implementation).

make_model.py OUT single|sharded|big [SCALE]
  single:  one model.safetensors with odd shapes and dtypes (f32, f16, i8, bool, f64, i64, empty)
  sharded: three shards, model.safetensors.index.json and config.json
  big:     one file with a SCALE MiB u8 tensor (and a few small ones), for pulls that take a while
compare.py-style check: check_equal(A, B) loads every *.safetensors of two directories with
safetensors.numpy.load_file and compares the arrays.
"""
import sys, json, os, numpy as np
from safetensors.numpy import save_file
out = sys.argv[1]; kind = sys.argv[2]; scale = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] != "check" else 1
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(7)
def tensors(prefix, n):
    t = {}
    for i in range(n):
        t[f"{prefix}.{i}.w"] = rng.standard_normal((scale * 97 + i, 33)).astype(np.float32)
        t[f"{prefix}.{i}.h"] = rng.standard_normal((13, 7, 3)).astype(np.float16)
        t[f"{prefix}.{i}.q"] = rng.integers(-128, 127, size=(1001 * scale,), dtype=np.int8)
        t[f"{prefix}.{i}.b"] = rng.integers(0, 2, size=(3,)).astype(np.bool_)
        t[f"{prefix}.{i}.d"] = rng.standard_normal((5,)).astype(np.float64)
        t[f"{prefix}.{i}.l"] = rng.integers(0, 1 << 40, size=(17,), dtype=np.int64)
    t[f"{prefix}.empty"] = np.zeros((0, 4), dtype=np.float32)
    return t
if kind == "check":
    import glob
    other = sys.argv[3]
    files = sorted(os.path.basename(p) for p in glob.glob(f"{out}/*.safetensors"))
    assert files, "no safetensors files"
    from safetensors.numpy import load_file
    n = 0
    for f in files:
        a, b = load_file(f"{out}/{f}"), load_file(f"{other}/{f}")
        assert a.keys() == b.keys(), f
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert np.array_equal(a[k], b[k]), k
            n += 1
    print(f"equal {n} tensors")
    sys.exit(0)
if kind == "big":
    t = tensors("layer", 2)
    t["big"] = rng.integers(0, 256, size=(scale << 20,), dtype=np.uint8)
    save_file(t, f"{out}/model.safetensors")
elif kind == "single":
    save_file(tensors("layer", 4), f"{out}/model.safetensors", metadata={"format": "np"})
else:
    wm = {}
    for s in range(3):
        fn = f"model-{s+1:05d}-of-00003.safetensors"
        t = tensors(f"shard{s}", 3)
        save_file(t, f"{out}/{fn}")
        for k in t: wm[k] = fn
    json.dump({"metadata": {}, "weight_map": wm}, open(f"{out}/model.safetensors.index.json", "w"))
    open(f"{out}/config.json", "w").write('{"model_type": "test"}\n')
