"""Tiny sources in each importer's published layout (keys, shapes, dtypes, folder names)."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image


def write_wav(path: Path, seconds: float = 0.1, rate: int = 16000, fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.sin(np.arange(int(seconds * rate)) * 0.05).astype(np.float32), rate, format=fmt)
    return path


def write_png(path: Path, colour: tuple[int, int, int] = (200, 20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def mmsa_split(rng: np.random.Generator, n: int, prefix: str, unaligned: bool) -> dict[str, object]:
    """One MMSA split: unaligned has audio/vision lengths; text lengths from text_bert's mask."""
    ta, tv, tt = (8, 6, 7) if unaligned else (7, 7, 7)
    audio = np.zeros((n, ta, 5), dtype=np.float32)
    vision = np.zeros((n, tv, 4), dtype=np.float32)
    text = np.zeros((n, tt, 10), dtype=np.float32)
    audio_len = rng.integers(2, ta + 1, size=n) if unaligned else np.full(n, ta)
    vision_len = rng.integers(1, tv + 1, size=n) if unaligned else np.full(n, tv)
    text_len = rng.integers(2, tt + 1, size=n)
    bert = np.zeros((n, 3, tt), dtype=np.int64)
    for i in range(n):
        audio[i, :audio_len[i]] = rng.normal(size=(audio_len[i], 5)) + 1.0  # padding is zeros after
        vision[i, :vision_len[i]] = rng.normal(size=(vision_len[i], 4))
        text[i, :text_len[i]] = rng.normal(size=(text_len[i], 10))
        bert[i, 0, :text_len[i]] = rng.integers(100, 200, size=text_len[i])
        bert[i, 1, :text_len[i]] = 1
    labels = np.clip(np.round(audio[:, :, 0].sum(axis=1) / audio_len - 1.0, 1) * 3, -3, 3).astype(np.float32)
    split: dict[str, object] = {
        "raw_text": np.array([f"utterance {prefix} {i}" for i in range(n)], dtype=object),
        "audio": audio, "vision": vision, "text": text, "text_bert": bert,
        "id": np.array([f"{prefix}vid$_${i}" for i in range(n)], dtype=object),
        "regression_labels": labels,
        "classification_labels": (labels > 0).astype(np.float32),
    }
    if unaligned:
        split["audio_lengths"] = [int(v) for v in audio_len]  # MMSA stores plain lists
        split["vision_lengths"] = [int(v) for v in vision_len]
    return split


def write_mmsa(path: Path, unaligned: bool = True, sizes: tuple[int, int, int] = (12, 4, 4)) -> Path:
    rng = np.random.default_rng(0)
    data = {name: mmsa_split(rng, n, name[:2], unaligned) for name, n in zip(("train", "valid", "test"), sizes,
                                                                               strict=True)}
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def write_multibench(path: Path) -> Path:
    """MultiBench affect: leading-zero padding, labels (N, 1, 1), one all-zero text sample."""
    rng = np.random.default_rng(1)
    data = {}
    for split, n in (("train", 5), ("valid", 3), ("test", 3)):
        arrays = {key: np.zeros((n, 6, dim), dtype=np.float32) for key, dim in (("vision", 3), ("audio", 4),
                                                                               ("text", 5))}
        for i in range(n):
            start = i % 4
            for array in arrays.values():
                array[i, start:] = rng.normal(size=(6 - start, array.shape[2])) + 2.0
        if split == "train":
            arrays["text"][4] = 0.0  # drop_entry removes it
        data[split] = {**arrays, "labels": rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32),
                       "id": np.array([[f"{split}vid", str(i)] for i in range(n)], dtype=object)}
    path.write_bytes(pickle.dumps(data))
    return path


