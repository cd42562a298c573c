"""mkdocs hook: the reference pages, generated from the code so that nothing is described twice.

A page asks for a generated part with a marker comment, replaced before the page is rendered:

* ``<!-- reference: round.yaml -->``: every field of round.yaml, walked from the pydantic
  models (``RunConfig`` and the sections it nests): type, constraints, default, description;
* ``<!-- reference: cli -->``: every command of pyproject's ``[project.scripts]``, from its
  own argparse parser: usage, options, exit codes;
* ``<!-- reference: methods -->``: the method registry as a table;
* ``<!-- reference: method NAME -->``: one method's upload formula (its
  ``upload_bytes_formula`` docstring) and the knobs its ``Config`` adds;
* ``<!-- reference: privacy -->``: which methods ``privacy.dp`` and ``privacy.dp_sgd`` apply to,
  and why not where they do not (``Method.dp_unsupported``, ``dp_sgd_unsupported``);
* ``<!-- reference: layering -->``: the import-linter contracts of pyproject.toml;
* ``<!-- reference: api PACKAGE -->``: mkdocstrings blocks for every module of a package, but
  the commands (on the command-line page) and the methods' own modules or packages, whose
  docstrings are their pages (only their members are listed here).

A field or a flag without a description, or a registered method without a page, fails the
build: the reference cannot silently have gaps.
"""

from __future__ import annotations

import argparse
import html
import importlib
import inspect
import json
import re
import types
import typing
from pathlib import Path

import annotated_types as at
import yaml
from mkdocs.exceptions import PluginError
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter's dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- reference: (?P<what>[\w.]+)(?: (?P<arg>\S+))? -->")
FENCE = re.compile(r"(^```.*?^```[ \t]*$)", re.M | re.S)
CONFIG_PAGE = "reference/config.md"


class Gaps(PluginError):
    """Parts of the reference the code does not describe."""


def md(text: str) -> str:
    """``text`` for a table cell: HTML and pipes escaped outside code spans, one line."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    return "".join(p if p.startswith("`") else html.escape(p, quote=False).replace("|", "\\|") for p in parts)


def prose(text: str) -> str:
    """A docstring or description as Markdown: HTML escaped outside code spans (so
    ``<run.output_dir>`` shows), and each run of indented lines (a usage example) a text block."""
    out: list[str] = []
    block: list[str] = []
    for line in inspect.cleandoc(text).splitlines() + [""]:
        if line.startswith("  ") and (block or not out or not out[-1]):
            block.append(line.strip())
            continue
        if block:
            out += ["```text", *block, "```"]
            block = []
        parts = re.split(r"(`[^`]*`)", line)
        out.append("".join(p if p.startswith("`") else html.escape(p, quote=False) for p in parts))
    return "\n".join(out).strip()


def docstring(obj) -> str:
    """``obj``'s own docstring (not one inherited from a base class), dedented; '' if none."""
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    return inspect.cleandoc(own) if own else ""


# -- round.yaml ------------------------------------------------------------------------------

def yaml_value(value) -> str:
    """A default as one would write it in round.yaml."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str) and not value.isprintable():
        return json.dumps(value)  # a YAML double-quoted string, escapes and all
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{yaml_value(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{yaml_value(field.default)}`"


CONSTRAINTS = ((at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<"))


def constraints(metadata: list) -> list[str]:
    out = []
    for item in metadata:
        for kind, attr, sign in CONSTRAINTS:
            if isinstance(item, kind):
                out.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "pattern", None):
            out.append(f"matching `{item.pattern}`")
    return out


def type_text(annotation, metadata: list | None = None) -> str:
    """A field's type in words, e.g. ``int, ≥ 1`` or ``list of one of `csv`, `plot```."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*args[1:], *(metadata or [])])
    extra = constraints(metadata or [])
    if origin is typing.Literal:
        base = "one of " + ", ".join(f"`{a}`" for a in args)
    elif origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_text(a) for a in rest) + (", " + ", ".join(extra) if extra else "") + " or `null`"
    elif origin is list:
        base = f"list of {type_text(args[0])}"
    elif origin is dict:
        base = f"map of {type_text(args[0])} to {type_text(args[1])}"
    elif isinstance(annotation, FieldInfo):
        return type_text(annotation.annotation, annotation.metadata)
    elif annotation is Path:
        base = "path"
    else:
        base = getattr(annotation, "__name__", str(annotation))
    return ", ".join([base, *extra])


