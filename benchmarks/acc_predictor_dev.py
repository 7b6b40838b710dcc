#!/usr/bin/env python
"""Choose accuracy-predictor settings without any family's held-out test architectures.

For each family Y: train on the other families (all their architectures), then use only Y's
``#20`` fine-tune architectures (split seed 0, as run_gpi_acc_predictor.py picks them): the
zero-shot SRCC on those 20 (``noft20``), and per fine-tune variant the SRCC on 10 of them after
fine-tuning on the other 10 (two folds, mean; ``ftK``). Prints one JSON line.

    python benchmarks/acc_predictor_dev.py STORE BASE_JSON FTS_JSON [SEEDS]

``BASE_JSON``: {"epochs", "bs", "lr", "gnn", "acc_norm", "rank"}; ``FTS_JSON``: a list of
keyword sets of :func:`aiop.predictor.train.finetune` plus "epochs".
"""

from __future__ import annotations

import json
import random
import sys
import time

import numpy as np
from scipy.stats import spearmanr

from aiop.predictor.api import Predictor
from aiop.predictor.train import (
    _fp,
    collect_predictions,
    finetune,
    fit_predictor,
    load_samples,
    make_spec,
    split_by_family,
)

T = "acc:classification"


def _srcc(pred: Predictor, samples: list) -> float:
    p = collect_predictions(pred, samples, [T])[T]
    return float(spearmanr(p.y_true, p.y_pred)[0])


def main(argv: list[str]) -> int:
    from pathlib import Path

    usage = "usage: acc_predictor_dev.py STORE BASE_JSON FTS_JSON [SEEDS]"
    if len(argv) not in (3, 4):
        print(usage, file=sys.stderr)
        return 2
    try:
        store, base_cfg, fts = argv[0], json.loads(argv[1]), json.loads(argv[2])
        seeds = int(argv[3]) if len(argv) > 3 else 2
    except ValueError as exc:  # JSONDecodeError is one
        print(f"acc_predictor_dev: error: {exc}", file=sys.stderr)
        return 2
    if not Path(store).is_file():
        print(f"acc_predictor_dev: error: no store at {store}", file=sys.stderr)
        return 2
    samples = load_samples(store, [T], acc_mode="individual-v4")
    fams = sorted({s.family for s in samples})
    res: dict[tuple[str, str], list[float]] = {}
    t0 = time.time()
    for fam in fams:
        split = split_by_family(samples, f"{fam}#20", 0)
        dev = split.finetune[fam]  # never the test architectures
        fps = sorted({_fp(s.cg) for s in dev})
        random.Random("dev").shuffle(fps)
        folds = [set(fps[:10]), set(fps[10:])]
        for seed in range(seeds):
            base = Predictor(
                spec=make_spec(base_cfg.get("gnn", "default")),
                targets=[T],
                epochs=base_cfg.get("epochs", 60),
                batch_size=base_cfg.get("bs", 64),
                lr=base_cfg.get("lr", 1e-3),
                seed=seed,
                progress=False,
            )
            fit_predictor(
                base, split.train, base_cfg.get("acc_norm", "global"), base_cfg.get("rank", 0.0)
            )
            res.setdefault(("noft20", fam), []).append(_srcc(base, dev))
            for a, b in ((0, 1), (1, 0)):
                ft_set = [s for s in dev if _fp(s.cg) in folds[a]]
                ev = [s for s in dev if _fp(s.cg) in folds[b]]
                res.setdefault(("noft10", fam), []).append(_srcc(base, ev))
                for k, ft in enumerate(fts):
                    kw = dict(ft)
                    tuned = finetune(base, ft_set, kw.pop("epochs", 30), **kw)
                    res.setdefault((f"ft{k}", fam), []).append(_srcc(tuned, ev))
    out: dict = {"base": base_cfg, "fts": fts, "s": round(time.time() - t0, 1)}
    for (v, fam), vals in sorted(res.items()):
        out.setdefault(v, {})[fam] = round(float(np.mean(vals)), 3)
    for v in list(out):
        if isinstance(out[v], dict) and all(f in out[v] for f in fams):
            out[v]["mean"] = round(float(np.mean([out[v][f] for f in fams])), 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
