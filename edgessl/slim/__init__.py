"""Several edge sizes from one pretraining: the `edgessl slim` and `edgessl prune` commands' API (api: per-width
reports and slimmed encoders; recover: pruning + recovery pretraining).

The width maths lives with the models: models.channels (which channels are coupled, how many each width keeps) ->
models.slicing (run a width with sliced weight views) -> models.slimmable (the shared encoder + private BatchNorm per
width) -> models.prune (physically smaller models), all with torch-pruning.
"""