def is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_rows(model: type[BaseModel], path: str, names, missing: list[str]) -> list[str]:
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name in names:
        field = model.model_fields[name]
        where = f"{path}.{name}"
        if not field.description:
            missing.append(where)
        rows.append(f"| `{name}` | {md(type_text(field.annotation, field.metadata))} | {default_text(field)} "
                    f"| {md(field.description or '')} |")
    return rows


def section(model: type[BaseModel], path: str, level: int, missing: list[str]) -> list[str]:
    """One section of round.yaml: its docstring, a table of its plain fields, then its own
    sections, one heading deeper."""
    out = [f"{'#' * level} `{path}` {{#{path}}}", ""]
    if doc := docstring(model):
        out += [prose(doc), ""]
    fields = model.model_fields
    leaves = [n for n, f in fields.items() if not is_section(f.annotation)]
    if leaves:
        out += [*field_rows(model, path, leaves, missing), ""]
    for name, field in fields.items():
        if is_section(field.annotation):
            out += section(field.annotation, f"{path}.{name}", level + 1, missing)
    return out


def method_section(missing: list[str], link) -> list[str]:
    from fedkrso.common.methods import METHODS, MethodConfig

    out = ["## `method` {#method}", "",
           "`method.name` chooses the method; its knobs sit beside `name`. The knobs every method has are "
           "below (a method may change a default); the knobs of one method are on its page:", "",
           ", ".join(f"[`{name}`]({link(method_page(name))}#knobs)" for name in METHODS), ""]
    common = [n for n in MethodConfig.model_fields if n != "name"]
    return out + field_rows(MethodConfig, "method", common, missing) + [""]


def config_reference(link=lambda page: page) -> str:
    """round.yaml, every section and field; ``link(page)`` makes a docs page's URL relative."""
    from fedkrso.common.config import RunConfig

    missing: list[str] = []
    out: list[str] = []
    for name, field in RunConfig.model_fields.items():
        if name == "method":
            out += method_section(missing, link)
        else:
            out += section(field.annotation, name, 2, missing)
    if missing:
        raise Gaps("round.yaml fields without a description (Field(description=...)): " + ", ".join(missing))
    return "\n".join(out)


# -- methods ---------------------------------------------------------------------------------

def method_page(name: str) -> str:
    return f"methods/{name.replace('+', '-plus')}.md"


def method_module(cls: type) -> str:
    """The module whose docstring describes method ``cls``: the package a method split into
    ``config``, ``layer`` and ``method`` is (``fedtt``, not ``fedtt.method``), else its module."""
    registry = "fedkrso.common.methods"
    return f"{registry}.{cls.__module__.removeprefix(registry + '.').split('.')[0]}"


def methods_table(link) -> str:
    from fedkrso.common.methods import METHODS

    rows = ["| `method.name` | what it is |", "| --- | --- |"]
    for name, cls in METHODS.items():
        doc = docstring(cls) or docstring(importlib.import_module(method_module(cls)))
        summary = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0]  # its first sentence
        rows.append(f"| [`{name}`]({link(method_page(name))}) | {md(summary)} |")
    return "\n".join(rows)


