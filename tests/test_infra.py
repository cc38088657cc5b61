"""Offline checks of the Azure deployment (``infra/*.bicep``, ``infra/main.parameters.json``,
``azure.yaml``) against the code.

No Bicep compiler is available offline, so the files are parsed with ``pycep-parser`` and the
few expressions that matter are resolved here. What the checks catch:

- a ``.bicep`` file that does not parse, a module path that does not exist, an orphan module;
- an app setting the code reads (found by parsing ``routines/config.py`` and the direct
  ``os.environ`` reads of ``function_app.py`` and what it imports) that Bicep never sets;
- identity-based storage settings that ``Settings.from_env`` cannot resolve to an identity;
- a Bicep default that differs from the code's default (both sides evaluated, nothing copied);
- queue or table names created by Bicep that differ from the names the code uses;
- settings Flex Consumption rejects, shared-key storage, local-auth Application Insights;
- a role assignment outside the least-privilege set, a resource API version nobody verified;
- azd wiring: parameters file, ``azure.yaml`` service, and (once they exist) ``host.json``'s
  extension bundle and the ``%SETTING%`` names ``function_app.py`` binds to.

Convention the checks rely on: app settings are declared in Bicep variables whose names end in
``Settings`` (``routinesSettings`` in main.bicep, ``hostStorageSettings``... in function.bicep).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from routines.config import Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
CONFIG_PY = ROOT / "routines" / "config.py"

# Read by the code but deliberately not set in Azure, with the reason.
LOCAL_ONLY_SETTINGS = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "local OTLP collector; in Azure telemetry goes to Application Insights",
}

# Read by the code, set by the platform itself (never by Bicep), with when.
PLATFORM_SETTINGS = {
    "WEBSITE_AUTH_ENABLED": "App Service sets it when its authentication is on (infra/app/easyauth.bicep)",
}

# Settings the Flex Consumption plan rejects or that would reintroduce keys.
FORBIDDEN_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_TIME_ZONE",
    "TZ",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "APPINSIGHTS_INSTRUMENTATIONKEY",
    "AzureWebJobsStorage",  # a connection string: keys; the identity form is AzureWebJobsStorage__*
}

# Built-in role definition GUIDs (identical in every tenant). Least privilege: exactly these.
EXPECTED_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
    "53ca6127-db72-4b80-b1b0-d745d6d5456d": "Azure AI User",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",  # webhook secrets (read only)
}

# Resource types and API versions checked against official templates, samples or REST specs
# (see docs/deployment.md, "What the templates use"). Add a pair here only after checking it.
VERIFIED_API_VERSIONS = {
    "Microsoft.Resources/resourceGroups": "2021-04-01",
    "Microsoft.ManagedIdentity/userAssignedIdentities": "2023-01-31",
    "Microsoft.Storage/storageAccounts": "2023-05-01",
    "Microsoft.Storage/storageAccounts/blobServices": "2023-05-01",
    "Microsoft.Storage/storageAccounts/blobServices/containers": "2023-05-01",
    "Microsoft.Storage/storageAccounts/queueServices": "2023-05-01",
    "Microsoft.Storage/storageAccounts/queueServices/queues": "2023-05-01",
    "Microsoft.Storage/storageAccounts/tableServices": "2023-05-01",
    "Microsoft.Storage/storageAccounts/tableServices/tables": "2023-05-01",
    "Microsoft.OperationalInsights/workspaces": "2023-09-01",
    "Microsoft.Insights/components": "2020-02-02",
    "Microsoft.Web/serverfarms": "2024-04-01",
    "Microsoft.Web/sites": "2024-04-01",
    "Microsoft.Web/sites/config": "2024-04-01",
    "Microsoft.Authorization/roleAssignments": "2022-04-01",
    "Microsoft.CognitiveServices/accounts": "2025-06-01",
    "Microsoft.CognitiveServices/accounts/projects": "2025-06-01",
    "Microsoft.KeyVault/vaults": "2023-07-01",
}

EXTENSION_BUNDLE_ID = "Microsoft.Azure.Functions.ExtensionBundle"
EXTENSION_BUNDLE_VERSION = "[4.*, 5.0.0)"

ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
AZD_REFERENCE = re.compile(r"^\$\{([A-Z0-9_]+)(?:=([^}]*))?\}$")

_PARSER = BicepParser()


# ------------------------------------------------------------------------------------------------
# Reading Bicep
# ------------------------------------------------------------------------------------------------


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


@functools.cache
def parse(path: Path) -> dict[str, Any]:
    tree: dict[str, Any] = dict(_PARSER.parse(file_path=path))
    return tree


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _is_expression(node: Any) -> bool:
    """pycep renders operators and function calls as one-key dicts; anything else is an object."""
    return isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("operator", "function")


def _key(raw: str) -> str:
    return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == "'" else raw


def object_literals(node: Any) -> Iterator[dict[str, Any]]:
    """Every object literal in an expression (both arms of a conditional, every union argument)."""
    if _is_expression(node):
        for part in next(iter(node.values())).values():  # {"type": ..., "operands"/"parameters": {...}}
            if isinstance(part, dict):
                for value in part.values():
                    yield from object_literals(value)
    elif isinstance(node, dict):
        yield node
        for value in node.values():
            yield from object_literals(value)
    elif isinstance(node, list):
        for value in node:
            yield from object_literals(value)


def identifiers(node: Any) -> Iterator[str]:
    """Every bare string in an expression (identifiers and literals alike)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from identifiers(value)
    elif isinstance(node, list):
        for value in node:
            yield from identifiers(value)


