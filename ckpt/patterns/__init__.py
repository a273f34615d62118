"""One placement class per sharing pattern: who writes, who reads, how the state reshards and how the `ckpt`
command shows it, in one home per pattern."""
