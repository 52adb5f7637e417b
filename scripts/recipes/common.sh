# Shared by the recipes: the paper's optimiser and schedule (Table 6) as open_clip flags.
# Linear decay after 10% warm-up = open_clip's const-cooldown with the cool-down covering the
# epochs after warm-up and power 1. Needs EPOCHS, NUM_SAMPLES, NPROC, BATCH_PER_GPU set.
steps_per_epoch=$(( NUM_SAMPLES / (NPROC * BATCH_PER_GPU) ))
warmup=$(( steps_per_epoch * EPOCHS / 10 ))
cooldown_epochs=$(( EPOCHS - (EPOCHS + 9) / 10 ))
PAPER_OPTIM=(--lr 5e-5 --wd 0.01 --beta1 0.9 --beta2 0.999 --eps 1e-8 --epochs "$EPOCHS"
  --warmup "$warmup" --lr-scheduler const-cooldown --epochs-cooldown "$cooldown_epochs"
  --lr-cooldown-power 1.0 --lr-cooldown-end 0 --precision amp)
