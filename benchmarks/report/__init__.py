"""``docs/performance.md`` from benchmark JSON: one module per section, each a function of its JSON.

Every ``section_*`` function reads its input (a missing file gives a "not run: <command>" section and
"not measured" targets), appends its Markdown lines, summary targets, headlines and the command that produces its
data to a :class:`~report.common.Report`, and writes its plots (matplotlib Agg, no timestamps: same inputs, same
bytes). :func:`~report.document.build` calls them in page order and :func:`~report.document.render` joins the page.
``benchmarks/perf_report.py`` is the command line.
"""

from .common import Report
from .document import Inputs, build, render

__all__ = ["Inputs", "Report", "build", "render"]