@functools.cache
def app_settings() -> dict[str, tuple[str, Any]]:
    """Setting name -> (file, raw value) over every ``*Settings`` variable of every file.
    Interpolated names (``'${x}__clientId'``) are skipped: they depend on parameters."""
    found: dict[str, tuple[str, Any]] = {}
    for path in bicep_files():
        for var_name, var in parse(path).get("variables", {}).items():
            if not var_name.endswith("Settings"):
                continue
            for literal in object_literals(var["value"]):
                for raw_key, value in literal.items():
                    key = _key(raw_key)
                    if "${" not in key:
                        found[key] = (_rel(path), value)
    return found


def resources(path: Path) -> dict[str, dict[str, Any]]:
    """Resources of a file, each with its ``config`` unwrapped from loops and conditions."""
    out = {}
    for name, resource in parse(path).get("resources", {}).items():
        config = resource["config"]
        while "config" in config and ("loop_type" in config or "condition" in config):
            config = config["config"]
        out[name] = {**resource, "config": config}
    return out


def modules(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name, module in parse(path).get("modules", {}).items():
        config = module["config"]
        if "condition" in config and "config" in config:
            config = config["config"]
        out[name] = {**module, "config": config}
    return out


class Unresolved(Exception):
    """The expression depends on something only known at deployment time."""


def resolve(node: Any, scope: dict[str, Any]) -> Any:
    """Evaluate the constant part of a Bicep expression: identifiers bound in ``scope``,
    ``'${x}'`` interpolation, literals, ``string(x)``. pycep does not tell identifiers from
    string literals apart, so a bare string bound in ``scope`` is taken as a reference."""
    if isinstance(node, str):
        if node in scope:
            return scope[node]
        if "${" in node:

            def substitute(match: re.Match[str]) -> str:
                if match.group(1) not in scope:
                    raise Unresolved(node)
                return _bicep_string(scope[match.group(1)])

            return INTERPOLATION.sub(substitute, node)
        return node
    if node is None or isinstance(node, bool | int):
        return node
    if isinstance(node, list):
        return [resolve(item, scope) for item in node]
    if _is_expression(node) and "function" in node and node["function"]["type"] == "string":
        (argument,) = node["function"]["parameters"].values()
        return _bicep_string(resolve(argument, scope))
    raise Unresolved(json.dumps(node)[:200])


def _bicep_string(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def file_scope(path: Path, bound: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters of ``path`` (``bound`` values, else literal defaults) and its resolvable vars."""
    tree = parse(path)
    scope: dict[str, Any] = {}
    for name, param in tree.get("parameters", {}).items():
        if bound is not None and name in bound:
            scope[name] = bound[name]
        elif not isinstance(param.get("default"), dict | type(None)):
            scope[name] = param["default"]
    for name, var in tree.get("variables", {}).items():
        with contextlib.suppress(Unresolved):
            scope[name] = resolve(var["value"], scope)
    return scope


def module_scope(module_file: str) -> tuple[Path, dict[str, Any]]:
    """Scope of a module as main.bicep calls it with its defaults."""
    main_scope = file_scope(MAIN)
    wanted = (INFRA / module_file).resolve()
    for module in modules(MAIN).values():
        path = (MAIN.parent / module["detail"]["path"]).resolve()
        if path == wanted:
            bound = {}
            for name, value in module["config"].get("params", {}).items():
                with contextlib.suppress(Unresolved):
                    bound[name] = resolve(value, main_scope)
            return path, file_scope(path, bound)
    raise AssertionError(f"main.bicep does not call {module_file}")


def one_resource(path: Path, type_: str) -> dict[str, Any]:
    matching = [r for r in resources(path).values() if r["type"] == type_ and not r["existing"]]
    assert len(matching) == 1, f"{_rel(path)}: expected one {type_}, found {len(matching)}"
    return matching[0]


# ------------------------------------------------------------------------------------------------
# Reading the code
# ------------------------------------------------------------------------------------------------


_ENV_READERS = ("os.environ.get", "os.environ.setdefault", "os.getenv", "environ.get")


def _direct_env_reads(tree: ast.AST) -> Iterator[str]:
    """Names read with ``os.environ.get("X")``, ``os.environ.setdefault("X", ...)``,
    ``os.getenv("X")`` or ``os.environ["X"]``."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in _ENV_READERS
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            yield str(node.args[0].value)
        if (
            isinstance(node, ast.Subscript)
            and ast.unparse(node.value) == "os.environ"
            and isinstance(node.slice, ast.Constant)
        ):
            yield str(node.slice.value)


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@functools.cache
def azure_modules() -> tuple[Path, ...]:
    """Files that run in Azure: function_app.py and the ``routines`` modules it imports,
    transitively (local tools such as the devhost are not imported, so not included)."""
    start = ROOT / "function_app.py"
    todo = [start if start.exists() else CONFIG_PY]
    seen: dict[Path, None] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            dotted: list[str] = []
            if isinstance(node, ast.Import):
                dotted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = path.parent.relative_to(ROOT).parts
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                dotted = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            for name in dotted:
                parts = name.split(".")
                if parts[0] != "routines":
                    continue
                for depth in range(1, len(parts) + 1):  # the packages on the way are imported too
                    found = _module_file(".".join(parts[:depth]))
                    if found is not None:
                        todo.append(found)
    return tuple(seen)


@functools.cache
def code_setting_names() -> frozenset[str]:
    """Every environment-variable name the deployed app reads: the UPPER_SNAKE string literals
    of routines/config.py (the settings module), plus direct ``os.environ`` reads in the files
    that run in Azure (``azure_modules``)."""
    names = {
        node.value
        for node in ast.walk(ast.parse(CONFIG_PY.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ENV_NAME.match(node.value)
    }
    for path in azure_modules():
        names.update(_direct_env_reads(ast.parse(path.read_text(encoding="utf-8"))))
    return frozenset(names)


@functools.cache
def code_table_suffixes() -> frozenset[str]:
    """Table-name suffixes the code appends to the prefix: ``f"{prefix}Runs"`` or ``prefix + "Runs"``."""
    suffixes = set()
    for path in (ROOT / "routines").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr) and len(node.values) == 2:
                head, tail = node.values
                if (
                    isinstance(head, ast.FormattedValue)
                    and ast.unparse(head.value).endswith("prefix")
                    and isinstance(tail, ast.Constant)
                    and re.fullmatch(r"[A-Z][A-Za-z0-9]*", str(tail.value))
                ):
                    suffixes.add(str(tail.value))
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Add)
                and ast.unparse(node.left).endswith("prefix")
                and isinstance(node.right, ast.Constant)
                and re.fullmatch(r"[A-Z][A-Za-z0-9]*", str(node.right.value))
            ):
                suffixes.add(str(node.right.value))
    return frozenset(suffixes)


def code_defaults() -> Settings:
    """The code's own defaults: settings with nothing but a storage connection."""
    return Settings.from_env({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})


def bicep_environment() -> dict[str, str]:
    """The app settings as the deployed app would see them with every parameter at its default.
    Values only known at deployment (endpoints, client id) become a placeholder naming the
    expression, so two settings bound to the same expression get the same value."""
    scopes = {"infra/main.bicep": file_scope(MAIN)}
    scopes["infra/app/function.bicep"] = module_scope("app/function.bicep")[1]
    env = {}
    for name, (file, raw) in app_settings().items():
        try:
            env[name] = _bicep_string(resolve(raw, scopes.get(file, {})))
        except Unresolved:
            env[name] = f"https://deploy-time.invalid/{json.dumps(raw, sort_keys=True)}"
    return env


# ------------------------------------------------------------------------------------------------
# (1) Parsing
# ------------------------------------------------------------------------------------------------


def test_infra_has_main_and_modules() -> None:
    assert MAIN.exists()
    assert len(bicep_files()) > 1


@pytest.mark.parametrize("path", bicep_files(), ids=_rel)
def test_bicep_file_parses(path: Path) -> None:
    tree = parse(path)
    assert tree.get("resources") or tree.get("modules"), f"{_rel(path)} declares nothing"


def test_every_module_path_exists_and_every_module_is_used() -> None:
    used = set()
    for path in bicep_files():
        for name, module in modules(path).items():
            assert module["type"] == "local", (
                f"{_rel(path)}: module {name} is not local (needs network restore)"
            )
            target = (path.parent / module["detail"]["path"]).resolve()
            assert target.exists(), (
                f"{_rel(path)}: module {name} points at missing {module['detail']['path']}"
            )
            used.add(target)
    orphans = {_rel(p) for p in bicep_files() if p != MAIN and p.resolve() not in used}
    assert not orphans, f"modules nobody deploys: {sorted(orphans)}"


def test_only_verified_api_versions() -> None:
    unverified = set()
    for path in bicep_files():
        for name, resource in resources(path).items():
            if VERIFIED_API_VERSIONS.get(resource["type"]) != resource["api_version"]:
                unverified.add(f"{_rel(path)}: {name} {resource['type']}@{resource['api_version']}")
    assert not unverified, f"API versions not in the verified list: {sorted(unverified)}"


# ------------------------------------------------------------------------------------------------
# (2) Every setting the code reads is set
# ------------------------------------------------------------------------------------------------


def test_code_setting_discovery_finds_the_spec_settings() -> None:
    # Guards the discovery itself: if it found nothing, the next test would pass vacuously.
    assert CONFIG_PY in azure_modules()
    assert {"ROUTINES_QUEUE_NAME", "ROUTINES_TABLE_PREFIX", "APPLICATIONINSIGHTS_CONNECTION_STRING"} <= (
        code_setting_names()
    )


def test_every_setting_the_code_reads_is_set_in_bicep() -> None:
    stale = set(LOCAL_ONLY_SETTINGS) - code_setting_names()
    assert not stale, f"LOCAL_ONLY_SETTINGS lists settings the code no longer reads: {sorted(stale)}"
    missing = code_setting_names() - set(LOCAL_ONLY_SETTINGS) - set(PLATFORM_SETTINGS) - set(app_settings())
    assert not missing, f"the code reads settings no Bicep *Settings variable sets: {sorted(missing)}"


def test_identity_storage_settings_resolve_in_the_code() -> None:
    env = bicep_environment()
    settings = Settings.from_env(env)  # raises SettingsError when the connection cannot resolve
    storage = settings.storage
    assert storage.uses_identity, "storage resolved to a connection string: keys in app settings"
    assert storage.table_endpoint and storage.queue_endpoint and storage.blob_endpoint
    assert storage.client_id, "no <connection>__clientId: the host would not pick the user-assigned identity"
    assert storage.client_id == settings.azure_client_id, (
        "AZURE_CLIENT_ID and the storage clientId come from different expressions"
    )
    assert env.get("AzureWebJobsStorage__credential") == "managedidentity"


def test_application_insights_settings_authenticate_with_the_identity() -> None:
    settings = app_settings()
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in settings
    client_id = settings["AZURE_CLIENT_ID"][1]
    assert isinstance(client_id, str), "AZURE_CLIENT_ID should be the identity's client id parameter"
    assert (
        settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"][1]
        == f"ClientId=${{{client_id}}};Authorization=AAD"
    )


def test_no_setting_flex_consumption_rejects_or_that_carries_keys() -> None:
    present = FORBIDDEN_SETTINGS & set(app_settings())
    assert not present, f"settings Flex Consumption rejects or that carry keys: {sorted(present)}"


# ------------------------------------------------------------------------------------------------
# (3) Names and defaults agree with the code
# ------------------------------------------------------------------------------------------------


def test_bicep_defaults_match_code_defaults() -> None:
    deployed = Settings.from_env(bicep_environment())
    expected = code_defaults()
    # app_settings is the snapshot of every setting (for webhook secret_setting names), not a default.
    platform = {
        "storage",
        "appinsights_connection_string",
        "azure_client_id",
        "otlp_endpoint",
        "app_settings",
    }
    differing = {
        field.name: (getattr(deployed, field.name), getattr(expected, field.name))
        for field in dataclasses.fields(Settings)
        if field.name not in platform and getattr(deployed, field.name) != getattr(expected, field.name)
    }
    assert not differing, f"Bicep default vs code default: {differing}"


def test_queues_created_by_bicep_are_the_code_queues() -> None:
    path, scope = module_scope("app/storage.bicep")
    names = {
        resolve(r["config"]["name"], scope)
        for r in resources(path).values()
        if r["type"] == "Microsoft.Storage/storageAccounts/queueServices/queues"
    }
    code = code_defaults()
    assert names == {code.queue_name, code.poison_queue_name}


def test_tables_created_by_bicep_are_the_code_tables() -> None:
    suffixes = code_table_suffixes()
    assert {"Routines", "Runs"} <= suffixes, f"table names not found in routines/ (found {sorted(suffixes)})"
    path, scope = module_scope("app/storage.bicep")
    names = set()
    for resource in parse(path)["resources"].values():
        if resource["type"] != "Microsoft.Storage/storageAccounts/tableServices/tables":
            continue
        config = resource["config"]
        if "loop_type" in config:
            detail = config["loop_type"]["detail"]
            for item in resolve(detail["array_name"], scope):
                names.add(resolve(config["config"]["name"], {**scope, detail["item_name"]: item}))
        else:
            names.add(resolve(config["name"], scope))
    prefix = code_defaults().table_prefix
    assert names == {prefix + suffix for suffix in suffixes}


# ------------------------------------------------------------------------------------------------
# Shape of the deployment
# ------------------------------------------------------------------------------------------------


def test_function_app_is_flex_consumption_python_311_with_its_identity() -> None:
    path, scope = module_scope("app/function.bicep")
    plan = one_resource(path, "Microsoft.Web/serverfarms")["config"]
    assert plan["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    assert plan["properties"]["reserved"] is True
    site = one_resource(path, "Microsoft.Web/sites")["config"]
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    tags = [literal for literal in object_literals(site["tags"]) if "'azd-service-name'" in literal]
    assert tags and tags[0]["'azd-service-name'"] == "api"
    config = site["properties"]["functionAppConfig"]
    assert resolve(config["runtime"]["name"], scope) == "python"
    assert resolve(config["runtime"]["version"], scope) == "3.11"
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"]["type"] == "UserAssignedIdentity"
    assert resolve(config["scaleAndConcurrency"]["instanceMemoryMB"], scope) == 2048
    assert "maximumInstanceCount" in config["scaleAndConcurrency"]


def test_storage_has_no_shared_keys_and_no_public_blobs() -> None:
    account = one_resource(INFRA / "app" / "storage.bicep", "Microsoft.Storage/storageAccounts")["config"]
    properties = account["properties"]
    assert properties["allowSharedKeyAccess"] is False
    assert properties["allowBlobPublicAccess"] is False
    assert properties["minimumTlsVersion"] == "TLS1_2"
    assert properties["supportsHttpsTrafficOnly"] is True


def test_application_insights_is_workspace_based_and_entra_only() -> None:
    component = one_resource(INFRA / "app" / "monitoring.bicep", "Microsoft.Insights/components")["config"]
    assert component["properties"]["DisableLocalAuth"] is True
    assert component["properties"]["WorkspaceResourceId"]


def _role_guids(path: Path, role_definition: Any, loop: dict[str, Any] | None) -> set[str]:
    """Role definition GUIDs a roleAssignments resource grants: a literal, a variable, or the
    ``id`` of each item of the list variable(s) the resource loops over."""
    variables = parse(path).get("variables", {})
    argument = role_definition["function"]["parameters"]["resource_name_1"]
    if isinstance(argument, str) and GUID.match(argument):
        return {argument}
    if isinstance(argument, str) and argument in variables and isinstance(variables[argument]["value"], str):
        return {variables[argument]["value"]}
    if loop is not None:
        lists = [name for name in identifiers(loop["detail"]["array_name"]) if name in variables]
        guids = {
            literal["id"]
            for name in lists
            for literal in object_literals(variables[name]["value"])
            if isinstance(literal.get("id"), str)
        }
        if guids:
            return guids
    raise AssertionError(f"{_rel(path)}: cannot tell which role {json.dumps(argument)} grants")


def test_role_assignments_are_exactly_the_least_privilege_set() -> None:
    assigned: dict[str, set[str]] = {}
    for path in bicep_files():
        for name, resource in parse(path).get("resources", {}).items():
            if resource["type"] != "Microsoft.Authorization/roleAssignments":
                continue
            config = resource["config"]
            loop = config.get("loop_type")
            while "config" in config and ("loop_type" in config or "condition" in config):
                config = config["config"]
            for guid in _role_guids(path, config["properties"]["roleDefinitionId"], loop):
                assigned.setdefault(guid, set()).add(f"{_rel(path)}:{name}")
    unexpected = {g: sorted(where) for g, where in assigned.items() if g not in EXPECTED_ROLES}
    assert not unexpected, f"roles outside the least-privilege set: {unexpected}"
    missing = {EXPECTED_ROLES[g] for g in set(EXPECTED_ROLES) - set(assigned)}
    assert not missing, f"roles the app needs but Bicep never assigns: {sorted(missing)}"


# ------------------------------------------------------------------------------------------------
# azd wiring
# ------------------------------------------------------------------------------------------------


def test_azd_parameters_file_matches_main_bicep() -> None:
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    declared = parse(MAIN)["parameters"]
    unknown = set(parameters) - set(declared)
    assert not unknown, f"main.parameters.json sets parameters main.bicep does not declare: {sorted(unknown)}"
    required = {name for name, p in declared.items() if p.get("default") is None}
    assert required <= set(parameters), (
        f"required parameters azd cannot fill: {sorted(required - set(parameters))}"
    )
    references = {}
    for name, entry in parameters.items():
        match = AZD_REFERENCE.match(str(entry["value"]))
        assert match, f"{name}: expected a ${{VAR}} or ${{VAR=default}} reference, got {entry['value']!r}"
        references[name] = match.groups()
    assert references["environmentName"][0] == "AZURE_ENV_NAME"
    assert references["location"][0] == "AZURE_LOCATION"
    assert references["principalId"][0] == "AZURE_PRINCIPAL_ID"
    main_settings = {key: raw for key, (file, raw) in app_settings().items() if file == "infra/main.bicep"}
    for name, (variable, default) in references.items():
        if default is not None:  # azd's default must be Bicep's default
            assert default == _bicep_string(declared[name]["default"]), f"{name}: {default!r}"
        if variable.startswith("ROUTINES_"):  # `azd env set ROUTINES_X` must feed setting ROUTINES_X
            assert main_settings.get(variable) == name, f"{variable} does not feed app setting {variable}"


def _yaml_mapping(text: str) -> dict[str, Any]:
    """Enough YAML for azure.yaml: nested ``key: value`` mappings by indentation."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict[str, Any]]] = [(-1, root)]
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        if value.strip():
            stack[-1][1][key] = value.strip().strip("'\"")
        else:
            child: dict[str, Any] = {}
            stack[-1][1][key] = child
            stack.append((indent, child))
    return root


def test_azure_yaml_deploys_the_repo_as_the_api_function_service() -> None:
    config = _yaml_mapping((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert config["services"] == {"api": {"project": ".", "language": "python", "host": "function"}}


def test_host_json_uses_extension_bundle_4() -> None:
    host = ROOT / "host.json"
    if not host.exists():
        pytest.skip("host.json does not exist yet")
    bundle = json.loads(host.read_text(encoding="utf-8")).get("extensionBundle", {})
    assert bundle.get("id") == EXTENSION_BUNDLE_ID
    assert bundle.get("version") == EXTENSION_BUNDLE_VERSION


def test_binding_expressions_in_function_app_name_settings_bicep_sets() -> None:
    app = ROOT / "function_app.py"
    if not app.exists():
        pytest.skip("function_app.py does not exist yet")
    names = set()
    for node in ast.walk(ast.parse(app.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(re.findall(r"%([A-Za-z_][A-Za-z0-9_]*)%", node.value))
    missing = names - set(app_settings())
    assert not missing, f"function_app.py binds to %SETTING%s Bicep does not set: {sorted(missing)}"


# ------------------------------------------------------------------------------------------------
# (5) The Foundry drop-in is off, or behind App Service Authentication: never open in Azure
# ------------------------------------------------------------------------------------------------


def test_foundry_api_is_off_by_default_and_has_no_unauthenticated_choice() -> None:
    param = parse(MAIN)["parameters"]["foundryApi"]
    allowed = next(d["argument"] for d in param["decorators"] if d["type"] == "allowed")
    assert param["default"] == "off" and sorted(allowed) == ["entra", "off"]  # "open" is local only
    assert app_settings()["ROUTINES_FOUNDRY_API"] == ("infra/main.bicep", "foundryApi")
    assert Settings.from_env(bicep_environment()).foundry_api == "off"


def test_entra_deploys_app_service_authentication_and_fails_without_a_client_id() -> None:
    (module,) = [m for m in modules(MAIN).values() if m["detail"]["path"] == "./app/easyauth.bicep"]
    condition = parse(MAIN)["modules"]["foundryAuth"]["config"]["condition"]["operator"]
    assert condition == {"type": "equals", "operands": {"operand_1": "foundryApi", "operand_2": "entra"}}
    assert module["config"]["params"]["clientId"] == "foundryApiClientId"
    path = INFRA / "app" / "easyauth.bicep"
    client_id = parse(path)["parameters"]["clientId"]
    assert client_id["default"] is None  # required, and a GUID's length: empty fails the deployment
    assert {d["type"]: d["argument"] for d in client_id["decorators"]}.get("min_length") == 36
    auth = one_resource(path, "Microsoft.Web/sites/config")["config"]
    assert auth["name"] == "authsettingsV2" and auth["properties"]["platform"]["enabled"] is True
    entra = auth["properties"]["identityProviders"]["azureActiveDirectory"]
    assert entra["enabled"] is True and entra["registration"]["clientId"] == "clientId"
    assert "${tenant().tenantId}" in entra["registration"]["openIdIssuer"]  # this tenant's tokens only
    # Optional for the app as a whole: function keys and webhook signatures still serve the other
    # routes, and /api/foundry refuses callers without a validated principal itself.
    assert auth["properties"]["globalValidation"] == {
        "requireAuthentication": False,
        "unauthenticatedClientAction": "AllowAnonymous",
    }
