"""Python client of the Routines agent scheduler's HTTP API, and the ``routines`` CLI.

    from azure.core.credentials import AzureKeyCredential
    from routines_client import RoutinesClient, RoutineScheduleTrigger, RoutineInvocationAction

    client = RoutinesClient("https://<app>.azurewebsites.net", AzureKeyCredential("<function key>"))
    routine = client.create_routine(
        name="daily-compliance-scan",
        trigger=RoutineScheduleTrigger(cron_expression="0 6 * * *", time_zone="Europe/Paris"),
        actions=[RoutineInvocationAction(agent_id="asst_abc123", input="Scan overnight logs")],
    )
    for run in client.list_routine_runs(routine_id=routine.id):
        print(run.id, run.status)

``routines_client.aio`` has the same client for asyncio.
"""

from routines_client._client import RoutinesClient
from routines_client._errors import (
    ConflictError,
    FieldError,
    NotFoundError,
    PreconditionFailedError,
    RoutinesError,
    ValidationError,
)
from routines_client._models import (
    Routine,
    RoutineAction,
    RoutineApprovalStep,
    RoutineConcurrency,
    RoutineInvocationAction,
    RoutineRateLimit,
    RoutineResponseAction,
    RoutineRetryPolicy,
    RoutineRun,
    RoutineRunStep,
    RoutineScheduleTrigger,
    RoutineTimerTrigger,
    RoutineTrigger,
    RoutineWebhookTrigger,
)
from routines_client._version import VERSION

__version__ = VERSION
__all__ = [
    "ConflictError",
    "FieldError",
    "NotFoundError",
    "PreconditionFailedError",
    "Routine",
    "RoutineAction",
    "RoutineApprovalStep",
    "RoutineConcurrency",
    "RoutineInvocationAction",
    "RoutineRateLimit",
    "RoutineResponseAction",
    "RoutineRetryPolicy",
    "RoutineRun",
    "RoutineRunStep",
    "RoutineScheduleTrigger",
    "RoutineTimerTrigger",
    "RoutineTrigger",
    "RoutineWebhookTrigger",
    "RoutinesClient",
    "RoutinesError",
    "ValidationError",
]
