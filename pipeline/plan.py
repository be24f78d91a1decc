"""Planning: a config (or several) -> the nodes to run, their keys, and what each will do.

``plan(config, stages, selection, store)`` validates every stage section, binds input roles,
orders the nodes (``graphlib``), computes each node's key from the hashed config, the input keys,
the code (``pipeline.codehash``) and the data fingerprint, and decides per node: ``run``,
``cached`` or ``skip``. For a node that will run it says why it is not cached, by comparing
these components with the newest artifact of the same stage in the store (``config:
evaluate.gamma 0.0 -> 0.1``, ``code: stages/evaluate.py``, ``input: model``, ``data``, or
``new``), and runs the stage's cluster-free checks (missing files, unknown class names) before
anything starts. Planning imports neither torch nor Ray.

Several configs can be planned at once (:func:`plan_many`, sweeps): nodes with equal keys are the
same artifact and run once (``execute`` dedupes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pipeline import codehash
from pipeline.catalogue import DEFAULT_CODE_PACKAGES
from pipeline.config import LoadedConfig, digest, hashed_view, runtime_view, stage_section, validate_section
from pipeline.dag import Stage, bind, descendants, nearest, order, resolve_kinds, stage_index
from pipeline.errors import ConfigError, find_user_error, is_user_error


@dataclasses.dataclass
class Selection:
    """Which nodes an invocation considers.

    Attributes:
        stages: ``--stages``: only these (their upstream must already be cached).
        from_stage: ``--from``: this stage and everything downstream of it.
        force: ``--force``: None (no forcing), [] (every selected node) or the names to re-run.
    """

    stages: list[str] | None = None
    from_stage: str | None = None
    force: list[str] | None = None


@dataclasses.dataclass
class Node:
    """One stage of a plan.

    Attributes:
        name: the stage name (one node per stage section).
        stage: the stage object.
        config: its validated config.
        bindings: ``{role: upstream node name}``.
        components: what the key is made of: ``config`` (hashed view), ``inputs`` (``{role:
            key}``), ``code`` (``{file: sha256}``), ``data`` (fingerprint or None).
        key: the artifact key (sha256 hex).
        action: ``run`` | ``cached`` | ``skip``.
        reason: why a ``run`` node is not cached (see module docstring); empty otherwise.
        status / seconds / metrics / error: filled in by execution.
    """

    name: str
    stage: Stage
    config: Any
    bindings: dict[str, str]
    components: dict[str, Any] = dataclasses.field(default_factory=dict)
    key: str = ""
    selected: bool = True
    cached: bool = False
    action: str = ""
    reason: str = ""
    status: str = "pending"
    seconds: float = 0.0
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def upstream(self) -> list[str]:
        return list(dict.fromkeys(self.bindings.values()))

    @property
    def runtime(self) -> dict[str, Any]:
        return runtime_view(self.config)


@dataclasses.dataclass
class Plan:
    """An ordered set of nodes for one config.

    Attributes:
        config: the loaded config.
        nodes: ``{name: Node}`` in execution order.
        notices: lines to print once (stages' ``notices``, deduplicated).
    """

    config: LoadedConfig
    nodes: dict[str, Node]
    notices: list[str]

    def __iter__(self):
        return iter(self.nodes.values())

    def keys(self) -> dict[str, str]:
        """``{node: key}``."""
        return {n.name: n.key for n in self}


def _user(e: BaseException) -> BaseException:
    """A user error raised while planning, as a ConfigError (exit status 2)."""
    u = find_user_error(e)
    return ConfigError(str(u)) if u is not None and not isinstance(u, ConfigError) else (u or e)


def plan(
    config: LoadedConfig,
    stages: Sequence[type[Stage]],
    selection: Selection | None = None,
    store: Any = None,
    *,
    code_packages: tuple[str, ...] = DEFAULT_CODE_PACKAGES,
    checks: bool = True,
) -> Plan:
    """Plan one config (see module docstring).

    Args:
        config: a loaded config (``pipeline.config.load_config``).
        stages: the stage classes, listed in their natural order (ties of the topological order).
        selection: ``--stages`` / ``--from`` / ``--force``.
        store: an ``ArtifactStore`` to look up cached artifacts in, or None (nothing is cached).
        code_packages: packages whose imports count as code dependencies.
        checks: run the stages' plan-time checks for the nodes that will run (False: keys only,
            e.g. for ``gc`` on a machine without the data).

    Raises:
        ConfigError: an unknown section or stage name (nearest named), an invalid section, a
            missing or ambiguous input binding (naming the key to set), a selected node whose
            upstream is neither selected nor cached, or a stage's plan-time check failing.
    """
    selection = selection or Selection()
    index = stage_index(stages)
    rank = {name: i for i, name in enumerate(index)}
    present = _stage_sections(config, index, {s for cls in stages for s in cls.shared})
    nodes: dict[str, Node] = {name: _node(config, name, index[name](), present, stages) for name in present}
    for node in nodes.values():  # the bound inputs' facts (e.g. the leakage guard), every node
        with _user_errors():
            node.stage.check_inputs(
                node.config, {r: nodes[u].stage.facts(nodes[u].config) for r, u in node.bindings.items()}
            )
    edges = {n.name: n.upstream for n in nodes.values()}
    nodes = {n: nodes[n] for n in order(edges, rank)}
    chosen, force, force_all = _select(config, selection, index, nodes, edges)
    # keys, cache state, actions
    for node in nodes.values():
        _key(node, nodes, code_packages)
        node.selected = node.name in chosen
        node.cached = store.exists(node.name, node.key) if store is not None else False
        # a forced node's descendants run again too: their keys cannot tell that its output changed
        forced = node.selected and (
            force_all or node.name in force or any(nodes[u].reason == "forced" for u in node.upstream)
        )
        node.action = "run" if node.selected and (forced or not node.cached) else ("cached" if node.cached else "skip")
        if node.action == "run":
            node.reason = "forced" if forced and node.cached else why_not_cached(node, store)
    _check_upstream(nodes, selection)
    for node in nodes.values():  # cluster-free checks, before anything starts
        if checks and node.action == "run":
            with _user_errors():
                node.stage.check(node.config)
    notices = list(
        dict.fromkeys(line for n in nodes.values() if n.action != "skip" for line in n.stage.notices(n.config))
    )
    return Plan(config, nodes, notices + unread_notices(nodes))


@contextlib.contextmanager
def _user_errors(nested: bool = False) -> Iterator[None]:
    """Re-raise a user error (or, with ``nested``, an error that carries one) as :func:`_user`'s
    ConfigError, without the traceback; anything else unchanged."""
    try:
        yield
    except Exception as e:
        if is_user_error(e) or (nested and find_user_error(e) is not None):
            raise _user(e) from None
        raise


def _stage_sections(config: LoadedConfig, index: dict[str, type[Stage]], shared: set[str]) -> list[str]:
    """The config's stage sections, in the stages' natural order.

    Raises:
        ConfigError: a section that is neither a stage nor a shared section, or no stage section.
    """
    for name in config.sections:
        if name not in index and name not in shared:
            raise ConfigError(
                f"{config.path}: unknown section {name!r}{nearest(name, [*index, *shared, 'run'])} "
                f"(stages: {', '.join(index)}; shared: {', '.join(sorted(shared)) or 'none'})"
            )
    present = [s for s in index if s in config.sections]
    if not present:
        raise ConfigError(f"{config.path}: no stage sections (stages: {', '.join(index)})")
    return present


def _node(config: LoadedConfig, name: str, stage: Stage, present: list[str], stages: Sequence[type[Stage]]) -> Node:
    """The node of section ``name``: its validated config (shared sections copied in), and its
    input roles (an input kind resolved over ``stages``) bound to upstream nodes.

    Raises:
        ConfigError: an invalid section, an input binding the config does not read, or a missing
            or ambiguous binding.
    """
    section, given = stage_section(config, name, stage.all_roles(), stage.shared)
    with _user_errors(nested=True):
        cfg = validate_section(name, stage.Config, section, config.path)
        roles = resolve_kinds(stage.inputs(cfg), stages)
    stray = sorted(set(given) - set(roles))
    if stray:
        raise ConfigError(
            f"{name}.{stray[0]} binds an input this {name} config does not read "
            f"(inputs: {', '.join(roles) or 'none'}); remove it"
        )
    return Node(name, stage, cfg, bind(name, roles, given, present))


def _select(
    config: LoadedConfig,
    selection: Selection,
    index: dict[str, type[Stage]],
    nodes: dict[str, Node],
    edges: dict[str, list[str]],
) -> tuple[set[str], set[str], bool]:
    """``(chosen node names, forced names, force every chosen node)`` of ``selection``.

    Raises:
        ConfigError: an unknown stage, one without a section, or a forced stage not chosen.
    """
    for s in [
        *(selection.stages or []),
        *([selection.from_stage] if selection.from_stage else []),
        *(selection.force or []),
    ]:
        if s not in index:
            raise ConfigError(f"unknown stage {s!r}{nearest(s, list(index))} (stages: {', '.join(index)})")
        if s not in nodes:
            raise ConfigError(f"stage {s!r} has no section in {config.path}")
    chosen = set(selection.stages) if selection.stages else set(nodes)
    if selection.from_stage:
        chosen &= {selection.from_stage} | descendants(edges, selection.from_stage)
    force_all = selection.force is not None and len(selection.force) == 0
    force = set(selection.force or [])
    unselected = sorted(force - chosen)
    if unselected:
        raise ConfigError(
            f"--force {' '.join(unselected)}: not among the stages this invocation runs "
            f"({', '.join(n for n in nodes if n in chosen)}); select it too"
        )
    return chosen, force, force_all


def _key(node: Node, nodes: dict[str, Node], code_packages: tuple[str, ...]) -> None:
    """Set ``node.components`` (hashed config, input keys, code fingerprint, data fingerprint)
    and ``node.key``, its digest; the upstream nodes' keys are set already."""
    with _user_errors():
        code = codehash.code_fingerprint(node.stage.code(node.config), code_packages)
        data = node.stage.fingerprint(node.config)
    node.components = {
        "config": hashed_view(node.config),
        "inputs": {role: nodes[up].key for role, up in sorted(node.bindings.items())},
        "code": code,
        "data": data,
    }
    node.key = digest(
        {
            "stage": node.name,
            "config": node.components["config"],
            "inputs": node.components["inputs"],
            "code": digest(code),
            "data": data,
        }
    )


