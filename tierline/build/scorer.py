"""Building the router's learned scorer beside the models it routes between.

`make models` calls `train_scorer` after the tiers are built; `tierline route
train-scorer` re-runs it alone. The scorer lands in `<models>/router/scorer.json`
with a Markdown card, and is listed in `<models>/manifest.json` with its sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

from tierline_router.scorer import Scorer, artifact_digests, collect_labels, decision_latency
from tierline_shared.models.artifacts import MANIFEST, file_entry

SCORER_PATH = Path("router") / "scorer.json"
DEFAULT_SCORER_N = 1000  # calibration problems labelled (both lower tiers answer each once)


def train_scorer(models_dir: Path, n: int = DEFAULT_SCORER_N, seed: int = 0, threads: int = 2) -> dict:
    """Label the calib split with the device and edge models, fit, save, list in the manifest."""
    models_dir = Path(models_dir)
    prompts, labels = collect_labels(models_dir, n, seed, threads=threads)
    scorer = Scorer().fit(prompts, labels, artifacts=artifact_digests(models_dir), seed=seed)
    path = models_dir / SCORER_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    scorer.save(path)
    latency = decision_latency(scorer, prompts[:500])
    card = {"kind": "router scorer (logistic regression per lower tier, prompt features only)",
            "trained_on": f"{n} calib problems, seed {seed}", "heldout": scorer.heldout,
            "artifacts": scorer.artifacts, "decision_latency_ms": latency}
    (path.parent / "card.md").write_text(
        "# Router scorer card\n\n```json\n" + json.dumps(card, indent=2) + "\n```\n")
    manifest_path = models_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["router_scorer"] = file_entry(models_dir, path)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return card
