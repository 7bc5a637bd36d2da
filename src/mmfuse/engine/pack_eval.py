"""One split of a pack for a saved model to be evaluated on (``mmfuse evaluate --pack``).

A pack holds preprocessed tensors, so it fits a model only if it was packed with the model's fitted
preprocessing (same vocabulary, image and audio settings) and labels: both are compared with what
``pack.json`` records before a sample is read, and a mismatch names what differs. A local pack is
read by position (``PackDataset``); a URL (``mmfuse.data.pack_stream``) is streamed in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmfuse.core.errors import DataError
from mmfuse.data.dataset import MultimodalDataset, SkipReport
from mmfuse.data.pack_dataset import PackDataset
from mmfuse.data.pack_format import FORMAT, MAX_INDEX_BYTES, READABLE_FORMATS, checked_shards
from mmfuse.data.pack_stream import StreamedSplit, is_url, read_pack_state
from mmfuse.engine.pack_open import shard_report
from mmfuse.engine.pack_verify import PACK_FILE
from mmfuse.model import MultimodalModel


def _plain(value: Any) -> Any:
    """As JSON would give it back (tuples become lists), so a saved state compares with pack.json's."""
    return json.loads(json.dumps(value, default=str))


def _mismatch(pack: dict[str, Any], model: dict[str, Any]) -> list[str]:
    keys = sorted(set(pack) | set(model))
    return [key for key in keys if pack.get(key) != model.get(key)]


def pack_split_for_model(model: MultimodalModel, location: str | Path, split: str) -> MultimodalDataset:
    """The pack's ``split`` (local folder or URL), after checking it was packed for ``model``."""
    where = str(location)
    remote = is_url(where)
    if remote:
        state = read_pack_state(where)
    else:
        path = Path(where) / PACK_FILE
        try:
            if path.stat().st_size > MAX_INDEX_BYTES:
                raise DataError(f"{path}: {path.stat().st_size:,} bytes, larger than a pack.json can be")
            state = json.loads(path.read_text())
        except OSError:
            raise DataError(f"{where} is not a finished pack: no {PACK_FILE}") from None
        except ValueError as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        if not isinstance(state, dict):
            raise DataError(f"{path}: unreadable (not a JSON object)")
    if state.get("format") not in READABLE_FORMATS:
        raise DataError(f"{where}: not a pack of this mmfuse (format {state.get('format')!r}, expected {FORMAT})")
    shards = checked_shards(state.get("shards", {}), f"{where}/{PACK_FILE}")
    if split not in shards:
        raise DataError(f"the pack {where} has no split '{split}'; it has {', '.join(sorted(shards)) or 'none'}")
    differs = _mismatch(state["preprocessor"], _plain(model.preprocessor.state()))
    if differs:
        raise DataError(f"the pack {where} was preprocessed differently from the model (its {', '.join(differs)} "
                        "differ): pack the data with the model's training config")
    # The keys the pack's targets were encoded with; a trained model's task also holds state fitted
    # after training (calibration temperatures) that the data does not depend on.
    model_task, pack_task = _plain(model.task.state()), _plain(state["task"])
    if not isinstance(pack_task, dict) or any(model_task.get(k) != v for k, v in pack_task.items()):
        raise DataError(f"the pack {where} has other labels or targets than the model's task")
    if remote:
        report = SkipReport()
        for reason, count in state.get("skipped", {}).get(split, {}).items():
            report.skipped += [reason] * int(count)
        return StreamedSplit(where, shards[split], int(state["counts"][split]), report)
    folder = Path(where)
    return PackDataset([folder / shard for shard in shards[split]], shard_report(folder, shards[split]))
