"""The `flash-quant` command: `recommend`, `calibrate`, `measure-errors`, `hardware`.

Imports are deferred to the subcommand: `recommend` and `hardware` load only the
torch-free planning modules (the package's own __init__ decides what else is imported).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

_EPILOG = "See docs/planning.md for the model, its sources and its limits."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flash-quant", description="flash_quant precision planning", epilog=_EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("recommend", help="per-operator precisions for a model, phase, length and chip")
    r.add_argument("--model", required=True,
                   help="preset (llama-3-8b, llama-3-70b, flux-dev) or a JSON file / string with hidden, "
                        "layers, heads, kv_heads, head_dim, ffn_dim")
    r.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    r.add_argument("--seq-len", type=int, required=True, help="prompt length (prefill), context (decode), "
                   "image tokens (flux-dev)")
    r.add_argument("--hardware", required=True, help="chip name (see `flash-quant hardware`)")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--quality", choices=("strict", "balanced", "aggressive"), default="balanced")
    r.add_argument("--strategy", action="append", default=None,
                   help="restrict to these strategies (names or JSON files); repeatable")
    r.add_argument("--json", action="store_true", help="print the recommendation as JSON")

    c = sub.add_parser("calibrate", help="time flash_quant on this device and fit the cost model")
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    c.add_argument("--quick", action="store_true", help="tiny shapes (for CPU / CI)")
    c.add_argument("--hardware", default=None, help="registry entry of this device (default: from its name)")
    c.add_argument("--presets", nargs="+", default=["accurate", "fast", "int4", "fp16"])
    c.add_argument("--warmup", type=int, default=None)
    c.add_argument("--reps", type=int, default=None)
    c.add_argument("--data-dir", default=None, help="where calibration_<hardware>.json goes (default: the "
                   "user data directory, $FLASH_QUANT_DATA_DIR or ~/.local/share/flash_quant; read before the "
                   "shipped data)")
    c.add_argument("--results-dir", default=None, help="where the markdown report goes "
                   "(default: beside the calibration JSON)")
    c.add_argument("--out-dir", default=None, help="also copy the outputs here (default: $OUT if set)")
    c.add_argument("--sdpa-baseline", action="store_true", help="also time SDPA's flash backend (family fa2)")
    c.add_argument("--refit", metavar="CALIBRATION_JSON", default=None,
                   help="no GPU: re-fit the stored measurements of this calibration file with the current "
                        "model, rewrite its coefficients and its report in --results-dir (measurements kept)")

    e = sub.add_parser("measure-errors", help="attention error of each preset vs float64 (S=1024, CPU)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--out", "--path", dest="path", default=None,
                   help="output JSON (default: measured_errors.json in the user data directory, "
                        "$FLASH_QUANT_DATA_DIR or ~/.local/share/flash_quant; read before the shipped data)")

    h = sub.add_parser("hardware", help="list the hardware registry, or show one entry")
    h.add_argument("name", nargs="?")
    return p


def _load_strategy(arg: str, layers: int):
    import os
    from .planning.strategies import MixedPrecisionStrategy, get_strategy
    if os.path.exists(arg):
        with open(arg) as f:
            try:
                return MixedPrecisionStrategy.from_json(json.load(f))
            except json.JSONDecodeError as err:
                raise ValueError(f"strategy file {arg!r} is not valid JSON: {err}") from None
    return get_strategy(arg, num_layers=layers)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "recommend":
            from .planning.models import load_model
            from .planning.recommend import format_recommendation, recommend
            model = load_model(args.model)
            strategies = None
            if args.strategy:
                strategies = [_load_strategy(s, model.layers) for s in args.strategy]
                if not any(s.name == "fp16_baseline" for s in strategies):
                    pass  # the baseline is computed separately; the list is what may be chosen
            rec = recommend(model, args.phase, args.seq_len, args.hardware, batch=args.batch,
                            quality=args.quality, strategies=strategies)
            print(json.dumps(rec.to_json(), indent=1) if args.json else format_recommendation(rec))
        elif args.command == "calibrate" and args.refit:
            from .planning.calibrate import refit
            refit(args.refit, results_dir=args.results_dir,
                  command="flash-quant " + " ".join(sys.argv[1:] if argv is None else argv))
        elif args.command == "calibrate":
            from .planning.calibrate import run_calibration
            run_calibration(args.device, hardware=args.hardware, quick=args.quick, presets=args.presets,
                            warmup=args.warmup, reps=args.reps, data_dir=args.data_dir,
                            results_dir=args.results_dir, out_dir=args.out_dir, sdpa_baseline=args.sdpa_baseline,
                            command="flash-quant " + " ".join(sys.argv[1:] if argv is None else argv))
        elif args.command == "measure-errors":
            from .planning.calibrate import measure_errors
            measure_errors(device=args.device, seq_len=args.seq_len, path=args.path,
                           command="flash-quant " + " ".join(sys.argv[1:] if argv is None else argv))
        elif args.command == "hardware":
            from .planning.hardware import get_hardware, list_hardware
            if args.name:
                print(get_hardware(args.name).summary())
            else:
                for key in list_hardware():
                    print(f"{key:<10} {get_hardware(key).display_name}")
    except (ValueError, FileNotFoundError) as err:
        print(f"flash-quant {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
