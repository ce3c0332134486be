"""The embedded default: CARP on Fashion-MNIST in minutes, on whatever device there is.

    python recipes/fashion_mnist.py            # under 10 minutes on 2 CPU cores
    python recipes/fashion_mnist.py --epochs 1 --train-images 2048   # a smoke test

Ends by printing the k-NN top-1 (k = 20, T = 0.07) on the 10k test images of the trained
teacher beside that of the same network at random initialisation and that of the raw
pixels. Every setting below is an option (`--help` lists them with their defaults).
"""

from carp_fast.export import export_backbone
from carp_fast.learner import carp_learner
from carp_fast.run import command_line, finish, knn_baselines, open_sources, parse_settings, pretraining_dataloaders, run_callbacks, start

DEFAULTS = dict(
    data="fashion-mnist",  # Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist
    out="runs/fashion_mnist",
    # Model
    arch="resnet10_tiny",  # 1.2M parameters: a CPU trains it in minutes
    n_prototypes=1024,  # small K for 60k images
    block_size=64,  # 16 blocks: small blocks are stable at small batches (paper B.2)
    hidden_dim=512,
    embed_dim=128,
    # Optimisation
    optimizer="adamw",  # LARS needs long schedules; AdamW learns far more in minutes
    base_lr=2e-3,  # x 256 / 256 (the 5e-4 tried first reached 68.1 % instead of 77.5 %)
    final_lr=2e-5,  # the cosine's absolute end
    weight_decay=0.05,
    batch_size=256,
    global_batch=256,
    teacher_momentum=0.97,  # few steps: a faster teacher
    # Crops: 28 px images
    global_size=28,
    local_size=14,
    local_crops=2,
    global_scale=(0.3, 1.0),
    local_scale=(0.1, 0.3),
    blur_sigma=(0.1, 0.5),  # 2 px of blur would erase a 28 px image
    # Budget
    epochs=4,
    train_images=16_384,  # a fixed random subset per epoch keeps the run to minutes on 2 cores
    minutes=7,  # training stops after the epoch that would pass this
    workers=2,
    # Monitoring
    eval_size=28,
    eval_resize=None,
    knn_bank=20_000,  # labelled training images in the k-NN bank (test: all 10k)
    knn_every=0,  # only after the last epoch
    knn_random_init=True,  # and at initialisation, beside the raw pixels
    log_every=10,
)


@command_line
def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    settings, config = parse_settings(defaults, argv, __doc__)
    accelerator = start(settings, config)  # processes, devices, precision, seed
    sources = open_sources(settings, config)  # pretraining images, k-NN bank and queries
    dls = pretraining_dataloaders(sources, settings, config, accelerator)
    learn = carp_learner(dls, config, accelerator=accelerator, path=settings.out, progress=settings.progress)
    learn.add_cbs(run_callbacks(settings, config, sources, accelerator))  # metrics, checkpoints (resume), k-NN, budget
    baselines = knn_baselines(learn, settings)  # the teacher at initialisation and the raw pixels
    learn.fit(settings.epochs)
    return finish(learn, settings, config, baselines, export=export_backbone)


if __name__ == "__main__":
    main()
