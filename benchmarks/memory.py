"""Extraction memory against corpus size: peak RSS of each feature stage at several N.

The issue asks that memory stay flat with corpus size (clips streamed, never a whole split held in
memory). For every stage and every N, a fresh child process of this script

1. imports the pipeline and reads peak RSS (``after_imports``);
2. runs the stage's own ``extract(...)`` on 8 utterances (warm-up: model load, first-pass
   allocations) and reads peak RSS again (``after_warmup``);
3. runs ``extract(...)`` on N utterances (the demo's dialogues repeated with new ids, as
   ``benchmarks/extract.py`` does, fresh cache root) and reads peak RSS (``after_run``).

While step 3 runs, a thread samples the current resident size every 0.2 s; ``quarters`` is the
largest sample in each quarter of the run's duration: flat quarters mean the stage does not
accumulate memory as it goes, which the peak alone (one transient spike) does not show.

``growth`` = after_run - after_warmup: what N utterances add on top of a loaded model. Flat means
growth does not rise with N beyond the final feature table itself (N x D float32, listed as
``table_mb``: the stage writes one file, so it holds the finished features once at the end).
The slope between consecutive N is printed in MB per 1,000 utterances.

    python benchmarks/memory.py --sizes 115 500 2000 --visual-sizes 115 500 1000

Peak RSS is ``ru_maxrss`` (Linux: KiB), which only grows, hence one process per (stage, N).

``--resolutions 640x360 1920x1080 3840x2160`` measures the visual stage on one 8-frame utterance per
frame size instead (a 4 s clip made from a demo clip's frames scaled up, the demo's visual settings),
with ``visual.max_frame_side`` as params give it and, for comparison, with frames left at their
native size (``--max-sides 1280 0``: 0 = no bound): bounded frames make peak RSS independent of
the resolution.

    python benchmarks/memory.py --resolutions 640x360 1920x1080 3840x2160 --max-sides 1280 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_extract_benchmark():
    """``benchmarks/extract.py`` as a module: its input builder and timed stage runner are reused."""
    spec = importlib.util.spec_from_file_location("extract_benchmark", Path(__file__).with_name("extract.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def current_rss_mb() -> float:
    """Resident size of this process now (Linux ``/proc/self/statm``), MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    """Samples :func:`current_rss_mb` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter(), current_rss_mb()))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[float | None]:
        """Stop sampling; the largest sample in each quarter of the sampled time."""
        self._stop_event.set()
        self.join()
        t0, t1 = self.samples[0][0], self.samples[-1][0]
        span = max(t1 - t0, 1e-9)
        quarters: list[float | None] = [None] * 4  # None: no sample fell in it (a run under 0.8 s)
        for t, rss in self.samples:
            q = min(int(4 * (t - t0) / span), 3)
            quarters[q] = max(quarters[q] or 0.0, rss)
        return [None if x is None else round(x, 1) for x in quarters]


def child(stage: str, n: int, params_path: Path, warmup: int, trim: bool) -> dict:
    """Peak RSS of one stage on ``n`` utterances in this (fresh) process."""
    bench = load_extract_benchmark()
    if not trim:  # the comparison run: the visual stage without its periodic heap trim
        bench.visual_features.TRIM_EVERY = 10**12
    params = bench.load_params(params_path)
    utterances = bench.demo_utterances(params, n, repeat=True)
    rss = {"after_imports": bench.peak_rss_mb()}
    bench.run_pipeline(stage, utterances[:warmup], params, measure=False)
    rss["after_warmup"] = bench.peak_rss_mb()
    sampler = RssSampler()
    sampler.start()
    run = bench.run_pipeline(stage, utterances, params, measure=False)
    quarters = sampler.stop()
    rss["after_run"] = bench.peak_rss_mb()
    report = run["report"]
    dim = int(report["dim"])
    return {
        "stage": stage,
        "utterances": len(utterances),
        "seconds": round(run["seconds"], 2),
        "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_quarters_mb": quarters,
        "heap_trim": trim,
        "growth_mb": round(rss["after_run"] - rss["after_warmup"], 1),
        "feature_dim": dim,
        "table_mb": round(len(utterances) * dim * 4 / 2**20, 2),
        "reasons": report.get("reasons"),
        "frames": report["run"].get("frames"),
    }


def make_clip(path: Path, width: int, height: int, seconds: float = 4.0, fps: int = 4) -> Path:
    """A ``width`` x ``height`` mp4 (OpenCV's mp4v) from the frames of a demo clip with a face, scaled up."""
    import cv2

    capture = cv2.VideoCapture(str(REPO / "data/raw/demo/train_splits/dia0_utt0.mp4"))
    ok, frame = capture.read()
    capture.release()
    if not ok:
        raise RuntimeError("cannot read the demo clip data/raw/demo/train_splits/dia0_utt0.mp4")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    big = cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(seconds * fps)):
        writer.write(big)
    writer.release()
    return path


