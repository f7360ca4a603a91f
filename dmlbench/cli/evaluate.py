"""``dmlbench evaluate``: score saved embeddings from any model with the benchmark's metrics."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from dmlbench.cli import app, console, friendly
from dmlbench.errors import DmlbenchError

if TYPE_CHECKING:  # numpy and dmlbench.evaluation (torch) are imported where used: fast start-up
    import numpy as np


class EmbeddingsFileError(DmlbenchError):
    """An embeddings file that is missing, not an .npz archive, or lacks an array."""


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` → ``(1, 2, 4, 8)``; anything else is one clear error.

    Example:
        >>> parse_ks("1, 10,100")
        (1, 10, 100)
    """
    from dmlbench.evaluation import EvaluationError

    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise EvaluationError(f"--recall-ks must be positive integers separated by commas (e.g. 1,2,4,8), got {text!r}.")
    return ks


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read ``embeddings``, ``labels`` and the optional ``is_query``/``is_gallery`` arrays.

    Pickled object arrays are refused (``allow_pickle=False``).
    """
    import numpy as np

    if not path.is_file():
        raise EmbeddingsFileError(f"embeddings file {path} does not exist; pass an .npz written with numpy.savez.")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        raise EmbeddingsFileError(
            f"{path} is not an .npz archive; save the arrays with numpy.savez(path, embeddings=..., labels=...)."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            missing = [name for name in ("embeddings", "labels") if name not in names]
            if missing:
                raise EmbeddingsFileError(
                    f"{path} has no array named {missing[0]!r} (it has: {', '.join(sorted(names)) or 'none'}); "
                    "save it with numpy.savez(path, embeddings=..., labels=...)."
                )
            arrays = {name: data[name] for name in ("embeddings", "labels", "is_query", "is_gallery") if name in names}
    except EmbeddingsFileError:
        raise
    except ValueError as err:
        if "pickle" in str(err):
            raise EmbeddingsFileError(
                f"{path} stores object (pickled) arrays, which are not loaded for safety; save plain numeric arrays."
            ) from None
        raise EmbeddingsFileError(f"{path} is not a readable .npz file ({err}).") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise EmbeddingsFileError(f"{path} is not a readable .npz file ({err}).") from None
    emb, labels = arrays["embeddings"], arrays["labels"]
    if emb.ndim != 2:
        raise EmbeddingsFileError(f"'embeddings' in {path} must be 2-D [N, D], got shape {emb.shape}.")
    for name in ("labels", "is_query", "is_gallery"):
        if name in arrays and arrays[name].shape != (emb.shape[0],):
            raise EmbeddingsFileError(
                f"'{name}' in {path} has shape {arrays[name].shape} but 'embeddings' has {emb.shape[0]} rows; "
                "they must match one to one."
            )
    if not np.issubdtype(emb.dtype, np.number) or np.issubdtype(emb.dtype, np.complexfloating):
        raise EmbeddingsFileError(f"'embeddings' in {path} must be real numbers, got dtype {emb.dtype}.")
    if labels.dtype.kind not in "iubUS":
        raise EmbeddingsFileError(f"'labels' in {path} must be integers or strings, got dtype {labels.dtype}.")
    return arrays


@app.command(
    "evaluate",
    epilog=(
        "Example:\n\n"
        "  python -c \"import numpy as np; np.savez('emb.npz', embeddings=np.random.randn(1000, 128), "
        "labels=np.arange(1000) % 50)\"\n\n"
        "  dmlbench evaluate --embeddings emb.npz --recall-ks 1,2,4,8 --format json\n\n"
        "In-Shop style query/gallery: add boolean arrays is_query and is_gallery to the .npz."
    ),
)
@friendly
def evaluate(
    *,
    embeddings: Annotated[
        Path,
        typer.Option("--embeddings", "-e", help="An .npz with arrays 'embeddings' [N, D] and 'labels' [N], "
                     "optionally boolean 'is_query' / 'is_gallery' [N] (query/gallery mode)."),
    ],
    recall_ks: Annotated[str, typer.Option(help="Comma-separated k values for Recall@k.")] = "1,2,4,8",
    distance: Annotated[str, typer.Option(help="cosine (L2-normalised inner product) or euclidean.")] = "cosine",
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    chunk_size: Annotated[int, typer.Option(help="Queries per similarity block (memory ~ chunk × N).")] = 4096,
    seed: Annotated[int, typer.Option(help="k-means seed for NMI and F1.")] = 0,
) -> None:
    """Score embeddings with MAP@R, R-Precision, P@1, Recall@k, NMI and F1 (exact k-NN)."""
    from dmlbench.evaluation import EvaluationError, evaluate_embeddings

    if fmt not in ("table", "json"):
        raise EvaluationError(f"--format must be table or json, got {fmt!r}.")
    ks = parse_ks(recall_ks)
    arrays = load_npz(embeddings)
    results = evaluate_embeddings(
        arrays["embeddings"],
        arrays["labels"],
        recall_ks=ks,
        query_mask=arrays.get("is_query"),
        gallery_mask=arrays.get("is_gallery"),
        distance=distance,
        chunk_size=chunk_size,
        seed=seed,
    )
    if fmt == "json":
        typer.echo(json.dumps(results))
        return
    _print_table(results, embeddings, arrays)


def _print_table(results: dict[str, float], path: Path, arrays: dict[str, Any]) -> None:
    import numpy as np

    n, d = arrays["embeddings"].shape
    table = Table(title=path.name, caption=f"{n} embeddings × {d} dims, {len(np.unique(arrays['labels']))} classes")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
