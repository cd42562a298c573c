"""The documentation site: it builds strictly (a broken link, anchor, mkdocstrings identifier or
reference marker fails), and its generated reference (docs/hooks/reference.py) has no gaps:
every round.yaml field and every command's flag appears with its description, and a field or
a flag without one stops the build.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from pydantic import BaseModel, Field

from conftest import REPO

pytest.importorskip("mkdocs", reason="mkdocs is not installed (make install: requirements.lock)")
from mkdocs.exceptions import PluginError  # noqa: E402

from fedkrso.common import config as config_module  # noqa: E402
from fedkrso.common.config import RunConfig  # noqa: E402


def load_hook():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_hook()


def leaves(model: type[BaseModel], path: str):
    """(dotted path, field) of every plain field, walked apart from the hook's own walk."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from leaves(field.annotation, f"{path}.{name}")
        elif path:
            yield f"{path}.{name}", field


def test_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(REPO / "mkdocs.yml"),
         "-d", str(site)],
        cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (site / "reference" / "config" / "index.html").read_text()
    assert "max_update_norm" in page and "freeze_ratio" in (site / "methods" / "fedtt-plus" / "index.html").read_text()


def test_round_yaml_reference_has_every_field_with_its_description():
    page = reference.config_reference()
    sections = [n for n in RunConfig.model_fields if n != "method"]
    fields = [leaf for name in sections for leaf in leaves(RunConfig.model_fields[name].annotation, name)]
    assert len(fields) > 60
    for path, field in fields:
        section, name = path.rsplit(".", 1)
        assert f"{{#{section}}}" in page, section
        assert f"| `{name}` |" in page and reference.md(field.description) in page, path


def test_a_field_without_a_description_stops_the_build(monkeypatch):
    class Undescribed(BaseModel):
        documented: int = Field(0, description="has one")
        forgotten: int = 0

    class Config(RunConfig):
        extra_section: Undescribed = Undescribed()

    monkeypatch.setattr(config_module, "RunConfig", Config)
    with pytest.raises(PluginError, match=r"extra_section\.forgotten"):
        reference.config_reference()


def test_method_pages_list_each_knob_once():
    from fedkrso.common.methods import METHODS

    pages = {name: reference.method_reference(name, lambda page: page) for name in METHODS}
    assert "| `rank` |" in pages["fedkrso"] and "| `rank` |" in pages["fedit"]  # two knobs, two fields
    assert "| `rank` |" not in pages["ffa-lora"] and "FedIT's knobs" in pages["ffa-lora"]  # inherited: linked
    assert "| `bottleneck` |" not in pages["fedtt+"] and "| `freeze_ratio` |" in pages["fedtt+"]
    assert all("## Upload" in page for page in pages.values())


def test_api_reference_lists_the_members_of_every_method_a_package_too():
    """A method split into a package (``fedkrso``, ``fedtt``: config, layer, method) is described
    by its package, as a one-module method by its module: one heading linked to its page, then
    the public members of each of its files."""
    from fedkrso.common.methods import METHODS

    page = reference.api_reference("fedkrso.common.methods", lambda page: page)
    for name, cls in METHODS.items():
        home = reference.method_module(cls)
        assert f"## `{home}` {{#{home}}}" in page and f"[its page]({reference.method_page(name)})" in page
    assert reference.method_module(METHODS["fedtt"]) == "fedkrso.common.methods.fedtt"
    for member in ("layer.TTAdapter", "layer.contract", "method.load_adapters", "method.FedTT.export_artifacts"):
        assert f"::: fedkrso.common.methods.fedtt.{member}" in page, member
    assert "::: fedkrso.common.methods.fedtt.config" not in page  # the knobs are the page's table
    assert reference.method_module(METHODS["fedkrso"]) == "fedkrso.common.methods.fedkrso"
    for member in ("layer.SubspaceAdapter", "method.FedKRSO.apply"):
        assert f"::: fedkrso.common.methods.fedkrso.{member}" in page, member
    table = reference.methods_table(lambda page: page)
    assert "| [`fedtt`](methods/fedtt.md) | FedTT: tensor-train adapters, and FedTT+" in table


def test_a_method_without_a_page_stops_the_build():
    from fedkrso.common.methods import METHODS

    page = SimpleNamespace(file=SimpleNamespace(src_uri="methods/all.md"))
    reference.on_pre_build(None)
    reference.on_page_markdown("\n".join(f"<!-- reference: method {n} -->" for n in METHODS if n != "fedavg"),
                               page, None, None)
    with pytest.raises(PluginError, match="fedavg"):
        reference.on_env(None, None, None)
    reference.on_page_markdown("<!-- reference: method fedavg -->", page, None, None)
    reference.on_env(None, None, None)


def test_cli_reference_has_every_flag_of_every_command():
    page = reference.cli_reference()
    commands = reference.commands()
    assert {"fedkrso-server", "fedkrso-client", "fedkrso-sim", "fedkrso-export"} <= set(commands)
    for prog, entry in commands.items():
        assert f"{{#{prog}}}" in page
        for action in reference.command_parser(entry)._actions:
            for flag in action.option_strings:
                assert f"`{flag}`" in page, (prog, flag)
            assert reference.md(action.help) in page, (prog, action.dest)


def test_a_flag_without_help_stops_the_build():
    parser = argparse.ArgumentParser(prog="toy")
    parser.add_argument("--documented", help="has help")
    parser.add_argument("--forgotten")
    with pytest.raises(PluginError, match="--forgotten"):
        reference.option_rows("toy", parser)


def test_every_public_member_the_api_reference_shows_has_a_docstring():
    """The Python API pages list every public class, function and method of client/, common/,
    server/ and sim/: none of them without a docstring (the gaps the reference showed). Exempt:
    the registered methods' classes (their module's docstring is their page) and the commands'
    ``main`` / ``parse_args`` (the command-line page reads their parsers)."""
    import ast

    from fedkrso.common.methods import METHODS

    method_classes = {cls.__name__ for cls in METHODS.values()}
    missing = []
    for folder in ("client", "common", "server", "sim"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())

            def walk(node, prefix=""):
                for n in ast.iter_child_nodes(node):
                    if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith("_"):
                        continue
                    command = not prefix and n.name in ("main", "parse_args")
                    if ast.get_docstring(n) is None and not command and n.name not in method_classes:
                        missing.append(f"{path.relative_to(REPO)}:{n.lineno} {prefix}{n.name}")
                    if isinstance(n, ast.ClassDef):
                        walk(n, f"{prefix}{n.name}.")

            walk(tree)
    assert not missing, "public members without a docstring:\n" + "\n".join(missing)
