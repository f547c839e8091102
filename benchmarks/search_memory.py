"""Peak memory of the search against the latent size: trajectory in memory vs offloaded / half precision.

A synthetic model with a video-shaped latent [C, F, H, W] (an analytic x0 prediction, so that the model
itself costs nothing) is searched in a fresh process per configuration. Peak anonymous resident memory
(RssAnon, polled) is what the search holds in RAM; a memory-mapped trajectory lives in the page cache
instead. The estimate is `optimalsteps.optimize.search.memory_estimate`, printed before a search starts.

Run: python benchmarks/search_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time

import torch


class VideoModel:
    """x0 = tanh(x) / 2: cheap, smooth, and every latent element matters."""

    process, prediction = "flow", "x0"

    def __init__(self, shape):
        self.sample_shape = shape

    def __call__(self, x, t):
        return torch.tanh(x) * 0.5


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _worker(shape, storage, dtype, teacher_steps, samples, queue):
    from optimalsteps import search
    from optimalsteps.optimize.options import Storage
    from optimalsteps.optimize.search import memory_estimate

    torch.set_num_threads(2)
    model = VideoModel(shape)
    noise = torch.randn((samples,) + shape, generator=torch.Generator().manual_seed(0))
    base = _rss_anon_mb()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        place = Storage(storage, dtype=dtype, dir=tmp, target_chunk=16, max_batch=64)
        result = search(model, noise, steps=5, teacher_steps=teacher_steps, storage=place, method="dp")
        seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    est = memory_estimate(noise, teacher_steps, "euler", storage=Storage(storage, dtype=dtype, target_chunk=16))
    queue.put((peak[0] - base, sum(est.values()) / 2**20, est["device"] / 2**20, seconds, result.indices))


def run(shape, storage, dtype, teacher_steps, samples):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(shape, storage, dtype, teacher_steps, samples, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    frames = [1, 4] if args.quick else [1, 4, 8, 16]
    teacher_steps, samples = (20, 2) if args.quick else (50, 2)
    print(f"synthetic video latent [16, F, 32, 32], B = {samples}, N = {teacher_steps}, M = 5, "
          "target chunk 16, max batch 64")
    print()
    print("| frames F | latent MB | trajectory | peak RSS (anon) MB | estimate in RAM / in total MB | seconds | "
          "same schedule |")
    print("|---|---|---|---|---|---|---|")
    for f in frames:
        shape = (16, f, 32, 32)
        latent_mb = 16 * f * 32 * 32 * 4 / 2**20
        base = None
        for storage, dtype in (("memory", None), ("memory", "bfloat16"), ("disk", None), ("disk", "bfloat16")):
            peak, total, device, seconds, indices = run(shape, storage, dtype, teacher_steps, samples)
            base = base or indices
            label = f"{storage}, {dtype or 'float32'}"
            print(f"| {f} | {latent_mb:.2f} | {label} | {peak:.0f} | {device:.0f} / {total:.0f} | {seconds:.1f} | "
                  f"{indices == base} |", flush=True)


if __name__ == "__main__":
    main()
