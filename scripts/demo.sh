#!/usr/bin/env bash
# make demo: the whole pipeline on the shipped demo data with SmolLM2-135M-Instruct.
#   data_transform.py -> train_by_mlx.sh -> convert_and_serve.sh (background) -> test_mlx.py --compare
# Environment (used by the shortened pipeline test; defaults give the real demo):
#   DEMO_CONFIG (configs/demo.yaml), DEMO_OVERRIDES ("KEY=VALUE ..." for every step),
#   DEMO_PROMPTS (data/demo_prompts.jsonl), DEMO_PORT (8080), DEMO_DATA_OUT (data/demo),
#   DEMO_RAW (data/demo_raw/*: the raw files data_transform.py reads)
# `make demo-dpo` runs it on the DPO demo (configs/dpo-demo.yaml, data/dpo_demo_raw/pairs.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
config="${DEMO_CONFIG:-configs/demo.yaml}"
prompts="${DEMO_PROMPTS:-data/demo_prompts.jsonl}"
port="${DEMO_PORT:-8080}"
data_out="${DEMO_DATA_OUT:-data/demo}"
read -r -a raw <<< "${DEMO_RAW:-$(echo data/demo_raw/*)}"
read -r -a overrides <<< "${DEMO_OVERRIDES:-}"
overrides+=("data=$data_out" "serve.port=$port")
py=scripts/python
get() { $py -c "import sys; from mlx_tune.config import load_config; c = load_config(sys.argv[1], sys.argv[2:]); print($1)" "$config" "${overrides[@]}"; }
output_dir=$(get c.output_dir)
fused_dir=$(get c.fused_path)
adapter_name=$(get c.serve.adapter_name)
t0=$(date +%s)
healthy() { $py -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$port/health" >/dev/null 2>&1; }
step() { printf '\n\033[1m== %s\033[0m (%ss elapsed)\n' "$1" "$(( $(date +%s) - t0 ))"; }

step "1/4 data: data_transform.py ${raw[*]} -> $data_out"
$py data_transform.py "${raw[@]}" --out "$data_out" --seed 0 --force

step "2/4 train: ./train_by_mlx.sh $config"
./train_by_mlx.sh "$config" "${overrides[@]}"

step "3/4 fuse + serve: ./convert_and_serve.sh $config (background)"
mkdir -p "$output_dir"
log="$output_dir/server.log"
./convert_and_serve.sh "$config" "${overrides[@]}" fuse.force=true > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  if healthy; then break; fi
  if ! kill -0 $server 2>/dev/null; then echo "the server exited; its log:"; cat "$log"; exit 1; fi
  sleep 1
done
healthy || { echo "server did not become healthy; log: $log"; tail -20 "$log"; exit 1; }
sed -n '/fidelity/,/^$/p' "$log" | head -20 || true

step "4/4 test: test_mlx.py --compare base $adapter_name"
report="$output_dir/eval_report.json"
$py test_mlx.py --base-url "http://127.0.0.1:$port" --prompts "$prompts" --compare base "$adapter_name" --report "$report" \
  --concurrency 8 --max-tokens 16

runs=$($py -c "import json, sys, urllib.request; print(len(json.load(urllib.request.urlopen(sys.argv[1], timeout=10))['runs']))" \
  "http://127.0.0.1:$port/studio/api/runs" 2>/dev/null || echo "?")
echo "studio: $runs runs listed at http://127.0.0.1:$port/studio#runs (./convert_and_serve.sh $config serves it again)"

step "done"
$py - "$report" "$output_dir" "$fused_dir" <<'PY'
import json, sys
report, out, fused = sys.argv[1:]
r = json.load(open(report))
acc = r["accuracy"]
names = r["models"]
print(f"accuracy on held-out demo prompts: base {acc[names[0]]:.0%}  ->  tuned {acc[names[1]]:.0%}")
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
curve = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
if curve:
    kept = json.load(open(f"{out}/adapter_config.json"))
    print("eval accuracy during training: " + "  ".join(f"step {s}: {a:.0%}" for s, a in curve)
          + f"  (adapter kept: step {kept.get('step')})")
print(f"adapter:     {out}/adapters.safetensors (+ adapter_config.json, metrics.jsonl)")
print(f"loss plot:   {out}/loss.png")
print(f"fused model: {fused}")
print(f"eval report: {report}")
PY
echo "total time: $(( $(date +%s) - t0 ))s"
