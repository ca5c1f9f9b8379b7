#!/usr/bin/env bash
# The toy pipeline: every experiment of the paper at toy scale, one command, on a CPU.
#   bash pipeline.sh              # the README's numbers (about 29 minutes on 2 cores)
#   SCALE=tiny bash pipeline.sh   # a few minutes: what the test suite runs (numbers meaningless)
# A plain chain of the scripts' own command lines, each step's files feed the next (--overwrite):
#   toy_gmm (Sec. 3) | sem train -> encode (DLCs + embeddings) | sedd train -> sample (p(c))
#   dit train x 4 conditionings -> sample | dit compose | text2dlc train -> sample -> dit sample
#   evaluate judge / probe (its own 30000 images) on everything -> evaluate report -> $OUT/results.md
set -euo pipefail
SCALE=${SCALE:-full}
OUT=${OUT:-runs/pipeline}
D=$(cd "$(dirname "$0")" && pwd)          # the scripts; runs/ goes under the current folder
PY=${PYTHON:-python}
if [ "$SCALE" = full ]; then
  GMM=(--steps=2500 --n_eval=5000)
  NDATA=4000; NPROBE=30000; SEM=(); SEDD=(--steps 1200); SAMPLE_SEDD=(--steps 512); DIT=(--steps 2000); T2D=(--steps 3000)
  NS=500; STEPS=50; NPAIRS=24; K=8; NP=32; JUDGE=(--judge_steps 400)
elif [ "$SCALE" = tiny ]; then
  GMM=(--steps=5 --batch_size=64 --width=16 --n_eval=300 --sample_steps=5 --pool=4096)
  NDATA=200; NPROBE=300; SEM=(--steps 2 --batch_size 8 --local_crops 1 --prototypes 32 --head_hidden 32 --head_bottleneck 16
       --warmup 1 --freeze_last 1 --teacher_temp_steps 2)
  SEDD=(--steps 4 --batch_size 16 --eval_every 4 --ckpt_every 4); DIT=(--steps 4 --batch_size 16 --ckpt_every 4 --sample_every 4)
  T2D=(--steps 4 --batch_size 8 --d_model 32 --n_layers 1); SAMPLE_SEDD=(); NS=40; STEPS=4; NPAIRS=6; K=4; NP=4
  JUDGE=(--judge_steps 30 --allow_low_rank)
else
  echo "error: SCALE must be full or tiny, got '$SCALE'" >&2; exit 2
fi
mkdir -p "$OUT/s" "$OUT/eval"
JUDGE+=(--judge "$OUT/judge.pt" --data shapes)
t0=$SECONDS
stage() { echo; echo "### [$((SECONDS - t0)) s] $*"; }

stage "1. Section 3: grid GMMs, unconditional vs oracle-index conditioning (python toy_gmm.py: all four variants)"
$PY "$D/toy_gmm.py" --run=pipeline --overwrite --variants=uncond,oracle "${GMM[@]}"

stage "2. SEM encoder (self-distillation) on shapes, then DLCs + continuous embeddings of the training images"
$PY "$D/sem.py" --run pipeline --overwrite --n $NDATA "${SEM[@]}"
$PY "$D/sem.py" encode --ckpt runs/sem-pipeline --data shapes --n $NDATA --out "$OUT/dlc" --continuous --overwrite
$PY "$D/sem.py" encode --ckpt runs/sem-pipeline --data shapes --n $NPROBE --out "$OUT/dlc-probe" --continuous --overwrite  # on 4000 the probe is sample-limited
$PY "$D/evaluate.py" probe --dlc "$OUT/dlc-probe" --out "$OUT/eval/probe"

stage "3. SEDD over the DLCs, then generated DLCs"
$PY "$D/sedd.py" --dlc "$OUT/dlc" --run pipeline --overwrite "${SEDD[@]}"
$PY "$D/sedd.py" sample --ckpt runs/sedd-pipeline "${SAMPLE_SEDD[@]}" --n $NS --out "$OUT/dlc-sedd" --overwrite
$PY "$D/sedd.py" sample --ckpt runs/sedd-pipeline "${SAMPLE_SEDD[@]}" --n $NS --eta 0 --out "$OUT/dlc-sedd-eta0" --overwrite   # no remasking

