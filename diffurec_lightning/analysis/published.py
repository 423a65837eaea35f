"""Published test numbers (full ranking, same protocol), as quoted in docs/method.md.

Keyed by (dataset, model name of this project); each entry gives its source and whichever of the
six metrics the source reports. The DiffuRecSys table is a mean of 5 seeds of the test split;
the paper's code also prints a best-validation figure, so compare with our test columns and keep
our validation columns in view (method.md: "How to read these numbers").
"""

from __future__ import annotations

from typing import Any

DIFFURECSYS_TABLE3 = "DiffuRecSys paper, Table 3 (V2, mean of 5 seeds)"
DIFFUREC_IN_TABLE3 = "DiffuRecSys paper, Table 3 (DiffuRec baseline)"
SASREC_TABLE5 = "DiffuRecSys paper, Table 5"
DCREC_LATER = "a later comparison (DCRec)"

_METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")


def _row(*values: float) -> dict[str, float]:
    return dict(zip(_METRICS, values, strict=True))


PUBLISHED: dict[tuple[str, str], dict[str, Any]] = {
    ("beauty", "diffurecsys"): {
        "source": DIFFURECSYS_TABLE3,
        "test": _row(0.0667, 0.0980, 0.1400, 0.0458, 0.0559, 0.0665),
    },
    ("beauty", "diffurec"): {
        "source": DIFFUREC_IN_TABLE3,
        "test": _row(0.0557, 0.0790, 0.1110, 0.0400, 0.0475, 0.0556),
    },
    ("toys", "diffurecsys"): {
        "source": DIFFURECSYS_TABLE3,
        "test": _row(0.0684, 0.0971, 0.1350, 0.0455, 0.0548, 0.0643),
    },
    ("toys", "diffurec"): {
        "source": DIFFUREC_IN_TABLE3,
        "test": _row(0.0557, 0.0746, 0.0984, 0.0417, 0.0477, 0.0537),
    },
    ("ml-1m", "diffurecsys"): {
        "source": DIFFURECSYS_TABLE3,
        "test": _row(0.1957, 0.2843, 0.3958, 0.1319, 0.1605, 0.1886),
    },
    ("ml-1m", "diffurec"): {
        "source": DIFFUREC_IN_TABLE3,
        "test": _row(0.1797, 0.2626, 0.3679, 0.1212, 0.1479, 0.1744),
    },
    ("beauty", "sasrec"): {"source": SASREC_TABLE5, "test": {"hr@10": 0.0592}},
    ("toys", "sasrec"): {"source": SASREC_TABLE5, "test": {"hr@10": 0.0652}},
    ("ml-1m", "sasrec"): {"source": SASREC_TABLE5, "test": {"hr@10": 0.1810}},
    ("beauty", "dcrec"): {"source": DCREC_LATER, "test": {"hr@5": 0.0630, "ndcg@5": 0.0449}},
    ("toys", "dcrec"): {"source": DCREC_LATER, "test": {"hr@5": 0.0690, "ndcg@5": 0.0518}},
}


def published(dataset: str, model: str) -> dict[str, Any] | None:
    """The published entry for this dataset and model, or None."""
    return PUBLISHED.get((dataset, model))


def for_dataset(dataset: str) -> list[tuple[str, dict[str, Any]]]:
    """(model, entry) of every published row of a dataset, in table order."""
    return [(model, entry) for (name, model), entry in PUBLISHED.items() if name == dataset]
