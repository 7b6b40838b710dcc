#!/usr/bin/env python
"""Write the training CG of models as JSON (AIO-P's make_cg.py), optionally into a store.

    python scripts/make_cg.py -models zoo:resnet18 net.onnx model.pb -output_dir cgs/
    python scripts/make_cg.py -family_samples ofa_mbv3:20 -store data/labels.db

One bad model is reported and skipped (exit 1 at the end); bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from aiop.cg import CGError, graph_for_model, parse_input_shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-models", nargs="*", default=[], help="MODELs (paths, zoo:, family:)")
    parser.add_argument("-family_samples", nargs="*", default=[], metavar="FAMILY:N")
    parser.add_argument("-input_shape", default=None, help="N,C,H,W for files without one")
    parser.add_argument("-output_dir", default=None, help="write <name>.json.gz here")
    parser.add_argument("-store", default=None, help="also put the graphs into this store")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        shape = parse_input_shape(args.input_shape)
        models = list(args.models)
        for item in args.family_samples:
            family, _, n = item.partition(":")
            if not n.isdigit():
                raise CGError(f"-family_samples wants FAMILY:N, not {item!r}")
            models += [f"family:{family}:{seed}" for seed in range(int(n))]
        if not models:
            raise CGError("nothing to do: give -models and/or -family_samples")
        if not args.output_dir and not args.store:
            raise CGError("give -output_dir and/or -store")
    except CGError as exc:
        print(f"make_cg: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output_dir) if args.output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    store = None
    if args.store:
        from aiop.cache import CacheError, Store

        try:
            store = Store(args.store)
        except CacheError as exc:
            print(f"make_cg: error: {exc}", file=sys.stderr)
            return 2
    failed = 0
    try:
        for model in tqdm(models, desc="graphs", disable=args.quiet):
            try:
                cg = graph_for_model(model, shape)
            except (CGError, ValueError) as exc:
                failed += 1
                print(f"make_cg: {model}: {str(exc).splitlines()[0]}", file=sys.stderr)
                continue
            if out:
                name = Path(model).stem if Path(model).exists() else model.replace(":", "_")
                cg.save(out / f"{name}.json.gz")
            if store is not None:
                store.put_graph(cg, name=model, meta={"model": model})
    finally:
        if store is not None:
            store.close()
    print(f"built {len(models) - failed} graph(s), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
