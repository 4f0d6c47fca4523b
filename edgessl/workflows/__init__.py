"""One module per command (pretrain, eval, finetune, embed, export, slim, prune, cache, check): each checks its
arguments, wires the toolkit packages below it, writes the outputs and reports. edgessl.api re-exports them; nothing
below imports this package."""
