"""Static checks of the Slicer extension, without Slicer: the module's imports, the CMake install
lists, the .ui bindings, the Extensions Index entry (against the real v1.0.2 schema), icon and help.

Testing/data/ExtensionsIndex-schema-v1.0.2.json is Slicer's own
Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json, stored as data.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MMCAFNet" / "MMCAFNet.py"
SETUP = ROOT / "MMCAFNetLib" / "slicer_setup.py"
MAX_MODULE_LINES = 450  # the module file is the thin Qt layer; Qt-free work belongs to MMCAFNetLib
UI = ROOT / "Resources" / "UI" / "MMCAFNet.ui"
SCHEMA = Path(__file__).resolve().parent / "data" / "ExtensionsIndex-schema-v1.0.2.json"
ALLOWED_THIRD_PARTY = {"slicer", "vtk", "qt", "ctk", "numpy"}


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"), filename=str(MODULE))


def load_list_tool():
    path = ROOT / "MMCAFNet" / "Testing" / "Python" / "update_cmake_lists.py"
    spec = importlib.util.spec_from_file_location("update_cmake_lists", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


# --------------------------------------------------------------------------------------------------
# A JSON-schema validator for the subset the Extensions Index schema uses (jsonschema is not a dependency)
# --------------------------------------------------------------------------------------------------

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def schema_errors(instance, schema: dict, path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (type, required, properties, additionalProperties,
    items, enum, minimum, maximum); an empty list means valid."""
    errors: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        ok = any(
            isinstance(instance, _TYPES[n]) and not (n in ("integer", "number") and isinstance(instance, bool))
            for n in names
        )
        if not ok:
            return [f"{path}: expected {expected}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} < minimum {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} > maximum {schema['maximum']}")
    if isinstance(instance, dict):
        errors += [f"{path}: missing required {k!r}" for k in schema.get("required", []) if k not in instance]
        properties = schema.get("properties", {})
        for key, value in instance.items():
            if key in properties:
                errors += schema_errors(value, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: additional property {key!r} is not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(value, schema["additionalProperties"], f"{path}.{key}")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def test_the_stored_schema_is_the_extensions_index_v1_0_2_schema():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema["$id"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert schema["required"] == ["$schema", "category", "scm_url"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["scm_type"]["enum"] == ["git", "local"]
    assert (schema["properties"]["tier"]["minimum"], schema["properties"]["tier"]["maximum"]) == (1, 5)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"category": None}, "missing required 'category'"),
        ({"tier": 9}, "maximum"),
        ({"tier": "1"}, "expected integer"),
        ({"scm_type": "svn"}, "not one of"),
        ({"scmurl": "https://x"}, "additional property"),
        ({"build_dependencies": [3]}, "expected string"),
        ({"enabled": 1}, "expected boolean"),
    ],
)
def test_the_validator_rejects_what_the_schema_forbids(change, problem):
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    entry = {"$schema": schema["$id"], "category": "Quantification", "scm_url": "https://github.com/a/b"}
    assert schema_errors(entry, schema) == []
    entry.update(change)
    entry = {k: v for k, v in entry.items() if v is not None}
    assert any(problem in e for e in schema_errors(entry, schema)), schema_errors(entry, schema)


def test_extensions_index_entry_validates_and_matches_the_cmake_project():
    entry = json.loads((ROOT / "MMCAFNet.json").read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema_errors(entry, schema) == []
    assert entry["$schema"] == schema["$id"]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert "tier" in entry
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"^project\((\w+)\)", cmake, re.M).group(1)
    assert project == "MMCAFNet" == Path("MMCAFNet.json").stem
    fields = dict(re.findall(r'^set\((EXTENSION_\w+) "([^"]*)"\)', cmake, re.M))
    variables = dict(re.findall(r'^set\((\w+) "([^"]*)"\)', cmake, re.M))

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], value)

    for name in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert fields.get(f"EXTENSION_{name}"), f"EXTENSION_{name} is not set in CMakeLists.txt"
    assert fields["EXTENSION_DEPENDS"] == "PyTorch"
    assert fields["EXTENSION_CATEGORY"] == entry["category"]
    assert expand(fields["EXTENSION_HOMEPAGE"]) == entry["scm_url"]
    for url, local in (("ICONURL", "Resources/Icons/MMCAFNet.png"), ("SCREENSHOTURLS", "Resources/Screenshots/")):
        value = expand(fields[f"EXTENSION_{url}"])
        assert value.startswith("https://raw.githubusercontent.com/") and local in value
        assert (ROOT / value.split("/main/", 1)[1]).is_file(), f"{value} names no file of the repository"
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MMCAFNet)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in cmake


# --------------------------------------------------------------------------------------------------
# The module file
# --------------------------------------------------------------------------------------------------


def test_module_compiles_and_imports_only_allowed_modules_at_file_scope():
    source = MODULE.read_text(encoding="utf-8")
    compile(source, str(MODULE), "exec")
    stdlib = set(sys.stdlib_module_names)
    for node in module_tree().body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports do not work in a scripted module"
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in stdlib or top in ALLOWED_THIRD_PARTY, f"line {node.lineno}: '{name}' imported at file scope"


def test_module_does_no_work_at_import():
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    for node in module_tree().body:
        if isinstance(node, allowed):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            assert value is None or all(
                isinstance(n, (ast.Constant, ast.Dict, ast.List, ast.Tuple, ast.Load, ast.Name))
                for n in ast.walk(value)
            ), f"line {node.lineno}: file-scope assignment computes something"
            continue
        raise AssertionError(f"line {node.lineno}: {type(node).__name__} runs at import")


