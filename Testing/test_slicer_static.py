"""Static checks of the Slicer extension: the Qt panel cannot run here (no Slicer application), so
what can be checked without it is checked from the files.

* the .ui parses, uses only declared custom widgets, wires every node selector to the scene;
* every ``self.ui.<name>`` the module uses exists in the .ui, and every widget bound with
  ``SlicerParameterName`` matches a parameter-node field of a type that widget can show;
* the choices the panel offers are the engine's;
* CMake lists every script and resource, and SAMIR.s4ext / SAMIR.json agree with CMake.
"""
import ast
import json
import re
import struct
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE_FOLDER = REPOSITORY / "SAMIRRegistration"
MODULE_SCRIPT = MODULE_FOLDER / "SAMIRRegistration.py"
UI_FILE = MODULE_FOLDER / "Resources" / "UI" / "SAMIRRegistration.ui"
MODULE_CMAKE = MODULE_FOLDER / "CMakeLists.txt"
TOP_CMAKE = REPOSITORY / "CMakeLists.txt"
S4EXT = REPOSITORY / "SAMIR.s4ext"
INDEX_JSON = REPOSITORY / "SAMIR.json"
QT_WIDGETS = {"QWidget", "QLabel", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox", "QPushButton", "QLineEdit",
              "QProgressBar", "QPlainTextEdit", "QFrame", "QGroupBox", "QRadioButton", "QTextEdit", "QSlider"}
# widget class -> parameter types the parameterNodeWrapper GUI connectors bind it to
WIDGET_TYPES = {"QCheckBox": {"bool"}, "QSpinBox": {"int"}, "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"},
                "QComboBox": {"choice"}, "QLineEdit": {"str"}, "qMRMLNodeComboBox": {"node"}}


# ------------------------------------------------------------------------------------------------
# helpers


def ui_tree() -> ElementTree.ElementTree:
    return ElementTree.parse(UI_FILE)


def ui_widgets() -> dict:
    """name -> <widget> element."""
    return {w.get("name"): w for w in ui_tree().getroot().iter("widget")}


def string_property(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def bound_parameters() -> dict:
    """SlicerParameterName -> widget element."""
    out = {}
    for widget in ui_widgets().values():
        prop = string_property(widget, "SlicerParameterName")
        if prop is not None:
            assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be a dynamic property"
            out[prop.find("string").text] = widget
    return out


def module_ast() -> ast.Module:
    return ast.parse(MODULE_SCRIPT.read_text(), filename=str(MODULE_SCRIPT))


def parameter_node_fields() -> dict:
    """Field name -> kind ("node", "bool", "int", "float", "str", "choice") of the @parameterNodeWrapper class."""
    tree = module_ast()
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)]
    assert len(classes) == 1, "expected exactly one @parameterNodeWrapper class"
    fields = {}
    for statement in classes[0].body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        annotation = ast.unparse(statement.annotation)
        if annotation.startswith("vtkMRML"):
            kind = "node:" + annotation
        elif "Choice(" in annotation:
            kind = "choice"
        else:
            base = re.sub(r"^Annotated\[(\w+),.*$", r"\1", annotation)
            kind = base
        fields[statement.target.id] = kind
    return fields


def cmake_list(text: str, variable: str) -> list:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def cmake_value(text: str, variable: str) -> str:
    match = re.search(r'set\(\s*' + variable + r'\s+"([^"]*)"', text)
    assert match, f"{variable} not found"
    return match.group(1)


def s4ext_values() -> dict:
    values = {}
    for line in S4EXT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values[key] = value.strip()
    return values


# ------------------------------------------------------------------------------------------------
# the .ui


def test_ui_parses_and_is_a_qmrmlwidget_with_declared_custom_widgets():
    root = ui_tree().getroot()
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "SAMIRRegistration")
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert used - QT_WIDGETS <= declared, f"undeclared custom widgets: {used - QT_WIDGETS - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_node_selector_gets_the_scene():
    root = ui_tree().getroot()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
                 and c.find("sender").text == "SAMIRRegistration"}
    assert selectors and selectors <= connected, f"not connected to the scene: {selectors - connected}"


def test_widgets_used_in_python_exist_in_the_ui():
    names = set(ui_widgets())
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SCRIPT.read_text()))
    assert used, "the module uses no widget?"
    assert used <= names, f"used in SAMIRRegistration.py but not in the .ui: {sorted(used - names)}"
    # rows hidden together with their label: each such widget has a "<name>Label"
    for name in re.findall(r"_setRowVisible\(self\.ui\.(\w+)", MODULE_SCRIPT.read_text()):
        assert name + "Label" in names, f"{name} has no label {name}Label"
    for tuple_names in re.findall(r"for widget in \(([^)]*)\):\s*\n\s*self\._setRowVisible", MODULE_SCRIPT.read_text()):
        for name in re.findall(r"self\.ui\.(\w+)", tuple_names):
            assert name + "Label" in names, f"{name} has no label {name}Label"


