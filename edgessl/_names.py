"""The names of the Python API (edgessl.api), in a module without imports: edgessl/__init__.py offers them without
loading torch, edgessl.api exports them."""

API_NAMES = (
    "pretrain", "load_encoder", "read_encoder_meta", "evaluate_encoder", "finetune", "load_classifier", "export",
    "slim", "slim_encoder", "prune_encoder", "embed", "cache_entries", "cache_budget_of", "clear_cache",
    "cache_store",
    "run_device_check",
    "list_recipes", "load_recipe", "recipes_dir", "widths_table",
    "PretrainConfig", "EvalOptions", "FinetuneOptions", "ExportOptions", "EmbedOptions", "PruneOptions", "SlimOptions",
    "CheckOptions", "CacheOptions", "CacheClearOptions",
    "PretrainResult", "EvalResult", "FinetuneResult", "ExportResult", "EmbedResult", "SlimResult",
)
