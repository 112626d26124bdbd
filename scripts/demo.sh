#!/usr/bin/env bash
# The demo: write the bundled SmolLM2-135M checkpoint and texts, measure FP perplexity, quantize
# it to W3A16 g64 with the default method and budget (no --method: lwc-let-round, 16 x 256
# calibration tokens, 100 steps per block) through the real pipeline (embedded local Ray, local
# storage), and measure perplexity again on the same 64 windows as BENCHMARKS.md. Outputs go to
# runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FIX=fixtures
OUT=runs/demo
WINDOWS=${DEMO_EVAL_WINDOWS:-64}
[ -f $FIX/smollm2/model.safetensors.index.json ] || $PY -m pipeline.fixtures smollm2 $FIX/smollm2
[ -f $FIX/texts/eval.txt ] || $PY -m pipeline.fixtures texts $FIX/texts
echo "== FP perplexity (eval.txt, first $WINDOWS windows of 512 tokens)"
FP=$($PY -m pipeline.evaluate --model $FIX/smollm2 --text $FIX/texts/eval.txt --seqlen 512 --max-windows "$WINDOWS" | tail -n 1)
echo "$FP"
echo "== quantize: W3A16 g64, the default method and budget, written as GPTQ v1 (the 3-bit default format)"
$PY -m pipeline.quantize --model $FIX/smollm2 --output $OUT/model --calib $FIX/texts/calib.txt \
    --wbits 3 --group-size 64 --seed 0 --report $OUT/report.json --restart
echo "== quantized perplexity"
Q=$($PY -m pipeline.evaluate --model $OUT/model --text $FIX/texts/eval.txt --seqlen 512 --max-windows "$WINDOWS" | tail -n 1)
echo "$Q"
$PY - "$FP" "$Q" <<'PYEOF'
import json, sys
fp, q = (json.loads(a) for a in sys.argv[1:3])
print(f"perplexity before: {fp['ppl']:.2f}   after (W3A16 g64): {q['ppl']:.2f}   ({q['tokens']} tokens)")
from pipeline.report import add_perplexity
add_perplexity("runs/demo/report.json", "eval.txt", fp["ppl"], q["ppl"])  # shown in the plot's title
print("report: runs/demo/report.json, plot: runs/demo/report.png")
PYEOF