def method_reference(name: str, link) -> str:
    """A method's upload formula and the knobs its own ``Config`` adds to its parents'."""
    from fedkrso.common.methods import METHODS, Method, MethodConfig

    if name not in METHODS:
        raise Gaps(f"no method {name!r} in the registry (one of {sorted(METHODS)})")
    cls = METHODS[name]
    formula = inspect.getdoc(cls.upload_bytes_formula)
    if not formula or formula == inspect.getdoc(Method.upload_bytes_formula):
        raise Gaps(f"{cls.__name__}.upload_bytes_formula states no formula in its docstring")
    out = ["## Upload", "", f"`{cls.__name__}.upload_bytes_formula`, b the bytes per element of "
           "`method.wire_dtype`:", "", "\n".join(f"> {line}" for line in formula.splitlines()), "",
           "## Knobs {#knobs}", ""]
    cfg = cls.Config
    parent = next(b for b in cfg.__mro__[1:] if issubclass(b, MethodConfig))
    inherited = [f"the knobs [every method has]({link(CONFIG_PAGE)}#method)"]
    if parent is not MethodConfig:
        owner = next(n for n, c in METHODS.items() if c.Config is parent)
        inherited.insert(0, f"[{METHODS[owner].__name__}'s knobs]({link(method_page(owner))}#knobs)")
    own = [n for n in cfg.__annotations__ if n != "name"]
    out.append(f"In round.yaml's `method` section with `name: {name}`; besides "
               + " and ".join(inherited) + (", these:" if own else ", none of its own."))
    if own:
        missing: list[str] = []
        out += ["", *field_rows(cfg, "method", own, missing)]
        if missing:
            raise Gaps(f"{name} knobs without a description: " + ", ".join(missing))
    return "\n".join(out)


