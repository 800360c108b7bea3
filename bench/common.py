"""What the benchmark scripts share."""
import json
from pathlib import Path


def write_summary(path: str | Path, summary: dict) -> Path:
    """The run's summary as indented JSON (bench/results/*.json), creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return out
