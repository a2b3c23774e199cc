"""The fixed machinery behind prepare.py; the agent never edits it; protected like prepare.py.

prepare.py is the contract an agent reads (constants, profiles, the dataset layout, the
tokenizer, the loader, evaluate_bpb); the work behind it lives here, one job per module:
downloading and cutting the datasets, training the tokenizer, the tuned-BLAS preload,
device peak FLOPs, the evaluation integrity probe (and the runner-side sandbox and scorer).

Modules here import neither trainer (train.py, train_mlx.py), nor autoresearch/, nor
prepare.py: prepare.py imports them and passes in what they need (paths, the tokenizer
spec). They stay light at import time: no torch, no MLX.
"""
