"""How small an INT8 file egp-onnx can make at a given unseen accuracy: issue 22's deflate target.

Issue 22 asks `--channels --quantize int8` for a file >= 5x smaller (deflated) than INT8 alone at
<= 0.5 pt of unseen accuracy lost. The default guard stops the weight loop where it judges the
held-out split at risk; this sweep removes the guard from the weight stage to find the ceiling:
the guarded channel stage first (``channels=True, sparsity=0``: the narrowed model the default
run starts its weight loop from), then that model's weights pruned to each fixed sparsity with no
guard (``--no-guard``; magnitude budget, as EGP's one-shot budget without the guard's
sensitivity caps empties whole layers), refit, and quantized as ``--quantize int8`` does. Each
row: the deflated file against INT8 alone's (one ``quantize_static`` call on the dense model,
timed nothing: sizes only), and unseen accuracy and agreement with the dense model on the test
split. The second compress refits against the narrowed model's outputs, not the dense model's,
so a single run could do slightly better; the rows are a ceiling of this pipeline, not of it
with finetuning.

Run: python benchmarks/deflate_ceiling.py [--models mnist] [--sparsities 0.4,0.5,0.6,0.7,0.8]
     [--select magnitude|obs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import egp_onnx
from egp_onnx.report.render import format_table
from egp_onnx.verify.cost import deflate_size

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pareto import cases, int8_alone, unseen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist")
    parser.add_argument("--sparsities", default="0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--select", default="magnitude", choices=["magnitude", "obs"])
    args = parser.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(Path(tmp), args.models.split(",")):
            reference = deflate_size(int8_alone(case, Path(tmp)))
            narrowed = egp_onnx.compress(case.model, case.calib, channels=True, sparsity=0.0, latency=False)
            models = {"dense": case.model, "--channels --sparsity 0": narrowed.model}
            for sparsity in sparsities:
                result = egp_onnx.compress(
                    narrowed.model,
                    case.calib,
                    sparsity=sparsity,
                    guard=False,
                    method="magnitude",
                    select=args.select,
                    quantize="int8",
                    latency=False,
                )
                models[f"then {sparsity:.2f} + INT8"] = result.model
            scores = unseen(case, models)
            rows = []
            for name, model in models.items():
                size = deflate_size(model)
                accuracy, agreement = scores[name]
                rows.append(
                    [
                        name,
                        f"{size / 1e3:.1f}",
                        f"{reference / size:.2f}",
                        f"{accuracy:.4f}",
                        f"{100 * (accuracy - scores['dense'][0]):+.2f}",
                        f"{agreement:.4f}",
                    ]
                )
            print(f"\n{case.name}: INT8 alone deflates to {reference / 1e3:.1f} kB; select {args.select}")
            headers = ["variant", "deflate kB", "x smaller than INT8 alone", "unseen acc", "pt", "agreement"]
            print(format_table(headers, rows))


if __name__ == "__main__":
    main()
