#!/usr/bin/env bash
# One command per result of the paper, at paper scale (the README's "Reproduce the paper"):
#   bash paper.sh table1              # Table 1, DLC512 rows: SEDD -> DiT -> FID-50k, with and without CFG
#   bash paper.sh fig8                # Fig. 8: FID vs the remasking eta (table + plot)
#   bash paper.sh fig5                # Fig. 5: the three L x V = 131072 configurations, trained end to end
#   bash paper.sh table3              # Table 3: linear probe of the one-hot DLC vs the continuous embedding
#   bash paper.sh compose A.jpg B.jpg # composition of two images (Sec. 5.2)
#   bash paper.sh text "a prompt"     # text -> DLC -> image (Sec. 6)
#   SCALE=tiny bash paper.sh RESULT   # the same chain with tiny models trained here for 2 steps on
#                                     # CPU (what tests/test_paper.py runs; numbers meaningless)
# A plain list of the scripts' own command lines; results go to $OUT/<result>/. Inputs are
# environment variables (paper-scale defaults below; every checkpoint may be ours or a
# `authors.py` conversion of the authors' released one):
#   OUT=runs/paper                   where results go
#   SEM_CKPT=runs/sem-imagenet       SEM encoder (sem.py train, or authors.py sem of lavoies/SEM_dinov2_L512)
#   SEDD_CKPT=runs/sedd-imagenet512  DLC generator (sedd.py train, or authors.py sedd of lavoies/DLC_SEDD_L512)
#   DIT_CKPT=runs/dit-imagenet       DLC -> image DiT (dit.py train, or authors.py dit of lavoies/DLC_DiT_L512)
#   LLADA_DIR=/models/DLC_LLADA_L512 the authors' finetuned LLaDA folder; or T2D_CKPT=runs/text2dlc-laion (ours)
#   DLC=runs/dlc512                  ImageNet-train DLC set with embeddings.npy (sem.py encode --continuous;
#                                    authors.py dlc of lavoies/DLC_512x256 has no embeddings: DLC probe only)
#   IMAGENET=/data/imagenet/train    ImageFolder (fig5 only)     LATENTS=/data/in256-latents (dit.py extract)
#   INIT=dinov2_vitl14_reg4_pretrain.pth (fig5 only)             VAE=/models/sd-vae-ft-ema (diffusers folder)
#   REF=VIRTUAL_imagenet256_labeled.npz (ADM's reference batch)  INCEPTION=weights/pt_inception-2015-12-05-6726825d.pth
#   GPUS=8 (torchrun processes)  N=50000 (samples per FID)  N_FIG8=10000  ETAS="0 0.001 0.003 0.01 0.03 0.1"
#   FIG5="512x256 128x1024 32x4096"
set -euo pipefail
SCALE=${SCALE:-paper}
OUT=${OUT:-runs/paper}
D=$(cd "$(dirname "$0")" && pwd)          # the scripts; runs/ goes under the current folder
PY=${PYTHON:-python}
WHAT=${1:-}
[ $# -gt 0 ] && shift

if [ "$SCALE" = paper ]; then
  SEM_CKPT=${SEM_CKPT:-runs/sem-imagenet}; SEDD_CKPT=${SEDD_CKPT:-runs/sedd-imagenet512}
  DIT_CKPT=${DIT_CKPT:-runs/dit-imagenet}; LLADA_DIR=${LLADA_DIR:-/models/DLC_LLADA_L512}; T2D_CKPT=${T2D_CKPT:-}
  DLC=${DLC:-runs/dlc512}; IMAGENET=${IMAGENET:-/data/imagenet/train}; LATENTS=${LATENTS:-/data/in256-latents}
  INIT=${INIT:-dinov2_vitl14_reg4_pretrain.pth}; VAE=${VAE:-/models/sd-vae-ft-ema}
  REF=${REF:-VIRTUAL_imagenet256_labeled.npz}; INCEPTION=${INCEPTION:-weights/pt_inception-2015-12-05-6726825d.pth}
  N=${N:-50000}; N_FIG8=${N_FIG8:-10000}; ETAS=${ETAS:-"0 0.001 0.003 0.01 0.03 0.1"}
  FIG5=${FIG5:-"512x256 128x1024 32x4096"}; GPUS=${GPUS:-8}
  LAUNCH="torchrun --nproc_per_node=$GPUS"; SEP="--"   # "--": torchrun must not read --n / --run itself
  SEDD_P="--preset imagenet"; DIT_P="--preset imagenet --vae $VAE"; EVAL_P="--preset imagenet"
  SEM_TRAIN="--preset imagenet --data $IMAGENET --init $INIT"; SEM_ENC="--preset imagenet --data $IMAGENET"
  SEDD_TRAIN="--preset imagenet512"; DIT_TRAIN="--preset imagenet --latents $LATENTS"
  SEDD_1024="--steps 1024 --eta 0"; SEDD_4096="--steps 4096 --eta 0.01"; DIT_CFG="--cfg_scale 1.7 --cfg_channels 4"
  K=8; T2D_N=4; ENC_SIZE=224; PROBE="--probe_solver torch --device cuda"
elif [ "$SCALE" = tiny ]; then
  T=$OUT/tiny
  SEM_CKPT=${SEM_CKPT:-runs/sem-paper-tiny}; SEDD_CKPT=${SEDD_CKPT:-runs/sedd-paper-tiny}
  DIT_CKPT=${DIT_CKPT:-runs/dit-paper-tiny}; LLADA_DIR=${LLADA_DIR:-}; T2D_CKPT=${T2D_CKPT:-runs/text2dlc-paper-tiny}
  DLC=${DLC:-$T/dlc}; REF=${REF:-$T/ref.npz}; INCEPTION=${INCEPTION:-random}
  N=${N:-8}; N_FIG8=${N_FIG8:-8}; ETAS=${ETAS:-"0 0.01"}; FIG5=${FIG5:-"4x8"}
  LAUNCH=$PY; SEP=""
  SEDD_P="--batch_size 8"; DIT_P="--sample_steps 2"; EVAL_P="--allow_low_rank --batch_size 8 --splits 2"
  SEM_TINY="--steps 2 --batch_size 8 --local_crops 1 --prototypes 32 --head_hidden 32 --head_bottleneck 16
            --warmup 1 --freeze_last 1 --teacher_temp_steps 2 --n 48"
  SEM_TRAIN=$SEM_TINY; SEM_ENC="--data shapes --n 48"
  SEDD_TRAIN="--steps 2 --batch_size 16 --eval_every 2 --ckpt_every 2"
  DIT_TRAIN="--data_n 48 --steps 2 --batch_size 16 --ckpt_every 2 --sample_every 2"
  SEDD_1024="--steps 4 --eta 0"; SEDD_4096="--steps 8 --eta 0.01"; DIT_CFG="--cfg_scale 1.7 --cfg_channels 3"
  K=2; T2D_N=2; ENC_SIZE=32; PROBE="--probe_solver torch --probe_epochs 2"
else
  echo "error: SCALE must be paper or tiny, got '$SCALE'" >&2; exit 2
fi
run() { local s=$1; shift; $LAUNCH "$D/$s" $SEP "$@"; }   # torchrun at paper scale, python at tiny
py() { local s=$1; shift; $PY "$D/$s" "$@"; }              # single-process steps (FID, probe, tables)

tiny_models() {   # SCALE=tiny: every model of the chain, trained here for 2 steps (skipped once done)
  [ "$SCALE" = tiny ] && [ ! -f "$T/done" ] || return 0
  mkdir -p "$T"
  py sem.py --run paper-tiny $SEM_TINY
  py sem.py encode --ckpt "$SEM_CKPT" --data shapes --n 48 --out "$DLC" --continuous
  py sedd.py --dlc "$DLC" --run paper-tiny $SEDD_TRAIN
  py dit.py train --cond dlc --dlc "$DLC" --run paper-tiny $DIT_TRAIN
  py text2dlc.py --dlc "$DLC" --run paper-tiny --steps 2 --batch_size 8 --d_model 32 --n_layers 1
  py dit.py sample --ckpt "$DIT_CKPT" --dlc "$DLC" --n 8 $DIT_P --out "$REF"      # a tiny fake reference batch
  touch "$T/done"
}

# SEDD samples -> DiT samples -> FID against the reference: fid_chain OUT_DIR SEDD_CKPT DIT_CKPT SEDD_FLAGS DIT_FLAGS N
fid_chain() {
  local o=$1 sedd=$2 dit=$3 sflags=$4 dflags=$5 n=$6
  run sedd.py sample $SEDD_P --ckpt "$sedd" --num "$n" $sflags --out "$o/dlc"
  run dit.py sample $DIT_P --ckpt "$dit" --dlc "$o/dlc" --n "$n" $dflags --out "$o/samples.npz"
  py evaluate.py fid $EVAL_P --samples "$o/samples.npz" --ref "$REF" --inception "$INCEPTION" --out "$o"
}

case "$WHAT" in
table1)   # paper: FID 2.00 (4096 steps, remasking eta 0.01, no CFG) and 1.59 (1024 steps, CFG 1.7, 4 channels)
  tiny_models; O=$OUT/table1
  fid_chain "$O/no-guidance" "$SEDD_CKPT" "$DIT_CKPT" "$SEDD_4096" "" "$N"
  fid_chain "$O/cfg-1.7" "$SEDD_CKPT" "$DIT_CKPT" "$SEDD_1024" "$DIT_CFG" "$N"
  py evaluate.py table --inputs "$O/no-guidance/metrics.json,$O/cfg-1.7/metrics.json" --out "$O/table1.md" ;;
