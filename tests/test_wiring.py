"""Static checks that keep the wiring explicit (engine_build.py's [Note: explicit wiring],
checkpoint/state.py's [Note: checkpoint interface]); AST only, no process group.

Each check fails on the code before this change (commit 9256f2e: save.py read
``getattr(engine.partition_comm, "replica_rank", 0)`` and ``engine.stage`` / ``.offload`` /
``.masters``, load.py ``engine.flat_groups``, engine_build.py ``hasattr(group,
"on_shard_modified")``, gathered.py ``getattr(p, "_hf_zero_group", None)``); see also
test_the_checks_see_a_violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

from hf_zero.checkpoint.state import CheckpointState

PACKAGE = Path(__file__).resolve().parent.parent / "hf_zero"

# What any checkpoint module may ask an engine (the public engine API and the interface).
ENGINE_API_FOR_CHECKPOINTS = {"checkpoint_state", "module", "save_16bit_model", "zero_optimization_stage"}
# The engine parts the checkpoint interface hides: never named in save.py / load.py.
ENGINE_INTERNALS = {"stage", "offload", "masters", "flat_groups", "frozen_groups", "partition_comm", "scaler",
                    "inner", "param_store", "partition_rank"}
# Where stage, group and offload internals live; the hasattr / getattr check skips them.
HOMES = ("stages/", "sharded_params.py", "flat_buffer.py", "offload/")


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _attribute_uses(tree: ast.AST, owner: str) -> list[tuple[int, str]]:
    return [(node.lineno, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == owner]


def checkpoint_interface_violations(path: Path) -> list[str]:
    """``engine.<x>`` beyond the engine API in any checkpoint module; in save.py / load.py:
    ``engine`` used for anything but ``checkpoint_state()``, ``state.<x>`` outside the
    CheckpointState protocol, or an engine internal named at all."""
    tree, name, problems = _parse(path), path.name, []
    allowed = {"checkpoint_state"} if name in ("save.py", "load.py") else ENGINE_API_FOR_CHECKPOINTS
    for line, attr in _attribute_uses(tree, "engine"):
        if attr not in allowed:
            problems.append(f"{name}:{line}: engine.{attr}")
    if name in ("save.py", "load.py"):
        interface = set(CheckpointState.__annotations__) | {n for n in vars(CheckpointState) if not n.startswith("_")}
        for line, attr in _attribute_uses(tree, "state"):
            if attr not in interface:
                problems.append(f"{name}:{line}: state.{attr} is not in CheckpointState")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS:
                problems.append(f"{name}:{node.lineno}: .{node.attr} (an engine internal)")
    return problems


def _internal_names() -> set[str]:
    """Attributes and methods of the stage, group and offload classes, and the private tags
    stage 3 puts on parameters (``p._hf_zero_group``)."""
    names: set[str] = set()
    files = [p for home in HOMES for p in ((PACKAGE / home).glob("*.py") if home.endswith("/") else [PACKAGE / home])]
    for path in files:
        for node in ast.walk(_parse(path)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_hf_zero")):
                names.add(str(node.args[1].value))   # setattr(p, "_hf_zero_group", self): a tag as well
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if (isinstance(node.value, ast.Name) and node.value.id == "self") or node.attr.startswith("_hf_zero"):
                    names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return names


def introspection_violations(path: Path, internal: set[str]) -> list[str]:
    """``hasattr(x, "name")`` / ``getattr(x, "name", ...)`` asking for a stage / group / offload
    internal: by the name asked for, or by an object named like a stage, group or offload."""
    problems = []
    for node in ast.walk(_parse(path)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2):
            continue
        target, asked = ast.unparse(node.args[0]), node.args[1]
        name = asked.value if isinstance(asked, ast.Constant) and isinstance(asked.value, str) else None
        suspicious_owner = any(word in target.lower() for word in ("stage", "group", "offload", "partition"))
        if (name is not None and name in internal) or suspicious_owner:
            problems.append(f"{path.name}:{node.lineno}: {node.func.id}({target}, {ast.unparse(asked)})")
    return problems


# Names a stage, group or offload class has that other objects legitimately have too; each
# entry is (file, name, why).
GENERIC = {
    ("engine_build.py", "step"): "an LR scheduler object (has .step) versus a factory taking the optimizer",
}


def test_checkpoint_modules_see_the_engine_only_through_its_checkpoint_interface():
    problems = [p for path in sorted((PACKAGE / "checkpoint").glob("*.py"))
                for p in checkpoint_interface_violations(path)]
    assert not problems, "checkpoint code reaches past engine.checkpoint_state():\n" + "\n".join(problems)


def test_no_code_outside_the_stages_asks_a_stage_group_or_backend_what_it_has():
    internal = _internal_names()
    assert {"on_shard_modified", "frozen_groups", "unshard", "secondary_comm", "_hf_zero_group"} <= internal
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(HOMES):
            continue
        problems += [p for p in introspection_violations(path, internal)
                     if not any(relative == f and repr(n) in p for f, n in GENERIC)]
    assert not problems, "hasattr/getattr on stage internals outside stages/:\n" + "\n".join(problems)


def test_the_engine_implements_every_member_of_the_checkpoint_interface():
    tree = _parse(PACKAGE / "engine_checkpoint.py")
    provided = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    provided |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    interface = set(CheckpointState.__annotations__) | {n for n in vars(CheckpointState) if not n.startswith("_")}
    assert interface - provided == set()


def test_the_checks_see_a_violation(tmp_path):
    """The checks are not vacuous: a module breaking each rule is reported."""
    bad = tmp_path / "save.py"
    bad.write_text("def f(engine, state, group):\n"
                   "    engine.stage.wait_for_reductions()\n"
                   "    state.offload.read_state()\n"
                   "    first = getattr(engine.partition_comm, 'replica_rank', 0)\n"
                   "    return hasattr(group, 'on_shard_modified'), first\n")
    problems = checkpoint_interface_violations(bad)
    assert any("engine.stage" in p for p in problems) and any("state.offload" in p for p in problems)
    tag = tmp_path / "tagged.py"
    tag.write_text("def g(p, x):\n    return getattr(p, '_hf_zero_group', None), hasattr(x, 'unshard')\n")
    found = introspection_violations(bad, _internal_names()) + introspection_violations(tag, _internal_names())
    assert len(found) == 4, found