def resolution_child(clip: Path, max_side: int, params_path: Path) -> dict:
    """Peak RSS of the visual stage on one 8-frame utterance: the clip ``clip`` (made by :func:`make_clip`)."""
    import tempfile

    import cv2

    from pipeline.config import load_params
    from pipeline.utterances import Utterance
    from pipeline.visual_features import extract

    bench = load_extract_benchmark()
    params = load_params(params_path)
    bound = max_side or 10**6  # 0: no bound, frames stay at their native size
    params = params.model_copy(update={"visual": params.visual.model_copy(update={"max_frame_side": bound})})
    capture = cv2.VideoCapture(str(clip))
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    capture.release()
    with tempfile.TemporaryDirectory() as tmp:
        utterance = Utterance("test/dia0_utt0", "test", "test/0", 0, "A", "x", "", "", clip=str(clip))
        rss_before = bench.peak_rss_mb()
        report = extract([utterance], params, Path(tmp) / "features", Path(tmp) / "cache")
        rss_after = bench.peak_rss_mb()
    return {
        "resolution": f"{width}x{height}",
        "max_frame_side": max_side or None,
        "peak_rss_mb_before": round(rss_before, 1),
        "peak_rss_mb": round(rss_after, 1),
        "frames": report["run"]["frames"],
        "reasons": report["reasons"],
    }


def run_child(bench, stage: str, n: int, args: argparse.Namespace) -> dict:
    """One (stage, N) measurement in a fresh interpreter (``ru_maxrss`` only grows)."""
    argv = [
        "--only",
        stage,
        "--n",
        str(n),
        "--params",
        str(args.params),
        "--warmup",
        str(args.warmup),
        "--trim" if args.trim else "--no-trim",
    ]
    return bench.run_json_child(Path(__file__), argv, f"{stage}: {n} utterances")


def print_table(results: list[dict]) -> None:
    print(
        "| stage | N | seconds | peak RSS MB: after imports | after warm-up | after run | growth MB "
        "| RSS MB, max per quarter of the run | feature table MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["peak_rss_mb"]
        quarters = " ".join("-" if x is None else f"{x:.0f}" for x in r["rss_quarters_mb"])
        print(
            f"| {r['stage']} | {r['utterances']} | {r['seconds']} | {p['after_imports']:.0f} "
            f"| {p['after_warmup']:.0f} | {p['after_run']:.0f} | {r['growth_mb']:.1f} | {quarters} "
            f"| {r['table_mb']:.1f} |"
        )
    print()
    for stage in dict.fromkeys(r["stage"] for r in results):
        rows = sorted((r for r in results if r["stage"] == stage), key=lambda r: r["utterances"])
        for lo, hi in zip(rows, rows[1:]):
            slope = (
                (hi["peak_rss_mb"]["after_run"] - lo["peak_rss_mb"]["after_run"])
                / (hi["utterances"] - lo["utterances"])
                * 1000
            )
            print(
                f"{stage}: peak RSS {lo['peak_rss_mb']['after_run']:.0f} MB at N={lo['utterances']} -> "
                f"{hi['peak_rss_mb']['after_run']:.0f} MB at N={hi['utterances']}: {slope:+.1f} MB per 1,000 "
                "utterances"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--stages", nargs="+", choices=("text", "audio", "visual"), default=["text", "audio", "visual"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[115, 500, 2000], help="N for text and audio")
    parser.add_argument("--visual-sizes", nargs="+", type=int, default=[115, 500, 1000], help="N for visual")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up utterances before the measured run")
    parser.add_argument(
        "--trim",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-trim: the visual stage without its periodic heap trim (for comparison)",
    )
    parser.add_argument("--resolutions", nargs="+", help="visual stage on one utterance per WxH frame size")
    parser.add_argument(
        "--max-sides",
        nargs="+",
        type=int,
        default=[1280, 0],
        help="visual.max_frame_side values for --resolutions (0 = frames at native size)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--res", help=argparse.SUPPRESS)  # child mode of --resolutions
    parser.add_argument("--max-side", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.params = args.params.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DGLBACKEND", "pytorch")
    os.chdir(REPO)
    if args.res:
        Path(args.child_out).write_text(json.dumps(resolution_child(Path(args.res), args.max_side, args.params)))
        return
    if args.only:
        figures = child(args.only, args.n, args.params, args.warmup, args.trim)
        Path(args.child_out).write_text(json.dumps(figures, default=str))
        return
    start = time.perf_counter()
    bench = load_extract_benchmark()
    if args.resolutions:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the clips are made here, outside the measured children
            clips = {res: make_clip(Path(tmp) / f"{res}.mp4", *map(int, res.split("x"))) for res in args.resolutions}
            rows = [
                bench.run_json_child(
                    Path(__file__),
                    ["--res", str(clips[res]), "--max-side", str(side), "--params", str(args.params)],
                    f"visual: {res}, max side {side or 'none'}",
                )
                for side in args.max_sides
                for res in args.resolutions
            ]
        print(
            f"\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s\n"
        )
        print(
            "| frame size | visual.max_frame_side | frames | peak RSS MB (after imports) "
            "| peak RSS MB (after the stage) |"
        )
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['resolution']} | {r['max_frame_side'] or 'none (native)'} | {r['frames']} "
                f"| {r['peak_rss_mb_before']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
        return
    results = [
        run_child(bench, stage, n, args)
        for stage in args.stages
        for n in (args.visual_sizes if stage == "visual" else args.sizes)
    ]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s\n")
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "results": results},
                indent=2,
                default=str,
            )
            + "\n"
        )
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