fig8)     # paper: a U-shaped FID-vs-eta curve, best near eta = 0.01 (4096 steps, no CFG)
  tiny_models; O=$OUT/fig8; INPUTS=""
  for eta in $ETAS; do
    fid_chain "$O/eta-$eta" "$SEDD_CKPT" "$DIT_CKPT" "${SEDD_4096% --eta*} --eta $eta" "" "$N_FIG8"
    INPUTS="$INPUTS${INPUTS:+,}$O/eta-$eta/metrics.json"
  done
  py evaluate.py plot --inputs "$INPUTS" --x "$(echo $ETAS | tr ' ' ,)" --xlabel "remasking eta" --y fid \
    --out "$O/fig8.png" ;;
fig5)     # paper: the three L x V configurations (32 x 4096, 128 x 1024, 512 x 256), each trained end to end
  tiny_models; O=$OUT/fig5; INPUTS=""
  for lv in $FIG5; do
    L=${lv%x*}; V=${lv#*x}; R=paper-fig5-$lv
    run sem.py --run "$R" $SEM_TRAIN --L "$L" --V "$V"
    run sem.py encode $SEM_ENC --ckpt "runs/sem-$R" --out "$O/dlc-$lv"
    run sedd.py --dlc "$O/dlc-$lv" --run "$R" $SEDD_TRAIN --L "$L" --V "$V"
    run dit.py train --cond dlc --dlc "$O/dlc-$lv" --run "$R" $DIT_TRAIN
    fid_chain "$O/$lv" "runs/sedd-$R" "runs/dit-$R" "$SEDD_4096" "" "$N"
    INPUTS="$INPUTS${INPUTS:+,}$O/$lv/metrics.json"
  done
  py evaluate.py table --inputs "$INPUTS" --out "$O/fig5.md" ;;
table3)   # paper: DLC512 85.3% (DINOv2 embedding 85.9%, RCG 0.1%)
  tiny_models
  py evaluate.py probe --dlc "$DLC" $PROBE --out "$OUT/table3" ;;
