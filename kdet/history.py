"""The training history file (``history.csv``): one row per finished epoch.

A low module (standard library only) so that both the training callbacks that
write the file (:mod:`kdet.workflow.callbacks`) and the plots that read it
(:mod:`kdet.visualize`) import it downwards.

Format: a header ``epoch,<key>,...``; ``epoch`` is the 1-based epoch number
written as an integer; a value is written with ``repr`` (exact round trip);
an empty cell means "not measured that epoch" (for example ``val_AP`` on an
epoch without evaluation).

    >>> import io
    >>> text = format_csv([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "val_AP": 0.1}],
    ...                   ["loss", "val_AP"])
    >>> print(text, end="")
    epoch,loss,val_AP
    1,0.5,
    2,0.25,0.1
    >>> parse_csv(io.StringIO(text))
    [{'epoch': 1, 'loss': 0.5, 'val_AP': None}, {'epoch': 2, 'loss': 0.25, 'val_AP': 0.1}]
"""
import csv
import io
import math

_MISSING = ("", "NA", None)


def format_value(value):
    """A cell: ``""`` for a missing value, else ``repr(float(value))`` (``nan`` stays ``nan``)."""
    if value is None:
        return ""
    return repr(float(value))


def format_row(row, keys):
    """The cells of ``row`` (a dict with ``epoch``) for the columns ``["epoch"] + keys``."""
    epoch = row["epoch"]
    if isinstance(epoch, float):
        if not (math.isfinite(epoch) and epoch == int(epoch)):
            raise ValueError(f"history row epoch {epoch!r} is not a whole number")
    cells = [str(int(epoch))]
    cells += [format_value(row.get(key)) for key in keys]
    return cells


def format_csv(rows, keys):
    """The whole file as text: header ``epoch,<keys>`` then one line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch"] + list(keys))
    for row in rows:
        writer.writerow(format_row(row, keys))
    return out.getvalue()


def parse_csv(lines, source="history"):
    """Rows of a history CSV (an open file or lines) as dicts: ``epoch`` an ``int``, other
    cells ``float`` (``None`` when empty or not a number)."""
    rows = []
    for line_number, row in enumerate(csv.DictReader(lines), start=2):
        parsed = {}
        for key, value in row.items():
            if key is None:  # more cells than header names
                continue
            if value in _MISSING:
                parsed[key] = None
                continue
            try:
                parsed[key] = float(value)
            except ValueError:
                parsed[key] = None
        epoch = parsed.get("epoch")
        if epoch is not None:
            if not (math.isfinite(epoch) and epoch == int(epoch)):
                raise ValueError(f"{source}, line {line_number}: epoch {row.get('epoch')!r} "
                                 "is not a whole number")
            parsed["epoch"] = int(epoch)
        rows.append(parsed)
    return rows


def read_csv_log(path):
    """Rows of the training history CSV ``path`` (see :func:`parse_csv`)."""
    with open(path, newline="", encoding="utf-8") as f:
        return parse_csv(f, source=str(path))
