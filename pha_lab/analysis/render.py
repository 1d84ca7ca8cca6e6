"""Tables as DataFrames that keep their provenance, written as Markdown, LaTeX and CSV.

`Table.frame` is what the CSV holds (numbers, full run ids); `Table.columns` picks and names what Markdown and
LaTeX show. A shown column `c` with a `c std` sibling reads "mean ± std"; one with `c lo`/`c hi` siblings reads
"value [lo, hi]" (an interval). `FORMATS` maps frame columns to how their cells are written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Table:
    """A table with its provenance: `frame` is what the CSV holds (numbers, full run ids); `columns`
    maps the frame columns shown in Markdown/LaTeX to headers. A column `c` with a `c std` sibling is
    shown as mean ± std, one with `c lo` and `c hi` siblings as `c [lo, hi]`."""

    name: str
    title: str
    frame: pd.DataFrame
    columns: dict[str, str]
    notes: list[str] = field(default_factory=list)
    formats: dict[str, Callable] = field(default_factory=dict)

    def display(self) -> pd.DataFrame:
        """The shown cells, as strings."""
        out = {}
        for col, header in self.columns.items():
            if col not in self.frame:
                out[header] = [""] * len(self.frame)
                continue
            fmt = self.formats.get(col, _fmt)
            nan = pd.Series(np.nan, index=self.frame.index)
            if f"{col} lo" in self.frame:
                out[header] = [
                    _interval(v, lo, hi, fmt)
                    for v, lo, hi in zip(self.frame[col], self.frame[f"{col} lo"], self.frame.get(f"{col} hi", nan))
                ]
            else:
                out[header] = [_pm(v, s, fmt) for v, s in zip(self.frame[col], self.frame.get(f"{col} std", nan))]
        return pd.DataFrame(out, columns=list(self.columns.values()))

    def to_markdown(self) -> str:
        shown = self.display()
        lines = [f"**{self.title}**", "", "| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
        lines += [
            "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in shown.itertuples(index=False)
        ]
        if shown.empty:
            lines.append("| " + " | ".join(["–"] * len(shown.columns)) + " |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def to_latex(self) -> str:
        shown = self.display()
        rows = [" & ".join(_tex(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
        if shown.empty:
            rows = [" & ".join(["--"] * len(shown.columns)) + r" \\"]
        body = [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex(self.title)}}}",
            r"\begin{tabular}{" + "l" * len(shown.columns) + "}",
            r"\toprule",
            " & ".join(_tex(c) for c in shown.columns) + r" \\",
            r"\midrule",
            *rows,
            r"\bottomrule",
            r"\end{tabular}",
        ]
        if self.notes:
            body.append(r"\par\smallskip\footnotesize " + r" \par ".join(_tex(n) for n in self.notes))
        return "\n".join(body + [r"\end{table}"]) + "\n"

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write `<name>.md`, `<name>.tex` and `<name>.csv` under out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {ext: out / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")}
        paths["md"].write_text(self.to_markdown())
        paths["tex"].write_text(self.to_latex())
        self.frame.to_csv(paths["csv"], index=False)
        return paths


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _fmt(value) -> str:
    if _missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value)


def _pm(value, std, fmt) -> str:
    text = fmt(value)
    if text and not _missing(std):
        return f"{text} ± {fmt(std)}"
    return text


def _interval(value, low, high, fmt) -> str:
    text = fmt(value)
    if text and not _missing(low) and not _missing(high):
        return f"{text} [{fmt(low)}, {fmt(high)}]"
    return text


def short_ids(value) -> str:
    return ", ".join(v[:8] for v in str(value).split(",") if v) if isinstance(value, str) else ""


def _tex(value) -> str:
    text = str(value)
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\^{}"),
    ):
        text = text.replace(a, b)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")


def fixed(digits: int) -> Callable:
    return lambda v: "" if v is None or pd.isna(v) else f"{float(v):.{digits}f}"


def signed(digits: int) -> Callable:
    return lambda v: "" if v is None or pd.isna(v) else f"{float(v):+.{digits}f}"


def tokens(value) -> str:
    return "" if value is None or pd.isna(value) else f"{int(value):,}"


def millions(value, digits: int = 3) -> str:
    """A count in millions: `digits` significant digits below 10M, `digits - 2` decimals from there: 12,001,152 ->
    '12.0M', 6,428,048 -> '6.43M' (3: non-embedding counts differ by a few %); blank for a missing value."""
    if value is None or pd.isna(value):
        return ""
    m = float(value) / 1e6
    return f"{m:.{digits - 2}f}M" if m >= 10 else f"{m:.{digits}g}M"


def scale_label(n_params) -> str:
    """A model's scale: 125,155,620 -> '125M'; 247,328 -> '0.25M'."""
    return millions(n_params, 2)


def percent(value) -> str:
    """0.278 -> '+28%'; a change that rounds to 0 reads '0%' (never '-0%')."""
    if value is None or pd.isna(value):
        return ""
    rounded = round(100 * float(value))
    return f"{rounded:+d}%" if rounded else "0%"


FORMATS = {
    "runs": short_ids,
    "reference runs": short_ids,
    "n_params": scale_label,
    "n_params_non_embedding": millions,
    "delta params": percent,
    "train/tokens_seen": tokens,
    "test/ppl": fixed(2),
    "test/bpb": fixed(3),
    "test/accuracy": fixed(3),
    "val/accuracy": fixed(3),
    "delta": signed(2),
}
