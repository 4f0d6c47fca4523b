"""Several edge sizes from one pretraining: slimmable widths (SlimCLR) and pruning, with torch-pruning.

channels (which channels are coupled, how many each width keeps) -> slicing (run a width with sliced weight views)
-> slimmable (the shared encoder + private BatchNorm per width) -> prune (physically smaller models).
"""
