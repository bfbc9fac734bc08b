"""Job configuration: pydantic schemas, YAML files, and command-line overrides of any field.

Every leaf field is a flag: `--optim.lr 1e-3`, `--model.name vit_small_patch16_224`. The flags users
type most have short names too (`--epochs`, `--batch-size`, `--model`, ...; see ALIASES).
Invalid values are refused with the field and the reason before any cluster work starts.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core import storage


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A bad configuration value, with the field path and the reason."""


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[str, object, object]]:
    """{'optim.lr': (help, annotation, default), ...} for every leaf of a nested schema."""
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaf_fields(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = (field.description or "", ann, field.default)
    return out


def _parse_value(text: str):
    """A command-line value as YAML would read it: 3 -> int, 1e-3 -> float, true -> bool, [1,2] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc, msg = ".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")
        # a check across fields (no one field to name) says what it checked, not the whole section it read
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if loc else f"  {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def build_parser(schema: type[BaseModel], aliases: dict[str, str], description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file (local or s3://); flags override its values")
    short = ap.add_argument_group("common flags")
    fields = _leaf_fields(schema)
    for flag, dotted in aliases.items():
        help_text, ann, default = fields[dotted]
        if ann is bool:
            short.add_argument(
                f"--{flag}",
                dest=dotted,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (= --{dotted})",
            )
        else:
            short.add_argument(f"--{flag}", dest=dotted, default=None, metavar="V", help=f"{help_text} (= --{dotted})")
    every = ap.add_argument_group("every field (dotted)")
    for dotted, (help_text, _, default) in fields.items():
        if dotted in aliases:  # a flat schema: the short flag is the field itself
            continue
        shown = "" if default is None else f" [default: {default}]"
        every.add_argument(f"--{dotted}", dest=dotted, default=None, metavar="V", help=f"{help_text}{shown}")
    return ap


def load_config(schema: type[BaseModel], args: argparse.Namespace, aliases: dict[str, str]):
    """YAML file, then command-line overrides, validated by the schema. Raises ConfigError."""
    data: dict = {}
    if args.config:
        try:
            text = storage.read_bytes(args.config) if "://" in args.config else Path(args.config).read_bytes()
        except (OSError, storage.StorageError) as e:
            raise ConfigError(f"cannot read --config {args.config}: {e}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:  # a syntax error: the line and column, not a traceback
            raise ConfigError(f"--config {args.config} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of sections")
    fields = _leaf_fields(schema)
    for dotted, value in vars(args).items():
        if value is None or dotted not in fields:
            continue
        ann = fields[dotted][1]
        textual = ann is str or (_is_optional(ann) and str in typing.get_args(ann))
        if textual and _is_optional(ann) and value in ("null", "~"):  # as YAML reads it: the help says "null"
            value = None
        _set(data, dotted, _parse_value(value) if isinstance(value, str) and not textual else value)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def parse_job_args(schema: type[BaseModel], aliases: dict[str, str], description: str, argv=None):
    """Parse, load and validate; print a clear error and exit 2 on a bad value."""
    parser = build_parser(schema, aliases, description)
    args = parser.parse_args(argv)
    try:
        return load_config(schema, args, aliases)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def _is_optional(ann) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann)
