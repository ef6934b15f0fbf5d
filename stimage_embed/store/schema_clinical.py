"""Arrow schema of the ``clinical`` table, declared once.

One row per clinical unit: a patient (``key_kind = 'patient'``) or a slide
(``key_kind = 'slide_id'``), keyed by ``(key_kind, key)``. The core columns below are
always there; every other column of an added CSV becomes a nullable column of its own
(``float64`` when all its values are numbers, ``int8`` for event columns, else ``string``),
added to the table the first time it appears (see :func:`clinical_schema`).

Units: times are in the unit of the file they came from (days, months: the file's choice,
never converted); events are 1 (the event happened) or 0 (censored).
"""

from __future__ import annotations

import pyarrow as pa

#: columns every ``clinical`` table has
CLINICAL = pa.schema(
    [
        pa.field("key_kind", pa.string(), nullable=False),  # patient | slide_id
        pa.field("key", pa.string(), nullable=False),  # the value of the key column
        # the patient: the key itself, or the slide's patient from ``slides`` (the slide id when unknown)
        pa.field("patient", pa.string()),
        pa.field("slide_id", pa.string()),  # key_kind slide_id: the slide; else NULL
        pa.field("time", pa.float64()),  # follow-up time, unit of the source file
        pa.field("event", pa.int8()),  # 1: event, 0: censored
        pa.field("response", pa.string()),  # e.g. pCR / RD, as given
        pa.field("subtype", pa.string()),  # e.g. PAM50 or receptor subtype, as given
        pa.field("source_file", pa.string()),  # the CSV the row came from (last upsert)
        pa.field("added_at", pa.timestamp("us", tz="UTC")),
    ]
)

#: Arrow type of an extra column by kind
EXTRA_TYPES = {"number": pa.float64(), "event": pa.int8(), "text": pa.string()}

#: the clinical table's merge key
CLINICAL_KEYS = ("key_kind", "key")


def clinical_schema(extra: list[pa.Field] | None = None) -> pa.Schema:
    """The core columns, then ``extra`` (nullable fields of other columns, in order)."""
    fields = list(CLINICAL)
    names = set(CLINICAL.names)
    for f in extra or []:
        if f.name not in names:
            fields.append(f.with_nullable(True))
            names.add(f.name)
    return pa.schema(fields)