def test_parameter_names_in_the_ui_are_parameter_node_fields_of_a_matching_type():
    fields = parameter_node_fields()
    bound = bound_parameters()
    assert set(bound) <= set(fields), f"SlicerParameterName without a field: {sorted(set(bound) - set(fields))}"
    assert set(fields) <= set(bound), f"parameter-node fields not in the panel: {sorted(set(fields) - set(bound))}"
    for name, widget in bound.items():
        kind = fields[name]
        widget_class = widget.get("class")
        if kind.startswith("node:"):
            assert widget_class == "qMRMLNodeComboBox", name
            types = [s.text for s in string_property(widget, "nodeTypes").iter("string")]
            assert types == [kind.split(":", 1)[1]], f"{name}: .ui node types {types} vs field {kind}"
        else:
            assert kind in WIDGET_TYPES.get(widget_class, set()), f"{name}: a {widget_class} cannot show {kind}"


def test_parameter_node_attributes_used_in_python_are_fields():
    fields = set(parameter_node_fields())
    text = MODULE_SCRIPT.read_text()
    used = set(re.findall(r"(?:parameters|self\._parameterNode|parameterNode)\.(\w+)", text))
    used -= {"connectGui", "disconnectGui", "GetNodeReference", "SetNodeReferenceID"}
    assert used <= fields, f"not parameter-node fields: {sorted(used - fields)}"


