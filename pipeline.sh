#!/usr/bin/env bash
# The toy pipeline: every experiment of the paper at toy scale, one command, on a CPU.
#   bash pipeline.sh              # the README's numbers (14-15 minutes on 2 idle AVX512-BF16 cores)
#   SCALE=tiny bash pipeline.sh   # a few minutes: what the test suite runs (numbers meaningless)
# A plain chain of the scripts' own command lines; each step's files feed the next (--overwrite):
#   sem -> encode | toy_gmm, sedd -> sample, dit x 4 conditionings -> sample / compose | text2dlc -> sample -> dit
#   evaluate judge / probe on everything -> evaluate report -> $OUT/results.md (tables, claims, figures)
set -euo pipefail
SCALE=${SCALE:-full}
OUT=${OUT:-runs/pipeline}
D=$(cd "$(dirname "$0")" && pwd)          # the scripts; runs/ goes under the current folder
PY=${PYTHON:-python}
if [ "$SCALE" = full ]; then
  GMM=(--steps=2500 --n_eval=5000)
  NDATA=4000; NPROBE=30000; SEM=(); SEDD=(--steps 1300); DIT=(--steps 2000); T2D=(--steps 1500 --lr 2e-3)
  NS=500; STEPS=50; NPAIRS=24; K=8; NP=32; JUDGE=(--judge_steps 400)
elif [ "$SCALE" = tiny ]; then
  GMM=(--steps=5 --batch_size=64 --width=16 --n_eval=300 --sample_steps=5 --pool=4096)
  NDATA=200; NPROBE=300; SEM=(--steps 2 --batch_size 8 --local_crops 1 --prototypes 32 --head_hidden 32 --head_bottleneck 16
       --warmup 1 --freeze_last 1 --teacher_temp_steps 2)
  SEDD=(--steps 4 --batch_size 16 --eval_every 4 --ckpt_every 4); DIT=(--steps 4 --batch_size 16 --ckpt_every 4 --sample_every 4)
  T2D=(--steps 4 --batch_size 8 --d_model 32 --n_layers 1); NS=40; STEPS=4; NPAIRS=6; K=4; NP=4; JUDGE=(--judge_steps 30 --allow_low_rank)
else
  echo "error: SCALE must be full or tiny, got '$SCALE'" >&2; exit 2
fi
mkdir -p "$OUT/s" "$OUT/eval"
JUDGE+=(--judge "$OUT/judge.pt" --data shapes)
t0=$SECONDS; stage() { echo; echo "### [$((SECONDS - t0)) s] $*"; }

# Two chains of one-thread steps side by side (faster than one after the other on 2 threads); each reads
# only what it or an earlier stage wrote. Logs: $OUT/lane-{a,b}.log.
lane() { (export OMP_NUM_THREADS=1; $1) >> "$OUT/lane-$2.log" 2>&1; }
finished() {  # wait for the lane jobs $@; if a step failed: wait for every job, show the logs' ends, stop
  local rc=0; for p in "$@"; do wait "$p" || rc=$?; done
  [ $rc = 0 ] && return; wait || true
  tail -n 5 "$OUT"/lane-[ab].log >&2; echo "error: a step failed (logs: $OUT/lane-[ab].log)" >&2; exit 1
}
dit_train() { $PY "$D/dit.py" train --cond $1 --dlc "$OUT/dlc" --data_n $NDATA --run pipeline-$1 --overwrite "${DIT[@]}"; }
S=(--n $NS --sample_steps $STEPS); G=(--cfg_scale 4)     # the DLC and embedding models guided at DiT's figure scale
judge() { $PY "$D/evaluate.py" judge --samples "$OUT/s/$1.npz" --out "$OUT/eval/$1" "${@:2}" "${JUDGE[@]}"; }