def _check_upstream(nodes: dict[str, Node], selection: Selection) -> None:
    """Every node that runs has its upstream run or cached.

    Raises:
        ConfigError: naming the node, the missing upstream and how to select it.
    """
    for node in nodes.values():
        if node.action != "run":
            continue
        for up in node.upstream:
            if nodes[up].action == "skip":
                raise ConfigError(
                    f"stage {node.name!r} needs {up!r}, which is not cached (key {nodes[up].key[:12]}) and not "
                    + (
                        f"selected; drop --stages or add {up!r} to it"
                        if selection.stages
                        else f"selected; run from {up!r} (--from {up}) or without --from"
                    )
                )


def unread_notices(nodes: dict[str, Node]) -> list[str]:
    """A notice for each node that no other node reads and whose stage is not terminal
    (``Stage.terminal``): a section the config plans for nothing."""
    read = {up for n in nodes.values() for up in n.upstream}
    return [
        f"{n.name}: nothing in this config reads its artifact (and it is not an end in itself); "
        f"remove the {n.name!r} section, or bind a stage to it"
        for n in nodes.values()
        if n.name not in read and not n.stage.terminal(n.config)
    ]


def plan_many(
    configs: Iterable[LoadedConfig],
    stages: Sequence[type[Stage]],
    selection: Selection | None = None,
    store: Any = None,
    **kw: Any,
) -> list[Plan]:
    """:func:`plan` for each config (sweeps); ``execute`` runs each distinct key once."""
    return [plan(c, stages, selection, store, **kw) for c in configs]