def test_module_follows_the_scripted_module_template(monkeypatch, tmp_path):
    """What Slicer's scripted-module loader and "Reload and Test" use: the module, widget, logic and test
    classes named after the file on their own base classes, the module's entry under Registration, a
    runTest that runs every test method, and the logic's documented entry points."""
    import inspect
    import types
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    import slicer_app_standin as standin
    standin.install(monkeypatch, tmp_path)
    bases = types.ModuleType("slicer.ScriptedLoadableModule")  # one distinct base per role
    for role in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(bases, role, type(role, (), {"__init__": lambda self, parent=None: setattr(self, "parent", parent)}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", bases)
    module = standin.import_module(monkeypatch)
    for suffix, base in (("", bases.ScriptedLoadableModule), ("Widget", bases.ScriptedLoadableModuleWidget),
                         ("Logic", bases.ScriptedLoadableModuleLogic), ("Test", bases.ScriptedLoadableModuleTest)):
        assert issubclass(getattr(module, "SAMIRRegistration" + suffix), base), suffix

    parent = types.SimpleNamespace()
    module.SAMIRRegistration(parent)
    assert parent.categories == ["Registration"] and parent.dependencies == []
    assert parent.title and parent.contributors and all(isinstance(c, str) for c in parent.contributors)
    assert parent.helpText and parent.acknowledgementText

    test = module.SAMIRRegistrationTest()
    methods = sorted(name for name in vars(module.SAMIRRegistrationTest) if name.startswith("test_"))
    ran = []
    monkeypatch.setattr(test, "setUp", lambda: ran.append("setUp"), raising=False)
    for name in methods:
        monkeypatch.setattr(test, name, lambda name=name: ran.append(name), raising=False)
    test.runTest()
    assert methods and sorted(ran[1::2]) == methods and set(ran[::2]) == {"setUp"}, ran  # each after a setUp

    register = inspect.signature(module.SAMIRRegistrationLogic.registerVolumes).parameters
    assert list(register)[:9] == ["self", "fixedVolume", "movingVolume", "movingSegmentation", "outputTransform",
                                  "outputVolume", "outputSegmentation", "outputJacobian", "settings"]
    assert register["waitForCompletion"].default is True
    propagate = inspect.signature(module.SAMIRRegistrationLogic.propagateSegmentationThroughSequence).parameters
    assert list(propagate)[:4] == ["self", "volumeSequence", "segmentation", "referenceFrame"]


def test_bridge_uses_no_qt_and_no_application():
    """SAMIRRegistrationLib runs on slicer-core: no Qt import, no ``slicer.app`` / ``slicer.util`` in its code."""
    for path in (MODULE_FOLDER / "SAMIRRegistrationLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & {"qt", "ctk", "PythonQt"}, path.name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in {"qt", "ctk", "PythonQt"}, path.name
                assert node.module != "slicer.util", path.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in {"app", "util"}, f"{path.name} uses slicer.{node.attr}"


# ------------------------------------------------------------------------------------------------
# packaging


def module_files() -> tuple:
    scripts, resources = set(), set()
    for path in MODULE_FOLDER.rglob("*"):
        relative = path.relative_to(MODULE_FOLDER).as_posix()
        if not path.is_file() or "__pycache__" in relative or relative.endswith((".pyc", ".egg-info")) \
                or ".egg-info/" in relative or relative == "CMakeLists.txt":
            continue
        if relative.endswith(".py"):
            scripts.add(relative)
        else:
            resources.add(relative)
    return scripts, resources


def test_cmake_lists_every_script_and_resource():
    """The module and bridge scripts one by one; the engine package through its glob (it grows on its own)."""
    text = MODULE_CMAKE.read_text()
    glob = re.search(r"file\(GLOB SAMIR_ENGINE_SCRIPTS RELATIVE \$\{CMAKE_CURRENT_SOURCE_DIR\} CONFIGURE_DEPENDS"
                     r" (\S+)\)", text)
    assert glob and glob.group(1) == "samir/*.py"
    engine = {p.relative_to(MODULE_FOLDER).as_posix() for p in (MODULE_FOLDER / "samir").glob("*.py")}
    expand = lambda items: {i.replace("${MODULE_NAME}", "SAMIRRegistration") for i in items}
    listed_scripts = expand(cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    assert "${SAMIR_ENGINE_SCRIPTS}" in listed_scripts and "samir/__init__.py" in engine
    listed_scripts = (listed_scripts - {"${SAMIR_ENGINE_SCRIPTS}"}) | engine
    weights_glob = re.search(r"file\(GLOB SAMIR_ENGINE_WEIGHTS RELATIVE \$\{CMAKE_CURRENT_SOURCE_DIR\} CONFIGURE_DEPENDS"
                             r" (\S+)\)", text)
    assert weights_glob and weights_glob.group(1) == "samir/weights/*.pt"
    weights = {p.relative_to(MODULE_FOLDER).as_posix() for p in (MODULE_FOLDER / "samir" / "weights").glob("*.pt")}
    listed_resources = expand(cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    assert "${SAMIR_ENGINE_WEIGHTS}" in listed_resources
    listed_resources = (listed_resources - {"${SAMIR_ENGINE_WEIGHTS}"}) | weights
    scripts, resources = module_files()
    # the globs take no subpackage and no other data file: the engine must have none that the module needs
    assert not [p for p in (MODULE_FOLDER / "samir").rglob("*") if p.is_file() and "__pycache__" not in p.parts
                and p.relative_to(MODULE_FOLDER).as_posix() not in engine | weights], "engine files the globs miss"
    assert scripts == listed_scripts, (f"missing from CMake: {sorted(scripts - listed_scripts)};"
                                       f" listed but absent: {sorted(listed_scripts - scripts)}")
    assert resources == listed_resources, (f"missing from CMake: {sorted(resources - listed_resources)};"
                                           f" listed but absent: {sorted(listed_resources - resources)}")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(SAMIRRegistration)" in TOP_CMAKE.read_text()


def png_size(path: Path) -> tuple:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icon_is_a_128_pixel_png():
    assert png_size(MODULE_FOLDER / "Resources" / "Icons" / "SAMIRRegistration.png") == (128, 128)


def test_s4ext_and_index_json_agree_with_cmake():
    text = TOP_CMAKE.read_text()
    project = re.search(r"project\((\w+)\)", text).group(1)
    assert S4EXT.stem == INDEX_JSON.stem == project == "SAMIR"
    s4ext = s4ext_values()
    index = json.loads(INDEX_JSON.read_text())
    depends = cmake_value(text, "EXTENSION_DEPENDS").split()
    assert depends == ["PyTorch"]
    assert s4ext["depends"].split() == depends == index["build_dependencies"]
    assert s4ext["category"] == cmake_value(text, "EXTENSION_CATEGORY") == index["category"] == "Registration"
    assert s4ext["homepage"] == cmake_value(text, "EXTENSION_HOMEPAGE")
    assert s4ext["iconurl"] == cmake_value(text, "EXTENSION_ICONURL")
    assert s4ext["screenshoturls"] == cmake_value(text, "EXTENSION_SCREENSHOTURLS")
    assert s4ext["description"] == cmake_value(text, "EXTENSION_DESCRIPTION")
    assert s4ext["contributors"] == cmake_value(text, "EXTENSION_CONTRIBUTORS")
    assert s4ext["scmurl"] == index["scm_url"] and s4ext["scmrevision"] == index["scm_revision"]
    assert s4ext["build_subdirectory"] == index["build_subdirectory"] == "."
    assert index["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-")
    # the icon and screenshot addresses name files of this repository (on its main branch)
    branch = s4ext["scmrevision"]
    for url in [s4ext["iconurl"], *s4ext["screenshoturls"].split()]:
        relative = url.split(f"/{branch}/", 1)[1]
        assert (REPOSITORY / relative).is_file(), f"{url} names no file of the repository"
        assert png_size(REPOSITORY / relative)[0] >= 128
    anchor = s4ext["homepage"].split("#", 1)[1]
    headings = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", (REPOSITORY / "README.md").read_text(), re.M)]
    assert anchor in headings, f"README has no section for the homepage anchor #{anchor}"
    assert (REPOSITORY / "LICENSE").read_text().lstrip().startswith("Apache License")


# ------------------------------------------------------------------------------------------------
# the Extensions Index (github.com/Slicer/ExtensionsIndex, main branch)

INDEX_SCHEMA = REPOSITORY / "Testing" / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"


def index_formatted(value, indent: int = 0) -> str:
    """The index's pre-commit formatting (prettier with multiline arrays, threshold 0): two-space
    indentation, every non-empty array one item per line, one trailing newline."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {index_formatted(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    if isinstance(value, list):
        items = [f"{inner}{index_formatted(v, indent + 2)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]" if items else "[]"
    return json.dumps(value)


def test_index_json_validates_against_the_index_schema_and_is_formatted_as_its_pre_commit_does():
    jsonschema = pytest.importorskip("jsonschema")
    text = INDEX_JSON.read_text()
    entry = json.loads(text)
    schema = json.loads(INDEX_SCHEMA.read_text())
    assert entry["$schema"] == schema["$id"]
    jsonschema.Draft7Validator(schema).validate(entry)
    with pytest.raises(jsonschema.ValidationError):  # the schema really constrains: no unknown keys
        jsonschema.Draft7Validator(schema).validate({**entry, "homepage": "x"})
    assert text == index_formatted(entry) + "\n"
    assert "\r" not in text and "\t" not in text


def test_repository_name_and_urls_follow_the_index_rules_and_agree():
    cmake = TOP_CMAKE.read_text()
    entry = json.loads(INDEX_JSON.read_text())
    match = re.fullmatch(r"https://github\.com/([\w-]+)/([\w.-]+?)(\.git)?", entry["scm_url"])
    assert match, entry["scm_url"]
    owner, repository = match.group(1), match.group(2)
    assert repository.startswith("Slicer"), "the index requires a repository name starting with 'Slicer'"
    assert not INDEX_JSON.stem.lower().startswith("slicer"), "the extension name must not start with 'Slicer'"
    s4ext = s4ext_values()
    for url in (cmake_value(cmake, "EXTENSION_HOMEPAGE"), cmake_value(cmake, "EXTENSION_ICONURL"),
                cmake_value(cmake, "EXTENSION_SCREENSHOTURLS"), s4ext["homepage"], s4ext["iconurl"],
                s4ext["screenshoturls"], s4ext["scmurl"]):
        assert f"/{owner}/{repository}" in url, f"{url} does not name {owner}/{repository}"
    help_links = re.findall(r'href="(https://github\.com/[^"#]+)', MODULE_SCRIPT.read_text())
    assert help_links and all(link.rstrip("/") == f"https://github.com/{owner}/{repository}" for link in help_links)


def test_supported_slicer_versions_are_stated_everywhere_and_enforced_by_the_build():
    cmake = TOP_CMAKE.read_text()
    minimum = re.search(r'set\(SAMIR_MINIMUM_SLICER_VERSION "([\d.]+)"\)', cmake).group(1)
    assert minimum == "5.10"
    assert re.search(r"VERSION_LESS SAMIR_MINIMUM_SLICER_VERSION\)\s*\n\s*message\(FATAL_ERROR", cmake)
    for text in (cmake_value(cmake, "EXTENSION_DESCRIPTION"), s4ext_values()["description"], MODULE_SCRIPT.read_text(),
                 (REPOSITORY / "README.md").read_text()):
        assert f"Slicer {minimum} or later" in text
    sys.path.insert(0, str(MODULE_FOLDER))
    try:
        from SAMIRRegistrationLib import dependencies
    finally:
        sys.path.remove(str(MODULE_FOLDER))
    assert dependencies.MINIMUM_SLICER_VERSION == (5, 10)
    assert dependencies.MINIMUM_PYTHON_VERSION == (3, 10)