def write_coco(root: Path) -> Path:
    """captions_{train,val}2017.json with two captions per image; images under images/<split>2017/."""
    annotations = root / "annotations"
    annotations.mkdir(parents=True)
    ann_id = 0
    for split, ids in (("train", (1, 2, 3)), ("val", (10, 11))):
        images, anns = [], []
        for image_id in ids:
            name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "height": 8, "width": 8})
            if image_id != 3:  # image 3 is missing on disk
                path = root / "images" / f"{split}2017" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (image_id * 20, 0, 0)).save(path, format="JPEG")
            for k in range(2):
                ann_id += 1
                anns.append({"id": ann_id, "image_id": image_id, "caption": f"A photo number {image_id} take {k}. "})
        (annotations / f"captions_{split}2017.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return annotations


def write_karpathy(path: Path) -> Path:
    images = [{"filepath": "train2014", "filename": f"COCO_train2014_{i:012d}.jpg", "cocoid": i, "imgid": n,
               "split": split, "sentences": [{"raw": "x", "tokens": ["x"], "imgid": n, "sentid": n}], "sentids": [n]}
              for n, (i, split) in enumerate(((1, "train"), (2, "restval"), (10, "test")))]  # 11: not listed
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def write_vggsound(root: Path) -> Path:
    """vggsound.csv (no header) + media: one wav, one mp4, one clip missing, one bad start."""
    rows = [["aaaaaaaaaaa", "1", "dog barking", "train"], ["bbbbbbbbbbb", "30", "people, crowd", "train"],
            ["ccccccccccc", "5", "dog barking", "test"], ["ddddddddddd", "12", "engine", "test"]]
    with (root / "vggsound.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    write_wav(root / "media" / "aaaaaaaaaaa_000001.wav")
    (root / "media" / "video").mkdir(parents=True)
    (root / "media" / "video" / "bbbbbbbbbbb_000030.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    write_wav(root / "media" / "ddddddddddd_000012.flac", fmt="FLAC")
    return root / "vggsound.csv"


AUDIOSET_CSV = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/012xff"
--aE2O5G5WE, 0.000, 10.000, "/m/03fwl,/m/04rlf"
"""


def write_audioset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "balanced_train_segments.csv").write_text(AUDIOSET_CSV)
    (root / "eval_segments.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                                            "zzzzzzzzzzz, 10.000, 20.000, \"/m/09x0r\"\n")
    (root / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/t/dd00088,"Gush"\n2,/m/012xff,"Toothbrush"\n'
        '3,/m/03fwl,"Goat"\n4,/m/04rlf,"Music"\n')
    write_wav(root / "clips" / "--PJHxphWEs_30000_40000.wav")
    write_wav(root / "clips" / "Y--aE2O5G5WE.flac", fmt="FLAC")
    write_wav(root / "clips" / "zzzzzzzzzzz_000010.wav")
    return root


def write_audiocaps(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                    "91139,r1nicOVtvkQ,130,A woman talks nearby as water pours\n"
                                    "58146,UDGBjjwyaqE,20,\"Multiple clanging, banging sounds\"\n"
                                    "11111,missingclip,0,Nothing here\n")
    (root / "val.csv").write_text("audiocap_id,youtube_id,start_time,caption\n"
                                  "97151,rqfQRErjfk8,170,A large crowd cheers\n"
                                  "97152,rqfQRErjfk8,170,People applaud and shout\n")
    write_wav(root / "audio" / "r1nicOVtvkQ.wav")
    write_wav(root / "audio" / "UDGBjjwyaqE_000020.wav")
    write_wav(root / "audio" / "97151.wav")  # named by audiocap_id; the clip's other caption reuses it
    return root


def write_clotho(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    header = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
    (root / "clotho_captions_development.csv").write_text(
        header + 'Forest ambience.wav,"Birds sing, wind blows",Birds chirp,Leaves rustle,A bird calls,Wind in trees\n'
        + "Gone.wav,a,b,c,d,e\n", encoding="utf-8")
    (root / "clotho_captions_evaluation.csv").write_text(header + "Rain.wav,Rain falls,Rain,Drops,Water,Storm\n")
    write_wav(root / "development" / "Forest ambience.wav")
    write_wav(root / "evaluation" / "Rain.wav")
    return root


def write_iemocap(root: Path) -> Path:
    """Session1 and Session5, one dialog each, in IEMOCAP_full_release's folders."""
    emotions = {1: [("F000", "neu"), ("M001", "exc"), ("F002", "fru"), ("M003", "xxx"), ("F004", "ang")],
                5: [("F000", "sad"), ("M001", "hap"), ("F002", "sur")]}
    for session, utterances in emotions.items():
        base = root / f"Session{session}"
        dialog = f"Ses0{session}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        transcript = []
        for k, (suffix, code) in enumerate(utterances):
            utt = f"{dialog}_{suffix}"
            lines += [f"[{k * 2 + 1:.4f} - {k * 2 + 2:.4f}]\t{utt}\t{code}\t[2.5000, 2.5000, 2.5000]",
                      "C-E1:\tNeutral;\t()", "A-E1:\tval 3; act 2; dom  2;\t()", ""]
            transcript.append(f"{utt} [{k * 2 + 1:08.4f}-{k * 2 + 2:08.4f}]: Sentence {session} {k}.")
            if not (session == 1 and suffix == "F004"):  # this wav is missing
                write_wav(base / "sentences" / "wav" / dialog / f"{utt}.wav")
        (base / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (base / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(lines))
        (base / "dialog" / "transcriptions").mkdir(parents=True)
        (base / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(transcript) + "\n")
    return root


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_FEATURES = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"},
               "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}


def write_hf_saved(root: Path) -> Path:
    """DatasetDict.save_to_disk layout: dataset_dict.json, <split>/state.json + data-*.arrow (stream)."""
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    for split, n in (("train", 4), ("validation", 2)):
        folder = root / split
        folder.mkdir()
        images = [{"bytes": _png_bytes((i * 50, 0, 0)), "path": None} for i in range(n)]
        table = pa.table({"image": pa.array(images, type=IMAGE_TYPE),
                          "text": [f"{split} {i}" for i in range(n)],
                          "label": pa.array([i % 2 for i in range(n - 1)] + [-1], type=pa.int64())})
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                       "_split": split}))
        (folder / "dataset_info.json").write_text(json.dumps({"features": HF_FEATURES}))
    return root


def write_hf_parquet(root: Path) -> Path:
    """The Hub's data/<split>-00000-of-00001.parquet with an Audio column and the features metadata."""
    (root / "data").mkdir(parents=True)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, n in (("train", 3), ("test", 2)):
        clips = []
        for i in range(n):
            buffer = io.BytesIO()
            sf.write(buffer, np.full(800, 0.1 * (i + 1), dtype=np.float32), 8000, format="FLAC")
            clips.append({"bytes": buffer.getvalue(), "path": f"clip{i}.flac"})
        table = pa.table({"id": list(range(100, 100 + n)),  # integer ids restart in every split
                          "audio": pa.array(clips, type=audio_type), "sentence": [f"say {i}" for i in range(n)],
                          "intent": [float(i) for i in range(n)]})
        meta = {"info": {"features": {"audio": {"_type": "Audio", "sampling_rate": 8000},
                                      "sentence": {"dtype": "string", "_type": "Value"},
                                      "intent": {"dtype": "float64", "_type": "Value"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root
