"""Extraction speed: each feature stage against a bare model loop on the same inputs, same process.

For every stage (text, audio, visual) a child process of this script

1. warms up (the stage on a few utterances, untimed: imports, thread pools, kernel caches);
2. runs the stage's own ``extract(...)`` on N utterances into a temporary features folder and a
   FRESH temporary cache root (nothing is resumed), timed wall-clock; the loader call inside it is
   timed too (``load`` below), so throughput is given with and without the one-off model load, and
   so are the stage's decoding, model, cache and output calls (where the time goes);
3. loads a fresh copy of the same model through the same :mod:`pipeline.encoders` loader (untimed),
   pre-decodes the inputs (untimed) and times a bare loop that only calls the model on them one
   batch at a time, with the stage's batch size, under ``torch.inference_mode()``;
4. with ``--rounds R``, alternates 2 and 3 R times.

ratio = pipeline utt/s / bare utt/s over the same N utterances (= bare seconds / pipeline seconds),
per round; the figure is the median over the R rounds (paired rounds cancel the drift of a shared
machine's speed). Throughputs are the best round of each side.
Targets (issue): text and audio ratio >= 0.8 (the audio pipeline decodes and resamples, the bare loop
reads pre-decoded 16 kHz arrays); visual: decoding at most a third of the stage's time.

Peak RSS is per stage because each stage runs in its own process (ru_maxrss only grows).

    python benchmarks/extract.py --utterances 500 --visual-utterances 100 --rounds 2 --json /tmp/extract.json

The demo profile's audio and visual encoders are randomly initialised (no weights offline); their
speed is that of the architecture. ``--audio-config base`` times a random wav2vec2 of
wav2vec2-base's size instead (``demo base`` times both).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline import audio_features, extraction_cache, text_features, visual_features  # noqa: E402
from pipeline.config import Params, load_params, parse_params  # noqa: E402
from pipeline.encoders import autocast_dtype, default_device  # noqa: E402
from pipeline.extraction_cache import ExtractionCache  # noqa: E402
from pipeline.media import MediaError, load_audio, sample_frames  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402
from pipeline.utterances import Utterance  # noqa: E402

STAGES = ("text", "audio", "visual")
TARGET_RATIO = 0.8
MAX_DECODE_SHARE = 1 / 3
BACKGROUND = "(background thread, overlapped)"

# wav2vec2-base's architecture (Baevski et al. 2020; facebook/wav2vec2-base's config.json), built with
# random weights: the audio figure then reflects the real model's cost without downloading it.
WAV2VEC2_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "feat_extract_norm": "group",
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
}


# ---------------------------------------------------------------------------------------------
# inputs


def demo_utterances(params: Params, n: int, repeat: bool) -> list[Utterance]:
    """``n`` utterances of the dataset ``params.data`` names (the demo: 115).

    With ``repeat``, whole dialogues are repeated in order until there are ``n``; copy ``k`` gets
    utterance and dialogue ids prefixed ``rep<k>/`` (unique ids, same text and media files).
    Without it, at most the dataset's own utterances are returned.
    """
    base, _, _ = prepare(params)
    if not repeat:
        return base[:n]
    out: list[Utterance] = []
    copy = 0
    while len(out) < n:
        out += [
            dataclasses.replace(u, utterance_id=f"rep{copy}/{u.utterance_id}", dialogue_id=f"rep{copy}/{u.dialogue_id}")
            for u in base
        ]
        copy += 1
    return out[:n]


def with_audio_config(params: Params, config: str) -> Params:
    """``params`` unchanged (``demo``), or with ``audio.random_init`` set to wav2vec2-base's size (``base``)."""
    if config == "demo":
        return params
    raw = params.model_dump(mode="json")
    raw["audio"]["random_init"] = dict(WAV2VEC2_BASE)
    return parse_params(raw)


