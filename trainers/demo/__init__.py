"""The demo job: a small byte-level GPT trained with DDP on the bundled corpus, with checkpoints and best-N.

    torchrun --standalone --nproc-per-node 4 -m trainers.demo --run-dir runs/demo

See `python -m trainers.demo --help` and docs/user_guide.md.
"""
