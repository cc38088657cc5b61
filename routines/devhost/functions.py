"""The app's functions, read from ``function_app.py``'s decorators, and a count of work in flight."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from types import ModuleType
from typing import Any

import azure.functions as func

from routines.devhost.settings import DevHostError

log = logging.getLogger("routines.devhost")


@dataclass(frozen=True)
class FunctionSpec:
    """One function of the app: its name, trigger binding (``get_dict_repr()``) and Python callable."""

    name: str
    trigger: Mapping[str, Any]
    user_function: Callable[..., Any]

    @property
    def trigger_type(self) -> str:
        return str(self.trigger.get("type"))

    @property
    def arg_name(self) -> str:
        return str(self.trigger["name"])

    def invoke(self, value: object) -> Any:
        """Call the function with the trigger value as its binding-named argument; awaits coroutines."""
        result = self.user_function(**{self.arg_name: value})
        if inspect.isawaitable(result):
            return asyncio.run(_await(result))
        return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


SUPPORTED_TRIGGERS = ("httpTrigger", "timerTrigger", "queueTrigger")


def load_app_module(app_dir: Path) -> ModuleType:
    """Import ``function_app.py`` of ``app_dir`` afresh (the app dir goes first on ``sys.path``)."""
    path = app_dir / "function_app.py"
    if not path.exists():
        raise DevHostError(f"{path} not found: --app-dir must be the folder holding function_app.py")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    spec = importlib_util.spec_from_file_location("function_app", path)
    if spec is None or spec.loader is None:
        raise DevHostError(f"cannot import {path}")
    module = importlib_util.module_from_spec(spec)
    sys.modules["function_app"] = module
    spec.loader.exec_module(module)
    return module


def find_function_app(module: ModuleType) -> func.FunctionApp:
    """The module's ``app``, or else its only ``FunctionApp`` instance."""
    app = getattr(module, "app", None)
    if isinstance(app, func.FunctionApp):
        return app
    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionApp)]
    if len(apps) != 1:
        raise DevHostError(f"{module.__file__}: expected one azure.functions.FunctionApp named 'app'")
    return apps[0]


def discover_functions(app: func.FunctionApp, env: Mapping[str, str]) -> list[FunctionSpec]:
    """The app's functions, from its decorators; ``get_functions()`` is called once, here.

    Functions disabled with the ``AzureWebJobs.<name>.Disabled`` setting are left out.
    Raises ``DevHostError`` for what this host cannot run: other trigger types, input or output
    bindings besides the HTTP return value, or parameters that no binding fills.
    """
    specs = []
    for function in app.get_functions():
        name = function.get_function_name() or function.get_user_function().__name__
        if env.get(f"AzureWebJobs.{name}.Disabled", "").lower() in ("true", "1"):
            log.info("function %s is disabled by AzureWebJobs.%s.Disabled", name, name)
            continue
        trigger = function.get_trigger()
        if trigger is None:
            raise DevHostError(f"function {name} has no trigger")
        trigger_dict = dict(trigger.get_dict_repr())
        spec = FunctionSpec(name, trigger_dict, function.get_user_function())
        if spec.trigger_type not in SUPPORTED_TRIGGERS:
            raise DevHostError(
                f"function {name}: trigger type {spec.trigger_type} is not supported by the devhost "
                f"(only {', '.join(SUPPORTED_TRIGGERS)})"
            )
        for binding in function.get_bindings():
            binding_dict = binding.get_dict_repr()
            if binding_dict.get("name") == spec.arg_name:
                continue
            if binding_dict.get("type") == "http" and binding_dict.get("name") == "$return":
                continue
            raise DevHostError(
                f"function {name}: binding {binding_dict.get('name')!r} of type {binding_dict.get('type')} "
                "is not supported by the devhost (only the trigger and the HTTP return value)"
            )
        _check_parameters(spec)
        specs.append(spec)
    return specs


def _check_parameters(spec: FunctionSpec) -> None:
    try:
        parameters = inspect.signature(spec.user_function).parameters
    except (TypeError, ValueError):
        return
    if spec.arg_name not in parameters and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        raise DevHostError(
            f"function {spec.name}: its trigger binding is named {spec.arg_name!r} "
            f"but the Python function has no parameter of that name"
        )
    unfilled = [
        p.name
        for p in parameters.values()
        if p.name != spec.arg_name
        and p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if unfilled:
        raise DevHostError(f"function {spec.name}: no binding fills parameter(s) {', '.join(unfilled)}")


class _InFlight:
    """Counts work in progress; lets a caller wait until it drops to a level."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def enter(self) -> None:
        with self._changed:
            self._count += 1

    def leave(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_at_most(
        self, level: int, timeout: float | None = None, stop: threading.Event | None = None
    ) -> bool:
        """Wait until at most ``level`` are in flight (or ``stop`` is set). True when reached."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._count > level:
                if stop is not None and stop.is_set():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Short waits so a set ``stop`` is noticed without a notify.
                self._changed.wait(0.1 if remaining is None else min(remaining, 0.1))
            return True
