"""IEMOCAP (Busso et al. 2008, ``IEMOCAP_full_release``) -> text + audio + emotion rows.

Layout followed (the release's own folders, per session ``Session1`` ... ``Session5``):

- ``SessionN/dialog/EmoEvaluation/<dialog>.txt``: one line per utterance
  ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`` (start - end,
  utterance, the majority emotion code, valence/activation/dominance); the annotators' lines
  around it (``C-E1: ...``, ``A-E1: ...``) are ignored.
- ``SessionN/dialog/transcriptions/<dialog>.txt``: ``Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.``
- ``SessionN/sentences/wav/<dialog>/<utterance>.wav``.

Classes: by default the 4-class setup most papers report (neutral; happy = ``hap`` + ``exc``
merged; angry; sad); utterances with other codes (frustrated, surprised, ...) are skipped and
counted per code. ``--all-classes`` keeps every code (``xxx``, no majority, is always skipped).
Split: by session, speaker-independent: ``--test-session`` (default 5) is the test split, the
other sessions train (training holds out ``data.val_fraction`` of it for validation). An
utterance whose wav or transcript is missing keeps the other modality (counted).
"""

from __future__ import annotations

import re
from pathlib import Path

from mmfuse.core.errors import DataError
from mmfuse.datasets.importers.writer import ImportWriter

CODES = {"neu": "neutral", "hap": "happy", "exc": "excited", "ang": "angry", "sad": "sad", "fru": "frustrated",
         "sur": "surprised", "fea": "fearful", "dis": "disgusted", "oth": "other"}
FOUR_CLASS = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
_EMOTION_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\t(\S+)\t(\S+)\t")
_TRANSCRIPT_LINE = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s*(.*)$")


def _sessions(source: Path) -> list[Path]:
    for root in (source, source / "IEMOCAP_full_release"):
        found = sorted(p for p in root.glob("Session*") if p.is_dir() and p.name[7:].isdigit())
        if found:
            return found
    raise DataError(f"{source}: no Session1..Session5 folders (give the IEMOCAP_full_release folder)")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _transcripts(session: Path, dialog: str) -> dict[str, str]:
    path = session / "dialog" / "transcriptions" / f"{dialog}.txt"
    if not path.is_file():
        return {}
    texts = {}
    for line in _read_lines(path):
        match = _TRANSCRIPT_LINE.match(line.strip())
        if match:
            texts[match.group(1)] = match.group(2).strip()
    return texts


def import_iemocap(source: Path, writer: ImportWriter) -> None:
    """Imports every session under ``source`` (see the module docstring)."""
    mapping = CODES if writer.options.all_classes else FOUR_CLASS
    sessions = _sessions(source)
    numbers = [int(s.name[7:]) for s in sessions]
    if writer.options.test_session not in numbers:
        raise DataError(f"--test-session {writer.options.test_session}: no Session{writer.options.test_session} "
                        f"under {source} (found {', '.join(s.name for s in sessions)})")
    for session, number in zip(sessions, numbers, strict=True):
        split = "test" if number == writer.options.test_session else "train"
        evaluations = sorted(p for p in (session / "dialog" / "EmoEvaluation").glob("*.txt")
                             if not p.name.startswith("."))  # macOS copies carry ._* resource files
        if not evaluations:
            writer.note(f"{session}: no dialog/EmoEvaluation/*.txt")
        for path in evaluations:
            dialog = path.stem
            texts = _transcripts(session, dialog)
            for line_no, line in enumerate(_read_lines(path), start=1):
                match = _EMOTION_LINE.match(line)
                if not match:
                    continue
                writer.seen()
                utterance, code = match.group(3), match.group(4)
                where = f"{path} line {line_no} ({utterance})"
                if code == "xxx":
                    writer.skip("no majority emotion (xxx)", where)
                    continue
                if code not in mapping:
                    reason = f"class '{CODES.get(code, code)}' not in the 4-class set" if code in CODES else \
                        f"unknown emotion code '{code}'"
                    writer.skip(reason, where)
                    continue
                if not writer.room(split):
                    continue
                wav = session / "sentences" / "wav" / dialog / f"{utterance}.wav"
                text = texts.get(utterance) or None
                if not wav.is_file():
                    writer.missing("audio (wav not found)")
                if text is None:
                    writer.missing("text (no transcript line)")
                if text is None and not wav.is_file():
                    writer.skip("neither wav nor transcript found", where)
                    continue
                writer.add({"id": utterance, "split": split, "text": text,
                            "audio": str(wav.resolve()) if wav.is_file() else None, "label": mapping[code],
                            "session": number})
    writer.suggest_config({
        "data": {"split_column": "split", "target_column": "label",
                 "modalities": {"text": {"kind": "text", "column": "text"},
                                "audio": {"kind": "audio", "column": "audio"}},
                 "text": {"max_length": 48},
                 "audio": {"sample_rate": 16000, "max_seconds": 8.0, "n_mels": 64, "hop_length": 320},
                 "batch_size": 32},
        "encoders": {"text": {"name": "text_gru", "dim": 128}, "audio": {"name": "audio_cnn", "dim": 128}},
        "fusion": {"name": "concat"},
        "task": {"name": "classification"},
        "optim": {"name": "adamw", "lr": 0.001},
        "trainer": {"max_epochs": 20, "patience": 5, "output_dir": "runs/iemocap"},
    }, f"Written by `mmfuse data import iemocap`: text + audio emotion classification\n"
       f"({'all classes' if writer.options.all_classes else '4 classes, happy+excited merged'}; "
       f"test = Session{writer.options.test_session}). Train with: mmfuse train -c config.yaml")
