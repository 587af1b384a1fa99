"""Tables rendered by pandas for the documents: HTML through ``Styler``,
Markdown through ``DataFrame.to_markdown`` (tabulate)."""
from __future__ import annotations

import pandas as pd
from markupsafe import Markup


def html_table(frame: pd.DataFrame, name: str) -> Markup:
    """``frame`` as an HTML table (cells escaped, no index) with
    ``id="T_<name>"`` and ``class="<name>"``; Markup, so a Jinja2 template
    inserts it as it is."""
    styler = frame.style.hide(axis="index").format(escape="html", na_rep="—").set_uuid(name)
    return Markup(styler.to_html(table_attributes=f'class="{name}"'))


def markdown_table(frame: pd.DataFrame, tablefmt: str = "github") -> str:
    """``frame`` as a Markdown table: cells as written (no number parsing,
    so "1e-3" stays "1e-3"), ``|`` inside a cell escaped."""
    cells = frame.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v)
    cells.columns = [str(c).replace("|", "\\|") for c in frame.columns]
    return cells.to_markdown(index=False, tablefmt=tablefmt, disable_numparse=True)
