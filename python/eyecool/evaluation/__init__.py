"""Panoptic quality, exactly as panopticapi computes it, and fast.

``pq_compute`` evaluates folders of PNGs (panopticapi's signature and return value); ``PanopticEvaluator``
evaluates predictions held in memory during training; ``eyecool pq`` is the command line
(``eyecool.evaluation.cli``).
"""
from eyecool.evaluation.evaluator import PanopticEvaluator
from eyecool.evaluation.panoptic_quality import (PQ_KEYS, PQStatistics, format_per_class_table, format_table,
                                                 pq_compute, summary, write_summary_json)
# The format's errors, exported here too: pq_compute raises and warns with them.
from eyecool.panoptic_format import PanopticFormatError, PanopticFormatWarning

__all__ = ["pq_compute", "PanopticEvaluator", "PQStatistics", "PanopticFormatError", "PanopticFormatWarning",
           "format_table", "format_per_class_table", "summary", "write_summary_json", "PQ_KEYS"]