def decoded_once(key_fn, decode_fn):
    """Memoise decoding by media key: repeated utterances share one decoded copy (memory stays small)."""
    cache: dict = {}

    def get(utt: Utterance):
        key = key_fn(utt)
        if key not in cache:
            try:
                cache[key] = decode_fn(utt)
            except MediaError:
                cache[key] = None
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------
# timing helpers


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """Times calls to named functions while active, as exclusive ("self") seconds per name.

    Nested timed calls are subtracted from their caller, so the main thread's buckets add up to at
    most the wall time; the remainder is the stage's own loop (iteration, tqdm, bookkeeping). Calls
    made in the stage's background decoding thread go to their own buckets, outside that sum. Used to say where the
    pipeline's time goes; the wrappers cost a few microseconds per call.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._local = threading.local()  # .stack per thread: per open call, seconds in nested timed calls
        self._lock = threading.Lock()
        self._patches = contextlib.ExitStack()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - t0
                nested = stack.pop()
                if stack:
                    stack[-1] += total
                # calls from the stage's decoding thread overlap the main thread's: a separate bucket
                bucket = name if threading.current_thread() is threading.main_thread() else f"{name} {BACKGROUND}"
                with self._lock:
                    self.seconds[bucket] = self.seconds.get(bucket, 0.0) + total - nested
                    self.calls[bucket] = self.calls.get(bucket, 0) + 1

        return timed

    def patch(self, owner, attr: str, name: str | None = None, static: bool = False) -> None:
        """Replace ``owner.attr`` by a timed wrapper until :meth:`close` (nothing if it has no such attribute)."""
        if not hasattr(owner, attr):
            logging.getLogger(__name__).warning("not timed: %s has no %s", getattr(owner, "__name__", owner), attr)
            return
        original = owner.__dict__[attr] if static else getattr(owner, attr)
        fn = original.__func__ if static else original
        wrapped = staticmethod(self.wrap(name or attr, fn)) if static else self.wrap(name or attr, fn)
        setattr(owner, attr, wrapped)
        self._patches.callback(setattr, owner, attr, original)

    def close(self) -> None:
        self._patches.close()


# Per stage: the module with the stage's ``extract`` (pipeline.<modality>_features; the stage module
# pipeline.extract_<modality> only adds the command line and the modality guard), its loader's name in that
# module, and the functions it calls whose time is worth separating (name in that module -> bucket).
STAGE_MODULES = {"text": text_features, "audio": audio_features, "visual": visual_features}
LOADERS = {"text": "load_text_encoder", "audio": "load_audio_backend", "visual": "load_face_models"}
CALLS = {
    "text": {"encode_texts": "model (tokenize+forward+pool)"},
    "audio": {
        "load_audio": "decode+resample",
        "encode_waves": "model (extractor+forward+pool)",
        "min_input_samples": "min_input_samples",
    },
    "visual": {"sample_frames": "decode", "embed_clips": "model (detect+track+embed)"},
}


def instrument(stage: str) -> Stopwatch:
    """A :class:`Stopwatch` on the stage's loader, model calls, decoding, cache and output writing."""
    watch = Stopwatch()
    module = STAGE_MODULES[stage]
    watch.patch(module, LOADERS[stage], "load")
    for attr, bucket in CALLS[stage].items():
        watch.patch(module, attr, bucket)
    watch.patch(module, "finish_extraction", "write features+report")
    watch.patch(extraction_cache, "file_signature", "file stat")
    for method in ("__init__", "put", "table"):
        watch.patch(ExtractionCache, method, f"cache {method.strip('_')}")
    watch.patch(ExtractionCache, "flush", "cache shard writes")
    watch.patch(ExtractionCache, "signature", "cache signatures", static=True)
    return watch


def run_pipeline(stage: str, utterances: list[Utterance], params: Params, measure: bool) -> dict:
    """The stage's ``extract`` into temporary folders (fresh cache root), wall-clock timed.

    Returns:
        ``seconds``, ``load_seconds`` (the loader call inside this run), the per-bucket
        ``breakdown`` (with ``measure``) and the stage ``report``.
    """
    watch = instrument(stage)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-features-") as features,
            tempfile.TemporaryDirectory(prefix="bench-cache-") as cache,
        ):
            device = default_device()
            sync(device)
            t0 = time.perf_counter()
            report = STAGE_MODULES[stage].extract(utterances, params, Path(features), Path(cache))
            sync(device)
            seconds = time.perf_counter() - t0
    finally:
        watch.close()
    out = {"seconds": seconds, "load_seconds": watch.seconds.get("load", 0.0), "report": report}
    if measure:
        breakdown = {k: round(v, 3) for k, v in sorted(watch.seconds.items(), key=lambda kv: -kv[1])}
        main = sum(v for k, v in watch.seconds.items() if not k.endswith(BACKGROUND))
        breakdown["rest (loop, tqdm, bookkeeping)"] = round(seconds - main, 3)
        out["breakdown"] = breakdown
        out["calls"] = watch.calls
    return out


# ---------------------------------------------------------------------------------------------
# bare model loops: load (untimed), pre-decode (untimed), then time only the model calls


