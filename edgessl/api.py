"""The Python API: every command's workflow (edgessl.workflows), re-exported; the CLI calls these and nothing else.

Each function takes the options of its command as keyword arguments, with the defaults of their one definition
(edgessl.config.PretrainConfig for pretraining, edgessl.options for the others); help(edgessl.<function>) lists
them."""

from __future__ import annotations

from edgessl._names import API_NAMES
from edgessl.config import PretrainConfig, list_recipes, load_recipe, recipes_dir
from edgessl.evaluate.finetune import FinetuneResult
from edgessl.models.backbone import load_encoder, read_encoder_meta
from edgessl.models.classifier import load_classifier
from edgessl.models.widths import slim_encoder
from edgessl.options import (
    CacheClearOptions,
    CacheOptions,
    CheckOptions,
    EmbedOptions,
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    PruneOptions,
    SlimOptions,
)
from edgessl.train.types import PretrainResult
from edgessl.workflows.cache import cache_budget_of, cache_entries, cache_store, clear_cache
from edgessl.workflows.check import run_device_check
from edgessl.workflows.embed import EmbedResult, embed
from edgessl.workflows.eval import EvalResult, evaluate_encoder
from edgessl.workflows.export import ExportResult, export
from edgessl.workflows.finetune import finetune
from edgessl.workflows.pretrain import pretrain
from edgessl.workflows.prune import prune_encoder
from edgessl.workflows.slim import SlimResult, slim, widths_table

__all__ = list(API_NAMES)  # edgessl._names: edgessl/__init__.py offers the same names lazily