stage "4. DiT with each conditioning (same size, same budget), generated embeddings for the baseline"
# two trainings at a time, one thread each (faster than one after the other with two threads)
for pair in "dlc label" "embedding none"; do
  pids=()
  for c in $pair; do
    OMP_NUM_THREADS=1 $PY "$D/dit.py" train --cond $c --dlc "$OUT/dlc" --data_n $NDATA --run pipeline-$c --overwrite "${DIT[@]}" \
      > "$OUT/dit-$c.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { tail -qn 1 "$OUT"/dit-*.log >&2; echo "error: a DiT training failed (logs: $OUT/dit-*.log)" >&2; exit 1; }; done
  tail -n 2 "$OUT"/dit-*.log
done
$PY "$D/dit.py" embgen --dlc "$OUT/dlc" --n $NS --out "$OUT/emb-gen.npy"

stage "5. Samples of every model (judge-FID, Table 3 left) and the training images at 16 px (the floor)"
S=(--n $NS --sample_steps $STEPS); G=(--cfg_scale 4)   # every conditioned model guided at DiT's figure scale
$PY "$D/dit.py" real --n $NS --out "$OUT/s/real-16px.npz"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-dlc --dlc "$OUT/dlc" "${S[@]}" "${G[@]}" --out "$OUT/s/dlc-encoded.npz"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-dlc --dlc "$OUT/dlc-sedd" "${S[@]}" "${G[@]}" --out "$OUT/s/dlc-sedd.npz"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-label "${S[@]}" "${G[@]}" --out "$OUT/s/label.npz"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-embedding --dlc "$OUT/dlc" "${S[@]}" "${G[@]}" --out "$OUT/s/embedding-encoded.npz"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-embedding --embeddings "$OUT/emb-gen.npy" "${S[@]}" "${G[@]}" --out "$OUT/s/embedding-generated.npz"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-none "${S[@]}" --out "$OUT/s/unconditional.npz"
for s in real-16px dlc-encoded embedding-encoded; do
  $PY "$D/evaluate.py" judge --samples "$OUT/s/$s.npz" --target_attrs "$OUT/dlc/attrs.npy" --out "$OUT/eval/$s" "${JUDGE[@]}"
done
for s in dlc-sedd label embedding-generated unconditional; do
  $PY "$D/evaluate.py" judge --samples "$OUT/s/$s.npz" --out "$OUT/eval/$s" "${JUDGE[@]}"
done

stage "6. Composition (Sec. 5.2): DLC token mixing vs averaging the continuous embeddings"
# sources that differ in shape, colour and background; then pairs that can recombine into a held-out combination
for pick in differ heldout; do
  name=$([ $pick = differ ] && echo compose || echo compose-heldout)
  $PY "$D/dit.py" compose --ckpt runs/dit-pipeline-dlc --emb_ckpt runs/dit-pipeline-embedding --dlc "$OUT/dlc" \
    --pick $pick --n_pairs $NPAIRS --n_per_pair $K --sample_steps $STEPS "${G[@]}" --out "$OUT/s/$name.npz"
  $PY "$D/evaluate.py" judge --samples "$OUT/s/$name.npz" --out "$OUT/eval/$name-dlc" "${JUDGE[@]}"
  $PY "$D/evaluate.py" judge --samples "$OUT/s/${name}_embavg.npz" --out "$OUT/eval/$name-embedding" "${JUDGE[@]}"
done

stage "7. Text -> DLC -> image (Sec. 6): seen vs held-out attribute combinations (prompts/*.txt)"
$PY "$D/text2dlc.py" --dlc "$OUT/dlc" --run pipeline --overwrite "${T2D[@]}"
for split in seen heldout; do
  $PY "$D/text2dlc.py" sample --ckpt runs/text2dlc-pipeline --prompts_file "$D/prompts/$split.txt" --n $NP \
    --out "$OUT/t2d-$split" --overwrite
  $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-dlc --dlc "$OUT/t2d-$split" --n $((6 * NP)) \
    --sample_steps $STEPS "${G[@]}" --out "$OUT/s/text-$split.npz"
  $PY "$D/evaluate.py" judge --samples "$OUT/s/text-$split.npz" --target_attrs "$OUT/t2d-$split/attrs.npy" \
    --out "$OUT/eval/text-$split" "${JUDGE[@]}"
done

stage "8. Results: tables, the claims next to the paper's numbers, figures"
$PY "$D/evaluate.py" report --pipeline "$OUT" --gmm runs/toy_gmm-pipeline/results.json --seconds $((SECONDS - t0))
echo "done in $((SECONDS - t0)) s; tables in $OUT/results.md, figures in $OUT/pipeline_*.png, sample grids in $OUT/s/*.png"
