"""Which catalog, and which table: opened, created the way a prediction table should be, or refused by name.

`--catalog` forms (the embedded default, $VITRAY_CATALOG, is the local stack's SQLite file):
    sqlite:///<path>.db        pyiceberg SqlCatalog on a local SQLite file (one machine: the local stack)
    postgresql://user@host/db  SqlCatalog on PostgreSQL (`pip install .[postgres]`)
    rest+https://host/path     a REST catalog (Polaris, Nessie, Unity, Glue, S3 Tables); its token or
                               credential from PYICEBERG_CATALOG__VITRAY__TOKEN / __CREDENTIAL
Data files reach S3 through pyarrow with the standard AWS chain (keys never pass through the catalog's
properties); the endpoint and region are the ones `core.storage` uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from pipeline.core import storage
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_TEMPFAIL
from pipeline.inference.rows import output_schema

CATALOG_ENV, WAREHOUSE_ENV = "VITRAY_CATALOG", "VITRAY_WAREHOUSE"
# pyiceberg's own retry rebases an append onto whatever landed meanwhile without validating it: ours does
# (`snapshots.commit`), so the table's must be off. Merged manifests: planning reads a few manifests, not one
# per run (measured by bench/table.py).
NO_REBASE = {"commit.retry.num-retries": "0", "commit.manifest-merge.enabled": "true"}


class TableRefused(ValueError):
    """A table or catalog that this job cannot write: nothing was written."""

    exit_code = EXIT_BAD_INPUT


class CatalogUnavailable(RuntimeError):
    """The catalog did not answer, or was locked: nothing of this run was committed; try again later."""

    exit_code = EXIT_TEMPFAIL


def catalog_properties(spec: str | None, warehouse: str | None) -> dict[str, str]:
    """pyiceberg `load_catalog` properties for a `--catalog` value (what Ray's `read_iceberg` takes too)."""
    spec = spec or os.environ.get(CATALOG_ENV)
    warehouse = warehouse or os.environ.get(WAREHOUSE_ENV)
    if not spec:
        raise TableRefused(
            "--table needs --catalog: sqlite:///<path>.db, postgresql://... or rest+https://... "
            f"(`make up` sets ${CATALOG_ENV} for the local stack)"
        )
    if spec.startswith("sqlite:"):
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise TableRefused(
                "--catalog sqlite:// in a Kubernetes pod: the file is gone with the pod's disk, and two pods on one "
                "file over a network volume corrupt it. Use a REST catalog (--catalog rest+https://...) or "
                "PostgreSQL (--catalog postgresql://...); see cluster/README.md"
            )
        if not spec.startswith("sqlite:///"):
            raise TableRefused(f"--catalog {spec}: write a SQLite catalog as sqlite:///<absolute or relative path>")
        Path(spec[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        props = {"type": "sql", "uri": spec, "init_catalog_tables": "true"}
    elif spec.startswith(("postgresql://", "postgresql+")):
        props = {"type": "sql", "uri": spec}
    elif spec.startswith(("rest+https://", "rest+http://")):
        props = {"type": "rest", "uri": spec[len("rest+") :]}
    else:
        raise TableRefused(
            f"--catalog {storage.redacted(spec)}: expected sqlite:///..., postgresql://... or rest+https://..."
        )
    if warehouse:
        props["warehouse"] = warehouse
    if storage.endpoint_url():
        props["s3.endpoint"] = storage.endpoint_url()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        props["s3.region"] = region
    return props


def open_catalog(spec: str | None, warehouse: str | None):
    from pyiceberg.catalog import load_catalog

    props = catalog_properties(spec, warehouse)
    try:
        return load_catalog("vitray", **props)
    except Exception as e:  # a refused connection, a locked SQLite file, a REST endpoint that does not answer
        raise CatalogUnavailable(f"cannot open the catalog {storage.redacted(props['uri'])}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kind(t: pa.DataType) -> str:
    """A type as both sides spell it (Iceberg reads strings back as large_string, lists as large_list)."""
    if pa.types.is_large_string(t) or pa.types.is_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_kind(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit},{t.tz}]"
    return str(t)


def check_compatible(table, name: str) -> None:
    """Refuse, by column, a table whose columns do not take our rows (another tool's table of that name)."""
    have = {f.name: f for f in table.schema().as_arrow()}
    want = output_schema(embeddings="embedding" in have)
    missing = [f.name for f in want if f.name not in have]
    common = [f for f in want if f.name in have]
    differ = [
        f"{f.name} ({_kind(have[f.name].type)}, not {_kind(f.type)})"
        for f in common
        if _kind(have[f.name].type) != _kind(f.type)
    ]
    ours = set(want.names)
    required = [f.name for f in table.schema().fields if f.required and f.name not in ours]
    problems = (
        ([f"missing columns {missing}"] if missing else [])
        + ([f"other types: {', '.join(differ)}"] if differ else [])
        + ([f"required columns this job does not write: {required}"] if required else [])
    )
    if problems:
        raise TableRefused(
            f"--table {name} exists with a schema this job cannot write ({'; '.join(problems)}): "
            "choose another table name, or migrate that table"
        )


def open_table(catalog, name: str, embeddings: bool):
    """The table `name`, created if it does not exist yet (partitioned by day of inferred_at, sorted by
    image_uri, pyiceberg's rebase off); `embeddings` on a table without the column adds it, nullable."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError
    from pyiceberg.transforms import DayTransform, IdentityTransform

    namespace = name.rsplit(".", 1)[0]
    try:
        try:
            table = catalog.load_table(name)
        except NoSuchTableError:
            try:
                catalog.create_namespace(namespace)
            except NamespaceAlreadyExistsError:
                pass
            try:
                with catalog.create_table_transaction(
                    name, schema=output_schema(embeddings), properties=NO_REBASE
                ) as txn:
                    with txn.update_spec() as spec:
                        spec.add_field("inferred_at", DayTransform(), "inferred_day")
                    with txn.update_sort_order() as order:
                        order.asc("image_uri", IdentityTransform())
            except TableAlreadyExistsError:  # another run created it meanwhile
                pass
            table = catalog.load_table(name)
    except (TableRefused, CatalogUnavailable):
        raise
    except Exception as e:
        if type(e).__name__ in ("OperationalError", "ConnectionError", "ServiceUnavailableError", "TimeoutError"):
            raise CatalogUnavailable(f"the catalog did not answer for --table {name}: {_first_line(e)}") from e
        raise
    check_compatible(table, name)
    if embeddings and "embedding" not in table.schema().column_names:
        with table.update_schema() as update:  # old rows read as null
            update.union_by_name(output_schema(embeddings=True))
    if any(table.properties.get(k) != v for k, v in NO_REBASE.items()):
        with table.transaction() as txn:
            txn.set_properties(**NO_REBASE)
    return catalog.load_table(name)