def why_not_cached(node: Node, store: Any) -> str:
    """Why ``node`` has no artifact: ``new`` (the stage has none in the store), or how its key's
    components differ from the newest artifact of the stage (config keys with old -> new values,
    changed input roles, changed code files, changed data)."""
    latest = store.latest(node.name) if store is not None else None
    old = (latest or {}).get("components")
    if not old:
        return "new"
    parts = []
    cfg = _diff(old.get("config"), node.components["config"])
    if cfg:
        shown = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in cfg[:3])
        parts.append(f"config: {shown}" + (f" (+{len(cfg) - 3} more)" if len(cfg) > 3 else ""))
    roles = [r for r, k in node.components["inputs"].items() if (old.get("inputs") or {}).get(r) != k]
    if roles:
        parts.append(f"input: {', '.join(roles)}")
    oc, nc = old.get("code") or {}, node.components["code"]
    files = sorted(f for f in set(oc) | set(nc) if oc.get(f) != nc.get(f))
    if files:
        parts.append(f"code: {', '.join(files[:3])}" + (f" (+{len(files) - 3} more)" if len(files) > 3 else ""))
    if old.get("data") != node.components["data"]:
        parts.append("data")
    return "; ".join(parts) or "not in the store"


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix[:-1] or "(all)", a, b)]


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


__all__ = ["Node", "Plan", "Selection", "plan", "plan_many", "unread_notices", "why_not_cached"]
