"""CARP on ImageNet-1k, ResNet-50, 2x224 + 6x96 multi-crop: the paper's main setting.

    accelerate launch recipes/in1k_mc.py --data /path/to/imagenet --out runs/in1k_mc

4 GPUs x batch 64 x 16 accumulation steps = global batch 4096 (paper appendix C.1).
Override any setting on the command line; `--help` lists them all. For 400 epochs the
paper uses --base-lr 0.3 --final-lr 0.003 (0.6 -> 0.006 up to 200 epochs).
"""

SETTINGS = dict(
    data="/path/to/imagenet",  # folder with train/ and val/ in the ImageNet layout
    out="runs/in1k_mc",
    epochs=200,
    # The model, objective and optimiser are CARPConfig's defaults: ResNet-50, K = 65,536,
    # B = 512, LARS, weight decay 1e-6, teacher momentum 0.99 -> 1, bf16, SyncBatchNorm,
    # channels_last.
    base_lr=0.6,  # peak 0.6 x 4096 / 256 = 9.6, no warm-up (paper C.1; 0.3 for 400 epochs)
    final_lr=0.006,  # absolute end of the cosine, not scaled with the batch (0.003 for 400 epochs)
    batch_size=64,  # per GPU; lower it (and keep global_batch) if memory runs out
    global_batch=4096,
    global_size=224,
    local_size=96,
    local_crops=6,
    workers=8,  # DALI threads per GPU
    knn_every=10,
    knn_bank=100_000,  # k-NN monitor: a labelled 100k bank keeps it to minutes
    knn_queries=10_000,
    log_every=50,
)

if __name__ == "__main__":
    from carp_fast.train import run

    run(SETTINGS, description=__doc__)