section3() {
  stage "1a. Section 3: grid GMMs, unconditional vs oracle-index conditioning (python toy_gmm.py: all four variants)"
  $PY "$D/toy_gmm.py" --run=pipeline --overwrite --variants=uncond,oracle "${GMM[@]}"
}
encoder() {
  stage "1b. SEM encoder (self-distillation) on shapes, DLCs + continuous embeddings of its training images; the judge"
  $PY "$D/sem.py" --run pipeline --overwrite --n $NDATA "${SEM[@]}"
  $PY "$D/sem.py" encode --ckpt runs/sem-pipeline --data shapes --n $NDATA --out "$OUT/dlc" --continuous --overwrite
  $PY "$D/dit.py" real --n $NS --out "$OUT/s/real-16px.npz"            # the training images at 16 px: the floor
  judge real-16px --target_attrs "$OUT/dlc/attrs.npy"                    # trains the judge once, before others read it
}
lane_a() {
  stage "2a. SEDD over the DLCs, then generated DLCs, with and without remasking"
  $PY "$D/sedd.py" --dlc "$OUT/dlc" --run pipeline --overwrite "${SEDD[@]}"
  $PY "$D/sedd.py" sample --ckpt runs/sedd-pipeline --n $NS --out "$OUT/dlc-sedd" --overwrite
  $PY "$D/sedd.py" sample --ckpt runs/sedd-pipeline --n $NS --eta 0 --out "$OUT/dlc-sedd-eta0" --overwrite
  stage "2a. DiT conditioned on the shape label; its samples (guided at 6: at 4 a tenth draw colour = background)"
  dit_train label
  $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-label "${S[@]}" --cfg_scale 6 --out "$OUT/s/label.npz"; judge label
  stage "2a. DLCs of 30000 more images for the linear probe (on 4000 the probe is sample-limited)"
  $PY "$D/sem.py" encode --ckpt runs/sem-pipeline --data shapes --n $NPROBE --out "$OUT/dlc-probe" --continuous --overwrite
  $PY "$D/evaluate.py" probe --dlc "$OUT/dlc-probe" --out "$OUT/eval/probe"
}
lane_b() {
  stage "2b. text2dlc (captions -> DLCs); DiT conditioned on the DLC, the continuous embedding, nothing (same size, budget)"
  $PY "$D/text2dlc.py" --dlc "$OUT/dlc" --run pipeline --overwrite "${T2D[@]}"
  dit_train dlc; dit_train embedding; dit_train none
  $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-none "${S[@]}" --out "$OUT/s/unconditional.npz"; judge unconditional
  $PY "$D/dit.py" embgen --dlc "$OUT/dlc" --n $NS --out "$OUT/emb-gen.npy"   # generated embeddings for the baseline
  stage "2b. Samples from encoded DLCs / embeddings (judge-FID, Table 3 left)"
  $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-dlc --dlc "$OUT/dlc" "${S[@]}" "${G[@]}" --out "$OUT/s/dlc-encoded.npz"
  $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-embedding --dlc "$OUT/dlc" "${S[@]}" "${G[@]}" --out "$OUT/s/embedding-encoded.npz"
  $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-embedding --embeddings "$OUT/emb-gen.npy" "${S[@]}" "${G[@]}" --out "$OUT/s/embedding-generated.npz"
  for s in dlc-encoded embedding-encoded; do judge $s --target_attrs "$OUT/dlc/attrs.npy"; done; judge embedding-generated
  stage "2b. Composition (Sec. 5.2): DLC token mixing vs averaging the continuous embeddings"
  # sources that differ in shape, colour and background; then pairs that can recombine into a held-out combination
  for pick in differ heldout; do
    name=$([ $pick = differ ] && echo compose || echo compose-heldout)
    $PY "$D/dit.py" compose --ckpt runs/dit-pipeline-dlc --emb_ckpt runs/dit-pipeline-embedding --dlc "$OUT/dlc" \
      --pick $pick --n_pairs $NPAIRS --n_per_pair $K --sample_steps $STEPS "${G[@]}" --out "$OUT/s/$name.npz"
    judge $name --out "$OUT/eval/$name-dlc"; judge ${name}_embavg --out "$OUT/eval/$name-embedding"
  done
  stage "2b. Text -> DLC -> image (Sec. 6): seen vs held-out attribute combinations (prompts/*.txt)"
  for split in seen heldout; do
    $PY "$D/text2dlc.py" sample --ckpt runs/text2dlc-pipeline --prompts_file "$D/prompts/$split.txt" --n $NP \
      --steps 64 --out "$OUT/t2d-$split" --overwrite                  # two of the 128 tokens per step
    $PY "$D/dit.py" sample --ckpt runs/dit-pipeline-dlc --dlc "$OUT/t2d-$split" --n $((6 * NP)) \
      --sample_steps $STEPS "${G[@]}" --out "$OUT/s/text-$split.npz"
    judge text-$split --target_attrs "$OUT/t2d-$split/attrs.npy"
  done
}
stage "1-2. Two lanes: (a) Section 3, then SEDD, label DiT, probe; (b) SEM, then text2dlc, the other DiTs"
: > "$OUT/lane-a.log"; : > "$OUT/lane-b.log"
lane section3 a & a=$!; lane encoder b & b=$!     # Section 3 needs nothing: it runs beside the encoder
finished $b; lane lane_b b & b=$!                   # everything else reads the encoder's DLCs and judge
finished $a; lane lane_a a & a=$!
finished $a $b; grep -h "^###" "$OUT"/lane-[ab].log || true

stage "3. The DLC DiT on SEDD's generated codes (Table 1)"
$PY "$D/dit.py" sample --ckpt runs/dit-pipeline-dlc --dlc "$OUT/dlc-sedd" "${S[@]}" "${G[@]}" --out "$OUT/s/dlc-sedd.npz"
judge dlc-sedd

stage "4. Results: tables, the claims next to the paper's numbers, figures"
$PY "$D/evaluate.py" report --pipeline "$OUT" --gmm runs/toy_gmm-pipeline/results.json --seconds $((SECONDS - t0))
echo "done in $((SECONDS - t0)) s; tables in $OUT/results.md, figures in $OUT/pipeline_*.png, sample grids in $OUT/s/*.png"
