"""The study report: Markdown tables and PNG figures from the stages' metrics files.

Pure functions of already-computed results (plus a few stored images for the
sample grids): ``figure_*`` draw one PNG each, ``section_*`` return Markdown.
Figures use matplotlib's Agg backend and carry no timestamps, so an unchanged
study gives unchanged files. ``render`` draws and formats, ``results`` finds
what a report covers, ``figures`` and ``tables`` make its parts, ``paper`` puts
a paper's numbers beside the run's, ``directions`` is the Jetley et al. section;
their public names are all here as ``advgen.report.NAME``.
"""

from __future__ import annotations

from advgen.report.figures import (  # noqa: F401 - re-exported: advgen.report.NAME as before
    curves, defense_table, figure_curves, figure_defense, figure_retrain, figure_sample_grid, figure_scaled,
    figure_transfer,
)
from advgen.report.paper import (  # noqa: F401 - re-exported: advgen.report.NAME as before
    EVALUATE_METRICS, PAPER_METRICS, RETRAIN_FIELDS, TRANSFER_FIELDS, bucket_count, evaluated_split, paper_tables,
    paper_value, substituted,
)
from advgen.report.render import (  # noqa: F401 - re-exported: advgen.report.NAME as before
    FigureJobs, draw, figure_jobs, fmt, rel, table,
)
from advgen.report.results import (  # noqa: F401 - re-exported: advgen.report.NAME as before
    declared_results, result_files, scan_results,
)
from advgen.report.tables import (  # noqa: F401 - re-exported: advgen.report.NAME as before
    BUCKET_HEADER, WHITEBOX_HEADER, bucket_rows, fgm_scale_note, rounding_sentences, whitebox_rows,
)


