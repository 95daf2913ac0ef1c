"""Peak memory and time of `wsvd compress --stream` on random-weight bf16 checkpoints of real shapes (not CI).

    python examples/stream_benchmark.py --shape tinyllama-1.1b --dir /tmp/tinyllama-random --json stream.json
    python examples/stream_benchmark.py --shape llama-2-7b --dir /tmp/llama7b-random    # 13.5 GB of disk
    python examples/stream_benchmark.py --shape llama-2-7b --layers 2 --dir /tmp/llama7b-2    # the 7B layer shape, 2 layers

Writes the checkpoint once (one shard per layer, never more than a layer in memory), then runs the
compression in a child process and reports its peak RSS (getrusage of the child), CPU seconds, wall
time and wall seconds per layer, beside the checkpoint's bf16 and float32 sizes. ``--layers N`` keeps the shape's
widths with N decoder layers: runs of two depths give the cost of one more layer (their difference), the streamed
peak RSS does not grow with depth (``pytest -m slow tests/test_stream.py -k depth``).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wsvd_passes.models.random_checkpoint import SHAPES, write_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--dir", required=True, help="checkpoint directory (written when it has no config.json)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    parser.add_argument("--recipe", default="wsvd-noq")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    hidden, intermediate, layers, heads, kv_heads = SHAPES[args.shape]
    if args.layers is not None:
        if args.layers < 1:
            sys.exit(f"error: --layers must be at least 1, not {args.layers}")
        layers = args.layers
    path = Path(args.dir)
    if (path / "config.json").is_file():
        written = json.loads((path / "config.json").read_text())["num_hidden_layers"]
        if written != layers:
            sys.exit(f"error: {path} holds a checkpoint of {written} layers, not {layers}: give another --dir")
    else:
        write_random_checkpoint(path, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                                kv_heads=kv_heads)
    size = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "wsvd_passes.cli", "compress", "--stream", "--model", str(path),
                   "--recipe", args.recipe, "--rho1", "0.5", "--calib-windows", str(args.calib_windows),
                   "--seq-len", str(args.seq_len), "--out", out]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"shape": args.shape, "layers": layers, "hidden": hidden, "recipe": args.recipe,
              "calib_windows": args.calib_windows, "seq_len": args.seq_len,
              "checkpoint_bf16_gib": size / 2**30, "float32_model_gib": 2 * size / 2**30,
              "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30, "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "wall_seconds": wall, "wall_seconds_per_layer": wall / layers}
    print(f"{args.shape} ({layers} layers, bf16 {result['checkpoint_bf16_gib']:.2f} GiB, float32 "
          f"{result['float32_model_gib']:.2f} GiB): peak RSS {result['peak_rss_gib']:.2f} GiB, "
          f"{wall:.0f} s wall ({result['wall_seconds_per_layer']:.1f} s/layer), {result['cpu_seconds']:.0f} CPU s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
