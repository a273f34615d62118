"""A load, stage by stage: resolve which checkpoint, check it against what the job declared before anything
changes, read this rank's share (only the byte ranges it needs), reshard state saved under another layout,
and apply it to the live components."""
