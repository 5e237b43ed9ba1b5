"""The public job API in one import: ``from vitedit.pipeline import run_apply, ApplyConfig, ...``.

The jobs themselves live in ``vitedit.jobs`` (one module per command); this module only re-exports
them, so library users and the CLI have one stable place to import from.
"""

from __future__ import annotations

from .device import resolve_device
from .jobs.apply import ApplyConfig, run_apply
from .imagesets import check_disjoint, default_check_dir, default_locality_dir, default_preserve_dir
from .jobs.common import DEFAULT_SPARSITIES, ModelOptions, Progress, default_hypernet_for, split_rows
from .jobs.experiment import ExperimentOptions, resolve_edit_config
from .jobs.export import EXPORT_FORMATS, ExportJob, run_export
from .jobs.locate import LocateConfig, run_locate
from .jobs.report import MAX_ACCURACY_DROP, ReportConfig, edit_galleries, plot_tradeoff, recommend, run_report
from .jobs.sensitive import SensitiveConfig, run_sensitive

__all__ = ["ApplyConfig", "DEFAULT_SPARSITIES", "EXPORT_FORMATS", "ExperimentOptions", "ExportJob", "LocateConfig",
           "MAX_ACCURACY_DROP", "ModelOptions", "Progress", "ReportConfig", "SensitiveConfig", "check_disjoint",
           "default_check_dir", "default_hypernet_for", "default_locality_dir", "default_preserve_dir",
           "edit_galleries", "plot_tradeoff", "recommend", "resolve_device", "resolve_edit_config", "run_apply",
           "run_export", "run_locate", "run_report", "run_sensitive", "split_rows"]
