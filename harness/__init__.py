"""The fixed machinery behind prepare.py; the agent never edits it; protected like prepare.py.

prepare.py is the contract an agent reads (constants, profiles, the dataset layout, the
tokenizer, the loader, evaluate_bpb); the work behind it lives here, one job per module:
downloading and cutting the datasets, training the tokenizer, the loader's best-fit packing
(packing.py), the tuned-BLAS preload,
device peak FLOPs, the memory a training step may use and the micro-batch that fits it,
evaluate_bpb's per-backend kernels, the in-process causality probe, and the trust boundary
the runner starts: the sandbox (sandbox.py) and the trusted scorer (scorer.py).

Modules here import neither trainer (train.py, train_mlx.py), nor autoresearch/, nor
prepare.py: prepare.py imports them and passes in what they need (paths, the tokenizer
spec). The one exception is the scorer's process entry point (`python -m harness.scorer`),
which loads the validation rows through prepare.py. They stay light at import time: no
torch, no MLX.
"""