def bare_text(utterances: list[Utterance], params: Params, device: torch.device):
    """Tokenizer + forward in length-sorted batches of ``text.batch_size`` (the utterance text only).

    Returns the timed loop (a function returning its figures); loading and input preparation happen here.
    """
    from pipeline.encoders import load_text_encoder

    settings = params.text
    tokenizer, model, _ = load_text_encoder(settings.model, device, settings.revision)
    texts = sorted((u.text for u in utterances if u.text.strip()), key=len)
    max_length = min(settings.max_length, tokenizer.model_max_length)
    dtype = autocast_dtype(settings.cuda_dtype, device)

    def timed() -> dict:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for s in range(0, len(texts), settings.batch_size):
                batch = tokenizer(
                    texts[s : s + settings.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                model(**batch).last_hidden_state.mean(1).float().cpu()
        sync(device)
        return {
            "seconds": time.perf_counter() - t0,
            "inputs": len(texts),
            "batches": -(-len(texts) // settings.batch_size),
        }

    return timed


def bare_audio(utterances: list[Utterance], params: Params, device: torch.device):
    """Feature extractor + forward on pre-decoded 16 kHz arrays, batched like the pipeline.

    The pipeline's rule: batch 1 for group-norm feature encoders (wav2vec2-base and the demo's), else
    ``audio.batch_size``; utterances longer than ``audio.chunk_seconds`` are cut into chunks.
    """
    from pipeline.encoders import load_audio_backend

    settings = params.audio
    extractor, model, _ = load_audio_backend(settings, device)
    batch_size = 1 if getattr(model.config, "feat_extract_norm", "layer") == "group" else settings.batch_size
    min_samples = audio_features.min_input_samples(model)
    decode = decoded_once(
        lambda u: (u.audio_source, u.start, u.end),
        lambda u: load_audio(u.audio_source, settings.sample_rate, settings.max_seconds, u.start, u.end),
    )
    chunk = int(settings.chunk_seconds * settings.sample_rate)
    waves = [w for u in utterances if u.audio_source and (w := decode(u)) is not None and w.numel() >= min_samples]
    chunks = [c.numpy() for w in waves for c in w.split(chunk)]
    dtype = autocast_dtype(settings.cuda_dtype, device)

    def timed() -> dict:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for s in range(0, len(chunks), batch_size):
                inputs = extractor(
                    chunks[s : s + batch_size],
                    sampling_rate=settings.sample_rate,
                    padding=True,
                    return_attention_mask=True,
                    return_tensors="pt",
                )
                model(
                    inputs["input_values"].to(device), attention_mask=inputs["attention_mask"].to(device)
                ).last_hidden_state.mean(1).float().cpu()
        sync(device)
        return {
            "seconds": time.perf_counter() - t0,
            "inputs": len(waves),
            "batches": -(-len(chunks) // batch_size),
            "audio_seconds": round(sum(w.numel() for w in waves) / settings.sample_rate, 1),
        }

    return timed


def bare_visual(utterances: list[Utterance], params: Params, device: torch.device):
    """MTCNN detect + extract + InceptionResnetV1 on pre-decoded frames, batched as the pipeline batches.

    Per group of ``visual.clips_per_batch`` clips: detection on batches of ``visual.batch_frames`` frames
    of one size, the first (largest) face at or above ``visual.min_face_prob`` in each frame, its crop,
    embeddings of the group's crops in batches of ``batch_frames``.
    """
    from pipeline.encoders import load_face_models

    settings = params.visual
    mtcnn, embedder, _ = load_face_models(settings.face_weights, settings.min_face_prob, device)
    decode = decoded_once(
        lambda u: (u.clip, u.start, u.end),
        lambda u: sample_frames(u.clip, settings.fps, settings.max_frames, u.start, u.end, settings.max_frame_side),
    )
    clips = [f for u in utterances if u.clip and (f := decode(u)) is not None]
    step, per_group = settings.batch_frames, settings.clips_per_batch

    def group_faces(group: list) -> tuple[list, list]:
        """Detection in batches of ``step`` frames of one size; per frame the first (largest) confident box."""
        by_size: dict[tuple, list] = {}
        for frame in (f for clip in group for f in clip):
            by_size.setdefault(frame.shape, []).append(frame)
        keep_frames, keep_boxes = [], []
        for frames in by_size.values():
            for s in range(0, len(frames), step):
                boxes, probs = mtcnn.detect(frames[s : s + step])
                for frame, b, p in zip(frames[s : s + step], boxes, probs):
                    good = [k for k in range(len(p)) if p[k] is not None and p[k] >= settings.min_face_prob]
                    if b is not None and good:
                        keep_frames.append(frame)
                        keep_boxes.append(b[good[:1]])
        return keep_frames, keep_boxes

    def timed() -> dict:
        detect_s = embed_s = 0.0
        frames = tracked = 0
        with torch.inference_mode():
            for g in range(0, len(clips), per_group):
                group = clips[g : g + per_group]
                t0 = time.perf_counter()
                keep_frames, keep_boxes = group_faces(group)
                crops = mtcnn.extract(keep_frames, keep_boxes, None) if keep_frames else []
                t1 = time.perf_counter()
                if keep_frames:
                    crops = torch.cat(list(crops))
                    for s in range(0, len(crops), step):
                        embedder(crops[s : s + step].to(device)).float().cpu()
                sync(device)
                detect_s += t1 - t0
                embed_s += time.perf_counter() - t1
                frames += sum(len(clip) for clip in group)
                tracked += len(keep_frames)
        return {
            "seconds": detect_s + embed_s,
            "inputs": len(clips),
            "frames": frames,
            "frames_tracked": tracked,
            "detect_seconds": detect_s,
            "embed_seconds": embed_s,
            "detect_frames_per_second": frames / detect_s if detect_s else None,
            "embed_frames_per_second": tracked / embed_s if embed_s else None,
        }

    return timed


BARE = {"text": bare_text, "audio": bare_audio, "visual": bare_visual}


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# one stage (child process)


def best(runs: list[dict]) -> dict:
    """The fastest of several timed runs (the least disturbed by other work on the machine)."""
    return min(runs, key=lambda r: r["seconds"])


def measure_stage(stage: str, params: Params, n: int, repeat: bool, warmup: int, rounds: int) -> dict:
    """Warm-up, then ``rounds`` x (timed pipeline run, timed bare loop), alternating; figures for one stage.

    Throughputs are the best round of each side; every round's seconds are kept in ``seconds_rounds``.
    The ratio is the median over rounds of each round's ratio (its pipeline run and the bare loop right
    after it): paired rounds cancel the slow drifts of a shared machine's speed, which the ratio of
    the two best rounds does not (that one is kept as ``ratio_best_of_each``).
    Each round's bare loop gets a freshly loaded model (untimed), as each pipeline run loads its own.
    Peak RSS ``pipeline`` is read after the first pipeline run, before the bare loop loads its model.
    """
    device = default_device()
    utterances = demo_utterances(params, n, repeat)
    rss_start = peak_rss_mb()
    if warmup:
        run_pipeline(stage, utterances[:warmup], params, measure=False)
    reset_cuda_peak(device)
    pipe_runs, bare_runs = [run_pipeline(stage, utterances, params, measure=True)], []
    pipe_cuda = cuda_peak_mb(device)
    rss_pipeline = peak_rss_mb()
    reset_cuda_peak(device)
    for r in range(rounds):
        if r:
            pipe_runs.append(run_pipeline(stage, utterances, params, measure=True))
        # a fresh model each round, as each pipeline run loads its own: the first passes through a new
        # instance are slower, and the bare loop must not gain from a model warmed by earlier rounds
        bare_loop = BARE[stage](utterances, params, device)  # load + pre-decode, untimed
        bare_runs.append(bare_loop())
        del bare_loop
    bare_cuda = cuda_peak_mb(device)
    pipe, bare = dict(best(pipe_runs)), dict(best(bare_runs))
    n = len(utterances)
    rate = n / pipe["seconds"]
    rate_no_load = n / (pipe["seconds"] - pipe["load_seconds"])
    bare_rate = n / bare["seconds"]
    ratios = [b["seconds"] / (p["seconds"] - p["load_seconds"]) for p, b in zip(pipe_runs, bare_runs)]
    report = pipe.pop("report")
    out = {
        "stage": stage,
        "device": str(device),
        "utterances": n,
        "rounds": rounds,
        "encoder": report["encoder"],
        "pipeline": {
            **pipe,
            "utterances_per_second": rate,
            "utterances_per_second_excluding_load": rate_no_load,
            "reasons": report["reasons"],
            "seconds_rounds": [round(x["seconds"], 3) for x in pipe_runs],
        },
        "bare": {
            **bare,
            "utterances_per_second": bare_rate,
            "seconds_rounds": [round(x["seconds"], 3) for x in bare_runs],
        },
        "ratio": statistics.median(b["seconds"] / p["seconds"] for p, b in zip(pipe_runs, bare_runs)),
        "ratio_excluding_load": statistics.median(ratios),
        "ratio_excluding_load_rounds": [round(x, 3) for x in ratios],
        "ratio_best_of_each": rate / bare_rate,
        "ratio_excluding_load_best_of_each": rate_no_load / bare_rate,
        "peak_rss_mb": {"after_imports": rss_start, "pipeline": rss_pipeline, "with_bare_loop": peak_rss_mb()},
        "cuda_max_allocated_mb": {"pipeline": pipe_cuda, "bare": bare_cuda},
    }
    run_facts = report["run"]  # timings and counts of the run: returned and logged, not in the report file
    if stage == "visual":
        work = pipe["seconds"] - pipe["load_seconds"]
        out["visual"] = {
            k: run_facts.get(k)
            for k in (
                "frames",
                "frames_tracked",
                "decode_seconds",
                "detect_seconds",
                "embed_seconds",
                "detect_frames_per_second",
                "embed_frames_per_second",
            )
        }
        out["visual"]["decode_share"] = run_facts["decode_seconds"] / work
        out["visual"]["decode_share_of_wall"] = run_facts["decode_seconds"] / pipe["seconds"]
    if stage == "audio":
        out["audio_seconds_decoded"] = run_facts.get("audio_seconds_decoded")
    return out


def child_main(args: argparse.Namespace) -> None:
    """``--only STAGE``: measure one stage in this process and write its figures to ``--child-out``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    if args.only == "audio":
        params = with_audio_config(params, args.audio_config[0])
    result = measure_stage(args.only, params, args.utterances, args.repeat_dialogues, args.warmup, args.rounds)
    result["audio_config"] = args.audio_config[0] if args.only == "audio" else None
    Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# parent: one child per stage, then the table


def run_json_child(script: Path, argv: list[str], label: str) -> dict:
    """Run ``script argv --child-out FILE`` in a fresh interpreter (its own peak RSS) and read back FILE's JSON.

    Raises: subprocess.CalledProcessError when the child fails.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
    try:
        subprocess.run(
            [sys.executable, str(Path(script).resolve()), *argv, "--child-out", str(out)], check=True, cwd=REPO
        )
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def run_child(args: argparse.Namespace, stage: str, n: int, audio_config: str | None) -> dict:
    """Run ``--only stage`` in a fresh interpreter (per-stage peak RSS) and read back its figures."""
    argv = [
        "--only",
        stage,
        "--params",
        str(args.params),
        "--utterances",
        str(n),
        "--warmup",
        str(args.warmup),
        "--rounds",
        str(args.rounds),
        "--repeat-dialogues" if args.repeat_dialogues else "--no-repeat-dialogues",
    ]
    if audio_config:
        argv += ["--audio-config", audio_config]
    return run_json_child(
        Path(__file__), argv, f"{stage}{' (' + audio_config + ')' if audio_config else ''}: {n} utterances"
    )


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict:
    info = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(results: list[dict]) -> None:
    """The compact Markdown table, then visual's detail and where the pipeline's time goes."""
    print(
        "| stage | encoder | N | pipeline s (load s) | pipeline utt/s | excl. load utt/s | bare utt/s "
        "| ratio excl. load: median (rounds) | best / best | target | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p, b = r["pipeline"], r["bare"]
        name = r["stage"] + (f" ({r['audio_config']})" if r.get("audio_config") else "")
        if r["stage"] == "visual":
            share = r["visual"]["decode_share"]
            target = f"decode {100 * share:.0f}% <= 33%: {verdict(share <= MAX_DECODE_SHARE)}"
        else:
            target = f">= {TARGET_RATIO}: {verdict(r['ratio_excluding_load'] >= TARGET_RATIO)}"
        gpu = r["cuda_max_allocated_mb"]["pipeline"]
        rss = f"{r['peak_rss_mb']['pipeline']:.0f}" + (f" (GPU {gpu:.0f})" if gpu is not None else "")
        print(
            f"| {name} | {encoder_name(r)} | {r['utterances']} | {p['seconds']:.1f} ({p['load_seconds']:.1f}) "
            f"| {p['utterances_per_second']:.1f} | {p['utterances_per_second_excluding_load']:.1f} "
            f"| {b['utterances_per_second']:.1f} | {r['ratio_excluding_load']:.2f} "
            f"({' '.join(f'{x:.2f}' for x in r['ratio_excluding_load_rounds'])}) "
            f"| {r['ratio_excluding_load_best_of_each']:.2f} | {target} | {rss} |"
        )
    for r in results:
        if r["stage"] == "visual":
            v, b = r["visual"], r["bare"]
            print(
                f"\nvisual: {v['frames']} frames ({v['frames_tracked']} with a tracked face); pipeline decode "
                f"{v['decode_seconds']:.1f} s = {100 * v['decode_share']:.0f}% of the stage excluding load "
                f"({100 * v['decode_share_of_wall']:.0f}% of its wall time); detect {v['detect_frames_per_second']} "
                f"frames/s, embed {v['embed_frames_per_second']} frames/s (bare loop: detect "
                f"{b['detect_frames_per_second']:.1f}, embed {b['embed_frames_per_second']:.1f} frames/s)"
            )
    print("\nwhere the pipeline's wall time goes (exclusive seconds per call site):")
    for r in results:
        name = r["stage"] + (f" ({r['audio_config']})" if r.get("audio_config") else "")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["pipeline"]["breakdown"].items() if abs(v) >= 0.005)
        print(f"- {name} ({r['pipeline']['seconds']:.2f} s): {parts}")


def encoder_name(r: dict) -> str:
    enc = r["encoder"]
    if r["stage"] == "audio" and not enc.get("pretrained", True):
        return f"random wav2vec2 ({r['audio_config']}: {enc.get('hidden_size')}-d)"
    return str(enc.get("model")).replace("package:", "")


def parent_main(args: argparse.Namespace) -> None:
    """Run each stage in its own process, print the table, write JSON when asked."""
    start = time.perf_counter()
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_before": load_average(),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    results = []
    for stage in args.stages:
        n = args.visual_utterances if stage == "visual" and args.visual_utterances else args.utterances
        for config in args.audio_config if stage == "audio" else [None]:
            results.append(run_child(args, stage, n, config))
    header["load_average_after"] = load_average()
    header["total_seconds"] = round(time.perf_counter() - start, 1)
    m = header["machine"]
    print(
        f"\n{header['date']}; {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"device {results[0]['device'] if results else '?'}{', ' + m['gpu'] if m.get('gpu') else ''}; load average "
        f"{header['load_average_before']} before, {header['load_average_after']} after; "
        f"{header['total_seconds']} s\n"
    )
    print_table(results)
    if any(not r["encoder"].get("pretrained", True) for r in results):
        print(
            "\nnote: encoders marked random are RANDOMLY INITIALISED (no weights offline): the speed is that of "
            "the architecture; the demo's tiny wav2vec2 is far cheaper than wav2vec2-base (--audio-config base)."
        )
    print(
        "ratio = pipeline utt/s / bare-loop utt/s on the same utterances; the pipeline figure includes "
        "decoding, the cache and writing the features, the bare loop only the model calls on pre-decoded "
        "inputs. 'excl. load' subtracts the loader call timed inside the pipeline run; the target uses the "
        "median over rounds of each round's ratio (pipeline run, then bare loop); 'best / best' divides the "
        "best round of each side. Throughputs are the best round of each side."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "stages": results}, indent=2, default=str) + "\n")
        print(f"\nfigures written to {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--utterances", type=int, default=500, help="N utterances per stage (default 500)")
    parser.add_argument("--visual-utterances", type=int, default=None, help="N for the visual stage only")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--audio-config",
        nargs="+",
        choices=("demo", "base"),
        default=["demo"],
        help="audio encoder: the params file's (demo, default) and/or a random wav2vec2 of "
        "wav2vec2-base's size (base: about 0.3 s per utterance per side on 2 CPU cores, "
        "5 min for 500)",
    )
    parser.add_argument(
        "--repeat-dialogues",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="repeat the dataset's dialogues (new ids, same files) to reach N (default on)",
    )
    parser.add_argument("--warmup", type=int, default=8, help="untimed warm-up run on this many utterances (0: none)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate pipeline and bare loop this many times; report the best of each (default 1)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available (the pipeline's own choice); cpu: hide the GPUs; cuda: fail without one",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", choices=STAGES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.params = args.params.resolve()
    if args.json:
        args.json = args.json.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DGLBACKEND", "pytorch")
    os.chdir(REPO)  # params paths (data.root, clips) are relative to the repository root
    if args.device == "cpu":  # before any CUDA call; the child processes inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.only:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