def privacy_table(link) -> str:
    from fedkrso.common.methods import METHODS

    rows = ["| method | `privacy.dp` | `privacy.dp_sgd` |", "| --- | --- | --- |"]
    for name, cls in METHODS.items():
        cells = [f"no: {md(why)}" if why else "yes" for why in (cls.dp_unsupported, cls.dp_sgd_unsupported)]
        rows.append(f"| [`{name}`]({link(method_page(name))}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- command line ----------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def command_parser(entry: str) -> argparse.ArgumentParser:
    """The argparse parser a console script builds (``module:function`` of pyproject), taken at
    the moment it would parse, so nothing runs."""
    module, func = entry.split(":")
    main = getattr(importlib.import_module(module), func)
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        main([])
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise Gaps(f"{entry} returned without parsing its arguments")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def commands() -> dict[str, str]:
    return pyproject()["project"]["scripts"]


def layering() -> str:
    rows = ["| contract | modules | may not import |", "| --- | --- | --- |"]
    for c in pyproject()["tool"]["importlinter"]["contracts"]:
        names = lambda key: ", ".join(f"`{m}`" for m in c[key])  # noqa: E731
        rows.append(f"| {md(c['name'])} | {names('source_modules')} | {names('forbidden_modules')} |")
    return "\n".join(rows)


def option_rows(prog: str, parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | value | default | description |", "| --- | --- | --- | --- |"]
    missing = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        if not action.help:
            missing.append(action.option_strings[-1] if action.option_strings else action.dest)
            continue
        takes = action.nargs != 0
        value = ""
        if takes and action.choices:
            value = " \\| ".join(f"`{c}`" for c in action.choices)
        elif takes:
            value = f"`{action.metavar or action.dest.upper()}`"
        if action.required:
            default = "required"
        elif takes and action.default not in (None, argparse.SUPPRESS):
            default = f"`{action.default}`"
        else:
            default = ""
        rows.append(f"| {flags} | {value} | {default} | {md(action.help)} |")
    if missing:
        raise Gaps(f"{prog} options without help: " + ", ".join(missing))
    return rows


def exit_codes(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| exit status | when |", "| --- | --- |"]
    for line in (parser.epilog or "").splitlines():
        if m := re.match(r"\s+(\d+)\s+(.*)", line):
            rows.append(f"| `{m[1]}` | {md(m[2])} |")
    return rows


def cli_reference() -> str:
    out = []
    for prog, entry in commands().items():
        parser = command_parser(entry)
        usage = parser.format_usage().removeprefix("usage: ").strip()
        out += [f"## `{prog}` {{#{prog}}}", "", f"`{entry}`", "", "```text", usage, "```", "",
                prose(parser.description or ""), "",
                *option_rows(prog, parser), "", *exit_codes(parser), ""]
    return "\n".join(out)


# -- Python API ----------------------------------------------------------------------------

def api_reference(package: str, link) -> str:
    """``:::`` blocks (mkdocstrings) for the modules of ``package``, in file order (subpackages
    have their own pages). A method's module, or the package of a method split into several
    modules, is described on its page and its knobs in its table, so here it gets its other
    public members, and its method class only the methods that class defines."""
    from fedkrso.common.methods import METHODS

    folder = Path(importlib.import_module(package).__file__).parent
    entries = {entry.split(":")[0] for entry in commands().values()}
    pages = {method_module(cls): method_page(name) for name, cls in reversed(METHODS.items())}
    out = [f"::: {package}", "    options:", "      members: false", ""]
    for path in sorted(p for p in folder.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()):
        module = f"{package}.{path.stem}"
        if path.stem == "__init__" or module in entries or (path.is_dir() and module not in pages):
            continue
        if module not in pages:
            out += [f"::: {module}", ""]
            continue
        out += [f"## `{module}` {{#{module}}}", "", f"Described on [its method's page]({link(pages[module])}); "
                "its public members:", ""]
        parts = sorted(p.stem for p in path.glob("*.py") if p.stem != "__init__") if path.is_dir() else []
        for part in [module, *(f"{module}.{p}" for p in parts)]:
            out += method_members(part, link)
    return "\n".join(out)


def method_members(module: str, link) -> list[str]:
    """``:::`` blocks for the public functions and classes ``module`` defines, but the
    ``Config`` (its page's knobs table) and, of a method class, only the methods it defines."""
    from fedkrso.common.methods import METHODS, MethodConfig

    page_of = {cls: method_page(name) for name, cls in METHODS.items()}
    out = []
    for name, obj in vars(importlib.import_module(module)).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module or not callable(obj):
            continue
        if isinstance(obj, type) and issubclass(obj, MethodConfig):
            continue  # the knobs table of the method's page
        if obj not in page_of:
            out += [f"::: {module}.{name}", "    options:", "      heading_level: 3", ""]
            continue
        out += [f"### `{module}.{name}`", "", f"`method.name: {obj.name}` ([its page]({link(page_of[obj])})); "
                "the methods it defines:", ""]
        for member, fn in vars(obj).items():
            if not member.startswith("_") and callable(fn) and fn.__doc__:
                out += [f"::: {module}.{name}.{member}", "    options:", "      heading_level: 4", ""]
    return out


# -- the hook --------------------------------------------------------------------------------

_method_pages: set[str] = set()


def on_pre_build(config):
    _method_pages.clear()


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")

    def link(target: str) -> str:
        return "../" * depth + target

    def expand(m: re.Match) -> str:
        what, arg = m["what"], m["arg"]
        if what == "round.yaml":
            return config_reference(link)
        if what == "cli":
            return cli_reference()
        if what == "methods":
            return methods_table(link)
        if what == "layering":
            return layering()
        if what == "privacy":
            return privacy_table(link)
        if what == "api" and arg:
            return api_reference(arg, link)
        if what == "method" and arg:
            _method_pages.add(arg)
            return method_reference(arg, link)
        raise Gaps(f"{page.file.src_uri}: unknown reference marker {m[0]!r}")

    parts = FENCE.split(markdown)  # a marker inside a code fence is an example, left as it is
    return "".join(p if i % 2 else MARKER.sub(expand, p) for i, p in enumerate(parts))


def on_env(env, config, files):
    """Every registered method has its page (after every page's markdown was read)."""
    from fedkrso.common.methods import METHODS

    if lacking := sorted(set(METHODS) - _method_pages):
        raise Gaps("methods without a page (docs/methods/NAME.md with <!-- reference: method NAME -->): "
                   + ", ".join(lacking))
    return env