compose)  # paper Sec. 5.2 / Fig. 6: token-wise mixing of the DLCs of two images, decoded by the DiT
  [ $# -ge 2 ] || { echo "error: compose needs two image files: bash paper.sh compose A.jpg B.jpg" >&2; exit 2; }
  tiny_models; O=$OUT/compose
  mkdir -p "$O/images"
  cp "$1" "$O/images/0-$(basename "$1")"; cp "$2" "$O/images/1-$(basename "$2")"   # row 0 = A, row 1 = B
  py sem.py encode --ckpt "$SEM_CKPT" --data "$O/images" --size $ENC_SIZE --out "$O/dlc"
  py dit.py compose $DIT_P --ckpt "$DIT_CKPT" --dlc "$O/dlc" --pairs 0:1 --n_per_pair $K $DIT_CFG \
    --out "$O/compose.npz" ;;
text)     # paper Sec. 6 / Fig. 7: the finetuned LLaDA writes DLCs for the prompt, the frozen DiT draws them
  [ $# -ge 1 ] || { echo "error: text needs a prompt: bash paper.sh text \"a golden retriever\"" >&2; exit 2; }
  tiny_models; O=$OUT/text
  if [ -n "$T2D_CKPT" ]; then SRC="--ckpt $T2D_CKPT"; else SRC="--model_path $LLADA_DIR --L 512"; fi
  py text2dlc.py sample $SRC --prompt "$1" --n $T2D_N --temperature 0.2 --remasking random --out "$O/dlc"
  py dit.py sample $DIT_P --ckpt "$DIT_CKPT" --dlc "$O/dlc" --n $T2D_N --cfg_scale 3 --out "$O/samples.npz" ;;
*)
  echo "error: unknown result '$WHAT'; use table1, fig8, fig5, table3, compose A.jpg B.jpg or text \"prompt\"" >&2
  exit 2 ;;
esac
echo "done: $WHAT -> $OUT"