def parameter_fields() -> set[str]:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("MMCAFNet.py has no @parameterNodeWrapper class")


def ui_tree() -> ET.Element:
    return ET.parse(UI).getroot()


def test_every_slicer_parameter_name_in_the_ui_is_a_parameter_node_field():
    fields = parameter_fields()
    names = [
        prop.find("string").text
        for prop in ui_tree().iter("property")
        if prop.get("name") == "SlicerParameterName"
    ]
    assert names, "the .ui binds no widget to the parameter node"
    assert len(names) == len(set(names)), "two widgets bind the same parameter"
    unknown = sorted(set(names) - fields)
    assert not unknown, f"SlicerParameterName(s) {unknown} are not fields of the parameter node ({sorted(fields)})"
    assert {"inputVolume", "lesion", "device", "heatmapMethod", "heatmapThreshold"} <= set(names)


def test_ui_top_widget_and_every_widget_the_module_uses_exist():
    root = ui_tree()
    assert root.find("widget").get("class") == "qMRMLWidget"
    widget_names = {w.get("name") for w in root.iter("widget")} | {lay.get("name") for lay in root.iter("layout")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    missing = sorted(used - widget_names)
    assert not missing, f"MMCAFNet.py uses self.ui.{missing} that the .ui does not define"


def test_help_cites_the_paper_and_the_dataset():
    source = MODULE.read_text(encoding="utf-8")
    for needle in ("2508.04205", "10.7937/TCIA.2020.NNC2-0461", "Yu et al.", "Li et al.", "MICCAI 2025"):
        assert needle in source, needle
    assert "acknowledgementText" in source and "helpText" in source


def test_torch_is_installed_through_pytorchutils_never_plain_pip():
    """Checked on the module file and on slicer_setup, which does the installing for its Logic."""
    source = MODULE.read_text(encoding="utf-8") + SETUP.read_text(encoding="utf-8")
    assert "PyTorchUtils" in source and "installTorch" in source
    for call in re.findall(r"pip_install\(([^)]*)\)", source):
        assert "torch" not in call, f"torch must come from the PyTorch extension, not pip_install({call})"
    assert "SimpleITK" in source  # pinned by the constraints file, never replaced


def test_module_file_stays_within_its_line_bound():
    lines = len(MODULE.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"MMCAFNet.py has {lines} lines; move Qt-free work into MMCAFNetLib"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``tree``, ``from a import b`` giving both a and a.b."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_the_widget_reaches_the_library_only_through_the_logic():
    widget = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "MMCAFNetWidget")
    direct = [(line, name) for line, name in imported_modules(widget) if name.split(".")[0] == "MMCAFNetLib"]
    assert not direct, f"the widget imports the library itself: {direct}"
    forbidden = ("MMCAFNetLib.synthetic", "MMCAFNetLib.ehr", "MMCAFNetLib.dataset")
    anywhere = [(line, name) for line, name in imported_modules(module_tree()) if name.startswith(forbidden)]
    assert not anywhere, f"MMCAFNet.py imports record or synthetic-data modules: {anywhere}"


def test_module_category_is_this_extensions_own():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    category = re.search(r'^set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake, re.M).group(1)
    assigned = [
        ast.literal_eval(node.value)
        for node in ast.walk(module_tree())
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.parent.categories"
    ]
    assert assigned == [[category]], f"module categories {assigned} should be [[{category!r}]] (CMakeLists.txt)"


# --------------------------------------------------------------------------------------------------
# Install lists
# --------------------------------------------------------------------------------------------------


def test_cmake_lists_name_every_python_and_resource_file():
    tool = load_list_tool()
    cmake_text = (ROOT / "MMCAFNet" / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = tool.parse_lists(cmake_text)
    expected = tool.expected_lists(ROOT)
    for name, files in expected.items():
        missing = sorted(set(files) - set(listed.get(name, [])))
        extra = sorted(set(listed.get(name, [])) - set(files))
        assert not missing and not extra, (
            f"{name} in MMCAFNet/CMakeLists.txt is stale (missing {missing}, gone {extra}); "
            "run python MMCAFNet/Testing/Python/update_cmake_lists.py"
        )
    module_scripts = listed["MODULE_PYTHON_SCRIPTS"]
    for py in sorted((ROOT / "MMCAFNet").glob("*.py")):
        assert py.name in module_scripts or f"${{MODULE_NAME}}{py.name[len('MMCAFNet'):]}" in module_scripts
    scripts = set(listed["MMCAFNetLib_PYTHON_SCRIPTS"])
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "MMCAFNetLib").rglob("*.py")}
    tracked = set(tool.repository_files(ROOT))
    assert on_disk & tracked <= scripts
    for must in ("Resources/UI/MMCAFNet.ui", "Resources/Icons/MMCAFNet.png", "Resources/Models.json"):
        assert must in listed["MMCAFNet_RESOURCE_FILES"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icon_is_a_128_pixel_png_and_the_screenshot_exists():
    assert png_size(ROOT / "Resources" / "Icons" / "MMCAFNet.png") == (128, 128)
    shots = sorted((ROOT / "Resources" / "Screenshots").glob("*.png"))
    assert shots, "no screenshot in Resources/Screenshots"
    width, height = png_size(shots[0])
    assert width >= 600 and height >= 300
